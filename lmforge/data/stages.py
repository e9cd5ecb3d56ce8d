"""Stages 3-5 of `lmforge prepare`, after the documents (stage_docs.py) and their train/val
split (stage_split.py); each reads one side of the split at a time:

3. tokenizer  train a byte-level BPE on the train documents (`train:VOCAB`) or load one
4. ids        tokenise each source's train and val documents (uint32 ids + offsets)
5. shards     weighted mixture of the train documents sampled with a seed, every val document
              once; shards and the tokenizer folder in OUT; returns the manifest (the driver
              writes it last), with the realised validation share in tokens
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.common import LmforgeError
from lmforge.config import PrepareConfig
from lmforge.data.shards import FORMAT, MANIFEST, TOKENIZER_DIR, ShardWriter, token_dtype
from lmforge.data.split_mix import plan_mixture, round_robin
from lmforge.data.stage_cache import Stage, digest, progress
from lmforge.data.stage_docs import read_docs
from lmforge.data.stage_split import SIDES
from lmforge.fileio import atomic_folder, write_json
from lmforge.tokenizer import (
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
    trained_bpe_size,
)


def stage_tokenizer(cfg: PrepareConfig, out: Path, split_dir: Path) -> Tokenizer:
    p = cfg.prepare
    spec = p.tokenizer
    if spec == "byte":
        return load_tokenizer("byte")
    if spec == "char":  # both sides: a char vocabulary must cover the val text to encode it
        chars: set[str] = set()
        for src, side in itertools.product(cfg.sources, SIDES):
            for text in read_docs(split_dir, src.name, side):
                chars.update(text)
        return CharTokenizer(sorted(chars), with_eot=True)
    if vocab := trained_bpe_size(spec, "prepare.tokenizer"):
        stage = Stage(out, "tokenizer", digest([split_dir.name, vocab, p.tokenizer_sample_bytes]))
        if not stage.done:
            with stage.build() as tmp:
                texts = round_robin(
                    [read_docs(split_dir, s.name, "train") for s in cfg.sources],
                    p.tokenizer_sample_bytes,
                )
                train_bpe(texts, vocab).save(tmp)
        return load_tokenizer(stage.final)
    tok = load_tokenizer(spec)
    if tok.eot_id is None:
        raise LmforgeError(
            f"tokenizer {spec} has no <|endoftext|> token, which shards need between documents"
        )
    return tok


def _tokenize(texts: Iterator[str], tok: Tokenizer, path: Path, bar: Any) -> tuple[list[int], int]:
    """Write the texts' ids to `path` (uint32) -> (document offsets into it, UTF-8 bytes read)."""
    offsets = [0]
    n_bytes = 0
    with open(path, "wb") as f:
        while batch := list(itertools.islice(texts, 512)):
            for ids in tok.encode_batch(batch):
                f.write(np.asarray(ids, dtype=np.uint32).tobytes())
                offsets.append(offsets[-1] + len(ids))
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
            bar.update(len(batch))
    return offsets, n_bytes


def stage_ids(
    cfg: PrepareConfig, out: Path, split_dir: Path, tok: Tokenizer
) -> tuple[Path, dict[str, Any]]:
    """Tokenise every document of both sides: `<source>.<side>.ids` (uint32) +
    `<source>.<side>.idx.npy` (offsets)."""
    stage = Stage(out, "ids", digest([split_dir.name, tokenizer_hash(tok)]))
    if stage.done:
        return stage.final, json.loads((stage.final / "stats.json").read_text())
    stats: dict[str, Any] = {}
    bar = progress("tokenize", "doc")
    with stage.build() as tmp:
        for src in cfg.sources:
            tokens = n_bytes = 0
            for side in SIDES:
                offsets, side_bytes = _tokenize(
                    read_docs(split_dir, src.name, side), tok, tmp / f"{src.name}.{side}.ids", bar
                )
                np.save(tmp / f"{src.name}.{side}.idx.npy", np.asarray(offsets, dtype=np.int64))
                tokens += offsets[-1]
                n_bytes += side_bytes
            stats[src.name] = {
                "tokens": tokens,
                "bytes": n_bytes,
                "bytes_per_token": round(n_bytes / max(tokens, 1), 4),
            }
        bar.close()
        write_json(tmp / "stats.json", stats)
    return stage.final, stats


