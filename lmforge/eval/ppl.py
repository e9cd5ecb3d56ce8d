"""Perplexity (`--task ppl[=PATH]`): every token of every document scored exactly once with
rolling windows (scoring.Scorer.rolling), as lm-evaluation-harness's loglikelihood_rolling
does, with an optional stride so that windows overlap and later tokens keep more context.

PATH is a text file (one document), a folder or a json/jsonl/parquet/csv file (read as
`lmforge prepare` reads a source, field `text`), or a prepared dataset (its validation split,
cut into documents at end-of-text tokens; it must use the model's tokenizer). The default is
the bundled Shakespeare's held-out last 10% of characters, nanoGPT's validation split.

Reports nats per token, perplexity and bits per byte (UTF-8 bytes of the documents' text,
which makes models with different tokenizers comparable)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError
from lmforge.data.loader import bundled_text_path, read_documents
from lmforge.data.shards import is_prepared, read_prepared
from lmforge.eval.scoring import Scorer, TokenStats, concat_stats
from lmforge.eval.tasks import TaskOptions, TaskResult, file_sha256
from lmforge.fileio import read_utf8_text
from lmforge.tokenizer import tokenizer_hash

HELD_OUT_FRACTION = 0.1


def held_out_shakespeare() -> str:
    text = read_utf8_text(bundled_text_path())
    return text[int(len(text) * (1 - HELD_OUT_FRACTION)) :]


def documents(
    scorer: Scorer, path: Path | None
) -> tuple[list[list[int]], list[int], dict[str, str]]:
    """(token ids of each document, UTF-8 bytes of each one's text, files read -> sha256)."""
    if path is None:
        text, source = held_out_shakespeare(), bundled_text_path()
        files = {f"{source} (last 10%)": file_sha256(source)}
        return scorer.encode_texts([text]), [len(text.encode())], files
    if is_prepared(path):
        return _prepared_documents(scorer, path)
    texts = read_documents(str(path), ["text"])
    ids = scorer.encode_texts(texts)
    return ids, [len(t.encode()) for t in texts], {str(path): file_sha256(path)}


def _prepared_documents(scorer: Scorer, path: Path):
    ds = read_prepared(path)
    if tokenizer_hash(ds.tokenizer) != tokenizer_hash(scorer.tokenizer):
        raise LmforgeError(f"{path} was prepared with another tokenizer than the model's")
    tokens = np.concatenate(ds.val) if ds.val else np.zeros(0, dtype=np.int64)
    if len(tokens) == 0:
        raise LmforgeError(f"{path} has no validation split to score")
    cuts = np.flatnonzero(tokens == ds.eot_id)
    pieces = [d[:-1] if d[-1] == ds.eot_id else d for d in np.split(tokens, cuts + 1) if len(d)]
    docs = [d.tolist() for d in pieces if len(d)]  # the prefix token stands before each
    nbytes = [len(scorer.tokenizer.decode(d).encode()) for d in docs]
    return docs, nbytes, {str(path / "manifest.json"): file_sha256(path / "manifest.json")}


def perplexity(stats: TokenStats, nbytes: int) -> dict[str, float]:
    nats = -stats.logprob.double().sum().item()
    n = len(stats.logprob)
    return {
        "nats_per_token": nats / n,
        "perplexity": math.exp(nats / n),
        "bits_per_byte": nats / (math.log(2) * nbytes),
        "tokens": n,
    }


def score_documents(scorer: Scorer, docs: list[list[int]], stride: int | None) -> TokenStats:
    return concat_stats([scorer.rolling(d, stride) for d in docs if d])


def run(scorer: Scorer, path: Path | None, options: TaskOptions) -> TaskResult:
    docs, nbytes, files = documents(scorer, path)
    docs, nbytes = docs[: options.limit], nbytes[: options.limit]
    stats = score_documents(scorer, docs, options.stride)
    details = {
        "stride": options.stride or scorer.block,
        "documents": len(docs),
        "first_token_unscored": scorer.prefix_id is None,
    }
    return TaskResult(perplexity(stats, sum(nbytes)), len(docs), details, files)
