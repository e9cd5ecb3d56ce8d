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