Side = tuple[np.ndarray, np.ndarray]  # one source's side: (token ids, document offsets)


def _side_ids(ids_dir: Path, name: str, side: str) -> Side:
    offsets = np.load(ids_dir / f"{name}.{side}.idx.npy")
    path = ids_dir / f"{name}.{side}.ids"
    tokens = np.memmap(path, dtype=np.uint32, mode="r") if offsets[-1] else np.zeros(0, np.uint32)
    return tokens, offsets


def _write_split(writer: ShardWriter, order: list[tuple[int, int]], sides: list[Side]) -> None:
    for src_i, doc in order:
        tokens, offsets = sides[src_i]
        writer.add(tokens[offsets[doc] : offsets[doc + 1]])


def _val_share(cfg: PrepareConfig, data: dict[str, dict[str, Side]]) -> dict[str, Any]:
    """The realised validation share in tokens (a separator per document included), per source
    and overall, of the sources' own tokens (before the mixture repeats or drops any)."""
    tokens = {
        name: {side: int(offsets[-1]) + len(offsets) - 1 for side, (_, offsets) in sides.items()}
        for name, sides in data.items()
    }
    val = sum(t["val"] for t in tokens.values())
    total = sum(t["train"] + t["val"] for t in tokens.values())
    return {
        "asked": cfg.prepare.val_fraction,
        "realised": round(val / max(total, 1), 4),
        "sources": {
            name: round(t["val"] / max(t["train"] + t["val"], 1), 4) for name, t in tokens.items()
        },
    }


def stage_shards(
    cfg: PrepareConfig, out: Path, ids_dir: Path, tok: Tokenizer, key: str
) -> dict[str, Any]:
    """Mix and write the shards and the tokenizer into OUT -> the manifest."""
    p = cfg.prepare
    names = [s.name for s in cfg.sources]
    data = {n: {side: _side_ids(ids_dir, n, side) for side in SIDES} for n in names}
    picks, mixture = plan_mixture(
        {n: np.diff(data[n]["train"][1]) for n in names},
        {s.name: s.weight for s in cfg.sources},
        p.total_tokens,
        p.seed,
    )
    train_order = (
        np.concatenate(
            [np.stack([np.full(len(idx), names.index(n)), idx], axis=1) for n, idx in picks]
        )
        if picks
        else np.zeros((0, 2), dtype=np.int64)
    )
    rng = np.random.default_rng(p.seed + 1)
    train_order = train_order[rng.permutation(len(train_order))]
    if len(train_order) == 0:
        raise LmforgeError(
            "no training documents left after cleaning and dedup; see the counts above and loosen `clean` thresholds"
        )
    val_order = [(i, d) for i, n in enumerate(names) for d in range(len(data[n]["val"][1]) - 1)]

    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is not a finished dataset
    for old in [*out.glob("train_*.bin"), *out.glob("val_*.bin"), *out.glob(".*.bin.tmp")]:
        old.unlink()
    dtype = token_dtype(tok.vocab_size)
    splits: dict[str, Any] = {}
    for split, order in (("train", train_order.tolist()), ("val", val_order)):
        writer = ShardWriter(out, split, dtype, tok.eot_id, p.tokens_per_shard)
        _write_split(writer, order, [data[n][split] for n in names])
        shards = writer.close()
        splits[split] = {
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
            "shards": shards,
        }
    with atomic_folder(out / TOKENIZER_DIR) as tmp:
        tok.save(tmp)
    return {
        "format": FORMAT,
        "stage_key": key,
        "dtype": dtype.name,
        "eot_id": int(tok.eot_id),
        "tokenizer": {
            "sha256": tokenizer_hash(tok),
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
        },
        "splits": splits,
        "val_split": _val_share(cfg, data),
        "mixture": mixture,
        "sources": {s.name: {"paths": s.paths, "weight": s.weight} for s in cfg.sources},
        "seed": p.seed,
    }
