"""Muon (Jordan et al. 2024): SGD momentum whose update is orthogonalised by a few
Newton-Schulz iterations, for 2-D weight matrices.

The update is torch.optim.Muon's, step for step (Nesterov momentum as an EMA, Jordan's quintic
coefficients, decoupled weight decay, the learning rate scaled by sqrt(max(1, rows / cols))),
with one change: torch's runs the Newton-Schulz matmuls in bf16 always. On a CPU without
native bf16 those are many times slower than fp32 (see hardware.pick_precision), so here they
run in `ns_dtype`: the run's own matmul precision. With ns_dtype=torch.bfloat16 the update is
torch's exactly (tests/test_train.py checks both).

Under FSDP2 a parameter is a DTensor holding one shard of rows per rank. The momentum stays
sharded (element-wise), but an orthogonalisation needs the whole matrix: each rank gathers
the Nesterov update, orthogonalises it and keeps its own shard of the result. Every rank
repeats the same small matmuls, which for the sizes FSDP runs here costs less than
scattering the work would save.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(updates: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz's quintic iteration towards U V^T of each update = U S V^T: (k, m, n) ->
    (k, m, n) in `dtype`. It works on the wide orientation (rows <= columns), so X X^T is the
    small Gram matrix. Matrices of one shape go through together (batched matmuls): a
    small model's step has a dozen small matrices, and one call each costs more than the math."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """`joint` lists groups of matrices with as many columns each that are orthogonalised as
    one matrix, their rows stacked: a block's q, k and v projections and SwiGLU's gate and up.
    They are separate Linears so that tensor parallelism can split them by heads, but one
    orthogonalisation of the stack is what the fused layout did, and it trains the default
    job better than three (1.477 against 1.507 val, BENCHMARKS.md)."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
        joint: list[list[torch.Tensor]] = (),
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices; got a {tuple(p.shape)} tensor")
        self._joint = {id(p): tuple(members) for members in joint for p in members}

    def _units(self, params: list[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """The params as orthogonalisation units: joint groups whole (each once), the rest
        alone."""
        units, seen = [], set()
        for p in params:
            unit = self._joint.get(id(p), (p,))
            if id(unit[0]) not in seen:
                seen.add(id(unit[0]))
                units.append(unit)
        return units

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            by_shape: dict[tuple[int, int], list[tuple[tuple, torch.Tensor]]] = {}
            for unit in self._units(group["params"]):
                if any(p.grad is None for p in unit):
                    continue
                nesterovs = [self._nesterov(p, mu) for p in unit]
                stacked = torch.cat(nesterovs) if len(unit) > 1 else nesterovs[0]  # (rows, cols)
                by_shape.setdefault(tuple(stacked.shape), []).append((unit, stacked))
            for (rows, cols), pairs in by_shape.items():
                stacked = torch.stack([nesterov for _, nesterov in pairs])  # (k, rows, cols)
                updates = orthogonalise(stacked, group["ns_steps"], self.ns_dtype)
                step_size = lr * math.sqrt(max(1.0, rows / cols))
                for (unit, _), update in zip(pairs, updates):
                    parts = update.split([p.size(0) for p in unit])  # each member's rows
                    for p, part in zip(unit, parts):
                        self._apply(p, part, lr * group["weight_decay"], step_size)
        return loss

    def _nesterov(self, p: torch.Tensor, mu: float) -> torch.Tensor:
        """Advance p's momentum; its Nesterov update, whole (gathered if p is sharded)."""
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - mu)
        nesterov = p.grad.lerp(buf, mu)
        return nesterov.full_tensor() if isinstance(nesterov, DTensor) else nesterov

    @staticmethod
    def _apply(p: torch.Tensor, update: torch.Tensor, decay: float, step_size: float) -> None:
        update = update.to(p.dtype)
        if isinstance(p, DTensor):  # this rank's shard, cut locally (no traffic)
            update = distribute_tensor(update, p.device_mesh, p.placements, src_data_rank=None)
        p.mul_(1 - decay)
        p.add_(update, alpha=-step_size)
