"""Masked attention patterns: SDPA with the dense boolean mask against FlexAttention with the
BlockMask of the same predicate (lmforge/model/masks.py), for a sliding window and for packed
documents at a few lengths, in fp32 and bf16. Prints the time to build each mask (once per
forward, shared by the layers), forward ms and, where FlexAttention has a backward (not on
CPU in torch 2.13), forward + backward ms, with flex's ratio to the dense mask (> 1 = flex
faster). SDPA's plain causal path (no mask at all) is the peer both are measured beside.

    python benchmarks/attention_patterns.py [--device cpu] [--reps 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from lmforge.model.gpt import attend
from lmforge.model.masks import AttentionPattern, compiled_flex

B, NH, HD = 2, 4, 32
WINDOW = 256


def documents(T: int, device) -> torch.Tensor:
    """(B, T) ids of packed documents of 64 to 512 tokens (seeded)."""
    g = torch.Generator().manual_seed(T)
    lengths = torch.randint(64, 513, (T // 64,), generator=g)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:T]
    return ids.expand(B, T).to(device)


def patterns(T: int, device) -> dict[str, AttentionPattern]:
    return {
        f"window {WINDOW}": AttentionPattern(window=WINDOW),
        "documents": AttentionPattern(documents=documents(T, device)),
    }


def ms(fn, reps: int) -> float:
    fn()  # warm-up (and flex's compile)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1000


def step(q, k, v, mask, backward: bool):
    def once():
        with torch.set_grad_enabled(backward):
            out = attend(q, k, v, mask)
            if backward:
                out.sum().backward()

    return once


def measure(pattern, T, dtype, device, reps) -> list[float | None]:
    """mask build ms (dense, flex), forward ms (causal, dense, flex), fwd+bwd (same three)."""
    torch._dynamo.reset()  # every case compiles afresh: no recompile limit reached
    build = [ms(lambda: pattern.dense(T, T, device), reps)]
    build.append(ms(lambda: pattern.block_mask(T, T, device), reps))
    masks = [True, pattern.dense(T, T, device), pattern.block_mask(T, T, device)]
    row = build
    for backward in (False, True):
        qkv = [torch.randn(B, NH, T, HD, device=device, dtype=dtype) for _ in range(3)]
        if backward:
            qkv = [t.requires_grad_() for t in qkv]
        for mask in masks:
            flex_cannot = backward and mask is masks[2] and device == "cpu"
            row.append(None if flex_cannot else ms(step(*qkv, mask, backward), reps))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    args = parser.parse_args()
    compiled_flex()  # the kernel under test
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}")
    print(f"(B, nh, hd) = ({B}, {NH}, {HD}); ms; ratio = dense / flex (> 1: flex faster)")
    print(
        "pattern      T     dtype     | build: dense   flex | fwd: causal  dense   flex  ratio"
        " | fwd+bwd: causal  dense   flex  ratio"
    )

    def fmt(x):
        return "   n/a" if x is None else f"{x:6.1f}"

    for dtype in (torch.float32, torch.bfloat16):
        for T in args.lengths:
            for name, pattern in patterns(T, args.device).items():
                b0, b1, f0, f1, f2, g0, g1, g2 = measure(pattern, T, dtype, args.device, args.reps)
                bwd_ratio = "   n/a" if g2 is None else f"{g1 / g2:5.2f}x"
                print(
                    f"{name:12} {T:5} {str(dtype).split('.')[1]:9} | {b0:12.1f} {b1:6.1f} | "
                    f"{f0:11.1f} {f1:6.1f} {f2:6.1f} {f1 / f2:5.2f}x | "
                    f"{g0:15.1f} {g1:6.1f} {fmt(g2)} {bwd_ratio}"
                )


if __name__ == "__main__":
    main()
