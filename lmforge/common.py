"""Small helpers every part uses: user-facing errors, device/dtype choice, seeding, rank-aware printing."""

from __future__ import annotations

import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch


class LmforgeError(Exception):
    """An error caused by the user's input: the CLI prints its message as one line and exits 1."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so multi-process runs don't repeat every line."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


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
    """'auto' -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 elsewhere (bf16 matmuls
    are ~100x slower than fp32 on common CPUs)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# Dense peak FLOP/s of common accelerators, for MFU (bf16 tensor-core figures, no sparsity).
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
_measured_peak: dict[str, float] = {}


def device_peak_flops(device: torch.device, precision: str = "fp32") -> float:
    """Peak FLOP/s used as the MFU denominator: a table for known GPUs; on other devices the
    throughput of a large fp32 matmul, measured once per process (a practical peak)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in _GPU_PEAK_FLOPS.items():
            if key in name:
                return flops if precision != "fp32" else flops / 2
    key = f"{device}:{precision}"
    if key not in _measured_peak:
        n = 1024
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        a @ b  # warm up
        t0 = time.perf_counter()
        reps = 8
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        _measured_peak[key] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return _measured_peak[key]
