"""Data pipeline throughput: cleaning, exact and near-dup dedup, tokenisation (MB/s), and BPE
training time through lmforge vs Hugging Face `tokenizers` called directly.

The corpus (>= 50 MB by default) is real text found on the machine: the bundled assets,
Python sources (stdlib and installed packages) and their prose docs (.md/.rst/.txt). Each file
is one document. Cleaning and dedup run in one process (MB/s per core); tokenisation uses the
`tokenizers` thread pool (all cores).

    python benchmarks/data_throughput.py [--mb 55] [--bpe-mb 20] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from lmforge.config import CleanConfig, DedupConfig
from lmforge.data.clean import Cleaner
from lmforge.data.dedup import Deduplicator
from lmforge.tokenizer import SPECIAL_TOKENS, train_bpe

ROOT = Path(__file__).resolve().parents[1]


def build_corpus(target_mb: float) -> list[str]:
    docs = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "lmforge" / "assets").iterdir())]
    roots = {
        Path(sysconfig.get_paths()["stdlib"]),
        Path(sysconfig.get_paths()["purelib"]),
        Path("/usr/share/doc"),
    }
    prose, code = [], []
    for root in sorted(roots):
        for p in sorted(root.rglob("*")):
            if p.suffix in (".md", ".rst", ".txt") and p.is_file():
                prose.append(p)
            elif p.suffix == ".py" and p.is_file():
                code.append(p)
    size = sum(len(d) for d in docs)
    for p in prose + code:  # prose first, then code until the target size
        if size >= target_mb * 1e6:
            break
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        size += len(text)
    return docs


def mb(docs: list[str]) -> float:
    return sum(len(d.encode("utf-8")) for d in docs) / 1e6


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bpe_direct(texts: list[str], vocab: int) -> None:
    """The same byte-level BPE, built with `tokenizers` alone (the peer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=55.0, help="corpus size in MB")
    ap.add_argument("--bpe-mb", type=float, default=20.0, help="text used for BPE training")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument(
        "--repeats", type=int, default=3, help="BPE training runs per side (alternating)"
    )
    args = ap.parse_args()

    t = time.perf_counter()
    docs = build_corpus(args.mb)
    size = mb(docs)
    print(
        f"corpus: {len(docs)} documents, {size:.1f} MB (built in {time.perf_counter() - t:.1f}s); "
        f"{os.cpu_count()} cores; python {sys.version.split()[0]}"
    )

    cleaner = Cleaner(CleanConfig())
    cleaned: list[str] = []
    secs = timed(lambda: cleaned.extend(r.text for r in map(cleaner.clean, docs) if r.text))
    print(
        f"clean (normalise + Gopher rules), 1 process: {size / secs:6.2f} MB/s  ({secs:.1f}s, {len(cleaned)} kept)"
    )

    exact = Deduplicator(DedupConfig(near=False))
    secs = timed(lambda: [exact.check(d) for d in docs])
    print(
        f"exact dedup, 1 process:                    {size / secs:6.2f} MB/s  ({secs:.1f}s, {exact.stats.exact_duplicates} dups)"
    )

    near = Deduplicator(DedupConfig(exact=False))
    secs = timed(lambda: [near.check(d) for d in docs])
    rep = near.stats.report()
    print(
        f"near dedup (MinHash 128 + LSH), 1 process: {size / secs:6.2f} MB/s  ({secs:.1f}s, "
        f"{rep['near_duplicates']} dups in {rep['near_dup_clusters']} clusters)"
    )

    sample, used = [], 0
    for d in docs:
        if used >= args.bpe_mb * 1e6:
            break
        sample.append(d)
        used += len(d.encode("utf-8"))
    lm, direct = [], []
    tok = None
    for _ in range(args.repeats):  # alternate so drift on a shared machine hits both sides
        t = time.perf_counter()
        tok = train_bpe(sample, args.vocab)
        lm.append(time.perf_counter() - t)
        direct.append(timed(lambda: bpe_direct(sample, args.vocab)))
    a, b = statistics.median(lm), statistics.median(direct)
    print(
        f"BPE training, {used / 1e6:.1f} MB, vocab {args.vocab}: lmforge {a:.2f}s vs tokenizers {b:.2f}s "
        f"(median of {args.repeats}; overhead {100 * (a / b - 1):+.1f}%)"
    )

    ids: list[list[int]] = []
    secs = timed(
        lambda: [ids.extend(tok.encode_batch(docs[i : i + 512])) for i in range(0, len(docs), 512)]
    )
    n_tokens = sum(map(len, ids))
    print(
        f"tokenise (encode_batch, all cores):        {size / secs:6.2f} MB/s  ({secs:.1f}s, "
        f"{n_tokens / secs / 1e6:.2f} M tokens/s, {size * 1e6 / n_tokens:.2f} bytes/token)"
    )


if __name__ == "__main__":
    main()
