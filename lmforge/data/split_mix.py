"""Which documents go where: the seeded train/val split by size, the weighted mixture of
training documents, and round-robin sampling of sources for the tokenizer."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.common import LmforgeError

_CUT_ABOVE = 0.01  # whole documents missing the target by more than this share: cut one
_LINE_WINDOW = 256  # bytes around a cut point searched for a line break


@dataclass(frozen=True)
class ValSplit:
    """One source's validation split: whole documents, plus optionally the tail of one."""

    val: np.ndarray
    """bool per document: held out whole."""
    cut: int = -1
    """The document whose tail is held out (its head stays in train); -1 = none."""
    cut_bytes: int = 0
    """About how many UTF-8 bytes that tail has (`split_text` moves it to a line break)."""


def plan_val_split(sizes: np.ndarray, fraction: float, seed: int, name: str) -> ValSplit:
    """Hold out `fraction` of a source's UTF-8 bytes, given each document's byte count.

    Bytes, because the split is decided before the tokenizer exists (it may be trained on the
    train side only), and bytes are the measure of text every tokenizer roughly follows.
    Documents in a seeded random order go to validation whole while they fit in the budget
    (fraction x the source's bytes); documents larger than what is left are skipped, so whole
    documents land within one document of the target. If that leaves more than about one
    point of the source's bytes unfilled (a single document, or only documents larger than
    the budget), or no validation at all, the rest is the tail of the largest remaining
    document, cut by position as nanoGPT splits Shakespeare (the head stays in train).
    fraction 0 holds out nothing."""
    sizes = np.asarray(sizes, dtype=np.int64)
    val = np.zeros(len(sizes), dtype=bool)
    left = fraction * int(sizes.sum())
    if left <= 0:
        return ValSplit(val)
    rng = np.random.default_rng(
        [seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")]
    )
    order = rng.permutation(len(sizes))
    cum = np.cumsum(sizes[order])
    k = int(np.searchsorted(cum, left, side="right"))  # the prefix that fits as a whole
    val[order[:k]] = True
    left -= int(cum[k - 1]) if k else 0
    rest = order[k:]
    for i in rest[sizes[rest] <= left]:  # later documents that still fit (left only shrinks)
        if sizes[i] <= left:
            val[i] = True
            left -= int(sizes[i])
    if left <= _CUT_ABOVE * int(sizes.sum()) and val.any():
        return ValSplit(val)
    train = order[~val[order]]  # seeded order breaks ties between equally large documents
    if len(train) == 0:
        return ValSplit(val)
    cut = int(train[np.argmax(sizes[train])])
    cut_bytes = min(max(1, round(left)), int(sizes[cut]) - 1)
    return ValSplit(val, cut, cut_bytes) if cut_bytes > 0 else ValSplit(val)


def split_text(text: str, tail_bytes: int) -> tuple[str, str]:
    """`text` -> (head, tail), the tail about `tail_bytes` UTF-8 bytes long: starting after a
    line break when one lies within min(256, tail_bytes / 4) bytes of that point (so the
    realised share moves by at most a quarter of the tail), else at the nearest character
    boundary. Both parts are non-empty when the text has two or more characters."""
    data = text.encode("utf-8")
    pos = len(data) - tail_bytes
    window = min(_LINE_WINDOW, tail_bytes // 4)
    lo, hi = max(1, pos - window), min(len(data) - 1, pos + window)
    # cut just after a "\n" at index j: j + 1 in [lo, hi]
    breaks = [j + 1 for j in (data.rfind(b"\n", lo - 1, pos), data.find(b"\n", pos, hi)) if j >= 0]
    if breaks:
        pos = min(breaks, key=lambda b: abs(b - pos))
    else:
        pos = min(max(pos, 1), len(data) - 1)
        while 0 < pos < len(data) and data[pos] & 0xC0 == 0x80:  # inside a UTF-8 character
            pos -= 1
        if pos == 0:  # the first character is the only boundary before: take the next
            pos = len(text[0].encode("utf-8"))
    return data[:pos].decode("utf-8"), data[pos:].decode("utf-8")


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
