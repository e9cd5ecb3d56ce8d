"""`lmforge prepare`'s driver: raw sources -> cleaned, deduplicated, mixed token shards, with
a report.

Stages, each cached under `OUT/.work/<stage>-<key>/` (stage_cache.py), so an interrupted run
resumes from the last finished stage:

1. docs       collect -> clean -> dedup across all sources (stage_docs.py)
2. split      each source's documents into train and val by size (stage_split.py)
3. tokenizer  train a byte-level BPE on the train documents, or load one (stages.py)
4. ids        tokenise each source's train and val documents (stages.py)
5. shards     mix and write shards + tokenizer into OUT (stages.py); then report.json,
              and manifest.json last: its presence marks the dataset complete
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError
from lmforge.config import PrepareConfig
from lmforge.data.collect import resolve_paths
from lmforge.data.report import build_report, drop_summary
from lmforge.data.shards import MANIFEST, REPORT
from lmforge.data.stage_cache import WORK, digest
from lmforge.data.stage_docs import stage_docs
from lmforge.data.stage_split import stage_split
from lmforge.data.stages import stage_ids, stage_shards, stage_tokenizer
from lmforge.fileio import write_json


def _check_out(out: Path) -> None:
    """OUT must be new, empty, or a folder this command made (nothing else is overwritten)."""
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file; give a folder")
    if (
        out.is_dir()
        and any(out.iterdir())
        and not (out / WORK).is_dir()
        and not (out / MANIFEST).is_file()
    ):
        raise LmforgeError(
            f"--out {out} holds other files; give a new or empty folder (nothing is overwritten)"
        )


def prepare(cfg: PrepareConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run (or resume) every stage; returns the report also written to OUT/report.json."""
    out = Path(out)
    if not cfg.sources:
        raise LmforgeError("no inputs: give INPUT paths or a --config with `sources`")
    _check_out(out)
    for src in cfg.sources:
        resolve_paths(src.paths)  # missing inputs fail now, before any work
    if force:
        shutil.rmtree(out / WORK, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t = time.perf_counter()
    docs, doc_stats = stage_docs(cfg, out)
    times["collect_clean_dedup"] = time.perf_counter() - t
    if not any(doc_stats[s.name]["documents_out"] for s in cfg.sources):
        raise LmforgeError(f"no documents left after cleaning: {drop_summary(doc_stats, cfg)}")

    t = time.perf_counter()
    split_dir, split_stats = stage_split(cfg, out, docs)
    times["split"] = time.perf_counter() - t

    t = time.perf_counter()
    tok = stage_tokenizer(cfg, out, split_dir)
    times["tokenizer"] = time.perf_counter() - t

    t = time.perf_counter()
    ids_dir, id_stats = stage_ids(cfg, out, split_dir, tok)
    times["tokenize"] = time.perf_counter() - t

    p = cfg.prepare
    key = digest(
        [
            ids_dir.name,  # its key holds the split folder's: val_fraction and seed
            p.seed,
            p.total_tokens,
            p.tokens_per_shard,
            [s.weight for s in cfg.sources],
        ]
    )
    old = _read_manifest(out)
    t = time.perf_counter()
    reused = bool(old and old.get("stage_key") == key and not force)
    manifest = old if reused else stage_shards(cfg, out, ids_dir, tok, key)
    times["mix_shards"] = time.perf_counter() - t
    report = build_report(cfg, str(out), doc_stats, split_stats, id_stats, manifest, reused, times)
    write_json(out / REPORT, report)
    if not reused:
        write_json(out / MANIFEST, manifest)  # last: its presence marks the dataset complete
    return report


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
