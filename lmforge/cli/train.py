"""`lmforge train`: pretraining from the config tree (no arguments: the default Shakespeare job)."""

from __future__ import annotations

import argparse

from lmforge.cli.options import add_run_options, config_overrides, resume_config
from lmforge.config import build_config
from lmforge.recipes.pretrain import train

DEFAULT_JOB = {"train": {"max_minutes": 5.0}}
"""`lmforge train` with no arguments: the config tree's defaults (the Shakespeare job), and a
time limit that no other run has unless it asks for one."""


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_run_options(parser, base=False)


def run(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    if args.resume:
        train(resume_config(args.resume, overrides), resume=args.resume)
    else:
        default_job = not args.config and not overrides
        layers = [args.config] if args.config else [DEFAULT_JOB] if default_job else []
        cfg = build_config(*layers, overrides=overrides)
        train(cfg)
    return 0
