"""Dedup: exact duplicates, and near duplicates found with high precision and recall."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.config import DedupConfig
from lmforge.data.dedup import Deduplicator, MinHasher, exact_key


def test_exact_duplicates_ignore_case_and_whitespace():
    d = Deduplicator(DedupConfig(near=False))
    assert d.check("Hello  world\nagain") is None
    assert d.check("hello world again") == "exact_duplicate"
    assert d.check("hello world, again") is None
    assert exact_key("A b") == exact_key(" a\tB ")


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 50_000, size=2000)]
    a = " ".join(words)
    b = " ".join(words[:1000] + [f"x{i}" for i in range(1000)])  # ~1/3 of shingles shared
    h = MinHasher(num_perm=256, shingle_size=3)
    sa, sb = h.shingles(a), h.shingles(b)
    true_j = len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))
    est = (h.signature(a) == h.signature(b)).mean()
    assert abs(est - true_j) < 0.08
    assert (h.signature(a) == h.signature(a.upper())).all()


def _synthetic(n_pairs: int, n_unrelated: int, seed: int = 0):
    """Base documents of 300 random words; each near-duplicate keeps ~90% of its base's words
    (edits: a replaced span, a few scattered word substitutions, an appended sentence)."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"tok{i}" for i in range(20_000)])
    docs, labels = [], []  # labels: id of the pair, or -1 for unrelated
    for p in range(n_pairs):
        base = list(vocab[rng.integers(0, len(vocab), size=300)])
        dup = list(base)
        start = int(rng.integers(0, 270))
        dup[start : start + 15] = vocab[rng.integers(0, len(vocab), size=15)]  # 5% span
        for i in rng.choice(300, size=9, replace=False):  # 3% scattered
            dup[i] = str(vocab[rng.integers(0, len(vocab))])
        dup += list(vocab[rng.integers(0, len(vocab), size=6)])  # 2% appended
        docs += [" ".join(base), " ".join(dup)]
        labels += [p, p]
    for _ in range(n_unrelated):
        docs.append(" ".join(vocab[rng.integers(0, len(vocab), size=300)]))
        labels.append(-1)
    order = rng.permutation(len(docs))
    return [docs[i] for i in order], [labels[i] for i in order]


def test_near_duplicates_found_with_precision_and_recall_above_095():
    docs, labels = _synthetic(n_pairs=150, n_unrelated=300)
    d = Deduplicator(
        DedupConfig(exact=False, shingle_size=3, num_perm=128, bands=32, threshold=0.5)
    )
    seen_pairs: set[int] = set()
    tp = fp = fn = 0
    for text, label in zip(docs, labels):
        is_dup = d.check(text) == "near_duplicate"
        expected = label >= 0 and label in seen_pairs  # the second member of a pair
        tp += is_dup and expected
        fp += is_dup and not expected
        fn += expected and not is_dup
        if label >= 0:
            seen_pairs.add(label)
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    report = d.stats.report()
    assert report["near_dup_clusters"] == report["near_duplicates"] == tp


def test_dedup_config_checks():
    with pytest.raises(LmforgeError, match="divisible"):
        DedupConfig(num_perm=100, bands=16)
    with pytest.raises(LmforgeError, match="threshold"):
        DedupConfig(threshold=0)
