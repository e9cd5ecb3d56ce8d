"""`lmforge report RUN_DIR [--out DIR]`: a training run's metrics as report.md with plots."""

from __future__ import annotations

import argparse

from lmforge.common import print0
from lmforge.eval.report import write_run_report


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run folder (holds metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="folder for report.md and its plots: new, empty, or an earlier run report's "
        "(None: RUN_DIR/report)",
    )


def run(args: argparse.Namespace) -> int:
    path = write_run_report(args.run_dir, args.out)
    print0(f"report: {path}")
    return 0
