"""`lmforge prepare`: raw sources -> cleaned, deduplicated, mixed token shards (lmforge/data/prepare.py).

Sources come from a YAML recipe (`--config`), from INPUT paths (one source each), or both;
every setting is a `--section.key=value` override, and the common ones have shorthands.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from lmforge.cli.options import add_config_options, config_overrides
from lmforge.config import PrepareConfig, SourceConfig, build_prepare_config, describe_keys
from lmforge.data.prepare import prepare
from lmforge.data.report import format_report
from lmforge.data.shards import REPORT

SHORTHANDS = {
    "--tokenizer": "prepare.tokenizer",
    "--val-fraction": "prepare.val_fraction",
    "--seed": "prepare.seed",
    "--workers": "prepare.workers",
    "--executor": "prepare.executor",
}


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="files, folders, globs, URLs or .urls lists (one source each, added to --config's)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output folder for shards, tokenizer, manifest.json and report.json",
    )
    parser.add_argument(
        "--config", metavar="FILE.yaml", help="a YAML recipe (see configs/prepare_*.yaml)"
    )
    parser.add_argument(
        "--text-field",
        default="text",
        metavar="A,B",
        help="json/jsonl/parquet/csv field(s) of the INPUTs, comma-separated",
    )
    parser.add_argument(
        "--force", action="store_true", help="redo every stage instead of reusing finished ones"
    )
    for flag, key in SHORTHANDS.items():  # same dest: given, they become that key's override
        parser.add_argument(
            flag, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V", help=f"same as --{key}"
        )
    add_config_options(parser, describe_keys(PrepareConfig))


def source_name(path: str) -> str:
    """A plain source name from an input path or URL: its file name up to the first dot, with
    other characters than letters, digits, '.', '_' and '-' made '_'."""
    stem = Path(path.rstrip("/")).name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "source"


def _input_sources(inputs: list[str], text_field: list[str], taken: set[str]) -> list[SourceConfig]:
    out = []
    for p in inputs:
        stem = source_name(p)
        name, k = stem, 1
        while name in taken:
            k += 1
            name = f"{stem}{k}"
        taken.add(name)
        out.append(SourceConfig(name=name, paths=[p], text_field=text_field))
    return out


def run(args: argparse.Namespace) -> int:
    layers = [args.config] if args.config else []
    cfg = build_prepare_config(*layers, overrides=config_overrides(args))
    if args.inputs:
        extra = _input_sources(
            args.inputs, args.text_field.split(","), {s.name for s in cfg.sources}
        )
        cfg = dataclasses.replace(cfg, sources=[*cfg.sources, *extra])  # checked again
    report = prepare(cfg, args.out, force=args.force)
    print(format_report(report))
    reused = "shards reused, " if report["reused_shards"] else ""
    print(f"wrote {args.out} ({reused}report: {Path(args.out) / REPORT})")
    return 0
