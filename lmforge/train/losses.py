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
        loss = self.cross_entropy(self.logits(model, batch), batch["labels"])
        return loss, {"tokens": batch["input_ids"].numel()}

    @staticmethod
    def logits(model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            document_ids=batch.get("document_ids"),
        )  # (B, T, V)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed over the target tokens: logits (B, T, V), labels (B, T) -> ()."""
        return F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            label_smoothing=self.label_smoothing,
            reduction="sum",
        )


class MaskedLMLoss:
    """BERT's objective (batches from lmforge/data/mlm.py): cross-entropy on the selected
    positions only (labels -100 elsewhere), summed; the units are the selected positions, known
    before the forward. Metrics (per selected position): mlm_loss, mlm_accuracy (the argmax is
    the hidden token).

    With next-sentence prediction (nsp_ids = the [IS_NEXT] and [NOT_NEXT] ids), the head is those
    two rows of the output layer at the [CLS] position (position 0), and each selected position
    also carries its row's NSP cross-entropy: the loss is still a sum over units, so
    accumulation stays exact, and its per-unit mean is the MLM mean plus the NSP mean over pairs
    (every full row has as many selected positions; the Masker selects a fixed count). Metrics
    nsp_loss and nsp_accuracy are weighted the same way. label_smoothing applies to the MLM
    cross-entropy (training only, as for CausalLMLoss)."""

    def __init__(self, nsp_ids: tuple[int, int] | None = None, label_smoothing: float = 0.0):
        self.nsp_ids = list(nsp_ids) if nsp_ids else None
        self.label_smoothing = label_smoothing

    def units(self, batch: Batch) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
        labels = batch["labels"]  # (B, T)
        selected = labels != -100
        picked = logits[selected].float()  # (N, V)
        targets = labels[selected]  # (N,)
        loss = F.cross_entropy(
            picked, targets, label_smoothing=self.label_smoothing, reduction="sum"
        )
        metrics: dict[str, Any] = {
            "tokens": batch["input_ids"].numel(),
            "mlm_loss": loss.detach(),
            "mlm_accuracy": (picked.argmax(-1) == targets).sum(),
        }
        if self.nsp_ids is not None:
            nsp_logits = logits[:, 0, self.nsp_ids].float()  # (B, 2)
            nsp = F.cross_entropy(nsp_logits, batch["nsp_label"], reduction="none")  # (B,)
            weight = selected.sum(-1)  # (B,) each row's selected positions
            loss = loss + (nsp * weight).sum()
            correct = nsp_logits.argmax(-1) == batch["nsp_label"]  # (B,)
            metrics["nsp_loss"] = (nsp.detach() * weight).sum()
            metrics["nsp_accuracy"] = (correct * weight).sum()
        return loss, metrics


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(N,) KL(softmax(teacher / T) || softmax(student / T)) of each row of logits (N, V)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, V)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (N, V)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class DistillLoss(CausalLMLoss):
    """Knowledge distillation (Hinton et al. 2015) of a frozen teacher into the model, per
    target token:

        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

    with CE the next-token cross-entropy on the hard labels (label_smoothing applies to it).
    T^2 keeps the soft term's gradients the size of the hard term's whatever T is. The
    teacher runs in eval mode without gradients, under the autocast the Trainer opened for
    the student. Units are target tokens, as for CausalLMLoss, so accumulation stays exact.
    Metrics (per token): kd_kl (the KL at temperature T) and kd_ce, the two parts."""

    def __init__(
        self,
        teacher: nn.Module,
        alpha: float,
        temperature: float,
        label_smoothing: float = 0.0,
    ):
        super().__init__(label_smoothing)
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = self.logits(model, batch)  # (B, T, V)
        with torch.no_grad():
            self.teacher.to(logits.device)
            teacher_logits = self.logits(self.teacher, batch)  # (B, T, V)
        labels = batch["labels"]  # (B, T)
        scored = labels != -100  # (B, T)
        ce = self.cross_entropy(logits, labels)
        kl = distill_kl(logits[scored], teacher_logits[scored], self.temperature).sum()
        loss = self.alpha * self.temperature**2 * kl + (1 - self.alpha) * ce
        metrics = {"tokens": batch["input_ids"].numel(), "kd_kl": kl.detach(), "kd_ce": ce.detach()}
        return loss, metrics


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


