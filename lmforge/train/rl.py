"""The arithmetic of reinforcement learning from a reward: advantages (GAE for PPO, group
normalisation for GRPO), whitening, and the adaptive KL coefficient. Pure tensor functions,
tested against hand-written loops.

Shapes: N answers, R answer tokens (right-padded); mask (N, R) is 1 on real answer tokens.
"""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each answer's tokens:
    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, with V and A
    zero after the answer's last token. rewards, values, mask (N, R) -> (advantages, returns
    = advantages + values), both (N, R) and zero on padding."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (N,)
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x (N, R) shifted and scaled to mean 0 and variance 1 over the masked entries (zero
    elsewhere)."""
    mask = mask.to(x.dtype)
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = ((x - mean) ** 2 * mask).sum() / n
    return (x - mean) * torch.rsqrt(var + eps) * mask


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each answer's score minus its group's mean, over the group's
    standard deviation (answers to one prompt are consecutive, group_size of them).
    scores (N,) -> (N,). A group whose answers all score the same gets 0 everywhere."""
    groups = scores.view(-1, group_size)  # (N / G, G)
    mean = groups.mean(-1, keepdim=True)
    std = groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).flatten()


class AdaptiveKL:
    """The KL coefficient of Ziegler et al. 2019: after each rollout of n answers whose mean
    KL to the reference was `kl`, beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon.
    With target 0 beta stays fixed."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target > 0:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n / self.horizon
