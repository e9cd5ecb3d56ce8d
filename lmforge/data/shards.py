"""Token shards: the on-disk format `lmforge prepare` writes and training reads.

A prepared folder holds `manifest.json`, `tokenizer/`, `train_XXXX.bin` / `val_XXXX.bin` (flat
token ids, uint16 when the vocabulary fits, else uint32; each document followed by the
tokenizer's end-of-text id) and `report.json`. Shards are written under a temporary name and
renamed when complete, and the manifest (with a sha256 per shard) is written last, atomically:
a folder without a manifest is never mistaken for a finished dataset.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.common import LmforgeError
from lmforge.fileio import atomic_open
from lmforge.tokenizer import Tokenizer, load_tokenizer, tokenizer_hash

MANIFEST = "manifest.json"
REPORT = "report.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "lmforge-shards-v1"
SPLITS = ("train", "val")
_FLUSH_TOKENS = 1 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


class ShardWriter:
    """Append documents (token id arrays) to `<split>_XXXX.bin` shards of about
    `tokens_per_shard` tokens; a document never straddles two shards."""

    def __init__(
        self,
        folder: str | Path,
        split: str,
        dtype: np.dtype,
        eot_id: int,
        tokens_per_shard: int = 100_000_000,
    ):
        self.folder, self.split, self.dtype = Path(folder), split, np.dtype(dtype)
        self.eot = np.array([eot_id], dtype=self.dtype)
        self.tokens_per_shard = tokens_per_shard
        self.shards: list[dict[str, Any]] = []
        self._file = None
        self._buf: list[np.ndarray] = []
        self._buffered = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._path = self.folder / name
        self._writing = ExitStack()  # the shard's atomic_open, closed by _finish()
        self._file = self._writing.enter_context(atomic_open(self._path))
        self._sha = hashlib.sha256()
        self._tokens = self._docs = 0

    def _flush(self) -> None:
        if self._buf:
            data = np.concatenate(self._buf).tobytes()
            self._file.write(data)
            self._sha.update(data)
            self._buf, self._buffered = [], 0

    def _finish(self) -> None:
        self._flush()
        self._writing.close()  # fsync, then rename into place
        self._file = None
        self.shards.append(
            {
                "file": self._path.name,
                "tokens": self._tokens,
                "documents": self._docs,
                "sha256": self._sha.hexdigest(),
            }
        )

    def add(self, ids: np.ndarray | list[int]) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        if (
            self._file is not None
            and self._tokens
            and self._tokens + len(ids) + 1 > self.tokens_per_shard
        ):
            self._finish()
        if self._file is None:
            self._open()
        self._buf += [ids, self.eot]
        self._buffered += len(ids) + 1
        self._tokens += len(ids) + 1
        self._docs += 1
        if self._buffered >= _FLUSH_TOKENS:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.shards


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class PreparedDataset:
    folder: Path
    train: list[np.ndarray]
    """Memmapped 1-D token arrays, one per shard."""
    val: list[np.ndarray]
    tokenizer: Tokenizer
    manifest: dict[str, Any]

    @property
    def eot_id(self) -> int:
        return int(self.manifest["eot_id"])

    def num_tokens(self, split: str = "train") -> int:
        return int(sum(len(a) for a in getattr(self, split)))


def is_prepared(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def _memmap(path: Path, dtype: np.dtype, tokens: int) -> np.ndarray:
    if tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))


def read_prepared(folder: str | Path, verify: bool = True) -> PreparedDataset:
    """Open a prepared dataset. Checks every shard's size and (with `verify`) its sha256, and
    that the tokenizer is the one the shards were written with."""
    folder = Path(folder)
    if not is_prepared(folder):
        raise LmforgeError(
            f"{folder} is not a prepared dataset (no {MANIFEST}); create one with `lmforge prepare INPUT --out {folder}`"
        )
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        dtype = np.dtype(manifest["dtype"])
        splits = {s: manifest["splits"][s]["shards"] for s in SPLITS}
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise LmforgeError(
            f"{folder / MANIFEST} is damaged ({type(e).__name__}: {e}); run `lmforge prepare` again"
        ) from None
    if manifest.get("format") != FORMAT:
        raise LmforgeError(
            f"{folder / MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}"
        )
    tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
    if tokenizer_hash(tokenizer) != manifest.get("tokenizer", {}).get("sha256"):
        raise LmforgeError(
            f"{folder / TOKENIZER_DIR} is not the tokenizer these shards were written with"
        )
    arrays: dict[str, list[np.ndarray]] = {}
    for split, shards in splits.items():
        arrays[split] = []
        for shard in shards:
            path = folder / shard["file"]
            if not path.is_file():
                raise LmforgeError(f"shard {path} listed in the manifest is missing")
            size = path.stat().st_size
            if size != shard["tokens"] * dtype.itemsize:
                raise LmforgeError(
                    f"shard {path} has {size} bytes, the manifest says {shard['tokens'] * dtype.itemsize}"
                )
            if verify and sha256_file(path) != shard["sha256"]:
                raise LmforgeError(
                    f"shard {path} fails its sha256 checksum (corrupted or modified)"
                )
            arrays[split].append(_memmap(path, dtype, shard["tokens"]))
    return PreparedDataset(folder, arrays["train"], arrays["val"], tokenizer, manifest)
