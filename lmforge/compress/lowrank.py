"""Low-rank factorisation of a trained GPT: each transformer-block Linear W (out, in) becomes
two, in -> r -> out, from W's truncated SVD, the best rank-r approximation in the Frobenius
norm (Eckart-Young). The config records r (model.low_rank), so GPT builds the same factors
when the checkpoint loads (lmforge/model/gpt.py, block_linear).

One r serves every matrix, capped at each one's full rank min(in, out). A factorisation saves
parameters only where r * (in + out) < in * out: below d/2 for the d x d attention matrices
(q, k, v under MHA, and the output), 0.8d for a 4d-wide MLP.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from lmforge.common import LmforgeError
from lmforge.compress.prune import rebuild
from lmforge.model.gpt import GPT


def rank_for(model: GPT, rank: int | None, fraction: float | None) -> int:
    """--rank r, or --rank-fraction f as max(1, round(f * d_model)) (d_model is the full rank
    of every block matrix of an unpruned model); one clear error for values out of range."""
    if (rank is None) == (fraction is None):
        raise LmforgeError("--method lowrank needs one of --rank or --rank-fraction")
    if rank is not None:
        if rank <= 0:
            raise LmforgeError(f"--rank {rank} must be > 0")
        return rank
    if not 0 < fraction <= 1:
        raise LmforgeError(f"--rank-fraction {fraction} must be in (0, 1]")
    return max(1, round(fraction * model.config.d_model))


def factor(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) -> (down (r, in), up (out, r)) with up @ down the rank-r truncated SVD of W,
    each factor taking sqrt of the singular values. Computed in float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)  # (out,k) (k,) (k,in)
    root = s[:r].sqrt()
    down = root[:, None] * vh[:r]  # (r, in)
    up = u[:, :r] * root  # (out, r)
    return down.to(weight.dtype), up.to(weight.dtype)


@torch.no_grad()
def low_rank(model: GPT, rank: int) -> GPT:
    """A GPT whose block Linears are rank-min(rank, in, out) factors of `model`'s."""
    cfg = model.config
    if cfg.low_rank is not None:
        raise LmforgeError(f"this model is already low-rank (model.low_rank={cfg.low_rank})")
    state = model.state_dict()
    for name, module in model.blocks.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        key = f"blocks.{name}"
        w = state.pop(f"{key}.weight")  # (out, in)
        r = min(rank, *w.shape)
        state[f"{key}.0.weight"], state[f"{key}.1.weight"] = factor(w, r)
        if f"{key}.bias" in state:
            state[f"{key}.1.bias"] = state.pop(f"{key}.bias")
    return rebuild(replace(cfg, low_rank=rank), state)
