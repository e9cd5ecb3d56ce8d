"""Weight-only quantization of a trained GPT (int8 per output channel, int4 in groups), with
int8 dynamic activations as an option, through torchao's `quantize_`.

What torchao does, and what lmforge adds around it:
- Every nn.Linear (attention, MLP, the head) goes through torchao's configs:
  Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, or IntxWeightOnlyConfig(int4,
  PerGroup(g)). torchao's packed int4 layouts (Int4WeightOnlyConfig) need kernels that this
  CPU build lacks, so int4 uses its "unpacked" layout: int4 values held one per int8 byte (26%
  of fp32 in memory and on disk, not 12.5%).
- The token embedding is a lookup, and a lookup on torchao's tensors dequantizes the whole
  table (about 200 ms for GPT-2's 50257 x 768 on 2 cores). QuantizedEmbedding keeps int8 rows
  with one scale each and rescales only the rows it gathers. With tied embeddings and int8, it
  reads the head's own int8 tensor (one copy of the table, in memory and in the file).
- The file: torchao's safetensors flattening puts each quantized tensor's parts (qdata, scale,
  ...) in model.safetensors with their types in its header; config.yaml's quantize section
  says which layers to rebuild before those tensors are assigned to them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.common import LmforgeError
from lmforge.config import QuantizeConfig
from lmforge.model.gpt import GPT, split_fused, unfused_keys

QUANTIZED = "lmforge_quantize"
"""Header key of a quantized model.safetensors: method and which tensors hold packed int4."""
INT4_DATA = "._weight_qdata"
"""torchao's flattened name for a quantized Linear weight's integer values."""


def _torchao():
    """torchao's quantization API. Its import logs that the CUDA-only extensions it ships
    cannot load on a CPU machine; that is expected here and not worth a user's attention."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        import torchao.quantization as tq
        from torchao.prototype.safetensors import safetensors_support
        from torchao.quantization.granularity import PerGroup
    except ImportError as e:
        raise LmforgeError(f"quantization needs torchao (pip install torchao): {e}") from None
    finally:
        logging.disable(level)
    return tq, PerGroup, safetensors_support


class QuantizedEmbedding(nn.Module):
    """A token embedding stored as int8 rows, each with its own scale (symmetric, absmax / 127):
    (V, d) int8 and (V,) float. `share(weight)` points it at a tied head's torchao Int8Tensor
    instead, whose per-output-channel rows are exactly these rows."""

    def __init__(self, num_embeddings: int, dim: int, persistent: bool = True):
        super().__init__()
        self.register_buffer(
            "qdata", torch.zeros(num_embeddings, dim, dtype=torch.int8), persistent=persistent
        )
        self.register_buffer("scale", torch.ones(num_embeddings), persistent=persistent)

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor) -> QuantizedEmbedding:
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (V,)
        self.qdata = torch.round(weight / scale[:, None]).clamp(-128, 127).to(torch.int8)
        self.scale = scale.float()
        return self

    def share(self, int8_weight: torch.Tensor) -> None:
        self.qdata, self.scale = int8_weight.qdata, int8_weight.scale.view(-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qdata)  # (..., d) int8
        return rows.to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)  # (..., d)


def _linear_config(qcfg: QuantizeConfig):
    tq, PerGroup, _ = _torchao()
    if qcfg.method == "int4":
        return tq.IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(qcfg.group_size)
        )
    if qcfg.activations == "int8":
        return tq.Int8DynamicActivationInt8WeightConfig()
    return tq.Int8WeightOnlyConfig()


def check_quantizable(model: GPT, qcfg: QuantizeConfig) -> None:
    if qcfg.method == "int4":
        widths = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear)})
        bad = [w for w in widths if w % qcfg.group_size]
        if bad:
            raise LmforgeError(
                f"quantize.group_size={qcfg.group_size} does not divide the input width {bad[0]} "
                f"of some layers (widths: {', '.join(map(str, widths))})"
            )


def shares_table(model: GPT, qcfg: QuantizeConfig) -> bool:
    """Whether the embedding reads the head's int8 table (tied embeddings, int8 weights)."""
    return model.config.tie_embeddings and qcfg.method == "int8"


@torch.no_grad()
def quantize_model(model: GPT, qcfg: QuantizeConfig) -> GPT:
    """Quantize `model` in place (eval mode, CPU, float weights) and return it."""
    if qcfg.method == "none":
        return model
    check_quantizable(model, qcfg)
    tq, _, _ = _torchao()
    shared = shares_table(model, qcfg)
    table = model.wte.weight
    embedding = QuantizedEmbedding(*table.shape, persistent=not shared)
    if model.config.tie_embeddings:  # the head gets a weight of its own for torchao to replace
        model.lm_head.weight = nn.Parameter(table.detach().clone(), requires_grad=False)
    tq.quantize_(model, _linear_config(qcfg), filter_fn=lambda m, _: isinstance(m, nn.Linear))
    if shared:
        embedding.share(model.lm_head.weight)
    else:
        embedding.quantize(table.detach())
    model.wte = embedding
    return model.eval()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., n) int8 holding int4 values in [-8, 7], n even -> (..., n/2) uint8, two per byte."""
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """pack_int4's inverse: (..., n/2) uint8 -> (..., n) int8."""
    low = (packed & 15).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def save_quantized(model: GPT, qcfg: QuantizeConfig, path: Path) -> None:
    """model.safetensors for a quantized model, through torchao's flattening. A shared table
    is written once, as the head's. int4 values, which torchao holds one per byte, are packed
    two per byte in the file."""
    _, _, st = _torchao()
    tensors, metadata = st.flatten_tensor_state_dict(model.state_dict())
    packed = []
    if qcfg.method == "int4":
        packed = [k for k, t in tensors.items() if k.endswith(INT4_DATA) and t.size(-1) % 2 == 0]
        tensors |= {k: pack_int4(tensors[k]) for k in packed}
    metadata[QUANTIZED] = json.dumps({"method": qcfg.method, "int4_packed": packed})
    save_file(tensors, str(path), metadata=metadata)


def load_quantized(model: GPT, qcfg: QuantizeConfig, path: Path) -> GPT:
    """A float GPT built from the checkpoint's config -> the quantized model the file holds
    (written before qkv and gate_up were split, too: gpt.split_fused splits torchao's
    flattened parts, whose rows are the weight's rows, and their names are renamed)."""
    _, _, st = _torchao()
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if QUANTIZED not in metadata:
        raise LmforgeError(
            f"{path} holds no quantized weights, but its config says quantize.method={qcfg.method}"
        )
    quantize_model(model, qcfg)
    tensors = split_fused(load_file(str(path)), model.config)
    metadata = {new: value for key, value in metadata.items() for new in unfused_keys(key)}
    for packed in json.loads(metadata[QUANTIZED])["int4_packed"]:
        for key in unfused_keys(packed):
            tensors[key] = unpack_int4(tensors[key])
    state, leftover = st.unflatten_tensor_state_dict(tensors, metadata)
    if leftover:
        raise LmforgeError(f"{path}: unexpected tensors {sorted(leftover)[:3]}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise LmforgeError(
            f"weights in {path} do not fit the model config: {str(e).splitlines()[0]}"
        ) from None
    if shares_table(model, qcfg):
        model.wte.share(model.lm_head.weight)
    return model.eval()
