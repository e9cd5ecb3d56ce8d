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

from lmforge.common import LmforgeError, print0
from lmforge.data.shards import token_dtype
from lmforge.fileio import read_utf8_text


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


def whole_split_batches(
    arrays: list[np.ndarray], block_size: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[dict[str, torch.Tensor]]:
    """This rank's batches over a whole split, every token but each array's first the target of
    exactly one window: {'input_ids', 'labels'} (batch_size, block_size), -100 where a
    target is not scored. Windows follow each other block_size targets apart; an array's last
    window ends at its last token and reaches back a full block for context, ignoring the
    targets the window before it scored. Windows go to ranks in turn, and every rank gets the
    same number of full batches (rows past the end score nothing), so that a sharded model's
    ranks run their forwards in step."""
    windows = []  # (array, first input, end, targets to skip)
    for a, tokens in enumerate(arrays):
        for first_target in range(1, len(tokens), block_size):
            end = min(first_target + block_size, len(tokens))
            begin = max(0, end - block_size - 1)
            windows.append((a, begin, end, first_target - begin - 1))
    mine = windows[rank::world_size]
    per_rank = -(-len(windows) // world_size)  # ceil
    n_batches = -(-per_rank // batch_size)
    inputs = torch.zeros(n_batches * batch_size, block_size, dtype=torch.long)
    labels = torch.full_like(inputs, -100)
    for row, (a, begin, end, skip) in enumerate(mine):
        window = torch.from_numpy(arrays[a][begin:end].astype(np.int64))  # (<= T + 1,)
        inputs[row, : len(window) - 1] = window[:-1]
        labels[row, skip : len(window) - 1] = window[1 + skip :]
    return [
        {"input_ids": x, "labels": y}
        for x, y in zip(inputs.split(batch_size), labels.split(batch_size))
    ]


def bundled_text_path() -> Path:
    return Path(str(resources.files("lmforge") / "assets" / "tinyshakespeare.txt"))


_RECORD_OR_COMPRESSED = {".jsonl", ".json", ".parquet", ".csv", ".html", ".htm", ".gz", ".zst"}


def read_documents(path: str, text_field: list[str]) -> list[str]:
    """data.path as documents: '' = bundled Shakespeare; a plain text file is one document
    (read strictly: binary or non-UTF-8 content is an error); a folder, or a json / jsonl /
    parquet / csv / html file (optionally .gz/.zst), is read as `lmforge prepare` reads a
    source, taking `text_field` from records."""
    from lmforge.config import SourceConfig
    from lmforge.data.collect import HTML, CollectStats, iter_documents

    p = Path(path) if path else bundled_text_path()
    if not p.exists():
        raise LmforgeError(f"data path not found: {p}")
    if p.is_file() and p.suffix.lower() not in _RECORD_OR_COMPRESSED:
        docs = [read_utf8_text(p)]
    else:
        stats = CollectStats()
        src = SourceConfig(name="data", paths=[str(p)], text_field=list(text_field), chunk_bytes=0)
        docs = []
        for doc in iter_documents(src, stats):
            text = doc.text
            if doc.kind == HTML:
                from lmforge.data.clean import html_to_text

                text = html_to_text(text) or ""
            docs.append(text)
        skipped = {k: v for k, v in stats.counts.items() if k.startswith("skipped")}
        if skipped:
            print0(f"data: skipped {skipped} under {p}: {'; '.join(stats.warnings[:3])}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LmforgeError(f"data at {p} is empty (no text found)")
    return docs


class PretrainData:
    """Tokenized train/val arrays plus what evaluation needs to report bits per byte."""

    def __init__(
        self, train: list[np.ndarray], val: list[np.ndarray], tokenizer, bytes_per_token: float
    ):
        self.train, self.val, self.tokenizer = train, val, tokenizer
        self.bytes_per_token = bytes_per_token


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Documents -> (training, validation) documents: the last `val_fraction` of the
    characters is validation (nanoGPT's split of one text), the document it starts in cut in
    two. Splitting text rather than tokens lets a tokenizer be trained on the training part
    alone."""
    total = sum(len(d) for d in docs)
    train_chars = int(total * (1 - val_fraction))
    for i, doc in enumerate(docs):
        if train_chars <= len(doc):
            head, tail = doc[:train_chars], doc[train_chars:]
            return docs[:i] + [head] * bool(head), [tail] * bool(tail) + docs[i + 1 :]
        train_chars -= len(doc)
    return docs, []


def _tokenizer_for_text(spec: str, docs: list[str], train_docs: list[str]):
    from lmforge.tokenizer import (
        ByteTokenizer,
        CharTokenizer,
        load_tokenizer,
        train_bpe,
        trained_bpe_size,
    )

    if spec in ("char", "auto"):  # documents need an end-of-text id between them
        return CharTokenizer.from_text("".join(docs), with_eot=len(docs) > 1)
    if spec == "byte":
        return ByteTokenizer()
    if vocab := trained_bpe_size(spec, "data.tokenizer"):
        return train_bpe(train_docs, vocab)
    return load_tokenizer(spec)


def encode_documents(tok, docs: list[str]) -> np.ndarray:
    """Documents -> one token stream, an end-of-text id between documents (a blank line
    when the tokenizer has none)."""
    ids: list[int] = []
    encoded = tok.encode_batch(docs)
    if len(encoded) > 1:  # one document needs no separator (nor a newline in the vocabulary)
        separator = [tok.eot_id] if tok.eot_id is not None else tok.encode("\n\n")
    for i, doc_ids in enumerate(encoded):
        if i:
            ids += separator
        ids += doc_ids
    return np.array(ids, dtype=token_dtype(tok.vocab_size))


def text_bytes_per_token(tok, ids: np.ndarray, max_tokens: int = 1_000_000) -> float:
    """UTF-8 bytes of the text the ids stand for, per token, end-of-text tokens counting as
    tokens but not as bytes (they are not text): the divisor that turns nats per token into
    bits per byte. Measured on the first max_tokens ids."""
    sample = np.asarray(ids[:max_tokens])
    text_ids = sample[sample != tok.eot_id] if tok.eot_id is not None else sample
    n_bytes = len(tok.decode(text_ids.tolist()).encode("utf-8"))
    return n_bytes / max(1, len(sample))


def load_pretrain_data(data_cfg, tokenizer=None) -> PretrainData:
    """data.path -> PretrainData. A prepared dataset (manifest.json) brings its own shards and
    tokenizer; text is split by characters (the last val_fraction is validation, as nanoGPT
    does; a `train:N` tokenizer is trained on the rest) and tokenized on the fly. `tokenizer`
    (e.g. from a checkpoint being resumed) wins over data.tokenizer."""
    path = data_cfg.path
    if path and (Path(path) / "manifest.json").is_file():
        return _prepared_data(path, data_cfg.tokenizer)
    docs = read_documents(path, data_cfg.text_field)
    train_docs, val_docs = split_documents(docs, data_cfg.val_fraction)
    tok = tokenizer or _tokenizer_for_text(data_cfg.tokenizer, docs, train_docs)
    train, val = encode_documents(tok, train_docs), encode_documents(tok, val_docs)
    return PretrainData([train], [val], tok, text_bytes_per_token(tok, val))


def _prepared_data(path: str, tokenizer_spec: str) -> PretrainData:
    from lmforge.data.shards import read_prepared
    from lmforge.tokenizer import load_tokenizer, tokenizer_hash

    ds = read_prepared(path)
    tok = ds.tokenizer
    if tokenizer_spec != "auto" and tokenizer_hash(
        load_tokenizer(tokenizer_spec)
    ) != tokenizer_hash(tok):
        raise LmforgeError(
            f"--data.tokenizer={tokenizer_spec} is not the tokenizer {path} was prepared with; "
            "prepared data brings its own (drop --data.tokenizer, or prepare again with it)"
        )
    if ds.num_tokens("val") == 0:
        raise LmforgeError(
            f"{path} has no validation split (prepared with val_fraction 0); run `lmforge "
            "prepare` again with --val-fraction > 0, since training evaluates on held-out data"
        )
    return PretrainData(
        ds.train,
        ds.val,
        tok,
        text_bytes_per_token(tok, np.concatenate([a[:1_000_000] for a in ds.val])),
    )
