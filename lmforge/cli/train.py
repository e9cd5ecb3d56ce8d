"""`lmforge train`: pretraining from the config tree (no arguments: the default Shakespeare job)."""

from __future__ import annotations

import argparse

from lmforge.cli.options import add_run_options, config_overrides, resume_config
from lmforge.config import build_config
from lmforge.recipes.pretrain import train

DEFAULT_JOB = {
    "data": {"tokenizer": "train:512"},
    "model": {"dropout": 0.1},
    "train": {
        "max_minutes": 5.0,
        "max_steps": 2400,
        "dropout_start": 700,
        "ema_decay": 0.995,
        "eval_steps": 0,
    },
}
"""`lmforge train` with no arguments: the config tree's defaults (the Shakespeare job), a
time limit that no other run has unless it asks for one, a 512-token BPE trained on the
training split (each 256-token window then holds ~480 characters instead of 256), and late
dropout: 700 steps without (the fast start), then dropout 0.1 against overfitting (a BPE
model sees its 0.5M training tokens ~10 times), over 2,400 steps, which about fit the 5
minutes on a 2-core CPU; and a weight average over ~200 steps, evaluated and saved, so that a
run the time limit cuts before its learning rate has decayed still ends near where the
finished schedule would; validation scores the whole split, every token once, so the loss it
reports carries no sampling noise (BENCHMARKS.md)."""


def default_job_overrides() -> list[str]:
    """DEFAULT_JOB as command-line overrides, for a benchmark that runs the default job with
    settings of its own added (any override outside the run section leaves DEFAULT_JOB out)."""
    return [
        f"--{section}.{key}={value}"
        for section, keys in DEFAULT_JOB.items()
        for key, value in keys.items()
    ]


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_run_options(parser, base=False)


def run(args: argparse.Namespace) -> int:
    overrides = config_overrides(args)
    if args.resume:
        train(resume_config(args.resume, overrides), resume=args.resume)
    else:
        # the run section says where outputs go and how they are logged, not what trains
        default_job = not args.config and all(o.startswith("--run.") for o in overrides)
        layers = [args.config] if args.config else [DEFAULT_JOB] if default_job else []
        cfg = build_config(*layers, overrides=overrides)
        train(cfg)
    return 0
