"""`lmforge sft --base CKPT --data FILE`: instruction tuning on chat conversations."""

from __future__ import annotations

import argparse

from lmforge.cli.options import add_run_options, run_post_training


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="json/jsonl of conversations (messages, alpaca, prompt/completion)",
    )
    add_run_options(parser, base=True)


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes.sft import sft

    return run_post_training(args, sft)
