"""Validation loss against how much of a model is pruned, for magnitude pruning (global),
structured pruning (the same fraction of kv head groups and MLP channels) and low-rank
factorisation (rank = (1 - level) * d_model), each as pruned and after a short recovery
fine-tune on the pretraining data. Prints the table and draws the curves into a PNG.

The x axis is the share of the transformer blocks' parameters removed (for magnitude pruning,
the share of them that are zero), so that the three methods compare at equal size.

    OMP_NUM_THREADS=1 lmforge train --train.max_steps=600 --run.dir=/tmp/prune_base
    OMP_NUM_THREADS=1 python benchmarks/prune_curve.py --checkpoint /tmp/prune_base
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from lmforge.compress import lowrank, prune, recover
from lmforge.train.checkpoint import load_plain


def block_params(model) -> int:
    """Nonzero parameters of the transformer blocks."""
    return sum(int(p.count_nonzero()) for p in model.blocks.parameters())


def compress(model, method: str, level: float):
    """(compressed copy of `model`, magnitude masks or None) at this level."""
    if method == "magnitude":
        pruned = copy.deepcopy(model)
        return pruned, prune.magnitude_prune(pruned, level, "global")
    if method == "structured":
        return prune.structured_prune(model, level, level), None
    rank = lowrank.rank_for(model, None, 1 - level)
    return lowrank.low_rank(model, rank), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="/tmp/prune_base")
    parser.add_argument("--levels", default="0.25,0.5,0.75", help="fractions pruned")
    parser.add_argument("--methods", default="magnitude,structured,lowrank")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--plot", default="prune_curve.png")
    args = parser.parse_args()

    model, tokenizer, cfg = load_plain(args.checkpoint)
    data = recover.pretrain_data(cfg, tokenizer)
    base_loss, base_params = recover.val_loss(model, cfg, data), block_params(model)
    rows = []
    with tempfile.TemporaryDirectory() as runs:
        for method in args.methods.split(","):
            for level in (float(x) for x in args.levels.split(",")):
                pruned, masks = compress(model, method, level)
                removed = 1 - block_params(pruned) / base_params
                loss = recover.val_loss(pruned, cfg, data)
                tuned = float("nan")
                if args.finetune_steps:
                    overrides = [f"--run.dir={runs}", f"--run.name={method}-{level}"]
                    overrides.append("--run.sample_tokens=0")
                    tune_cfg = recover.recovery_config(cfg, pruned, args.finetune_steps, overrides)
                    recover.finetune(pruned, tokenizer, tune_cfg, masks)
                    tuned = recover.val_loss(pruned, cfg, data)
                rows.append((method, level, removed, loss, tuned))

    print(f"\n{args.checkpoint}: val loss {base_loss:.4f}, {base_params:,} block parameters")
    print(f"{'method':<11} {'level':>5} {'removed':>8} {'pruned':>8} {'+ft':>8}")
    for method, level, removed, loss, tuned in rows:
        print(f"{method:<11} {level:>5.2f} {removed:>8.1%} {loss:>8.4f} {tuned:>8.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(base_loss, color="gray", lw=1, label="unpruned")
    for i, method in enumerate(dict.fromkeys(r[0] for r in rows)):
        mine = [r for r in rows if r[0] == method]
        x = [0.0] + [r[2] for r in mine]
        color = f"C{i}"
        ax.plot(x, [base_loss] + [r[3] for r in mine], "o-", color=color, label=method)
        if args.finetune_steps:
            tuned = [base_loss] + [r[4] for r in mine]
            ax.plot(x, tuned, "o--", color=color, label=f"{method} + {args.finetune_steps} steps")
    ax.set_xlabel("share of block parameters removed (zeroed, for magnitude)")
    ax.set_ylabel("validation loss")
    ax.set_title(f"pruning {Path(args.checkpoint).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
