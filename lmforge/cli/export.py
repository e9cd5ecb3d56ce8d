"""`lmforge export --checkpoint DIR --format hf --out OUT`: a checkpoint as a Hugging Face folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.common import print0
from lmforge.model.hf import check_out_free, export_hf
from lmforge.train.checkpoint import load_plain, save_checkpoint


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, or a run folder (its latest checkpoint)",
    )
    parser.add_argument(
        "--format",
        choices=["hf", "lmforge"],
        default="hf",
        help="hf: a transformers GPT2LMHeadModel/LlamaForCausalLM folder; lmforge: a plain "
        "checkpoint (with --merge: a LoRA adapter folded into its base)",
    )
    parser.add_argument(
        "--merge", action="store_true", help="fold a LoRA adapter checkpoint into its base first"
    )
    parser.add_argument("--out", required=True, help="new (or empty) folder to write")


def run(args: argparse.Namespace) -> int:
    if args.format == "lmforge":
        out = Path(args.out)
        check_out_free(out)
        model, tokenizer, cfg = load_plain(args.checkpoint, args.merge)
        save_checkpoint(out, model, cfg, tokenizer)
        print0(f"exported {args.checkpoint} as a plain lmforge checkpoint to {out}")
        return 0
    out, kind = export_hf(args.checkpoint, args.out, args.merge)
    print0(f"exported {args.checkpoint} as a Hugging Face {kind} model to {out}")
    return 0
