"""Which documents go where: the seeded train/val split by document, the weighted mixture of
training documents, and round-robin sampling of sources for the tokenizer."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from lmforge.common import LmforgeError


def val_mask(n: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """Which of a source's n documents are held out: round(n * fraction) of them (at least one
    when the source has two or more), chosen with a seed; the same for every stage."""
    mask = np.zeros(n, dtype=bool)
    if n < 2 or fraction <= 0:
        return mask
    k = min(n - 1, max(1, round(n * fraction)))
    rng = np.random.default_rng(
        [seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")]
    )
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def round_robin(iterators: list[Iterator[str]], max_bytes: int) -> Iterator[str]:
    """One text from each source in turn until `max_bytes` characters or all run out."""
    used = 0
    live = list(iterators)
    while live and used < max_bytes:
        for it in list(live):
            text = next(it, None)
            if text is None:
                live.remove(it)
                continue
            used += len(text)
            yield text


def plan_mixture(
    lengths: dict[str, np.ndarray], weights: dict[str, float | None], total: int, seed: int
) -> tuple[list[tuple[str, np.ndarray]], dict[str, Any]]:
    """Choose training documents per source. With weights, source i gets about
    weight_i * total tokens (documents in seeded random order, repeated when a source runs out);
    without, every document once. -> ([(source, doc indices)], mixture report)."""
    rng = np.random.default_rng(seed)
    available = {name: int((lens + 1).sum()) for name, lens in lengths.items()}  # +1: separator
    weighted = all(w is not None for w in weights.values())
    if weighted:
        wsum = sum(weights.values())
        total = total or sum(available.values())
        targets = {name: weights[name] / wsum * total for name in lengths}
    else:
        targets = {name: float(available[name]) for name in lengths}
    picks: list[tuple[str, np.ndarray]] = []
    report: dict[str, Any] = {}
    for name, lens in lengths.items():
        target = targets[name]
        if target > 0 and len(lens) == 0:
            raise LmforgeError(
                f"source {name!r} has weight {weights[name]} but no training documents left"
            )
        chosen: list[np.ndarray] = []
        got = 0
        while got < target:
            order = rng.permutation(len(lens)) if weighted else np.arange(len(lens))
            cum = np.cumsum(lens[order] + 1)
            need = target - got
            cut = int(np.searchsorted(cum, need)) + 1  # docs until the target is reached
            chosen.append(order[:cut])
            got += int(cum[min(cut, len(cum)) - 1])
        idx = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        picks.append((name, idx))
        report[name] = {
            "weight": weights[name],
            "target_tokens": int(target),
            "tokens": got,
            "documents": int(len(idx)),
            "epochs": round(got / max(available[name], 1), 3),
        }
    total_got = sum(r["tokens"] for r in report.values())
    for r in report.values():
        r["share"] = round(r["tokens"] / max(total_got, 1), 4)
    return picks, report
