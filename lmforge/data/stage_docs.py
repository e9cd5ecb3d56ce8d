"""Stage 1 of `lmforge prepare`: collect -> clean -> dedup, into one `<source>.jsonl.zst` per
source and a stats.json.

Cleaning and MinHash signatures run on the executor's workers (batches of documents; local
processes on all cores, or a Dask cluster: executors.py); dedup decisions stream in the main
process, in source order, so the result does not depend on the executor or its workers.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.config import CleanConfig, DedupConfig, PrepareConfig
from lmforge.data.clean import Cleaner
from lmforge.data.collect import CollectStats, iter_documents
from lmforge.data.dedup import Deduplicator, MinHasher, exact_key
from lmforge.data.executors import open_executor
from lmforge.data.stage_cache import Stage, digest, fingerprint, progress
from lmforge.fileio import write_json

_BATCH = 256  # documents per worker task
_worker_state: dict[str, Any] = {}


def docs_file(folder: Path, source: str, split: str = "") -> Path:
    """`<source>.jsonl.zst` (this stage), or `<source>.<split>.jsonl.zst` (stage_split.py)."""
    return folder / f"{source}{'.' + split if split else ''}.jsonl.zst"


def read_docs(folder: Path, source: str, split: str = "") -> Iterator[str]:
    """A source's documents from a stage folder (this one's, or one side of the split), in order."""
    import zstandard

    with (
        open(docs_file(folder, source, split), "rb") as raw,
        zstandard.ZstdDecompressor().stream_reader(raw) as r,
    ):
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            yield json.loads(line)["text"]


class JsonlZstWriter:
    """Documents -> a `{"text": ...}` per line, zstd-compressed; counts documents and bytes."""

    def __init__(self, path: Path):
        import zstandard

        self._raw = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._w = zstandard.ZstdCompressor(level=3).stream_writer(self._raw)
        self.count = 0
        self.bytes = 0

    def write(self, text: str) -> None:
        line = json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") + b"\n"
        self._w.write(line)
        self.count += 1
        self.bytes += len(text.encode("utf-8"))

    def close(self) -> None:
        self._w.flush()
        self._w.close()


def _worker_init(cleaners: list[CleanConfig], dedup: DedupConfig) -> None:
    _worker_state["cleaners"] = [Cleaner(c) for c in cleaners]
    _worker_state["hasher"] = (
        MinHasher(dedup.num_perm, dedup.shingle_size, dedup.seed) if dedup.near else None
    )


def _clean_batch(task: tuple[int, list[tuple[str, str]]]) -> tuple[int, list[tuple[Any, ...]]]:
    """In a worker: clean each document and precompute its dedup keys."""
    src_idx, docs = task
    cleaner: Cleaner = _worker_state["cleaners"][src_idx]
    hasher: MinHasher | None = _worker_state["hasher"]
    out = []
    for text, kind in docs:
        res = cleaner.clean(text, kind)
        if res.text is None:
            out.append((None, res.reason, 0, None, None))
        else:
            sig = hasher.signature(res.text) if hasher else None
            out.append((res.text, None, res.pii, exact_key(res.text), sig))
    return src_idx, out


def _doc_batches(
    cfg: PrepareConfig, stats: dict[str, CollectStats], origins: deque
) -> Iterator[tuple[int, list]]:
    for i, src in enumerate(cfg.sources):
        batch: list[tuple[str, str]] = []
        for doc in iter_documents(src, stats[src.name], cfg.fetch):
            batch.append((doc.text, doc.kind))
            origins.append(doc.origin)
            if len(batch) == _BATCH:
                yield i, batch
                batch = []
        if batch:
            yield i, batch


def stage_docs(cfg: PrepareConfig, out: Path) -> tuple[Path, dict[str, Any]]:
    """Collect, clean and deduplicate every source -> (stage folder, stats per source)."""
    key = digest(
        [
            [dataclasses.asdict(s) for s in cfg.sources],  # each with its full clean settings
            [fingerprint(s) for s in cfg.sources],
            dataclasses.asdict(cfg.dedup),
            dataclasses.asdict(cfg.fetch),
        ]
    )
    stage = Stage(out, "docs", key)
    if stage.done:
        return stage.final, json.loads((stage.final / "stats.json").read_text())
    with stage.build() as tmp:
        stats = _clean_and_dedup(cfg, tmp)
        write_json(tmp / "stats.json", stats)
    return stage.final, stats


def _clean_and_dedup(cfg: PrepareConfig, folder: Path) -> dict[str, Any]:
    cleaners = [s.clean for s in cfg.sources]
    collect = {s.name: CollectStats() for s in cfg.sources}
    drops = {s.name: Counter() for s in cfg.sources}
    pii = Counter()
    dedup = Deduplicator(cfg.dedup) if cfg.dedup.exact or cfg.dedup.near else None
    origins: deque = deque()
    with open_executor(cfg.prepare, _worker_init, (cleaners, cfg.dedup)) as executor:
        writers = {s.name: JsonlZstWriter(docs_file(folder, s.name)) for s in cfg.sources}
        bar = progress("clean+dedup", "doc")
        try:
            batches = _doc_batches(cfg, collect, origins)
            for src_idx, results in executor.map(_clean_batch, batches):
                name = cfg.sources[src_idx].name
                for text, reason, n_pii, ekey, sig in results:
                    origin = origins.popleft()
                    if text is not None and dedup is not None:
                        reason = dedup.check(text, origin, ekey, sig)
                    if reason:
                        drops[name][reason] += 1
                        continue
                    pii[name] += n_pii
                    writers[name].write(text)
                bar.update(len(results))
        finally:
            bar.close()
            for w in writers.values():
                w.close()
    stats: dict[str, Any] = {
        s.name: {
            "documents_in": sum(drops[s.name].values()) + writers[s.name].count,
            "documents_out": writers[s.name].count,
            "bytes_out": writers[s.name].bytes,
            "dropped": dict(sorted(drops[s.name].items())),
            "collect": dict(sorted(collect[s.name].counts.items())),
            "pii_replaced": pii[s.name],
            "urls": collect[s.name].urls,
            "warnings": collect[s.name].warnings[:20],
        }
        for s in cfg.sources
    }
    stats["_dedup"] = dedup.stats.report() if dedup else {}
    return stats
