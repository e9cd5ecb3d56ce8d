"""The model's Linear layers: nn.Linear, with fp32 products on oneDNN where it is faster.

PyTorch runs an fp32 Linear on CPU through its BLAS, MKL in the x86 wheels, which on CPUs
other than Intel's runs at about half the speed of oneDNN, the other matmul library PyTorch
ships (hardware.fp32_linear_uses_onednn decides, LMFORGE_FP32_LINEAR overrides). `linear`
then computes the forward product and both backward products on oneDNN. Both libraries
compute the same fp32 products and differ only in the order of their sums, so results
differ in rounding (about 1e-6 relative), not in precision.

Everything else keeps F.linear: other devices and dtypes, autocast (PyTorch already runs
bf16 matmuls on oneDNN), weights or inputs that are tensor subclasses (DTensors under tensor
parallelism, torchao's quantized weights), and torch.compile, which brings its own kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.hardware import fp32_linear_uses_onednn, onednn_linear

_PLAIN = (torch.Tensor, nn.Parameter)


def takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `linear` runs x @ weight^T + bias on oneDNN (see the module docstring)."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and (bias is None or type(bias) in _PLAIN)
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and fp32_linear_uses_onednn()
    )


class _OneDNNLinear(torch.autograd.Function):
    """x (..., in) @ weight (out, in)^T + bias (out,) -> (..., out), with both backward
    products on oneDNN too."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gy = grad_y.reshape(-1, grad_y.size(-1))  # (N, out)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = onednn_linear(gy, weight.t()).view_as(x)  # (N, in) -> (..., in)
        if need_w:
            x2 = x.reshape(-1, x.size(-1))  # (N, in)
            # oneDNN measured fastest with the weight's shorter side as the product's rows
            if weight.size(0) <= weight.size(1):
                grad_w = onednn_linear(gy.t(), x2.t())  # (out, in)
            else:
                grad_w = onednn_linear(x2.t(), gy.t()).t()  # (in, out) -> (out, in)
        if need_b:
            grad_b = gy.sum(0)  # (out,)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear, on oneDNN where takes_onednn says so."""
    if takes_onednn(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state-dict names and isinstance) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
