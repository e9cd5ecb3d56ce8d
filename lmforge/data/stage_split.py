"""Stage 2 of `lmforge prepare`: the train/val split, decided on each source's documents right
after the docs stage, into `<source>.train.jsonl.zst` and `<source>.val.jsonl.zst` and a
stats.json.

Splitting here, before any tokenizer exists, lets the tokenizer be trained on the train side
only; every later stage reads one side or the other, so nothing of validation leaks into
training. The rule (by UTF-8 bytes, whole documents first) is `split_mix.plan_val_split`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import PrepareConfig
from lmforge.data.split_mix import plan_val_split, split_text
from lmforge.data.stage_cache import Stage, digest, progress
from lmforge.data.stage_docs import JsonlZstWriter, docs_file, read_docs
from lmforge.fileio import write_json

SIDES = ("train", "val")


def stage_split(cfg: PrepareConfig, out: Path, docs: Path) -> tuple[Path, dict[str, Any]]:
    """Split every source's documents -> (stage folder, stats per source)."""
    p = cfg.prepare
    stage = Stage(out, "split", digest([docs.name, p.val_fraction, p.seed]))
    if stage.done:
        return stage.final, json.loads((stage.final / "stats.json").read_text())
    stats: dict[str, Any] = {}
    bar = progress("split", "doc")
    with stage.build() as tmp:
        for src in cfg.sources:
            sizes = np.fromiter(
                (len(t.encode("utf-8")) for t in read_docs(docs, src.name)), dtype=np.int64
            )
            plan = plan_val_split(sizes, p.val_fraction, p.seed, src.name)
            writers = {side: JsonlZstWriter(docs_file(tmp, src.name, side)) for side in SIDES}
            cut = 0
            try:
                for i, text in enumerate(read_docs(docs, src.name)):
                    if i == plan.cut:
                        head, tail = split_text(text, plan.cut_bytes)
                        writers["train"].write(head)
                        if tail:
                            writers["val"].write(tail)
                            cut += 1
                    else:
                        writers["val" if plan.val[i] else "train"].write(text)
                    bar.update()
            finally:
                for w in writers.values():
                    w.close()
            stats[src.name] = {
                **{f"{side}_documents": writers[side].count for side in SIDES},
                **{f"{side}_bytes": writers[side].bytes for side in SIDES},
                "documents_cut": cut,
            }
        bar.close()
        write_json(tmp / "stats.json", stats)
    return stage.final, stats
