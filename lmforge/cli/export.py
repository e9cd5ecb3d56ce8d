"""`lmforge export --checkpoint DIR --format hf --out OUT`: a checkpoint as a Hugging Face folder."""

from __future__ import annotations

import argparse

from lmforge.common import print0
from lmforge.model.hf import export_hf


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, or a run folder (its latest checkpoint)",
    )
    parser.add_argument(
        "--format",
        choices=["hf"],
        default="hf",
        help="hf: a transformers GPT2LMHeadModel/LlamaForCausalLM folder",
    )
    parser.add_argument("--out", required=True, help="new (or empty) folder to write")


def run(args: argparse.Namespace) -> int:
    out, kind = export_hf(args.checkpoint, args.out)
    print0(f"exported {args.checkpoint} as a Hugging Face {kind} model to {out}")
    return 0
