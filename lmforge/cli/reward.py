"""`lmforge reward --base CKPT --data FILE`: a reward model from preference pairs."""

from __future__ import annotations

import argparse

from lmforge.cli.options import (
    FINE_TUNING_DEFAULTS,
    add_run_options,
    config_overrides,
    post_training_config,
)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="json/jsonl of preference records: instruction (+ input) or prompt, chosen, rejected",
    )
    add_run_options(parser, base=True)


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes import preference

    overrides = config_overrides(args)
    overrides += [f"--data.path={args.data}"] if args.data else []
    cfg, resume = post_training_config(args, overrides, FINE_TUNING_DEFAULTS)
    getattr(preference, args.verb)(cfg, resume=resume)
    return 0
