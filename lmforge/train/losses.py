"""Training objectives: what the one Trainer minimises. Every method (pretraining, SFT,
classification, reward model, DPO, ...) is one of these plus its data.

The contract, `LossFn`:
- `units(batch)` -> how many units the loss averages over (target tokens, pairs, ...), a
  0-d tensor known before any forward pass. The Trainer sums it over all micro-batches and
  ranks of a step first, then back-propagates each micro-batch's loss divided by that total,
  so accumulation and DDP give the gradient of one big batch even when micro-batches hold
  different numbers of units, and a micro-batch with no units (every label -100) adds
  nothing instead of a NaN.
- `loss_fn(model, batch)` -> (sum of the per-unit losses, metrics). metrics["tokens"] is
  the number of tokens the forward processed (for tokens/s); any other metric is a sum over
  the batch's units, logged as its per-unit mean (e.g. "correct" -> accuracy).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

Batch = dict[str, torch.Tensor]


class LossFn(Protocol):
    def units(self, batch: Batch) -> torch.Tensor: ...

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]: ...


class CausalLMLoss:
    """Next-token cross-entropy summed over target tokens; labels are already shifted and
    -100 marks positions without loss (prompt, padding)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def units(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        )  # (B, T, V)
        labels = batch["labels"]  # (B, T)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )
        return loss, {"tokens": batch["input_ids"].numel()}


class ClassificationLoss:
    """Cross-entropy of a sequence classifier (B, C) against batch["label"] (B,), summed over
    examples; metrics["accuracy"] counts the correct ones (logged as the accuracy)."""

    def units(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["label"].numel())

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, C)
        loss = F.cross_entropy(logits.float(), batch["label"], reduction="sum")
        correct = (logits.argmax(-1) == batch["label"]).sum()
        return loss, {"tokens": batch["attention_mask"].sum(), "accuracy": correct}


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of log p(label) over each row's labelled positions: logits (B, T, V) in any
    dtype, labels (B, T) already shifted, -100 where nothing is scored."""
    scored = labels != -100
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    picked = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
    return (picked * scored).sum(-1)


def sequence_kl(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(B,) KL(p || q) of the next-token distributions (logits (B, T, V) each), summed over
    each row's labelled positions."""
    logp = F.log_softmax(logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    return (kl * (labels != -100)).sum(-1)


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """(B,) per-pair loss from sequence log-probabilities (B,) each. With h the chosen's
    log-ratio to the reference minus the rejected's:
    - sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta * h);
    - ipo (Azar et al. 2023): (h - 1 / (2 beta))^2;
    - hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta * h)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"loss_type {loss_type!r} is not one of {DPO_LOSS_TYPES}")


class DPOLoss:
    """Direct preference optimisation on batches of B pairs laid out as 2B rows (the chosen
    conversations, then the rejected: one forward for both; lmforge/data/preference.py).
    The frozen reference scores the same rows without gradients. Units are pairs.

    Metrics (per pair): accuracy (the chosen's implicit reward beta * log-ratio is above the
    rejected's), margin (their difference), kl (KL(policy || reference) of the next-token
    distributions summed over the chosen answer's tokens, teacher-forced; nats per answer)."""

    def __init__(self, reference: nn.Module, beta: float, loss_type: str = "sigmoid"):
        self.reference = reference.eval().requires_grad_(False)
        self.beta, self.loss_type = beta, loss_type

    def units(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].size(0) // 2)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        B = ids.size(0) // 2
        logits = model(ids, attention_mask=mask)  # (2B, T, V)
        policy = sequence_logprobs(logits, labels)  # (2B,)
        with torch.no_grad():
            self.reference.to(ids.device)
            ref_logits = self.reference(ids, attention_mask=mask)  # (2B, T, V)
            ref = sequence_logprobs(ref_logits, labels)
            kl = sequence_kl(logits[:B].detach(), ref_logits[:B], labels[:B])  # (B,)
        losses = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], self.beta, self.loss_type)
        reward = (self.beta * (policy - ref)).detach()  # (2B,) implicit rewards
        metrics = {
            "tokens": ids.numel(),
            "accuracy": (reward[:B] > reward[B:]).sum(),
            "margin": (reward[:B] - reward[B:]).sum(),
            "kl": kl.sum(),
        }
        return losses.sum(), metrics


class RewardLoss:
    """Bradley-Terry loss of a reward model (B scores per forward of 2B rows, the chosen
    conversations first): -log sigmoid(r_chosen - r_rejected - margin), summed over pairs.
    Metrics (per pair): accuracy (r_chosen > r_rejected) and margin (their mean gap)."""

    def __init__(self, margin: float = 0.0):
        self.margin = margin

    def units(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].size(0) // 2)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        mask = batch["attention_mask"]
        rewards = model(batch["input_ids"], attention_mask=mask).float()  # (2B,)
        B = rewards.size(0) // 2
        gap = rewards[:B] - rewards[B:]  # (B,)
        loss = -F.logsigmoid(gap - self.margin).sum()
        metrics = {
            "tokens": mask.sum(),
            "accuracy": (gap > 0).sum(),
            "margin": gap.detach().sum(),
        }
        return loss, metrics
