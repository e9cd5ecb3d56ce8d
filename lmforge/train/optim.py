"""The optimizers of a run, built from train.* settings.

adamw: AdamW with decoupled weight decay on matrices only (dim >= 2): embeddings and Linear
weights decay; biases and norm gains don't.

muon: Muon (Nesterov momentum orthogonalised by five Newton-Schulz iterations, Jordan et
al. 2024; lmforge/train/muon.py) on the transformer blocks' 2-D weight matrices, with its own learning
rate, momentum and decay, and AdamW as above on everything else (embeddings, the head, norms,
biases, any head outside the blocks), as modded-nanogpt and nanochat split them. Muon's
update is a matrix's orthogonalisation, which means nothing for a vector, and an embedding
or output layer is a lookup or a readout rather than a map between hidden states.

Frozen parameters (requires_grad=False, e.g. a base model under LoRA) are left out; a tied
weight is one parameter and sits in one group. One schedule drives every group: Muon's
learning rate is train.lr's times muon_lr / lr (`lr_scale`).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.gpt import FUSED
from lmforge.train.muon import Muon


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """A 2-D weight inside the transformer blocks (attention and MLP projections, LoRA's A
    and B): Muon's. Embeddings, the LM head and task heads live outside `blocks`."""
    return param.dim() == 2 and ".blocks." in f".{name}"


JOINT = tuple(
    tuple(f"{fused.split('.')[0]}.{part}" for part in parts) for fused, parts in FUSED.items()
)
"""Linears that Muon orthogonalises as one stacked matrix, the parts of what older lmforge
fused ((attn.q, attn.k, attn.v) and (mlp.gate, mlp.up); see Muon's docstring)."""


def joint_matrices(named, matrices: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each block's q, k, v weights and gate, up weights, where all of a set train by Muon."""
    by_name = {name: p for name, p in named}
    chosen = {id(p) for p in matrices}
    joint = []
    for name in by_name:
        for first, *rest in JOINT:
            if name.endswith(f"{first}.weight"):
                prefix = name[: -len(f"{first}.weight")]
                members = [by_name.get(f"{prefix}{m}.weight") for m in (first, *rest)]
                if all(p is not None and id(p) in chosen for p in members):
                    joint.append(members)
    return joint


def param_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizers(
    model: nn.Module, train_cfg, device: torch.device, precision: str = "fp32"
) -> list[torch.optim.Optimizer]:
    """[AdamW] or, with train.optimizer=muon, [Muon, AdamW]: every trainable parameter in
    exactly one group of one of them (asserted). Muon orthogonalises in the run's precision
    (bf16 for bf16 runs, else fp32)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # dedups ties
    muon = train_cfg.optimizer == "muon"
    matrices, rest = [], []
    for name, p in named:
        (matrices if muon and is_muon_matrix(name, p) else rest).append(p)
    optimizers: list[torch.optim.Optimizer] = []
    if matrices:
        optimizers.append(
            Muon(
                matrices,
                lr=train_cfg.muon_lr,
                momentum=train_cfg.muon_momentum,
                weight_decay=train_cfg.muon_weight_decay,
                ns_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                joint=joint_matrices(named, matrices),
            )
        )
    if rest:
        optimizers.append(adamw(param_groups(rest, train_cfg.weight_decay), train_cfg, device))
    grouped = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(named), (
        "a parameter in 0 or 2 groups"
    )
    return optimizers


def lr_scale(optimizer: torch.optim.Optimizer, train_cfg) -> float:
    """An optimizer's learning rate over train.lr's (the schedule's) at every step."""
    return train_cfg.muon_lr / train_cfg.lr if isinstance(optimizer, Muon) else 1.0


def adamw(groups: list[dict], train_cfg, device: torch.device) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel on CUDA and CPU (on a 2-core CPU it steps a
    0.8M-parameter model in 0.3 ms against 1.1 ms for the multi-tensor path). Tensor
    parallel leaves some parameters plain and makes others DTensors; the fused and
    multi-tensor kernels take one kind per call, so such a mix steps parameter by parameter."""
    mixed = len({type(p) for group in groups for p in group["params"]}) > 1
    fused = device.type in ("cuda", "cpu") and not mixed
    return torch.optim.AdamW(
        groups,
        lr=train_cfg.lr,
        betas=(train_cfg.beta1, train_cfg.beta2),
        eps=train_cfg.eps,
        fused=fused or None,
        foreach=False if mixed else None if fused else True,
    )
