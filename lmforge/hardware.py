"""What the machine can do: device choice, precision choice, matmul settings, peak FLOP/s.

Probes here never touch the global random generators (they use a private torch.Generator):
a run that resumes in a new process must see exactly the RNG stream it saved.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import nullcontext

import torch

from lmforge.common import LmforgeError

# Dense peak FLOP/s of common accelerators, for MFU (bf16 tensor-core figures, no sparsity;
# TF32, which fp32 matmuls use once enable_tf32 has run, is half of it on these parts).
_GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU whose name contains a key of the table (TF32, half the
    bf16 figure, for fp32), or None for a GPU not in it."""
    for key, flops in _GPU_PEAK_FLOPS.items():
        if key in name:
            return flops if precision != "fp32" else flops / 2
    return None


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs; on a CPU, bf16 autocast
    where the CPU has native bf16 matmuls (AVX512-BF16 or AMX) and they measure faster than
    fp32, else fp32 (without native support bf16 matmuls are many times slower)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16() and cpu_bf16_speedup() >= 1.2:
        return "bf16"
    return "fp32"


def _cpuinfo(field: str) -> str:
    """The value of the first `field` line Linux's /proc/cpuinfo has (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports (empty elsewhere)."""
    return set(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """The CPU's vendor as Linux reports it (GenuineIntel, AuthenticAMD, ...; empty elsewhere)."""
    return _cpuinfo("vendor_id")


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@functools.cache
def cpu_bf16_speedup(n: int = 512, reps: int = 8) -> float:
    """fp32 time / bf16 time of an n x n matmul on this CPU (> 1: bf16 is faster), fp32 on
    the library lmforge's Linears use for it (fp32_linear_uses_onednn)."""
    cpu = torch.device("cpu")
    fp32 = onednn_linear if fp32_linear_uses_onednn() else None
    return _matmul_seconds(cpu, torch.float32, n, reps, fp32) / _matmul_seconds(
        cpu, torch.bfloat16, n, reps
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias -> (..., out) on oneDNN, whatever the dtype:
    PyTorch's own op for it, which inductor uses for CPU Linears (torch.ops.mkldnn)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


FP32_LINEAR_ENV = "LMFORGE_FP32_LINEAR"
"""Environment variable that fixes fp32_linear_uses_onednn's choice: `onednn`, `blas`, or
`auto` (the default: fp32_linear_uses_onednn reads the CPU). `blas` gives F.linear's results bitwise, for runs that must
match ones made elsewhere (with MKL_CBWR pinning MKL's own kernels)."""


@functools.cache
def fp32_linear_uses_onednn() -> bool:
    """Whether lmforge's fp32 Linears on CPU (lmforge/model/linear.py) run on oneDNN rather
    than PyTorch's BLAS. PyTorch sends an fp32 matmul on CPU to its BLAS, in the x86 wheels
    MKL, which runs its fastest kernels on Intel CPUs only; oneDNN, which PyTorch also ships,
    picks kernels by instruction set. On a 2-core AMD Zen 5 EPYC MKL's fp32 products ran at
    195-210 GFLOP/s and oneDNN's at 395-460 (benchmarks/train_step.py prints both). `auto` takes
    oneDNN where the BLAS is MKL and the CPU is not Intel's. It reads the CPU rather than
    timing the two, so every process on a machine chooses alike: the two libraries round
    differently, and a run resumed in a new process must compute as the first did."""
    choice = os.environ.get(FP32_LINEAR_ENV, "auto")
    if choice not in ("auto", "onednn", "blas"):
        raise LmforgeError(f"{FP32_LINEAR_ENV}={choice!r}: expected auto, onednn or blas")
    available = torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_linear_pointwise"
    )
    if choice == "onednn" and not available:
        raise LmforgeError(f"{FP32_LINEAR_ENV}=onednn: this PyTorch has no oneDNN fp32 Linear")
    if choice != "auto":
        return choice == "onednn"
    mkl_off_intel = torch.backends.mkl.is_available() and cpu_vendor() not in ("GenuineIntel", "")
    return available and mkl_off_intel


def _matmul_seconds(
    device: torch.device, dtype: torch.dtype, n: int, reps: int, linear=None
) -> float:
    """Seconds per n x n matmul (best of three rounds of `reps`), on private random data:
    a @ b, or linear(a, b) where given (onednn_linear)."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    product = (lambda: a @ b) if linear is None else (lambda: linear(a, b))
    product()  # warm up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            product()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def enable_tf32(device: torch.device) -> None:
    """Let fp32 matmuls and convolutions on CUDA use TF32 tensor cores (what the MFU table
    assumes for fp32); no effect on other devices."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@functools.cache
def device_peak_flops(device: torch.device, precision: str = "fp32") -> float:
    """Peak FLOP/s of one device, the MFU denominator: a table for known GPUs; on other
    devices the throughput of a 1024^3 matmul in the run's precision, measured once per
    process (a practical peak), on oneDNN where lmforge's fp32 Linears use it."""
    if device.type == "cuda":
        flops = gpu_peak_flops(torch.cuda.get_device_name(device), precision)
        if flops is not None:
            return flops
    n = 1024
    onednn = device.type == "cpu" and precision == "fp32" and fp32_linear_uses_onednn()
    linear = onednn_linear if onednn else None
    return 2 * n**3 / _matmul_seconds(device, _DTYPES[precision], n, 4, linear)
