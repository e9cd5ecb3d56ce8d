"""Pruning a trained GPT: unstructured magnitude pruning (zeros in place, the shapes unchanged)
and structured pruning (whole attention heads and MLP hidden channels removed: a smaller model
with a new config).

Magnitude: torch.nn.utils.prune's L1 selection zeroes the S smallest |w| of the transformer
blocks' Linear weights, over all of them at once (scope global) or within each (scope layer);
embeddings, norms, biases and the head are left alone. prune.remove then makes the zeros
plain weights again, since its reparametrisation (weight_orig * weight_mask, recomputed by a
forward hook) renames the parameters, which a GPT could not load back. A recovery fine-tune
keeps the zeros with `keep_masks`, which re-applies the masks after every optimizer step.

Structured: the config holds one n_head, n_kv_head and ffn_hidden for every layer, so every
layer loses the same number of heads and channels, each layer its own least important ones.
Under grouped-query attention a key/value head serves n_head / n_kv_head query heads; the
unit removed is such a whole group (a kv head with its query heads; one head under MHA), which
keeps every group the same size, as the one config requires. head_dim stays as it was.

Importance is read from the weights alone (no data), and is exactly zero for a unit whose
removal leaves every output unchanged:
- a kv group: ||[W_O,h W_V | W_O,h b_V]||_F over its query heads h, the norm of the group's
  output-value circuit. A head adds W_O,h (A_h (x W_V^T + b_V)) to the residual stream, and
  the rows of A_h sum to one, so this is zero iff the group adds nothing, whatever attends;
- an MLP channel i: ||W_proj[:, i]|| * ||[W_fc[i] | b_fc[i]]|| (SwiGLU: times the up row's
  norm too, the gate's in place of fc's); GELU, ReLU^2 and SiLU all map 0 to 0.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lmforge.common import LmforgeError
from lmforge.model.gpt import GPT


def block_linears(model: GPT) -> list[nn.Linear]:
    """Every nn.Linear inside the transformer blocks (attention and MLP, factors included)."""
    return [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]


def sparsity(model: GPT) -> float:
    """Share of exact zeros among the blocks' Linear weights."""
    weights = [m.weight for m in block_linears(model)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


@torch.no_grad()
def magnitude_prune(model: GPT, amount: float, scope: str = "global") -> list[torch.Tensor]:
    """Zero round(amount * n) of the blocks' Linear weights with the smallest magnitude: over
    all of them (scope 'global') or round(amount * n_i) in each matrix ('layer'). Returns each
    weight's mask (1 kept, 0 pruned), in block_linears order, for keep_masks."""
    if not 0 <= amount < 1:
        raise LmforgeError(f"--sparsity {amount} must be in [0, 1)")
    if scope not in ("global", "layer"):
        raise LmforgeError(f"--scope {scope!r} must be global or layer")
    linears = block_linears(model)
    if scope == "global":
        targets = [(m, "weight") for m in linears]
        torch_prune.global_unstructured(targets, torch_prune.L1Unstructured, amount=amount)
    else:
        for m in linears:
            torch_prune.l1_unstructured(m, "weight", amount=amount)
    masks = [m.weight_mask.detach().clone() for m in linears]
    for m in linears:
        torch_prune.remove(m, "weight")  # weight = weight_orig * mask, a plain Parameter again
    return masks


class keep_masks:
    """Within this context, every optimizer step is followed by weight *= mask for each
    (weight, mask) of `masks`: pruned weights stay exactly zero through a fine-tune on the one
    Trainer, whose loop knows nothing of them (a global step hook of torch.optim), and the
    Trainer's checkpoints hold the zeros under the model's own parameter names."""

    def __init__(self, model: GPT, masks: list[torch.Tensor]):
        self.pairs = list(zip((m.weight for m in block_linears(model)), masks))

    @torch.no_grad()
    def _apply(self, optimizer, args, kwargs) -> None:
        for weight, mask in self.pairs:
            weight.mul_(mask.to(weight.device))

    def __enter__(self) -> keep_masks:
        self.handle = register_optimizer_step_post_hook(self._apply)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _removed(fraction: float, total: int, what: str, flag: str) -> int:
    """How many of `total` units a fraction removes, or one clear error."""
    if not 0 <= fraction < 1:
        raise LmforgeError(f"{flag} {fraction} must be in [0, 1)")
    n = round(fraction * total)
    if n >= total:
        raise LmforgeError(
            f"{flag} {fraction} would remove all {total} {what} of each layer; keep at least one"
        )
    return n


def group_importance(attn: nn.Module) -> torch.Tensor:
    """(nkv,) norm of each kv group's output-value circuit (module docstring)."""
    hd = attn.hd
    nkv = attn.v.weight.size(0) // hd
    w_v = attn.v.weight.view(nkv, hd, -1)  # (nkv, hd, d)
    if attn.v.bias is not None:
        w_v = torch.cat([w_v, attn.v.bias.view(nkv, hd, 1)], dim=-1)  # (nkv, hd, d+1)
    d = attn.proj.weight.size(0)
    w_o = attn.proj.weight.view(d, nkv, -1, hd)  # (d, nkv, g, hd): query h = j*g + i
    circuit = torch.einsum("djih,jhe->jide", w_o, w_v)  # (nkv, g, d, d or d+1)
    return circuit.flatten(1).norm(dim=1)


def channel_importance(mlp: nn.Module) -> torch.Tensor:
    """(hidden,) importance of each MLP hidden channel (module docstring)."""

    def row_norms(linear: nn.Linear) -> torch.Tensor:  # (hidden,)
        w = linear.weight
        if linear.bias is not None:
            w = torch.cat([w, linear.bias[:, None]], dim=1)
        return w.norm(dim=1)

    score = mlp.proj.weight.norm(dim=0)  # (hidden,) output columns
    if mlp.kind == "swiglu":
        return score * row_norms(mlp.gate) * row_norms(mlp.up)
    return score * row_norms(mlp.fc)


def _kept(score: torch.Tensor, n_removed: int) -> torch.Tensor:
    """Indices of the len(score) - n_removed highest scores, in their original order."""
    return score.topk(len(score) - n_removed).indices.sort().values


def _rows(linear: str, index: torch.Tensor, state: dict, sd: dict) -> None:
    """state[linear.weight/bias] = sd's rows `index`."""
    for part in ("weight", "bias"):
        if f"{linear}.{part}" in sd:
            state[f"{linear}.{part}"] = sd[f"{linear}.{part}"][index]


@torch.no_grad()
def structured_prune(model: GPT, heads_fraction: float, ffn_fraction: float) -> GPT:
    """A smaller GPT without the least important round(heads_fraction * n_kv_head) kv groups
    and round(ffn_fraction * ffn_hidden) MLP channels of every layer (module docstring); its
    config has the new n_head, n_kv_head and ffn_hidden and the old head_dim (head_size)."""
    cfg = model.config
    if cfg.low_rank is not None:
        raise LmforgeError("structured pruning needs full Linears; this model is low-rank")
    nh, nkv, hd, hidden = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim
    g = nh // nkv
    drop_groups = _removed(heads_fraction, nkv, "kv head groups", "--heads-fraction")
    drop_channels = _removed(ffn_fraction, hidden, "MLP channels", "--ffn-fraction")
    new_cfg = replace(
        cfg,
        n_head=(nkv - drop_groups) * g,
        n_kv_head=None if cfg.n_kv_head is None else nkv - drop_groups,
        head_size=hd,
        ffn_hidden=hidden - drop_channels,
    )
    sd = model.state_dict()
    state = dict(sd)
    for i, block in enumerate(model.blocks):
        groups = _kept(group_importance(block.attn), drop_groups)  # (nkv',)
        heads = (groups[:, None] * g + torch.arange(g)).flatten()  # (nh',) query heads kept
        dims = torch.arange(hd)
        q_rows = (heads[:, None] * hd + dims).flatten()  # (nh' * hd,)
        kv_rows = (groups[:, None] * hd + dims).flatten()  # (nkv' * hd,)
        _rows(f"blocks.{i}.attn.q", q_rows, state, sd)
        _rows(f"blocks.{i}.attn.k", kv_rows, state, sd)
        _rows(f"blocks.{i}.attn.v", kv_rows, state, sd)
        proj = f"blocks.{i}.attn.proj.weight"
        state[proj] = sd[proj][:, q_rows]  # (d, nh' * hd)

        channels = _kept(channel_importance(block.mlp), drop_channels)  # (hidden',)
        for linear in ("gate", "up") if cfg.mlp == "swiglu" else ("fc",):
            _rows(f"blocks.{i}.mlp.{linear}", channels, state, sd)
        proj = f"blocks.{i}.mlp.proj.weight"
        state[proj] = sd[proj][:, channels]  # (d, hidden')
    return rebuild(new_cfg, state)


def rebuild(cfg, state: dict[str, torch.Tensor]) -> GPT:
    """GPT(cfg) holding `state`'s tensors (built on meta: no init drawn), in eval mode."""
    with torch.device("meta"):
        model = GPT(cfg)
    missing, unexpected = model.assign_weights({k: v.clone() for k, v in state.items()})
    if missing or unexpected:  # a bug here, not a user error
        raise RuntimeError(f"rebuilt model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
