"""Dropout's cost on this CPU: `F.dropout` against lmforge.model.dropout, alternating, in one
run. First one call (forward + backward) on the default job's tensors: the attention
probabilities (micro-batch 8, 4 heads, 256 x 256) and a residual branch (8, 256, 128), in
fp32 and bf16. Then the default job's model (6 x 128, QK-norm, bf16 autocast): forward +
backward of one micro-batch without dropout, with dropout 0.05 on the residual branches only,
and with 0.05 everywhere, through lmforge's masks and through `F.dropout`; with --compile
the same under torch.compile too (its compile time left out: the warm-up calls pay it).

    python benchmarks/dropout_cpu.py [--repeats 20] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

import lmforge.model.dropout as cheap
from lmforge.config import ModelConfig
from lmforge.model.gpt import GPT


def ms(fn, repeats: int) -> float:
    """Median milliseconds of fn() after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def torch_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    return F.dropout(x, p, training)


def one_call(repeats: int) -> None:
    print("| tensor | dtype | F.dropout ms | lmforge ms | ratio |")
    print("|---|---|---:|---:|---:|")
    for name, shape in (("attention probs", (8, 4, 256, 256)), ("residual", (8, 256, 128))):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            grad = torch.randn(shape, dtype=dtype)
            ours = ms(lambda x=x, g=grad: cheap.dropout(x, 0.05).backward(g), repeats)
            theirs = ms(lambda x=x, g=grad: F.dropout(x, 0.05).backward(g), repeats)
            dt = str(dtype).removeprefix("torch.")
            print(f"| {name} {shape} | {dt} | {theirs:.2f} | {ours:.2f} | {theirs / ours:.2f}x |")


def model_step(repeats: int, compile: bool) -> None:
    tokens = torch.randint(0, 65, (8, 256))

    def step_ms(dropout: float, attention_dropout: float | None, masks, compiled: bool) -> float:
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=65, block_size=256, n_layer=6, n_head=4, d_model=128, qk_norm=True,
            dropout=dropout, attention_dropout=attention_dropout,
        )  # fmt: skip
        model = GPT(cfg).train()
        if compiled:
            model = torch.compile(model)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(tokens)
            F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()

        with mock.patch.object(cheap, "_CpuDropout", masks):
            return ms(step, repeats)

    through_torch = mock.Mock(apply=torch_dropout)  # the same call sites, F.dropout inside
    variants = (
        ("no dropout", 0.0, None, cheap._CpuDropout),
        ("dropout 0.05, residual branches only", 0.05, 0.0, cheap._CpuDropout),
        ("dropout 0.05, lmforge masks", 0.05, None, cheap._CpuDropout),
        ("dropout 0.05, F.dropout", 0.05, None, through_torch),
    )
    # eager first, every variant, then compiled: compiling leaves worker processes behind
    modes = (False, True) if compile else (False,)
    table = {(name, c): step_ms(d, a, masks, c) for c in modes for name, d, a, masks in variants}
    print("\n| default job's model, forward + backward | eager ms |" + " compiled ms |" * compile)
    print("|---|---:|" + "---:|" * compile)
    for name, *_ in variants:
        print(f"| {name} | " + " | ".join(f"{table[name, c]:.1f}" for c in modes) + " |")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="also time the model compiled")
    args = p.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    one_call(args.repeats)
    model_step(args.repeats, args.compile)


if __name__ == "__main__":
    main()
