"""Calibration (`--task calibration[=MC_FILE]`): does the model's confidence match how often it
is right? Two sources:
- multiple choice: the softmax over an item's choice log-likelihoods (mc.py's scoring; default
  data PIQA), confidence = the top choice's probability;
- next-token prediction on the held-out Shakespeare: confidence = the top token's probability.

For each: ECE over 15 equal-width confidence bins (Guo et al. 2017: sum over bins of
|accuracy - mean confidence| weighted by the bin's share of predictions), the Brier score (the
mean squared distance between the predicted distribution and the one-hot truth, summed over
classes), and the bins, which the report draws as a reliability diagram."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.eval import mc, ppl
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import TaskOptions, TaskResult, file_sha256

BINS = 15


def reliability_bins(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = BINS
) -> list[dict]:
    """Equal-width bins over (0, 1]: bin b holds confidences in (b/bins, (b+1)/bins], the first
    also 0. Each: lower, upper, count, mean confidence, accuracy (0 for an empty bin)."""
    confidence = confidence.double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # (N,)
    out = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "confidence": confidence[members].mean().item() if count else 0.0,
                "accuracy": correct[members].double().mean().item() if count else 0.0,
            }
        )
    return out


def ece(bins: list[dict]) -> float:
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins)


def mc_calibration(scorer: Scorer, path: Path | None, options: TaskOptions):
    """(metrics, bins) from the softmax over each item's choices."""
    items = mc.load_items(path or mc.DEFAULT, options.limit)
    lls = mc.choice_loglikelihoods(scorer, items)
    confidence, correct, brier = [], [], []
    for it, ll in zip(items, lls):
        p = torch.softmax(ll, dim=0)  # (n_choices,)
        truth = torch.zeros_like(p)
        truth[it.label] = 1.0
        confidence.append(p.max())
        correct.append(int(p.argmax()) == it.label)
        brier.append((p - truth).pow(2).sum())
    bins = reliability_bins(torch.stack(confidence), torch.tensor(correct))
    return {"mc_ece": ece(bins), "mc_brier": torch.stack(brier).mean().item()}, bins, len(items)


def next_token_calibration(scorer: Scorer, options: TaskOptions):
    """(metrics, bins) of next-token prediction on the held-out Shakespeare."""
    stats = scorer.rolling(scorer.encode_texts([ppl.held_out_shakespeare()])[0], options.stride)
    bins = reliability_bins(stats.confidence, stats.correct)
    p_target = stats.logprob.double().exp()
    brier = (stats.sum_sq.double() - 2 * p_target + 1).mean().item()
    return {"next_token_ece": ece(bins), "next_token_brier": brier}, bins


def run(scorer: Scorer, path: Path | None, options: TaskOptions) -> TaskResult:
    mc_metrics, mc_bins, n_items = mc_calibration(scorer, path, options)
    token_metrics, token_bins = next_token_calibration(scorer, options)
    source = path or mc.DEFAULT
    return TaskResult(
        {**mc_metrics, **token_metrics},
        n_items,
        {"reliability": {"mc": mc_bins, "next_token": token_bins}},
        {str(source): file_sha256(source)},
    )
