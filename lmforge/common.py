"""What every part uses: the user-facing error, rank-aware printing, seeding.

Importing this module does not import torch, so configs, data tools and the CLI's error
handling stay light; hardware choices (device, precision, peak FLOP/s) are in hardware.py.
"""

from __future__ import annotations

import os
import random


class LmforgeError(Exception):
    """An error caused by the user's input: the CLI prints its message as one line and exits 1."""


def did_you_mean(name: str, choices, cutoff: float = 0.5) -> str:
    """ "; did you mean 'x'?" for the choice nearest to a mistyped name, or ""."""
    import difflib

    near = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f"; did you mean '{near[0]}'?" if near else ""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, so multi-process runs don't repeat every line."""
    if is_rank0():
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (init, dropout, data order)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
