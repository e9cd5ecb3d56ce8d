"""The evaluation tasks `lmforge eval --task NAME[=FILE]` runs, and what they share.

A task is a module in lmforge/eval/ with `run(scorer, path, options) -> TaskResult`: `path` is
the FILE of the spec (None: the task's bundled default data), `options` the run's settings.
Each is usable from Python as well:

    from lmforge.eval import mc
    result = mc.run(Scorer(model, tokenizer), Path("piqa.jsonl"), TaskOptions())
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError, did_you_mean

TASKS = {
    "ppl": "lmforge.eval.ppl",
    "mc": "lmforge.eval.mc",
    "gen": "lmforge.eval.gen",
    "calibration": "lmforge.eval.calibration",
    "bias": "lmforge.eval.bias",
    "toxicity": "lmforge.eval.toxicity",
}
"""Task name -> the module that runs it."""

ASSETS = Path(__file__).resolve().parents[1] / "assets"
EVAL_ASSETS = ASSETS / "eval"
"""Bundled evaluation data (lmforge/assets/eval/SOURCES.md names origins and licences)."""


@dataclass
class TaskOptions:
    """Settings shared by every task (each reads the ones it needs); all go into the report."""

    limit: int | None = None
    """Score only the first N items (documents for ppl); None = all."""
    stride: int | None = None
    """ppl / next-token calibration: window stride in tokens; None = the block size."""
    max_new_tokens: int = 64
    """gen / toxicity: tokens generated per prompt (greedy)."""
    classifier: str | None = None
    """toxicity: an lmforge classifier checkpoint whose `flag_label` marks a text as toxic."""
    flag_label: str = "rude"
    """toxicity: the classifier label that counts as flagged."""
    chat: bool = False
    """gen / toxicity: wrap prompts in the chat template (for SFT/DPO/PPO models)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("limit", "stride", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} {value} must be >= 1")


@dataclass
class TaskResult:
    metrics: dict[str, float]
    """Headline numbers, flat (name -> value), as report.json's tasks[NAME]."""
    items: int
    """Items scored (documents, questions, pairs, prompts)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else the report shows or plots, JSON-serialisable (per-group breakdowns,
    calibration bins, sample generations, truncation counts)."""
    data: dict[str, str] = field(default_factory=dict)
    """The files the task read -> their SHA-256, so a report says exactly what produced it."""


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """'NAME' or 'NAME=FILE' -> (name, path or None); an unknown name names the nearest."""
    name, _, file = spec.partition("=")
    name = name.strip()
    if name not in TASKS:
        raise LmforgeError(
            f"unknown task {name!r}{did_you_mean(name, TASKS)}; tasks: {', '.join(TASKS)}"
        )
    return name, Path(file) if file else None


def run_task(name: str, scorer, path: Path | None, options: TaskOptions) -> TaskResult:
    module = importlib.import_module(TASKS[name])
    return module.run(scorer, path, options)


def file_sha256(path: Path) -> str:
    """A file's SHA-256; a folder's is that of its files' relative paths and hashes."""
    path = Path(path)
    if path.is_dir():
        lines = [
            f"{f.relative_to(path).as_posix()}\t{file_sha256(f)}\n"
            for f in sorted(path.rglob("*"))
            if f.is_file()
        ]
        return hashlib.sha256("".join(lines).encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
