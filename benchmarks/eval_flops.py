"""Where multiple-choice scoring time goes, and the speed-up over lm-eval's hf backend that its
arithmetic allows: the rows `lmforge eval --task mc` builds for the first N PIQA items (input
tokens, padding, predicted positions), their matmul FLOPs in the blocks and the output layer,
this CPU's fp32 GEMM rate on the model's two main shapes, and the scoring time with trees
packed into block-long rows (what lmforge does) against one tree per row, alternating.

    python benchmarks/eval_flops.py [--checkpoint runs/chat_base] [--limit 300] [--hf-tokens 33100]

--hf-tokens: the tokens the hf backend runs for the same items (benchmarks/eval_vs_lm_eval.py
counts them); it runs every one through the blocks and the head.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lmforge.eval import mc
from lmforge.eval.scoring import Scorer, _RowLayout
from lmforge.train import checkpoint as ckpt


def block_flops_per_token(cfg) -> float:
    """2 x multiply-adds of one token through every block's Linears."""
    d, q, kv = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    mlp_in = 2 if cfg.mlp == "swiglu" else 1
    per_layer = d * (q + 2 * kv) + q * d + (mlp_in + 1) * d * cfg.ffn_dim
    return 2.0 * cfg.n_layer * per_layer


def gflops(m: int, k: int, n: int, repeats: int = 10) -> float:
    a, b = torch.randn(m, k), torch.randn(n, k)
    a @ b.T
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b.T
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def one_tree_per_row(self, trees):
    return [[tree] for tree in sorted(trees, key=lambda t: -t.length)]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, default=Path("runs/chat_base"))
    p.add_argument("--data", type=Path, default=Path("lmforge/assets/eval/piqa_valid.jsonl"))
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hf-tokens", type=int, default=33100)
    args = p.parse_args()
    model, tokenizer = ckpt.load(ckpt.resolve_checkpoint(args.checkpoint))
    cfg = model.config
    items = mc.load_items(args.data, args.limit)

    scorer = Scorer(model, tokenizer, args.batch_size)
    pairs = [scorer.encode_pair(it.context, " " + c) for it in items for c in it.choices]
    layouts = [_RowLayout(row) for row in scorer._rows(scorer._trees(pairs))]
    inputs = sum(len(x.ids) for x in layouts)
    predicted = sum(len(x.predict_at) for x in layouts)
    padded = sum(
        len(batch) * max(len(x.ids) for x in batch)
        for batch in (
            layouts[b : b + args.batch_size] for b in range(0, len(layouts), args.batch_size)
        )
    )
    per_token, head = block_flops_per_token(cfg), 2.0 * cfg.d_model * cfg.vocab_size
    ours = (padded * per_token + predicted * head) / 1e9
    hf = args.hf_tokens * (per_token + head) / 1e9
    print(f"{args.limit} items, {len(layouts)} rows, {inputs} input tokens ({padded} padded), ")
    print(f"{predicted} predicted positions")
    print(f"lmforge: {padded * per_token / 1e9:.0f} GFLOP in the blocks + ", end="")
    print(f"{predicted * head / 1e9:.0f} in the head = {ours:.0f}")
    print(f"hf ({args.hf_tokens} tokens, head everywhere): {hf:.0f} GFLOP")
    print(f"bound on the speed-up at equal GEMM rate: {hf / ours:.2f}x")
    rows = args.batch_size * cfg.block_size
    print(f"fp32 GEMM, MLP shape: {gflops(rows, cfg.d_model, cfg.ffn_dim):.0f} GFLOPS; ", end="")
    print(f"head shape: {gflops(rows, cfg.d_model, cfg.vocab_size):.0f} GFLOPS")

    packed, times = Scorer._rows, {"packed rows": [], "one tree per row": []}
    for _ in range(3):
        for name, rows_of in (("packed rows", packed), ("one tree per row", one_tree_per_row)):
            Scorer._rows = rows_of
            start = time.perf_counter()
            mc.score_choices(Scorer(model, tokenizer, args.batch_size), items)
            times[name].append(time.perf_counter() - start)
    Scorer._rows = packed
    for name, seconds in times.items():
        print(f"scoring, {name}: " + ", ".join(f"{s:.2f}" for s in seconds) + " s")


if __name__ == "__main__":
    main()
