"""`lmforge reward --base CKPT --data FILE`: a reward model from preference pairs."""

from __future__ import annotations

import argparse

from lmforge.cli.options import add_run_options, run_post_training


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="json/jsonl of preference records: instruction (+ input) or prompt, chosen, rejected",
    )
    add_run_options(parser, base=True)


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes import preference

    return run_post_training(args, getattr(preference, args.verb))  # reward() or dpo()
