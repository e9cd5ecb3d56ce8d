"""`lmforge prune --checkpoint CKPT --out DIR --method magnitude|structured|lowrank`: a pruned
or low-rank checkpoint (lmforge/compress/prune.py, lowrank.py), optionally fine-tuned on its
pretraining data to recover (--finetune-steps; lmforge/compress/recover.py; --train.lr=... and
other config keys tune that run). Prints parameter counts and validation losses."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from lmforge.common import LmforgeError, print0
from lmforge.model.hf import check_out_free
from lmforge.train.checkpoint import load_plain, resolve_checkpoint, save_checkpoint


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)"
    )
    parser.add_argument("--out", required=True, help="new (or empty) folder to write")
    parser.add_argument(
        "--method",
        choices=["magnitude", "structured", "lowrank"],
        default="magnitude",
        help="zero small weights, remove heads/channels, or factor matrices by SVD",
    )
    parser.add_argument(
        "--sparsity", type=float, default=0.5, help="magnitude: share of block weights zeroed"
    )
    parser.add_argument(
        "--scope",
        choices=["global", "layer"],
        default="global",
        help="magnitude: one threshold over all block matrices, or the sparsity in each",
    )
    parser.add_argument(
        "--heads-fraction",
        type=float,
        default=0.25,
        help="structured: share of each layer's kv head groups removed (heads under MHA)",
    )
    parser.add_argument(
        "--ffn-fraction",
        type=float,
        default=0.25,
        help="structured: share of each layer's MLP hidden channels removed",
    )
    parser.add_argument("--rank", type=int, help="lowrank: rank of every block matrix")
    parser.add_argument(
        "--rank-fraction", type=float, help="lowrank: rank as a fraction of d_model"
    )
    parser.add_argument(
        "--finetune-steps",
        type=int,
        default=0,
        help="recovery fine-tune steps on the pretraining data (0: none); takes --train.x=v",
    )
    parser.set_defaults(accepts_overrides=True)


def compress(model, args: argparse.Namespace):
    """(compressed model, magnitude masks or None); `model` is left as it was."""
    from lmforge.compress import lowrank, prune

    if args.method == "magnitude":
        pruned = copy.deepcopy(model)
        return pruned, prune.magnitude_prune(pruned, args.sparsity, args.scope)
    if args.method == "structured":
        return prune.structured_prune(model, args.heads_fraction, args.ffn_fraction), None
    rank = lowrank.rank_for(model, args.rank, args.rank_fraction)
    return lowrank.low_rank(model, rank), None


def run(args: argparse.Namespace) -> int:
    from lmforge.cli.options import config_overrides
    from lmforge.compress import prune, recover

    out = Path(args.out)
    check_out_free(out)
    if args.finetune_steps < 0:
        raise LmforgeError(f"--finetune-steps {args.finetune_steps} must be >= 0")
    overrides = config_overrides(args)
    if overrides and not args.finetune_steps:
        raise LmforgeError(
            f"{overrides[0]}: config keys only tune the recovery fine-tune (--finetune-steps N)"
        )
    source = resolve_checkpoint(args.checkpoint)
    model, tokenizer, cfg = load_plain(source)
    if cfg.quantize.method != "none" or cfg.run.head != "lm" or not cfg.model.causal:
        raise LmforgeError(f"{source} is not a plain causal LM (quantized, a head, or a masked LM)")
    if tokenizer is None:
        raise LmforgeError(f"{source} has no tokenizer/, so its data cannot be encoded")
    pruned, masks = compress(model, args)
    tune_cfg = None
    if args.finetune_steps:
        tune_cfg = recover.recovery_config(cfg, pruned, args.finetune_steps, overrides)
    data = recover.pretrain_data(cfg, tokenizer)
    losses = [recover.val_loss(model, cfg, data), recover.val_loss(pruned, cfg, data)]
    if tune_cfg is not None:
        recover.finetune(pruned, tokenizer, tune_cfg, masks)
        losses.append(recover.val_loss(pruned, cfg, data))
    cfg.model = pruned.config
    save_checkpoint(out, pruned, cfg, tokenizer)

    before, after = model.num_params(), pruned.num_params()
    zeros = f", block weights {prune.sparsity(pruned):.1%} zero" if masks is not None else ""
    print0(f"pruned {source} ({args.method}) to {out}")
    print0(f"parameters: {before:,} -> {after:,} ({after / before:.1%}){zeros}")
    tuned = f", {losses[2]:.4f} after {args.finetune_steps} fine-tune steps" if tune_cfg else ""
    print0(f"val loss: {losses[0]:.4f} before, {losses[1]:.4f} pruned{tuned}")
    return 0
