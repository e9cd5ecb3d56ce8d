"""`lmforge tokenizer train --input ... --vocab-size N --out DIR`: a byte-level BPE from raw files.

Inputs are read like `lmforge prepare` sources (files, folders, globs; any supported format,
compressed or not) and normalised (NFC, whitespace), without the quality filters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.config import SourceConfig
from lmforge.data.clean import html_to_text, normalize
from lmforge.data.collect import HTML, CollectStats, iter_documents
from lmforge.tokenizer import SPECIAL_TOKENS, bytes_per_token, train_bpe


def add_arguments(parser, verb: str) -> None:
    parser.add_argument("action", choices=["train"], help="what to do (train)")
    parser.add_argument(
        "--input", nargs="+", required=True, help="files, folders or globs of training text"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included"
    )
    parser.add_argument(
        "--out", required=True, help="folder for tokenizer.json (+ tokenizer_config.json)"
    )
    parser.add_argument(
        "--text-field", default="text", help="json/jsonl/parquet/csv field(s), comma-separated"
    )
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="minimum count of a pair to be merged"
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=1_000_000_000,
        help="stop reading input after this much text",
    )
    parser.add_argument(
        "--special-tokens", default=",".join(SPECIAL_TOKENS), help="comma-separated added tokens"
    )


def iter_texts(
    paths: list[str], text_field: list[str], max_bytes: int, stats: CollectStats
) -> Iterator[str]:
    src = SourceConfig(name="input", paths=paths, text_field=text_field, chunk_bytes=1 << 20)
    used = 0
    for doc in iter_documents(src, stats):
        raw = (html_to_text(doc.text) or "") if doc.kind == HTML else doc.text
        text = normalize(raw)
        if text:
            used += len(text)
            yield text
        if used >= max_bytes:
            return


def run(args) -> int:
    out = Path(args.out)
    if (out / "tokenizer.json").exists():
        raise LmforgeError(
            f"{out / 'tokenizer.json'} exists; choose another --out (nothing is overwritten)"
        )
    stats = CollectStats()
    fields = args.text_field.split(",")
    t0 = time.perf_counter()
    tok = train_bpe(
        iter_texts(args.input, fields, args.max_bytes, stats),
        args.vocab_size,
        special_tokens=[t for t in args.special_tokens.split(",") if t],
        min_frequency=args.min_frequency,
    )
    seconds = time.perf_counter() - t0
    if stats.counts["files"] == 0:
        raise LmforgeError(f"no readable text in {' '.join(args.input)}")
    tok.save(out)
    bpt = bytes_per_token(tok, iter_texts(args.input, fields, 10_000_000, CollectStats()))
    skipped = {k: v for k, v in stats.counts.items() if k.startswith("skipped")}
    print(
        f"trained a {tok.vocab_size}-token byte-level BPE in {seconds:.1f}s on {stats.counts['files']} file(s)"
        f"{f' (skipped: {skipped})' if skipped else ''}; {bpt['bytes_per_token']:.2f} bytes/token; wrote {out}"
    )
    return 0
