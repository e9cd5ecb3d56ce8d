"""`lmforge sft --base CKPT --data FILE`: instruction tuning on chat conversations."""

from __future__ import annotations

import argparse
import dataclasses

from lmforge.cli.options import add_config_options, config_overrides, resume_config
from lmforge.common import LmforgeError
from lmforge.config import build_config, describe_keys
from lmforge.train import checkpoint as ckpt

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
    parser.add_argument("--base", metavar="CKPT", help="checkpoint or run folder to start from")
    parser.add_argument(
        "--data",
        metavar="FILE",
        help="json/jsonl of conversations (messages, alpaca, prompt/completion)",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML recipe (see configs/)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run exactly where it stopped"
    )
    add_config_options(parser, describe_keys())


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes.sft import sft

    overrides = config_overrides(args)
    overrides += [f"--run.base={args.base}"] if args.base else []
    overrides += [f"--data.path={args.data}"] if args.data else []
    if args.resume:
        sft(resume_config(args.resume, overrides), resume=args.resume)
        return 0
    if not args.base:
        raise LmforgeError("lmforge sft needs --base CKPT (a checkpoint or run folder)")
    base_model = ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(args.base)).model
    layers = [
        {"model": dataclasses.asdict(base_model)},
        SFT_DEFAULTS,
        *([args.config] if args.config else []),
    ]
    sft(build_config(*layers, overrides=overrides))
    return 0
