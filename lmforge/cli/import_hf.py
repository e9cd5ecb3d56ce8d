"""`lmforge import --hf DIR --out CKPT`: a Hugging Face GPT-2/Llama folder as a checkpoint."""

from __future__ import annotations

import argparse

from lmforge.common import print0
from lmforge.model.hf import import_hf


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--hf",
        required=True,
        help="Hugging Face GPT-2 or Llama folder (config.json, weights, tokenizer)",
    )
    parser.add_argument("--out", required=True, help="new (or empty) checkpoint folder to write")


def run(args: argparse.Namespace) -> int:
    out, tokenizer = import_hf(args.hf, args.out)
    note = (
        ""
        if tokenizer is not None
        else " (no tokenizer files found: the checkpoint has no tokenizer)"
    )
    print0(f"imported {args.hf} to checkpoint {out}{note}")
    return 0
