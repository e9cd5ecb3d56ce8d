"""Parameter-efficient fine-tuning, applied from outside the model: LoRA, prefix tuning and
P-tuning. `apply_peft` freezes the base GPT and returns the module to train; its forward has
GPT's signature and returns logits for the real tokens only, so every loss_fn (SFT, DPO,
classification, ...) and the Engine work unchanged.

- LoRA (Hu et al. 2021) swaps the targeted nn.Linear layers in place for LoRALinear: the
  module to train is the GPT itself. `merge_lora` folds the updates into the base weights and
  leaves a plain GPT (an ordinary checkpoint, exportable to Hugging Face).
- Prefix tuning (Li & Liang 2021) and P-tuning (Liu et al. 2021) wrap the GPT and hand it a
  Prefix (lmforge/model/gpt.py) of learned keys/values at every layer. During training these
  come from a reparametrisation encoder; adapter files hold the encoder's output ("folded").

An adapter folder holds `adapter.safetensors` (the method's tensors only) and `adapter.yaml`
(the peft config and the sha256 of the base checkpoint's model.safetensors), so an adapter
is never applied to weights it was not trained on.

Shapes: L layers, P virtual tokens, d model dim, nkv key/value heads, hd head dim, H encoder
hidden size, r LoRA rank.
"""

from __future__ import annotations

import dataclasses
import math
from fnmatch import fnmatchcase
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.common import LmforgeError
from lmforge.config import ModelConfig, PeftConfig, build_config, read_yaml
from lmforge.fileio import atomic_folder
from lmforge.model.dropout import Dropout
from lmforge.model.gpt import FUSED, GPT, KVCache, Prefix, split_fused

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.yaml"


# ---------------------------------------------------------------- LoRA


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A^T @ B^T * (alpha / r). A (r, in) starts like nn.Linear's
    weight (kaiming-uniform), B (out, r) at zero, so training starts from the base model.
    merge() adds B @ A * alpha / r to the base weight (inference at the base's cost) and
    unmerge() subtracts it again (equal up to rounding)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        return y + self.dropout(x) @ self.lora_A.T @ self.lora_B.T * self.scale

    def delta(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A * self.scale  # (out, in)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def _matches(name: str, pattern: str) -> bool:
    """fnmatch against the module name or any dotted tail of it: 'attn.q', 'attn.*' and
    '*.attn.q' all match 'blocks.0.attn.q' (so a pattern without '*' matches names ending
    with it, at a dot)."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def unfused_targets(patterns: list[str]) -> list[str]:
    """peft.targets saved before attention's qkv and SwiGLU's gate_up were split into separate
    Linears (gpt.FUSED): a pattern whose last name is one of those names each of its parts
    ('attn.qkv' -> 'attn.q', 'attn.k', 'attn.v'); other patterns are kept."""
    parts = {fused.split(".")[1]: names for fused, names in FUSED.items()}  # qkv -> (q, k, v)
    out = []
    for pattern in patterns:
        head, dot, last = pattern.rpartition(".")
        out += [f"{head}{dot}{part}" for part in parts[last]] if last in parts else [pattern]
    return out


def lora_targets(model: GPT, patterns: list[str]) -> list[str]:
    """Names of the nn.Linear layers the patterns match; a pattern that matches none is an
    error naming it and the model's Linear layers (those of the first block)."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LmforgeError("the model already has LoRA adapters; merge_lora it first")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for pattern in patterns:
        if not any(_matches(name, pattern) for name in linears):
            examples = [n for n in linears if n.startswith("blocks.0.") or "." not in n]
            raise LmforgeError(
                f"peft.targets pattern {pattern!r} matches no Linear layer of the model; "
                f"they are named like {', '.join(examples)}"
            )
    targets = [name for name in linears if any(_matches(name, p) for p in patterns)]
    if model.config.tie_embeddings and "lm_head" in targets:
        raise LmforgeError(
            "peft.targets includes lm_head, whose weight is the token embedding's "
            "(model.tie_embeddings): merging its update would change the embedding too"
        )
    return targets


def merge_lora(model: GPT) -> GPT:
    """Fold every LoRA update into its base weight and drop the adapters: `model` is a plain
    GPT again, all of whose parameters train, saveable and exportable as any other."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            model.set_submodule(name, module.base)
    return model.requires_grad_(True)


# ---------------------------------------------------------------- prefix tuning, P-tuning


class Folded(nn.Module):
    """A trained encoder's output kept as a plain parameter: what an adapter file holds."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(value)

    def forward(self) -> torch.Tensor:
        return self.value


class PrefixEncoder(nn.Module):
    """Li & Liang's reparametrisation: P learned embeddings (P, d) through an MLP
    d -> H -> tanh -> L * 2 * nkv * hd give every layer's prefix keys and values. Optimising
    the prefix directly is unstable, they report; the MLP is only needed for training."""

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, hidden: int):
        super().__init__()
        self.shape = (cfg.n_layer, 2, cfg.kv_heads, cfg.head_dim)
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, cfg.d_model) * cfg.init_std)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, hidden), nn.Tanh(), nn.Linear(hidden, math.prod(self.shape))
        )

    def forward(self) -> torch.Tensor:
        out = self.mlp(self.embedding)  # (P, L * 2 * nkv * hd)
        return out.view(-1, *self.shape).permute(1, 2, 3, 0, 4)  # (L, 2, nkv, P, hd)


