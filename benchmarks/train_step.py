"""Where a training step's time goes on this machine: one model, several ways of running it.

Prints milliseconds per step (forward + backward + clip + AdamW, fixed random batch) for fp32,
bf16 autocast and torch.compile, the AdamW variants, and the matmul FLOP/s of the model's
shapes in fp32 (on PyTorch's BLAS and on oneDNN, lmforge/model/linear.py) and bf16, so
precision and compile choices can be made from figures.

    python benchmarks/train_step.py [--preset shakespeare-char --batch 12 --block 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmforge.config import model_config
from lmforge.hardware import autocast_context, cpu_vendor, fp32_linear_uses_onednn, onednn_linear
from lmforge.model.gpt import GPT


def ms_per_call(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1000


def step_ms(args, precision: str, compile_model: bool) -> float:
    torch.manual_seed(0)
    model = GPT(model_config(preset=args.preset, vocab_size=65, block_size=args.block))
    run = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, 65, (args.batch, args.block))
    y = torch.randint(0, 65, (args.batch, args.block))
    device = torch.device("cpu")

    def step():
        with autocast_context(precision, device):
            loss = F.cross_entropy(run(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return ms_per_call(step, warmup=15, reps=args.reps)


def adamw_ms(args, **kind) -> float:
    model = GPT(model_config(preset=args.preset, vocab_size=65, block_size=args.block))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kind)
    return ms_per_call(opt.step, warmup=10, reps=200)


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, onednn: bool = False) -> float:
    """(m, k) @ (k, n): PyTorch's own (BLAS for fp32), or with `onednn` oneDNN's Linear."""
    a, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)  # w (n, k): a Linear's
    product = (lambda: onednn_linear(a, w)) if onednn else (lambda: a @ w.t())
    return 2 * m * k * n / ms_per_call(product, warmup=10, reps=200) / 1e6


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="shakespeare-char")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    tokens = args.batch * args.block
    print(f"{args.preset}, batch {args.batch} x {args.block}, {torch.get_num_threads()} threads")
    for label, precision, compiled in (
        ("fp32", "fp32", False),
        ("bf16 autocast", "bf16", False),
        ("fp32 + torch.compile", "fp32", True),
    ):
        ms = step_ms(args, precision, compiled)
        print(f"  step {label:22} {ms:7.1f} ms  {tokens / ms * 1000:8.0f} tok/s")
    for label, kind in (
        ("for-loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        print(f"  AdamW {label:21} {adamw_ms(args, **kind):7.2f} ms")
    d = model_config(preset=args.preset).d_model
    for label, dtype, onednn in (
        ("fp32 BLAS", torch.float32, False),
        ("fp32 oneDNN", torch.float32, True),
        ("bf16", torch.bfloat16, False),
    ):
        rate = matmul_gflops(tokens, d, 4 * d, dtype, onednn)
        print(f"  matmul ({tokens}x{d}x{4 * d}) {label:12} {rate:7.0f} GFLOP/s")
    print(f"  fp32 Linears run on oneDNN here (CPU {cpu_vendor()}): {fp32_linear_uses_onednn()}")


if __name__ == "__main__":
    main()
