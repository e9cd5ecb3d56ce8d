"""Learning-rate schedules and the batch-size ramp: pure functions of the optimizer step.

Being pure, they need no state of their own to resume: the step alone fixes the value.
"""

from __future__ import annotations

import math


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warmup from 1/warmup to 1 over the first warmup_steps steps (step counts from 0)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def wsd_lr(
    step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int, decay_fraction: float
) -> float:
    """Warmup-stable-decay: warmup, hold lr, then decay linearly to min_lr over the last
    decay_fraction of the run."""
    if step < warmup_steps:
        return lr * warmup_factor(step, warmup_steps)
    decay_steps = max(1, round(decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    return lr + progress * (min_lr - lr)


def inverse_sqrt_lr(step: int, lr: float, warmup_steps: int) -> float:
    """lr * min(t / t_warmup, sqrt(t_warmup / t)) with t = step + 1 (Vaswani et al.)."""
    t = step + 1
    w = max(1, warmup_steps)
    return lr * min(t / w, math.sqrt(w / t))


def constant_lr(step: int, lr: float, warmup_steps: int) -> float:
    return lr * warmup_factor(step, warmup_steps)


def lr_at(step: int, train_cfg) -> float:
    """The learning rate for optimizer step `step` under a TrainConfig."""
    c = train_cfg
    if c.schedule == "cosine":
        return cosine_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps)
    if c.schedule == "wsd":
        return wsd_lr(step, c.lr, c.min_lr, c.warmup_steps, c.max_steps, c.decay_fraction)
    if c.schedule == "inverse_sqrt":
        return inverse_sqrt_lr(step, c.lr, c.warmup_steps)
    return constant_lr(step, c.lr, c.warmup_steps)


def accum_steps_at(step: int, max_accum: int, ramp_interval: int) -> int:
    """Batch-size ramp: 1 accumulation step, doubled every ramp_interval steps up to max_accum.
    ramp_interval 0 means no ramp (always max_accum)."""
    if ramp_interval <= 0:
        return max_accum
    return min(max_accum, 2 ** (step // ramp_interval))
