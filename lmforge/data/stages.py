"""Stages 2-4 of `lmforge prepare`, after the documents (stage_docs.py):

2. tokenizer  train a byte-level BPE on the train documents (`train:VOCAB`) or load one
3. ids        tokenise each source's documents (uint32 ids + offsets)
4. shards     train/val split by document, weighted mixture sampled with a seed, shards and
              the tokenizer folder in OUT; returns the manifest (the driver writes it last)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.common import LmforgeError
from lmforge.config import PrepareConfig, SourceConfig
from lmforge.data.shards import FORMAT, MANIFEST, TOKENIZER_DIR, ShardWriter, token_dtype
from lmforge.data.split_mix import plan_mixture, round_robin, val_mask
from lmforge.data.stage_cache import Stage, digest, progress
from lmforge.data.stage_docs import read_docs
from lmforge.fileio import atomic_folder, write_json
from lmforge.tokenizer import (
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
)


def _train_docs(
    docs: Path, cfg: PrepareConfig, stats: dict[str, Any], src: SourceConfig
) -> Iterator[str]:
    """A source's documents that are not held out for validation."""
    p = cfg.prepare
    mask = val_mask(stats[src.name]["documents_out"], p.val_fraction, p.seed, src.name)
    for i, text in enumerate(read_docs(docs, src.name)):
        if not mask[i]:
            yield text


def stage_tokenizer(cfg: PrepareConfig, out: Path, docs: Path, stats: dict[str, Any]) -> Tokenizer:
    p = cfg.prepare
    spec = p.tokenizer
    if spec == "byte":
        return load_tokenizer("byte")
    if spec == "char":
        chars: set[str] = set()
        for src in cfg.sources:
            for text in read_docs(docs, src.name):
                chars.update(text)
        return CharTokenizer(sorted(chars), with_eot=True)
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            raise LmforgeError(
                f"--prepare.tokenizer {spec!r}: expected train:VOCAB_SIZE, e.g. train:8192"
            ) from None
        key = digest([docs.name, vocab, p.tokenizer_sample_bytes, p.val_fraction, p.seed])
        stage = Stage(out, "tokenizer", key)
        if not stage.done:
            with stage.build() as tmp:
                texts = round_robin(
                    [_train_docs(docs, cfg, stats, s) for s in cfg.sources],
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


def stage_ids(
    cfg: PrepareConfig, out: Path, docs: Path, tok: Tokenizer
) -> tuple[Path, dict[str, Any]]:
    """Tokenise every kept document: `<source>.ids` (uint32) + `<source>.idx.npy` (offsets)."""
    stage = Stage(out, "ids", digest([docs.name, tokenizer_hash(tok)]))
    if stage.done:
        return stage.final, json.loads((stage.final / "stats.json").read_text())
    stats: dict[str, Any] = {}
    bar = progress("tokenize", "doc")
    with stage.build() as tmp:
        for src in cfg.sources:
            offsets = [0]
            n_bytes = 0
            with open(tmp / f"{src.name}.ids", "wb") as f:
                batch: list[str] = []
                for text in itertools.chain(read_docs(docs, src.name), [None]):
                    if text is not None:
                        batch.append(text)
                    if batch and (text is None or len(batch) == 512):
                        for ids in tok.encode_batch(batch):
                            f.write(np.asarray(ids, dtype=np.uint32).tobytes())
                            offsets.append(offsets[-1] + len(ids))
                        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
                        bar.update(len(batch))
                        batch = []
            np.save(tmp / f"{src.name}.idx.npy", np.asarray(offsets, dtype=np.int64))
            tokens = offsets[-1]
            stats[src.name] = {
                "tokens": tokens,
                "bytes": n_bytes,
                "bytes_per_token": round(n_bytes / max(tokens, 1), 4),
            }
        bar.close()
        write_json(tmp / "stats.json", stats)
    return stage.final, stats


def _source_ids(ids_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.load(ids_dir / f"{name}.idx.npy")
    path = ids_dir / f"{name}.ids"
    tokens = np.memmap(path, dtype=np.uint32, mode="r") if offsets[-1] else np.zeros(0, np.uint32)
    return tokens, offsets


def _write_split(
    writer: ShardWriter,
    order: list[tuple[str, int]] | np.ndarray,
    names: list[str],
    data: dict[str, tuple[np.ndarray, np.ndarray]],
) -> None:
    for src_i, doc in order:
        tokens, offsets = data[names[src_i]]
        writer.add(tokens[offsets[doc] : offsets[doc + 1]])


def stage_shards(
    cfg: PrepareConfig, out: Path, ids_dir: Path, tok: Tokenizer, key: str
) -> dict[str, Any]:
    """Split, mix and write the shards and the tokenizer into OUT -> the manifest."""
    p = cfg.prepare
    names = [s.name for s in cfg.sources]
    data = {n: _source_ids(ids_dir, n) for n in names}
    train_lens: dict[str, np.ndarray] = {}
    train_docs: dict[str, np.ndarray] = {}
    val_pairs = []
    for i, n in enumerate(names):
        offsets = data[n][1]
        mask = val_mask(len(offsets) - 1, p.val_fraction, p.seed, n)
        train_docs[n] = np.flatnonzero(~mask)
        train_lens[n] = np.diff(offsets)[train_docs[n]]
        val_pairs += [(i, int(d)) for d in np.flatnonzero(mask)]
    picks, mixture = plan_mixture(
        train_lens, {s.name: s.weight for s in cfg.sources}, p.total_tokens, p.seed
    )
    train_order = (
        np.concatenate(
            [
                np.stack([np.full(len(idx), names.index(n)), train_docs[n][idx]], axis=1)
                for n, idx in picks
            ]
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

    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder is not a finished dataset
    for old in [*out.glob("train_*.bin"), *out.glob("val_*.bin"), *out.glob(".*.bin.tmp")]:
        old.unlink()
    dtype = token_dtype(tok.vocab_size)
    splits: dict[str, Any] = {}
    for split, order in (("train", train_order.tolist()), ("val", val_pairs)):
        writer = ShardWriter(out, split, dtype, tok.eot_id, p.tokens_per_shard)
        _write_split(writer, order, names, data)
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
        "mixture": mixture,
        "sources": {s.name: {"paths": s.paths, "weight": s.weight} for s in cfg.sources},
        "seed": p.seed,
    }