class PromptEncoder(nn.Module):
    """P-tuning's prompt encoder: P learned embeddings (P, d) through an MLP d -> H -> ReLU -> d,
    or first through a two-layer bidirectional LSTM (d -> 2H), which makes the virtual tokens
    depend on each other (Liu et al. report smoother optimisation)."""

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, hidden: int, kind: str):
        super().__init__()
        d = cfg.d_model
        self.embedding = nn.Parameter(torch.randn(num_virtual_tokens, d) * cfg.init_std)
        self.lstm = (
            nn.LSTM(d, hidden, num_layers=2, bidirectional=True, batch_first=True)
            if kind == "lstm"
            else None
        )
        head_in = 2 * hidden if self.lstm is not None else d
        self.mlp = nn.Sequential(nn.Linear(head_in, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def forward(self) -> torch.Tensor:
        h = self.embedding  # (P, d)
        if self.lstm is not None:
            h = self.lstm(h[None])[0][0]  # (P, 2H)
        return self.mlp(h)  # (P, d)


class _Prefixed(nn.Module):
    """A frozen GPT run with the Prefix that `prefix()` makes from `source` (an encoder, or
    Folded once saved). forward has GPT's signature; `config` is what callers such as the
    Engine read."""

    tensor_name = ""  # the adapter file's one tensor

    def __init__(self, model: GPT, source: nn.Module):
        super().__init__()
        self.model = model
        self.source = source.to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
        self.config = model.config

    def prefix(self) -> Prefix:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(
            input_ids,
            attention_mask,
            position_ids,
            kv_cache,
            logits_to_keep,
            self.prefix(),
            return_hidden=return_hidden,
            document_ids=document_ids,
        )  # (B, T or k, V or d)

    def fold(self) -> None:
        """Replace the encoder by its output, as adapter files store it."""
        with torch.no_grad():
            self.source = Folded(self.source())

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.model.set_activation_checkpointing(enabled)


class PrefixTuned(_Prefixed):
    """Prefix tuning: every layer attends to P learned keys/values (L, 2, nkv, P, hd) first.
    The prefix takes no positions: real tokens keep theirs (0, 1, ...)."""

    tensor_name = "prefix"

    def prefix(self) -> Prefix:
        return Prefix(self.source())


class _KVRecorder:
    """Stands in for a KVCache during one forward and keeps each layer's keys/values, with
    their autograd graph (a KVCache writes in place, which backward cannot go through)."""

    packed = False

    def __init__(self):
        self.length = 0
        self.kv: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.kv.append(torch.stack([k[0], v[0]]))  # (2, nkv, P, hd)
        return k, v

    def advance(self, n: int) -> None:
        self.length += n


class PTuned(_Prefixed):
    """P-tuning: P learned virtual-token embeddings (P, d) come before every input. They take
    positions 0..P-1 and the real tokens P, P+1, ...; logits are for the real tokens only, and
    a padded batch's attention mask needs no change (the virtual tokens are always seen).

    The virtual tokens come first and attend causally only to each other, so their keys and
    values at every layer do not depend on the input: one forward of the virtual embeddings
    alone gives them, and the real tokens attend to them as a Prefix shifted by P. That is
    the computation of prepending them to the input embeddings (with one dropout mask for all
    rows), with the KV cache and the masks holding real tokens only, so the Engine works
    unchanged. `config.block_size` is what is left for real tokens."""

    tensor_name = "prompt"

    def __init__(self, model: GPT, source: nn.Module, num_virtual_tokens: int):
        super().__init__(model, source)
        self.num_virtual_tokens = num_virtual_tokens
        self.config = dataclasses.replace(
            model.config, block_size=model.config.block_size - num_virtual_tokens
        )

    def prefix(self) -> Prefix:
        recorder = _KVRecorder()
        self.model(None, kv_cache=recorder, logits_to_keep=1, inputs_embeds=self.source()[None])
        return Prefix(torch.stack(recorder.kv), shift=self.num_virtual_tokens)  # (L, 2, nkv, P, hd)


# ---------------------------------------------------------------- applying, counting, files


def apply_peft(model: GPT, cfg: PeftConfig) -> nn.Module:
    """Freeze `model` and return the module to train: the GPT itself with LoRA layers in place,
    or a PrefixTuned / PTuned wrapper around it. method none returns `model` untouched."""
    if cfg.method == "none":
        return model
    if cfg.method == "ptuning" and cfg.num_virtual_tokens >= model.config.block_size:
        raise LmforgeError(
            f"peft.num_virtual_tokens={cfg.num_virtual_tokens} must be below the model's "
            f"block_size {model.config.block_size} (P-tuning's virtual tokens take positions)"
        )
    targets = lora_targets(model, cfg.targets) if cfg.method == "lora" else []  # check first
    model.requires_grad_(False)
    P, H = cfg.num_virtual_tokens, cfg.encoder_hidden
    if cfg.method == "lora":
        for name in targets:
            lora = LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout)
            model.set_submodule(name, lora)
        module = model
    elif cfg.method == "prefix":
        module = PrefixTuned(model, PrefixEncoder(model.config, P, H))
    else:
        module = PTuned(model, PromptEncoder(model.config, P, H, cfg.encoder), P)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in peft_parameters(module)}, "base parameters must be frozen"
    return module


