"""Exact and near-duplicate removal.

Exact: a 128-bit hash of the lower-cased, whitespace-collapsed text. Near: MinHash over word
n-gram shingles, vectorised in numpy, with banded LSH (Broder 1997; Leskovec et al., "Mining of
Massive Datasets", ch. 3). A candidate pair from LSH is confirmed only if the signatures agree
on at least `threshold` of their positions (the Jaccard estimate), which keeps precision high.
Decisions stream: the first document of a cluster is kept, later members are dropped.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmforge.config import DedupConfig

_CHUNK = 4096  # shingles per vectorised block: bounds memory at _CHUNK * num_perm * 8 bytes


def exact_key(text: str) -> bytes:
    """Hash of the normalised text: case and whitespace differences don't make a new document."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


class MinHasher:
    """Signatures of word-shingle sets: for each of `num_perm` hash functions
    h(x) = (a*x + b) mod 2^64 (a odd), the minimum over the document's shingles, top 32 bits."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.shingle_size = shingle_size
        self.a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(
            1
        )
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.mix = rng.integers(1, 2**63, size=shingle_size, dtype=np.uint64) * np.uint64(
            2
        ) + np.uint64(1)

    def shingles(self, text: str) -> np.ndarray:
        """uint64 hashes of the distinct word n-grams of the lower-cased text."""
        words = text.lower().split()
        wh = np.fromiter(
            (zlib.crc32(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words)
        )
        n = min(self.shingle_size, max(len(wh), 1))
        m = len(wh) - n + 1
        if m <= 0:
            return np.zeros(1, dtype=np.uint64)
        acc = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                acc += (wh[k : k + m] + np.uint64(k + 1)) * self.mix[k]
        return np.unique(acc)

    def signature(self, text: str) -> np.ndarray:
        sh = self.shingles(text)
        sig = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(sh), _CHUNK):
                block = sh[i : i + _CHUNK, None] * self.a[None, :] + self.b[None, :]
                np.minimum(sig, block.min(axis=0), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)


@dataclass
class DedupStats:
    exact_duplicates: int = 0
    near_duplicates: int = 0
    clusters: dict[int, int] = field(default_factory=dict)
    """Representative document id -> number of near-duplicates dropped in its favour."""
    examples: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        sizes = [n + 1 for n in self.clusters.values()]
        return {
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "near_dup_clusters": len(sizes),
            "largest_cluster": max(sizes, default=0),
            "examples": [{"kept": a, "dropped": b} for a, b in self.examples],
        }


class Deduplicator:
    """Streaming dedup: `check(...)` says whether a document duplicates one already kept and,
    if not, remembers it.

    Memory per kept document: the exact hash (16 bytes), one bucket entry per band, and the
    signature at 16 bits per value for confirming LSH candidates (a 1/65536 chance that two
    different values agree adds no visible bias to the Jaccard estimate)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.rows = cfg.num_perm // cfg.bands
        self.hasher = MinHasher(cfg.num_perm, cfg.shingle_size, cfg.seed)
        self.seen: set[bytes] = set()
        self.buckets: list[dict[bytes, int]] = [{} for _ in range(cfg.bands)]
        self.sigs = np.zeros((1024, cfg.num_perm), dtype=np.uint16)
        self.origins: list[str] = []
        self.stats = DedupStats()

    def _store(self, sig: np.ndarray, origin: str) -> int:
        idx = len(self.origins)
        if idx == len(self.sigs):
            self.sigs = np.concatenate([self.sigs, np.zeros_like(self.sigs)])
        self.sigs[idx] = sig.astype(np.uint16)
        self.origins.append(origin)
        return idx

    def check(
        self, text: str, origin: str = "", key: bytes | None = None, sig: np.ndarray | None = None
    ) -> str | None:
        """-> None (new document, now remembered), 'exact_duplicate' or 'near_duplicate'.
        `key` and `sig` may be precomputed (in worker processes) with `exact_key` and
        `MinHasher.signature`."""
        if self.cfg.exact:
            key = key if key is not None else exact_key(text)
            if key in self.seen:
                self.stats.exact_duplicates += 1
                return "exact_duplicate"
            self.seen.add(key)
        if not self.cfg.near:
            return None
        sig = sig if sig is not None else self.hasher.signature(text)
        keys = [sig[b * self.rows : (b + 1) * self.rows].tobytes() for b in range(self.cfg.bands)]
        candidates = {self.buckets[b][k] for b, k in enumerate(keys) if k in self.buckets[b]}
        if candidates:
            cand = np.fromiter(candidates, dtype=np.int64)
            agree = (self.sigs[cand] == sig.astype(np.uint16)[None, :]).mean(axis=1)
            best = int(agree.argmax())
            if agree[best] >= self.cfg.threshold:
                rep = int(cand[best])
                self.stats.near_duplicates += 1
                self.stats.clusters[rep] = self.stats.clusters.get(rep, 0) + 1
                if len(self.stats.examples) < 5:
                    self.stats.examples.append((self.origins[rep], origin))
                return "near_duplicate"
        idx = self._store(sig, origin)
        for b, k in enumerate(keys):
            self.buckets[b].setdefault(k, idx)
        return None
