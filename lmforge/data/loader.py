"""Pretraining batches: random windows from token arrays, seeded, rank-sharded, resumable.

Each optimizer step draws one global batch of `micro_batch_size * accum * world_size` window
starts from a single seeded generator; every rank takes its own rows. The data order thus
depends only on the seed and the step count, not on the world size or the accumulation split,
which is what makes accumulation and DDP equal to one big batch, and resume exact.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch

from lmforge.common import LmforgeError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


class RandomWindowLoader:
    """Windows of block_size + 1 tokens at uniformly random starts across one or more arrays
    (as nanoGPT's get_batch), yielding {'input_ids', 'labels'} micro-batches."""

    def __init__(
        self,
        arrays: list[np.ndarray],
        block_size: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.arrays = [np.asarray(a) for a in arrays]  # memmaps stay views, no copy
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        starts_per_array = [max(0, len(a) - block_size) for a in self.arrays]
        if sum(starts_per_array) == 0:
            raise LmforgeError(
                f"data too short: no array holds more than block_size={block_size} tokens; "
                "add data or lower model.block_size"
            )
        self._cum_starts = np.cumsum(starts_per_array)  # (n_arrays,)
        self._offsets = np.arange(block_size + 1)  # (T+1,)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_drawn = 0

    def _windows(self, global_starts: np.ndarray) -> np.ndarray:
        """Global start indices (N,) -> token windows (N, T+1) as int64."""
        which = np.searchsorted(self._cum_starts, global_starts, side="right")  # (N,)
        local = global_starts - np.concatenate(([0], self._cum_starts[:-1]))[which]  # (N,)
        out = np.empty((len(global_starts), self.block_size + 1), dtype=np.int64)
        for a in np.unique(which):
            rows = np.nonzero(which == a)[0]
            out[rows] = self.arrays[a][local[rows, None] + self._offsets]
        return out

    def next_step(self, accum_steps: int) -> list[dict[str, torch.Tensor]]:
        """This rank's `accum_steps` micro-batches for the next optimizer step."""
        n = self.micro_batch_size * accum_steps * self.world_size
        starts = torch.randint(int(self._cum_starts[-1]), (n,), generator=self.generator).numpy()
        self.steps_drawn += 1
        windows = torch.from_numpy(self._windows(starts))  # (n, T+1)
        batches = []
        for micro in range(accum_steps):
            first = (micro * self.world_size + self.rank) * self.micro_batch_size
            rows = windows[first : first + self.micro_batch_size]  # (micro, T+1)
            batches.append({"input_ids": rows[:, :-1], "labels": rows[:, 1:]})
        return batches

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "steps_drawn": self.steps_drawn,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps_drawn = state["steps_drawn"]


def bundled_text_path() -> Path:
    return Path(str(resources.files("lmforge") / "assets" / "tinyshakespeare.txt"))


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise LmforgeError(f"{path} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(
            f"{path} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None


def read_text_corpus(path: str) -> str:
    """data.path as text: '' = bundled Shakespeare, a file, or a folder of .txt/.md files
    (sorted, joined by blank lines)."""
    p = Path(path) if path else bundled_text_path()
    if not p.exists():
        raise LmforgeError(f"data path not found: {p}")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise LmforgeError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {p}")
        text = "\n\n".join(_decode(f) for f in files)
    else:
        text = _decode(p)
    if not text.strip():
        raise LmforgeError(f"data at {p} is empty")
    return text


class PretrainData:
    """Tokenized train/val arrays plus what evaluation needs to report bits per byte."""

    def __init__(
        self, train: list[np.ndarray], val: list[np.ndarray], tokenizer, bytes_per_token: float
    ):
        self.train, self.val, self.tokenizer = train, val, tokenizer
        self.bytes_per_token = bytes_per_token


def _tokenizer_for_text(spec: str, text: str):
    from lmforge.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer

    if spec == "char":
        return CharTokenizer.from_text(text)
    if spec == "byte":
        return ByteTokenizer()
    return load_tokenizer(spec)


def load_pretrain_data(data_cfg, tokenizer=None) -> PretrainData:
    """data.path -> PretrainData. A prepared dataset (manifest.json) brings its own shards and
    tokenizer; text is tokenized on the fly and split by position (the last val_fraction is
    validation, as nanoGPT does). `tokenizer` (e.g. from a checkpoint being resumed) wins over
    data.tokenizer."""
    path = data_cfg.path
    if path and (Path(path) / "manifest.json").is_file():
        from lmforge.data.shards import read_prepared

        ds = read_prepared(path)
        tok = ds.tokenizer
        sample = np.concatenate([np.asarray(a[:200_000]) for a in ds.val])
        bpt = len(tok.decode(sample.tolist()).encode("utf-8")) / max(1, len(sample))
        return PretrainData(ds.train, ds.val, tok, bpt)
    text = read_text_corpus(path)
    tok = tokenizer or _tokenizer_for_text(data_cfg.tokenizer, text)
    split = int(len(text) * (1 - data_cfg.val_fraction))
    train_text, val_text = text[:split], text[split:]
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    train = np.array(tok.encode(train_text), dtype=dtype)
    val = np.array(tok.encode(val_text), dtype=dtype)
    bpt = len(val_text.encode("utf-8")) / max(1, len(val))
    return PretrainData([train], [val], tok, bpt)
