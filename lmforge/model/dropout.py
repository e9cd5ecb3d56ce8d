"""Dropout whose masks cost less than the matmuls on a CPU.

`F.dropout` on CPU draws one float from the Mersenne Twister per element (`bernoulli_`): on
the default job's attention probabilities that is ~10 ms a layer, more than the layer's
matmuls, so dropout doubled the step time (BENCHMARKS.md, "Speed to quality"). Here each
64-bit draw gives four 16-bit lanes, and an element is kept when its lane clears a threshold:
2-3x cheaper forward and backward (benchmarks/dropout_cpu.py). The rate is rounded to a
multiple of 1/65536 and the kept elements are scaled by 1 / (1 - that rate), so the output
is unbiased for the rate actually applied.
Other devices keep `F.dropout` (CUDA's is a fused Philox kernel already).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

LANES = 65536  # a 16-bit lane's values: the rate's resolution


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Boolean tensor of `shape`, each element True with probability 1 - round(p * 65536) /
    65536, drawn from the CPU generator (seeded runs stay bitwise reproducible)."""
    numel = shape.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64)
    words.random_(-(2**63), 2**63 - 1)  # every bit uniform
    lanes = words.view(torch.int16)[:numel].view(shape)  # uniform on [-32768, 32767]
    return lanes >= round(p * LANES) - LANES // 2


class _CpuDropout(torch.autograd.Function):
    """x * keep * scale with keep 0/1 in x's dtype (a bool operand would take PyTorch's slower
    type-promoting path) and the scale applied in fp32 per element, as F.dropout applies it (a
    bf16-rounded scale would bias every kept element the same way)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p).view(torch.uint8).to(x.dtype)
        ctx.scale = LANES / (LANES - round(p * LANES))
        ctx.save_for_backward(keep)
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with cheap masks on CPU."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu" or not 0 < p < 1:
        return F.dropout(x, p, training)
    return _CpuDropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout with `dropout`'s cheap CPU masks; same attribute `p`, no state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
