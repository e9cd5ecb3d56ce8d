"""Tensor parallel (train.parallel.tp), Megatron's split applied from outside with DTensor's
`parallelize_module`: in each block, the q, k, v projections and the MLP's input layers are
split by output rows (column-wise: each rank computes its own heads and hidden channels), the
two output projections by input columns (row-wise: partial sums, all-reduced). The token
embedding is vocabulary-parallel (row-wise over the vocabulary) and so is the head (column-
wise over the vocabulary, its logits gathered), as torchtitan does.

The residual stream stays replicated (no sequence parallel), so norms and biases of the
residual stream train the same on every rank. Two kinds of parameter need more:
- QK-norm gains act on each rank's own heads, so each rank's gradient is a partial sum:
  `sync_partial_grads` all-reduces them before clipping;
- a tied embedding and head stay whole on every rank (one Parameter cannot be split both
  ways at once).
The attention code reads head counts from the tensors it gets, so a rank's nh / tp heads run
through the same lines as a whole model's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

COLUMN_WISE = ("attn.q", "attn.k", "attn.v", "mlp.fc", "mlp.gate", "mlp.up")
ROW_WISE = ("attn.proj", "mlp.proj")


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Split `model` (a GPT) over the ranks of tp_mesh, in place."""
    for block in model.blocks:
        plan = {name: ColwiseParallel() for name in COLUMN_WISE if _has(block, name)}
        plan |= {name: RowwiseParallel() for name in ROW_WISE}
        parallelize_module(block, tp_mesh, plan)
    if not model.config.tie_embeddings:
        parallelize_module(
            model,
            tp_mesh,
            {
                "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
                "lm_head": ColwiseParallel(output_layouts=Replicate()),
            },
        )


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def partial_grad_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters whose gradient each TP rank holds only a share of: the QK-norm gains."""
    return [
        p
        for block in model.blocks
        for norm in (block.attn.q_norm, block.attn.k_norm)
        if norm is not None
        for p in norm.parameters()
    ]


def sync_partial_grads(params: list[nn.Parameter], tp_group) -> None:
    """Sum the per-rank shares of these parameters' gradients over the TP group. Under FSDP
    a gradient is a DTensor of which this rank holds one data-parallel shard; the ranks of a
    TP group hold the same shard, so their local tensors add up."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat, group=tp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