def peft_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the PEFT method added (LoRA's A and B, or the prefix/prompt source)."""
    if isinstance(module, _Prefixed):
        return list(module.source.parameters())
    return [p for m in module.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def trainable_share(module: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters), each counted once (a tied weight is one)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapter_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What an adapter file holds: LoRA's A and B by module name, or the encoder's output
    (the folded prefix (L, 2, nkv, P, hd) or prompt (P, d)). Parameters where they are ones."""
    if isinstance(module, _Prefixed):
        return {module.tensor_name: module.source()}
    return {
        f"{name}.{key}": getattr(m, key)
        for name, m in module.named_modules()
        if isinstance(m, LoRALinear)
        for key in ("lora_A", "lora_B")
    }


def write_adapter(module: nn.Module, folder: Path, cfg: PeftConfig, base_sha256: str) -> None:
    """adapter.safetensors (the method's tensors, encoders folded) and adapter.yaml (the peft
    config and the base weights' sha256) into an existing folder."""
    if cfg.method == "none":
        raise LmforgeError("peft.method is none: there is no adapter to save")
    with torch.no_grad():
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_tensors(module).items()}
    meta = {"base_sha256": base_sha256, "peft": dataclasses.asdict(cfg)}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")


def save_adapter(module: nn.Module, folder: str | Path, cfg: PeftConfig, base_sha256: str) -> Path:
    """Write an adapter folder atomically (see write_adapter)."""
    with atomic_folder(folder) as tmp:
        write_adapter(module, tmp, cfg, base_sha256)
    return Path(folder)


def load_adapter(model: GPT, folder: str | Path, base_sha256: str) -> nn.Module:
    """Apply the adapter in `folder` to `model` (whose checkpoint's model.safetensors has
    sha256 `base_sha256`) and return the module, as apply_peft does; prefix and prompt come
    folded. An adapter trained on other base weights is refused. One saved before qkv and
    gate_up were split (gpt.FUSED) loads too: its targets and tensors name the parts."""
    folder = Path(folder)
    meta = read_yaml(folder / ADAPTER_CONFIG)
    if meta.get("base_sha256") != base_sha256:
        raise LmforgeError(
            f"adapter {folder} was trained on base weights with sha256 {meta.get('base_sha256')}, "
            f"but these weights have sha256 {base_sha256}: an adapter on the wrong base"
        )
    cfg = build_config({"peft": meta.get("peft") or {}}).peft
    module = apply_peft(model, dataclasses.replace(cfg, targets=unfused_targets(cfg.targets)))
    if isinstance(module, _Prefixed):
        module.fold()
    path = folder / ADAPTER_WEIGHTS
    try:
        saved = split_fused(load_file(str(path)), model.config)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"cannot read {path}: {str(e).strip().splitlines()[0]}") from None
    own = adapter_tensors(module)
    want = {k: tuple(v.shape) for k, v in own.items()}
    have = {k: tuple(v.shape) for k, v in saved.items()}
    if want != have:
        bad = next(k for k in sorted(want.keys() | have.keys()) if want.get(k) != have.get(k))
        raise LmforgeError(
            f"{path} does not fit this model: tensor {bad!r} has shape {have.get(bad)} there, "
            f"the model needs {want.get(bad)}"
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(saved[name])
    return module
