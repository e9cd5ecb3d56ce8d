"""`lmforge export --checkpoint DIR --format hf --out OUT` and `lmforge import --hf DIR --out CKPT`."""

from __future__ import annotations

import argparse

from lmforge.common import print0
from lmforge.model.hf import export_hf, import_hf


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "export":
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
    else:
        parser.add_argument(
            "--hf",
            required=True,
            help="Hugging Face GPT-2 or Llama folder (config.json, weights, tokenizer)",
        )
        parser.add_argument(
            "--out", required=True, help="new (or empty) checkpoint folder to write"
        )


def run(args: argparse.Namespace) -> int:
    if args.verb == "export":
        out, kind = export_hf(args.checkpoint, args.out)
        print0(f"exported {args.checkpoint} as a Hugging Face {kind} model to {out}")
        return 0
    out, tokenizer = import_hf(args.hf, args.out)
    note = (
        ""
        if tokenizer is not None
        else " (no tokenizer files found: the checkpoint has no tokenizer)"
    )
    print0(f"imported {args.hf} to checkpoint {out}{note}")
    return 0
