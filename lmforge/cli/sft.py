"""`lmforge sft --base CKPT --data FILE`: instruction tuning on chat conversations."""

from __future__ import annotations

import argparse

from lmforge.cli.options import add_run_options, config_overrides, post_training_config

SFT_DEFAULTS = {
    "data": {"sampling": "bucketed"},
    "train": {
        "max_steps": 400,
        "micro_batch_size": 16,
        "lr": 3e-4,
        "min_lr": 3e-5,
        "warmup_steps": 20,
        "weight_decay": 0.0,
        "eval_interval": 100,
        "ckpt_interval": 200,
    },
}
"""Where fine-tuning differs from pretraining's defaults: a short run at a lower learning rate
on batches of whole conversations."""


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="json/jsonl of conversations (messages, alpaca, prompt/completion)",
    )
    add_run_options(parser, base=True)


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes.sft import sft

    overrides = config_overrides(args)
    overrides += [f"--data.path={args.data}"] if args.data else []
    cfg, resume = post_training_config(args, overrides, SFT_DEFAULTS)
    sft(cfg, resume=resume)
    return 0
