"""`lmforge classify --base CKPT --data FILE --text-field T --label-field L`: a classifier head."""

from __future__ import annotations

import argparse

from lmforge.cli.options import (
    FINE_TUNING_DEFAULTS,
    add_run_options,
    config_overrides,
    post_training_config,
)

CLASSIFY_DEFAULTS = {
    **FINE_TUNING_DEFAULTS,
    "train": {**FINE_TUNING_DEFAULTS["train"], "max_steps": 300, "ckpt_interval": 300},
}


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--data", metavar="FILE", help="json/jsonl records with a text and a label")
    parser.add_argument("--text-field", help="the records' text field (classify.text_field)")
    parser.add_argument("--label-field", help="the records' label field (classify.label_field)")
    parser.add_argument("--freeze-base", action="store_true", help="train only the head")
    add_run_options(parser, base=True)


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes.classify import classify

    overrides = config_overrides(args)
    for flag, key in ((args.data, "data.path"),
                      (args.text_field, "classify.text_field"), (args.label_field, "classify.label_field")):  # fmt: skip
        overrides += [f"--{key}={flag}"] if flag else []
    overrides += ["--classify.freeze_base=true"] if args.freeze_base else []
    cfg, resume = post_training_config(args, overrides, CLASSIFY_DEFAULTS)
    classify(cfg, resume=resume)
    return 0