def answer_logprobs(
    logits: torch.Tensor, answer_ids: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the answer tokens and the full next-token distributions that
    produced them: logits (N, L, V) whose last R positions predict answer_ids (N, R) ->
    (log p(answer token) (N, R), log p(every token) (N, R, V)), at `temperature`."""
    R = answer_ids.size(1)
    logprobs = F.log_softmax(logits[:, -R:].float() / temperature, dim=-1)  # (N, R, V)
    return logprobs.gather(-1, answer_ids[..., None])[..., 0], logprobs


class PPOLoss:
    """The clipped surrogate of PPO (Schulman et al. 2017) on rollout micro-batches (lmforge/
    data/rollouts.py), summed over answer tokens (the units):

        -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + vf_coef * value loss
        - entropy_coef * entropy [+ kl_coef * KL(policy || reference) for grpo]

    ratio = p_new / p_old of the answer token. With a value head (the model returns (logits,
    values), heads.ActorCritic), the value loss is 0.5 * max((V - R)^2, (V_clipped - R)^2)
    with V clipped to old V +- value_clip. GRPO has no value head; its KL term is the
    unbiased k3 estimate exp(q - p) - (q - p) - 1 (Schulman 2020) of log-probs p (policy)
    and q (reference), as DeepSeekMath's GRPO.

    Metrics (per answer token): policy_loss, value_loss, entropy, clip_fraction (tokens
    whose clipped term is the one taken), approx_kl (0.5 (log ratio)^2 to the rollout
    policy), ratio."""

    def __init__(
        self,
        clip: float = 0.2,
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        kl_coef: float = 0.0,
        temperature: float = 1.0,
    ):
        self.clip, self.value_clip, self.vf_coef = clip, value_clip, vf_coef
        self.entropy_coef, self.kl_coef, self.temperature = entropy_coef, kl_coef, temperature

    def units(self, batch: Batch) -> torch.Tensor:
        return batch["answer_mask"].sum()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, values = out if isinstance(out, tuple) else (out, None)  # (N, L, V), (N, L)
        mask = batch["answer_mask"].float()  # (N, R)
        logp, all_logp = answer_logprobs(logits, batch["answer_ids"], self.temperature)
        log_ratio = logp - batch["old_logprobs"]
        ratio = log_ratio.exp()
        advantages = batch["advantages"]
        plain = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - self.clip, 1 + self.clip)
        policy_loss = torch.maximum(plain, clipped)  # (N, R)
        entropy = -(all_logp.exp() * all_logp).sum(-1)  # (N, R)
        per_token = policy_loss - self.entropy_coef * entropy
        metrics: dict[str, Any] = {"tokens": batch["input_ids"].numel()}
        if values is not None:
            R = mask.size(1)
            v, old_v, returns = values[:, -R:].float(), batch["old_values"], batch["returns"]
            v_clipped = old_v + (v - old_v).clamp(-self.value_clip, self.value_clip)
            value_loss = 0.5 * torch.maximum((v - returns) ** 2, (v_clipped - returns) ** 2)
            per_token = per_token + self.vf_coef * value_loss
            metrics["value_loss"] = (value_loss.detach() * mask).sum()
        if self.kl_coef > 0:
            to_ref = batch["ref_logprobs"] - logp  # log q - log p
            per_token = per_token + self.kl_coef * (to_ref.exp() - to_ref - 1)
        metrics |= {
            name: (value.detach() * mask).sum()
            for name, value in (
                ("policy_loss", policy_loss),
                ("entropy", entropy),
                ("clip_fraction", (clipped > plain).float()),
                ("approx_kl", 0.5 * log_ratio**2),
                ("ratio", ratio),
            )
        }
        return (per_token * mask).sum(), metrics
