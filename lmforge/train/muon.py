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
    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.float32,
    ):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D matrices; got a {tuple(p.shape)} tensor")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                nesterov = p.grad.lerp(buf, mu)
                if isinstance(nesterov, DTensor):
                    nesterov = nesterov.full_tensor()  # (rows, cols) on every rank
                by_shape.setdefault(p.shape, []).append((p, nesterov))
            for (rows, cols), pairs in by_shape.items():
                stacked = torch.stack([nesterov for _, nesterov in pairs])  # (k, rows, cols)
                updates = orthogonalise(stacked, group["ns_steps"], self.ns_dtype)
                step_size = lr * math.sqrt(max(1.0, rows / cols))
                for (p, _), update in zip(pairs, updates):
                    update = update.to(p.dtype)
                    if isinstance(p, DTensor):  # this rank's shard, cut locally (no traffic)
                        update = distribute_tensor(
                            update, p.device_mesh, p.placements, src_data_rank=None
                        )
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update, alpha=-step_size)
        return loss
