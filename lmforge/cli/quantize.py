"""`lmforge quantize --checkpoint CKPT --method int8|int4 --out DIR`: a checkpoint whose weights
are stored and run quantized (lmforge/compress/quantize.py); it loads with lmforge.load and
generates, evaluates and serves like any other."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.common import LmforgeError, print0
from lmforge.config import QuantizeConfig
from lmforge.model.hf import check_out_free
from lmforge.train.checkpoint import WEIGHTS, load_plain, resolve_checkpoint, save_checkpoint


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)"
    )
    parser.add_argument("--method", choices=["int8", "int4"], default="int8")
    parser.add_argument(
        "--group-size", type=int, default=128, help="int4: input columns sharing one scale"
    )
    parser.add_argument(
        "--activations",
        choices=["none", "int8"],
        default="none",
        help="int8: also quantize activations per token on the fly (int8 weights only)",
    )
    parser.add_argument("--out", required=True, help="new (or empty) folder to write")


def run(args: argparse.Namespace) -> int:
    from lmforge.compress.quantize import quantize_model

    out = Path(args.out)
    check_out_free(out)
    source = resolve_checkpoint(args.checkpoint)
    model, tokenizer, cfg = load_plain(source)
    if cfg.quantize.method != "none":
        raise LmforgeError(f"{source} is already quantized ({cfg.quantize.method})")
    cfg.quantize = QuantizeConfig(args.method, args.group_size, args.activations)
    save_checkpoint(out, quantize_model(model, cfg.quantize), cfg, tokenizer)
    before, after = ((folder / WEIGHTS).stat().st_size for folder in (source, out))
    print0(
        f"quantized {source} ({args.method}, activations {args.activations}) to {out}: "
        f"{after / 1e6:.2f} MB, {after / before:.1%} of {before / 1e6:.2f} MB"
    )
    return 0
