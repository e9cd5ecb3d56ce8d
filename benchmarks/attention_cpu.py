"""Causal attention on this CPU: SDPA (its flash kernel) against lmforge's written-out
`causal_attention`, forward + backward and forward alone, in fp32 and bf16, for a few
(batch, heads, length, head dim) shapes. gpt.explicit_attention_pays picks between them for
training; this prints the figures behind that choice.

    python benchmarks/attention_cpu.py [--reps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmforge.model.gpt import causal_attention

SHAPES = [(32, 4, 64, 32), (16, 4, 128, 32), (16, 4, 128, 64), (8, 4, 192, 32), (8, 4, 256, 32)]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def ms(fn, shape, dtype, backward: bool, reps: int) -> float:
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)

    def once():
        out = fn(q, k, v)
        if backward:
            out.backward(grad)

    with torch.set_grad_enabled(backward):
        for _ in range(5):
            once()
        start = time.perf_counter()
        for _ in range(reps):
            once()
    return (time.perf_counter() - start) / reps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "dtype     (B, nh, T, hd)      fwd+bwd ms: sdpa  explicit  ratio | fwd ms: sdpa  explicit"
    )
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            row = [
                ms(fn, shape, dtype, bwd, args.reps)
                for bwd in (True, False)
                for fn in (sdpa, causal_attention)
            ]
            print(
                f"{str(dtype).split('.')[1]:9} {str(shape):18} {row[0]:17.2f} {row[1]:9.2f} "
                f"{row[0] / row[1]:6.2f}x | {row[2]:11.2f} {row[3]:9.2f}"
            )


if __name__ == "__main__":
    main()
