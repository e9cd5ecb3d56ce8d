"""`lmforge classify --base CKPT --data FILE --text-field T --label-field L`: a classifier head."""

from __future__ import annotations

import argparse

from lmforge.cli.options import FINE_TUNING_DEFAULTS, add_run_options, run_post_training

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

    fields = {"classify.text_field": args.text_field, "classify.label_field": args.label_field}
    extra = [f"--{key}={value}" for key, value in fields.items() if value]
    extra += ["--classify.freeze_base=true"] if args.freeze_base else []
    return run_post_training(args, classify, extra, CLASSIFY_DEFAULTS)
