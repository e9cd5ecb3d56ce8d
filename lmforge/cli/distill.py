"""`lmforge distill --teacher CKPT --student-preset P`: knowledge distillation of a teacher
checkpoint into a new student model, on the teacher's pretraining data (or --data)."""

from __future__ import annotations

import argparse

from lmforge.cli.options import add_run_options, config_overrides, resume_config
from lmforge.common import LmforgeError


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--teacher", metavar="CKPT", help="the teacher: a checkpoint or run folder")
    parser.add_argument(
        "--student-preset",
        metavar="P",
        help="the student's model preset (lmforge/model/presets.py); --model.* keys override it",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="text file, folder or prepared dataset (default: the data the teacher trained on)",
    )
    add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes.distill import distill, distill_config

    overrides = config_overrides(args) + ([f"--data.path={args.data}"] if args.data else [])
    if args.resume:
        distill(resume_config(args.resume, overrides), resume=args.resume)
        return 0
    if not args.teacher:
        raise LmforgeError("lmforge distill needs --teacher CKPT (a checkpoint or run folder)")
    if not args.student_preset:
        raise LmforgeError("lmforge distill needs --student-preset P (a model preset, e.g. tiny)")
    distill(distill_config(args.teacher, args.student_preset, args.config, overrides))
    return 0
