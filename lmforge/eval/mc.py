"""Multiple choice (`--task mc[=FILE]`): the log-likelihood of each choice after the context.

Items are JSON/JSONL records `{"context": str, "choices": [str, ...], "label": int}`. Each choice
is scored as the continuation TARGET_DELIMITER + choice after the context, as lm-evaluation-
harness does (its default target_delimiter); the context's trailing whitespace moves to the
continuation (scoring.Scorer.encode_pair). `acc` picks the most likely choice; `acc_norm`
divides each log-likelihood by the continuation's length in UTF-8 bytes first (the harness
divides by characters: the same on ASCII text). The default data is PIQA's validation split
(lmforge/assets/eval/SOURCES.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.common import LmforgeError
from lmforge.data.sft import read_records
from lmforge.eval.scoring import PairScore, Scorer
from lmforge.eval.tasks import EVAL_ASSETS, TaskOptions, TaskResult, file_sha256

DEFAULT = EVAL_ASSETS / "piqa_valid.jsonl"
TARGET_DELIMITER = " "


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int


def load_items(path: Path, limit: int | None = None) -> list[Item]:
    """The first `limit` items of a task file, checked: one line names the bad record."""
    records = read_records(path)[:limit]
    items = []
    for i, r in enumerate(records):
        where = f"{path}: item {i}"
        if not isinstance(r, dict):
            raise LmforgeError(f"{where} is not an object")
        for key in ("context", "choices", "label"):
            if key not in r:
                raise LmforgeError(f"{where} has no {key!r} field (needs context, choices, label)")
        choices, label = r["choices"], r["label"]
        if not isinstance(r["context"], str):
            raise LmforgeError(f"{where}: context must be a string")
        if not isinstance(choices, list) or len(choices) < 2:
            raise LmforgeError(f"{where}: choices must be a list of two or more strings")
        if not all(isinstance(c, str) and c for c in choices):
            raise LmforgeError(f"{where}: every choice must be a non-empty string")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise LmforgeError(
                f"{where}: label {label!r} is out of range for {len(choices)} choices"
            )
        items.append(Item(r["context"], choices, label))
    return items


def score_choices(scorer: Scorer, items: list[Item]) -> list[list[PairScore]]:
    """Each item's choices scored, all items in one batched pass (the choices of one item
    share their context's forward)."""
    requests = [(it.context, TARGET_DELIMITER + c) for it in items for c in it.choices]
    scores = scorer.loglikelihood(requests)
    out, start = [], 0
    for it in items:
        out.append(scores[start : start + len(it.choices)])
        start += len(it.choices)
    return out


def loglikelihoods(scored: list[list[PairScore]]) -> list[torch.Tensor]:
    """(n_choices,) log-likelihood of each item's choices."""
    return [torch.tensor([s.logprob for s in row], dtype=torch.float64) for row in scored]


def choice_loglikelihoods(scorer: Scorer, items: list[Item]) -> list[torch.Tensor]:
    return loglikelihoods(score_choices(scorer, items))


def accuracy(items: list[Item], lls: list[torch.Tensor]) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per UTF-8 byte of the choice)."""
    correct = correct_norm = 0
    for it, ll in zip(items, lls):
        nbytes = torch.tensor([len(c.encode("utf-8")) for c in it.choices], dtype=torch.float64)
        correct += int(ll.argmax()) == it.label
        correct_norm += int((ll / nbytes).argmax()) == it.label
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n}


def run(scorer: Scorer, path: Path | None, options: TaskOptions) -> TaskResult:
    path = path or DEFAULT
    items = load_items(path, options.limit)
    scored = score_choices(scorer, items)
    metrics = accuracy(items, loglikelihoods(scored))
    metrics["chance"] = sum(1 / len(it.choices) for it in items) / len(items)
    cuts = [row[0].context_cut for row in scored]  # the choices share their context
    details = {"truncated": {"requests": sum(c > 0 for c in cuts), "tokens": sum(cuts)}}
    return TaskResult(metrics, len(items), details, {str(path): file_sha256(path)})
