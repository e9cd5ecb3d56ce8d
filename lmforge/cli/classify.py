"""`lmforge classify --base CKPT --data FILE --text-field T --label-field L`: a classifier head."""

from __future__ import annotations

import argparse
import dataclasses

from lmforge.cli.options import add_config_options, config_overrides, resume_config
from lmforge.common import LmforgeError
from lmforge.config import build_config, describe_keys
from lmforge.train import checkpoint as ckpt

CLASSIFY_DEFAULTS = {
    "data": {"sampling": "bucketed"},
    "train": {
        "max_steps": 300,
        "micro_batch_size": 16,
        "lr": 3e-4,
        "min_lr": 3e-5,
        "warmup_steps": 20,
        "weight_decay": 0.0,
        "eval_interval": 100,
        "ckpt_interval": 300,
    },
}


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--base", metavar="CKPT", help="checkpoint or run folder to start from")
    parser.add_argument("--data", metavar="FILE", help="json/jsonl records with a text and a label")
    parser.add_argument("--text-field", help="the records' text field (classify.text_field)")
    parser.add_argument("--label-field", help="the records' label field (classify.label_field)")
    parser.add_argument("--freeze-base", action="store_true", help="train only the head")
    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML recipe")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run exactly where it stopped"
    )
    add_config_options(parser, describe_keys())


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes.classify import classify

    overrides = config_overrides(args)
    for flag, key in ((args.base, "run.base"), (args.data, "data.path"),
                      (args.text_field, "classify.text_field"), (args.label_field, "classify.label_field")):  # fmt: skip
        overrides += [f"--{key}={flag}"] if flag else []
    overrides += ["--classify.freeze_base=true"] if args.freeze_base else []
    if args.resume:
        classify(resume_config(args.resume, overrides), resume=args.resume)
        return 0
    if not args.base:
        raise LmforgeError("lmforge classify needs --base CKPT (a checkpoint or run folder)")
    base_model = ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(args.base)).model
    layers = [
        {"model": dataclasses.asdict(base_model)},
        CLASSIFY_DEFAULTS,
        *([args.config] if args.config else []),
    ]
    classify(build_config(*layers, overrides=overrides))
    return 0
