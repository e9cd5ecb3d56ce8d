"""The one decoder-only transformer. GPT-2 and Llama are configurations of it (ModelConfig).

Written for one device; data/tensor/pipeline parallelism and compilation are applied from
outside (lmforge/train/distributed.py). Shapes: B batch, T new tokens, S keys (cache + new),
nh query heads, nkv key/value heads, hd head dim, d model dim, V vocab.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.common import LmforgeError
from lmforge.config import ModelConfig
from lmforge.model.dropout import Dropout, dropout
from lmforge.model.linear import Linear
from lmforge.model.masks import AttentionPattern, BlockMask, Mask, check_backend, flex_attend

SDPA_HAS_GQA = torch.__version__ >= "2.5"
"""SDPA's enable_gqa (torch >= 2.5) lets nkv key/value heads serve nh query heads without
materialising repeated copies; older torch falls back to repeat_interleave."""


def sdpa_gqa(q: torch.Tensor, mask: torch.Tensor | bool) -> bool:
    """Whether to pass enable_gqa to SDPA rather than repeat k/v. On CUDA only the flash
    kernel honours enable_gqa, and flash takes neither an explicit mask nor fp32: there SDPA
    would fall back to its slow math kernel, so k/v are repeated for the memory-efficient
    kernel instead (transformers gates it the same way). On CPU enable_gqa is always faster."""
    if not SDPA_HAS_GQA:
        return False
    if q.device.type != "cuda":
        return True
    return isinstance(mask, bool) and q.dtype in (torch.float16, torch.bfloat16)


class KVCache:
    """Preallocated keys and values for every layer, filled left to right by prefill and decode.

    Rows of a batch share one length; prompts of different lengths are left-padded and the
    padding is hidden by the attention mask the caller passes to GPT.forward. A cache is
    anything with `packed` (False), `length` (positions before the new ones, for the
    block-size check and the default positions), `update` and `advance`.

    A packed cache (`packed` True: the server's, lmforge/serve/batching.py) holds rows of
    different lengths whose new tokens come packed into one sequence (B = 1), some rows one
    decode token, others a whole prompt. No mask over one sequence says which keys each token
    sees, so such a cache has `attend(layer, q, k, v)` in place of `length` and `update`: it
    stores the new keys/values and does the attention itself. It checks its own rows'
    lengths, and the caller passes every token's position_ids.
    """

    packed = False

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, nkv, max_len, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled so far

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nkv, T, hd) keys/values; return all so far, (B, nkv, S, hd)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """After a forward has written n new positions through every layer."""
        self.length += n


@dataclass
class Prefix:
    """Key/value positions that every token attends to before its own sequence: the model's
    hook for prefix tuning and P-tuning (lmforge/model/peft.py). A prefix is shared by every row
    of a batch and sits outside the KV cache and the attention mask: each query sees all of it,
    whatever the padding or sliding window.

    kv (n_layer, 2, nkv, P, hd): each layer's keys and values, used as given (RoPE is not
    applied to them). shift: positions the prefix takes before the real tokens, whose positions
    move up by it (0 for prefix tuning; P for P-tuning, whose virtual tokens sit at 0..P-1)."""

    kv: torch.Tensor
    shift: int = 0


EXPLICIT_ATTENTION_MAX_T = 512
"""Longest sequence for which bf16/fp16 attention on CPU is spelled out (causal_attention)
rather than left to SDPA. PyTorch's CPU flash kernel is slow in low precision, its backward
most: on a 2-core EPYC, 16 x 4 heads x 128 x 32 took 10.5 ms forward + backward against
2.1 ms written out, and the written-out path stayed ahead up to 512 tokens (2.7x) but fell
behind at 1,024 (0.73x), where its (T, T) scores outgrow the caches. fp32 stays on SDPA,
which is as fast or faster there. `python benchmarks/attention_cpu.py` prints the figures."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def explicit_attention_pays(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | bool, dropout_p: float = 0.0
) -> bool:
    """Whether `attend` should use causal_attention rather than SDPA: plain causal attention
    on CPU over as many keys as queries, either in bf16/fp16 with T <= EXPLICIT_ATTENTION_MAX_T,
    or with attention dropout at any length and dtype (SDPA's CPU dropout draws a float per
    probability, 2-3x the cost of lmforge.model.dropout's masks)."""
    if mask is not True or q.device.type != "cpu" or q.size(-2) != k.size(-2):
        return False
    low_precision = compute_dtype(q) in (torch.bfloat16, torch.float16)
    return dropout_p > 0 or (low_precision and q.size(-2) <= EXPLICIT_ATTENTION_MAX_T)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """dropout(softmax(q k^T / sqrt(hd) + causal mask)) v, written out in the matmuls'
    precision: q, k, v (B, nh, T, hd) -> (B, nh, T, hd). Scores and probabilities are rounded
    to bf16/fp16 as flash attention rounds them; PyTorch's softmax kernel sums in fp32."""
    B, nh, T, hd = q.shape
    dtype = compute_dtype(q)
    causal = torch.full((T, T), float("-inf"), dtype=dtype, device=q.device).triu(1)  # (T, T)
    scores = torch.baddbmm(  # (B*nh, T, T), the mask added by the matmul itself
        causal.expand(B * nh, T, T), (q * hd**-0.5).flatten(0, 1), k.flatten(0, 1).mT
    )
    probs = dropout(scores.softmax(dim=-1), dropout_p)  # dropout_p > 0 only in training
    return (probs @ v.flatten(0, 1)).view(B, nh, T, hd)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask | BlockMask, dropout_p=0.0
) -> torch.Tensor:
    """SDPA with nkv <= nh key/value heads: q (B, nh, T, hd), k and v (B, nkv, S, hd) ->
    (B, nh, T, hd). mask as GPT.forward gives it: True causal, False none, an additive tensor
    (additive_mask), or a FlexAttention BlockMask (model.attention_backend=flex)."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return flex_attend(q, k, v, mask, dropout_p)
    gqa = {}
    nh, nkv = q.size(1), k.size(1)
    if explicit_attention_pays(q, k, mask, dropout_p):
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
        return causal_attention(q, k, v, dropout_p)
    if nkv != nh:
        if sdpa_gqa(q, mask):
            gqa = {"enable_gqa": True}  # SDPA pairs query head h with kv head h // (nh/nkv)
        else:
            k = k.repeat_interleave(nh // nkv, dim=1)  # (B, nh, S, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None if isinstance(mask, bool) else mask,
        is_causal=mask is True,
        dropout_p=dropout_p,
        **gqa,
    )


def at_positions(t: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """t (B or 1, ..., T at `dim`, ...) at each row's own positions keep (B, k): the same
    shape with k at `dim` (hidden states, RoPE tables, mask rows of the kept queries)."""
    B, k = keep.shape
    t = t.expand(B, *t.shape[1:])
    view = [B if i == 0 else k if i == dim else 1 for i in range(t.dim())]
    size = [B if i == 0 else k if i == dim else n for i, n in enumerate(t.shape)]
    return t.gather(dim, keep.view(view).expand(size))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = may attend) as SDPA adds it to the scores: 0 or -inf, in the
    matmuls' dtype. SDPA makes exactly this of a boolean mask itself, in every layer; made once
    per forward instead (the conversion was 10% of fp32 attention at 16 x 256 tokens)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def query_rows(mask: Mask, keep: torch.Tensor, S: int) -> Mask:
    """The mask of the kept queries keep (B, k) alone: mask as `attend` takes it (True
    causal, False none, or a (B or 1, 1, T, S) tensor) -> False or (B, 1, k, S)."""
    if mask is False:
        return False
    if mask is True:
        return torch.arange(S, device=keep.device) <= keep[:, None, :, None]  # (B, 1, k, S)
    return at_positions(mask, keep, 2)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """RoPE on queries or keys x (B, h, T, hd), halves rotated as in transformers: with x =
    [x1, x2], x * cos + [-x2, x1] * sin. rope holds (cos, [-sin1, sin2]) (GPT.rope_tables),
    so the sign rides on the table and the swap is one roll: the same products and sums,
    bitwise, in two fewer passes over x."""
    cos, signed_sin = rope  # (B, 1, T, hd) each
    return x * cos + x.roll(x.size(-1) // 2, dims=-1) * signed_sin


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s fixed encoding: (B, T) positions -> (B, T, dim), sin/cos interleaved."""
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / dim)
    )
    angles = positions[..., None].float() * inv_freq  # (B, T, dim/2)
    # an odd dim has one more sin than cos column: drop the last cos
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., :dim]


class HeadNorm(nn.RMSNorm):
    """QK-norm: RMSNorm over each head's vector, in the dtype queries and keys arrive in. Under
    bf16 autocast they are bf16, and nn.RMSNorm's fp32 gain would send them down PyTorch's
    unfused path (and return fp32); the gain is cast instead (a no-op in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def set_dropout(module: nn.Module, dropout: float, attention_dropout: float) -> None:
    """Set the model's dropout rates inside `module` (a model, a wrapped one or a pipeline
    stage): embeddings and residual branches, and attention probabilities. An adapter's own
    dropout (LoRA's, peft.dropout) keeps its rate."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.resid_drop.p, m.dropout = dropout, attention_dropout
        elif isinstance(m, MLP) or hasattr(m, "wte"):  # a GPT's or a first stage's embeddings
            m.drop.p = dropout


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, scaling survivors by 1/keep."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty(x.size(0), *([1] * (x.dim() - 1))).bernoulli_(keep)
        return x * mask / keep


def drop_path_rate(cfg: ModelConfig, layer: int) -> float:
    """Stochastic depth grows linearly from 0 at the first block to cfg.drop_path at the last."""
    return cfg.drop_path * layer / max(cfg.n_layer - 1, 1)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def block_linear(cfg: ModelConfig, n_in: int, n_out: int) -> nn.Module:
    """A transformer block's Linear (n_in -> n_out): lmforge's Linear (an nn.Linear), or with
    model.low_rank its two factors n_in -> r -> n_out, r = min(low_rank, n_in, n_out), as an
    nn.Sequential whose `0.weight` is (r, n_in) and `1.weight` (n_out, r) with the bias, if
    any, on the second."""
    if cfg.low_rank is None:
        return Linear(n_in, n_out, bias=cfg.bias)
    r = min(cfg.low_rank, n_in, n_out)
    return nn.Sequential(Linear(n_in, r, bias=False), Linear(r, n_out, bias=cfg.bias))


class Attention(nn.Module):
    """Causal (or bidirectional) self-attention with nkv <= nh key/value heads. q, k and v are
    separate Linears, as in Llama, so that tensor parallelism can give each rank whole heads
    of each; forward reads head counts from its tensors, so a rank holding nh/tp query and
    nkv/tp key/value heads runs the same code."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        nh, nkv, self.hd = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q = block_linear(cfg, cfg.d_model, nh * self.hd)
        self.k = block_linear(cfg, cfg.d_model, nkv * self.hd)
        self.v = block_linear(cfg, cfg.d_model, nkv * self.hd)
        self.proj = block_linear(cfg, nh * self.hd, cfg.d_model)
        # QK-norm: RMSNorm of each head's query and key, so that attention logits cannot grow
        # with the weights (a cause of loss spikes at high learning rates); None when off
        self.q_norm = HeadNorm(self.hd, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = HeadNorm(self.hd, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.dropout = cfg.attention_dropout_rate
        self.resid_drop = Dropout(cfg.dropout)

    def forward(
        self, x, rope, mask, kv_cache: KVCache | None, prefix_kv=None, keep=None
    ) -> torch.Tensor:
        """prefix_kv (2, nkv, P, hd): this layer's Prefix keys/values, put before every row's.
        keep (B, k): only these positions of each row query (keys and values are every
        position's), and the output is (B, k, d); None: all of them."""
        B, T, _ = x.shape
        # Under autocast each Linear casts its fp32 input for itself and saves that copy for its
        # backward: cast once, so that q, k and v share one copy, as one fused Linear had it
        # (their input gradients then add up in bf16, not fp32: measured against fp32
        # gradients, no less accurate). A no-op in fp32.
        x = x.to(compute_dtype(x))
        xq = x if keep is None else at_positions(x, keep, 1)  # (B, Tq, d), Tq = T or k
        Tq = xq.size(1)
        q = self.q(xq).view(B, Tq, -1, self.hd).transpose(1, 2)  # (B, nh, Tq, hd)
        k = self.k(x).view(B, T, -1, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v(x).view(B, T, -1, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if self.q_norm is not None:  # before RoPE and the cache: cached keys are normed too
            q, k = self.q_norm(q), self.k_norm(k)  # over hd; (B, nh, T, hd), (B, nkv, T, hd)
        if rope is not None:
            rope_q = rope if keep is None else tuple(at_positions(t, keep, 2) for t in rope)
            q, k = rotate(q, rope_q), rotate(k, rope)
        if keep is not None:
            mask = query_rows(mask, keep, k.size(-2))
        if kv_cache is not None and kv_cache.packed:
            y = kv_cache.attend(self.layer, q, k, v)  # (1, nh, T, hd)
        else:
            if kv_cache is not None:
                k, v = kv_cache.update(self.layer, k, v)  # (B, nkv, S, hd)
            if prefix_kv is not None:
                pk, pv = prefix_kv.to(k.dtype)[:, None].expand(-1, B, -1, -1, -1)  # (B,nkv,P,hd)
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nkv, P+S, hd)
            y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, Tq, hd)
        y = y.transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, nh * hd): d unless pruned
        return self.resid_drop(self.proj(y))


MLP_CHUNK_ROWS = 512
"""Outside training, a CPU MLP runs over this many tokens at a time when it has more than
twice as many: each chunk's hidden activations (512 x 704 fp32 for the chat base, 1.4 MB)
stay in the caches between their Linear, activation and product, where the whole batch's
went out to memory and back. Each token's output is computed alike either way. On a
2-core EPYC, `lmforge eval` scored 300 PIQA items (16 rows of 256 tokens a batch) in
1.61-1.65 s against 1.79-1.86 s in one pass (benchmarks/eval_vs_lm_eval.py, BENCHMARKS.md)."""


class MLP(nn.Module):
    """GPT-2's fc -> GELU -> proj, Llama's SwiGLU (silu(gate) * up -> proj), or
    fc -> ReLU squared -> proj (relu2: as cheap as GELU, trains faster in modded-nanogpt)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.ffn_dim
        if self.kind == "swiglu":
            self.gate = block_linear(cfg, cfg.d_model, hidden)
            self.up = block_linear(cfg, cfg.d_model, hidden)
        else:
            self.fc = block_linear(cfg, cfg.d_model, hidden)
        self.proj = block_linear(cfg, hidden, cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))  # one autocast copy for gate and up (Attention.forward)
        tokens = x.numel() // x.size(-1)
        if self.training or x.device.type != "cpu" or tokens <= 2 * MLP_CHUNK_ROWS:
            return self._forward(x)
        rows = x.reshape(tokens, -1)  # (B*T, d)
        chunks = [self._forward(chunk) for chunk in rows.split(MLP_CHUNK_ROWS)]  # (<=n, d) each
        return torch.cat(chunks).view_as(x)  # (B, T, d)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, hidden)
        elif self.kind == "relu2":
            h = F.relu(self.fc(x)).square()  # (B, T, hidden)
        else:
            h = F.gelu(self.fc(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.drop(self.proj(h))


def stacked_linears(module: nn.Module) -> list[nn.Module]:
    """An Attention's q, k, v or a SwiGLU MLP's gate, up: the Linears that were one until
    tensor parallelism needed them apart (FUSED), which init_weights draws as one; [] for any
    other module, and for low-rank factors (model.low_rank), which never were one."""
    if isinstance(module, Attention):
        group = [module.q, module.k, module.v]
    elif isinstance(module, MLP) and module.kind == "swiglu":
        group = [module.gate, module.up]
    else:
        return []
    return group if all(isinstance(m, nn.Linear) for m in group) else []


FUSED = {"attn.qkv": ("q", "k", "v"), "mlp.gate_up": ("gate", "up")}
"""The Linears older lmforge fused, with the parts their rows stacked, in order."""
_FUSED_KEY = re.compile(r"((?:.*\.)?)(attn\.qkv|mlp\.gate_up)\.(.+)")


def unfused_keys(key: str) -> list[str]:
    """The names a state-dict key of the fused layout has now, one per part
    (`blocks.0.attn.qkv.weight` -> `blocks.0.attn.q.weight`, `...k.weight`, `...v.weight`);
    [key] for any other key."""
    match = _FUSED_KEY.fullmatch(key)
    if match is None:
        return [key]
    prefix, fused, rest = match.groups()
    parent = fused.split(".")[0]
    return [f"{prefix}{parent}.{part}.{rest}" for part in FUSED[fused]]


def split_fused(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict written before q, k, v and gate, up were separate Linears (checkpoints,
    adapters) -> today's names. A fused tensor's rows [q | k | v] or [gate | up] are split;
    one on a fused Linear's input side (LoRA's lora_A, a low-rank model's first factor `0.`)
    serves every part, each of which gets a copy. Parts are clones, so no two parameters
    share memory. Other tensors pass through, so a state dict in today's layout is unchanged.
    (A low-rank model whose rank exceeds a part's width, rare under GQA, does not fit: its
    factors were shared by parts that now each have a lower rank.)"""
    widths = {
        "attn.qkv": [cfg.n_head * cfg.head_dim] + 2 * [cfg.kv_heads * cfg.head_dim],
        "mlp.gate_up": 2 * [cfg.ffn_dim],
    }
    out = {}
    for key, tensor in state.items():
        match = _FUSED_KEY.fullmatch(key)
        if match is None:
            out[key] = tensor
            continue
        fused, rest = match.group(2, 3)
        shared = rest.startswith("0.") or rest.endswith("lora_A")
        parts = [tensor] * len(FUSED[fused]) if shared else tensor.split(widths[fused])
        out |= {name: part.clone() for name, part in zip(unfused_keys(key), parts)}
    return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1, self.norm2 = make_norm(cfg), make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.drop_path = DropPath(drop_path_rate(cfg, layer))
        self.activation_checkpointing = False  # set from outside by the trainer

    def _forward(self, x, rope, mask, kv_cache, prefix_kv, keep):
        """keep (B, k): compute only these positions of each row (see Attention.forward)."""
        residual = x if keep is None else at_positions(x, keep, 1)  # (B, T or k, d)
        if self.pre_norm:
            x = self.attn(self.norm1(x), rope, mask, kv_cache, prefix_kv, keep)
            x = residual + self.drop_path(x)
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = self.norm1(
            residual + self.drop_path(self.attn(x, rope, mask, kv_cache, prefix_kv, keep))
        )
        return self.norm2(x + self.drop_path(self.mlp(x)))

    def forward(self, x, rope, mask, kv_cache=None, prefix_kv=None, keep=None):
        if self.activation_checkpointing and self.training and kv_cache is None:
            return checkpoint(
                self._forward, x, rope, mask, kv_cache, prefix_kv, keep, use_reentrant=False
            )
        return self._forward(x, rope, mask, kv_cache, prefix_kv, keep)


def require_causal(config: ModelConfig, task: str) -> None:
    """One clear line where a bidirectional model (model.causal=false, a masked-LM encoder)
    is asked for what only a causal LM does: generate, or learn from next-token log-probs."""
    if not config.causal:
        raise LmforgeError(
            f"this model is bidirectional (model.causal=false, a masked-LM encoder): it cannot "
            f"{task}; fine-tune it (e.g. lmforge classify) instead"
        )


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not cfg.vocab_size:
            raise ValueError(
                "ModelConfig.vocab_size must be set (it normally comes from the tokenizer)"
            )
        check_backend(cfg.attention_backend)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = (
            nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_encoding == "learned" else None
        )
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if cfg.pos_encoding == "rope":
            self.register_buffer("rope_inv_freq", self._rope_inv_freq(), persistent=False)
        if not self.wte.weight.is_meta:  # on meta: shapes only, weights come by assign_weights
            self.init_weights()

    def _rope_inv_freq(self, device=None) -> torch.Tensor:
        hd = self.config.head_dim
        exponents = torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd
        return 1.0 / (self.config.rope_theta**exponents)  # (hd/2,)

    @torch.no_grad()
    def assign_weights(self, state: dict[str, torch.Tensor]):
        """Take `state`'s tensors as this model's parameters instead of copying them in: for a
        model built under `torch.device("meta")`, so that loading a large model neither draws
        random weights first nor holds two copies. Tensors are cast to the parameter's dtype and
        made contiguous (a copy only where needed); a tied head stays one shared Parameter,
        whichever of its two names `state` holds (safetensors keeps one name of shared
        tensors); non-persistent buffers (RoPE frequencies) are rebuilt on the weights' device.

        Returns load_state_dict's (missing_keys, unexpected_keys); a missing tensor stays on
        meta, so callers must treat any as an error. Shape mismatches raise RuntimeError."""
        state = dict(state)
        if self.config.tie_embeddings:
            shared = state.get("wte.weight", state.get("lm_head.weight"))
            if shared is not None:
                state["wte.weight"] = state["lm_head.weight"] = shared
        own = self.state_dict(keep_vars=True)
        state = {
            name: t.to(dtype=own[name].dtype).contiguous() if name in own else t
            for name, t in state.items()
        }
        result = self.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_embeddings:  # assign gave the two names separate Parameters
            self.lm_head.weight = self.wte.weight
        if self.config.pos_encoding == "rope":
            self.rope_inv_freq = self._rope_inv_freq(self.wte.weight.device)
        return result

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's scheme, one place for every tensor:
        - token and learned position embeddings, every Linear weight: N(0, init_std);
        - residual output projections (attn.proj, mlp.proj): N(0, init_std / sqrt(2 * n_layer)),
          so the residual stream's variance does not grow with depth; with zero_init_proj, 0
          (drawn, then zeroed: every other tensor gets the draw it gets without the option),
          so that each block starts as the identity;
        - biases 0; norm weights 1 (LayerNorm bias 0, QK-norms too); an untied lm_head like
          any Linear.
        Attention's q, k, v and SwiGLU's gate, up are drawn as one matrix of their stacked
        rows, then split (stacked_linears): a seed gives the model it gave when each group was
        one Linear. Separate draws would differ, since torch's CPU normal_ makes its numbers
        16 at a time from each call's own stream (a width whose rows * columns is not a
        multiple of 16 shifts every later draw), and CUDA's generator advances per call."""
        std = self.config.init_std
        stacked: set[nn.Module] = set()
        for name, module in self.named_modules():
            group = stacked_linears(module)  # before its Linears: named_modules is pre-order
            if group:
                rows = [linear.weight.size(0) for linear in group]
                weight = group[0].weight.new_empty(sum(rows), group[0].weight.size(1))
                nn.init.normal_(weight, mean=0.0, std=std)
                for linear, part in zip(group, weight.split(rows)):
                    linear.weight.copy_(part)
                stacked.update(group)
            if isinstance(module, nn.Linear):
                is_residual_out = name.endswith("attn.proj") or name.endswith("mlp.proj")
                scale = 1 / math.sqrt(2 * self.config.n_layer) if is_residual_out else 1.0
                if module not in stacked:
                    nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if is_residual_out and self.config.zero_init_proj:
                    nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        if self.config.tie_embeddings:  # the loop above re-drew the shared weight as a Linear
            nn.init.normal_(self.wte.weight, mean=0.0, std=std)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        for block in self.blocks:
            block.activation_checkpointing = enabled

    def _positions(self, B, T, offset, attention_mask, position_ids, device) -> torch.Tensor:
        if position_ids is not None:
            return position_ids
        if attention_mask is not None and attention_mask.dim() == 2:  # padding: count real tokens
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
            return pos[:, offset : offset + T]
        return torch.arange(offset, offset + T, device=device).unsqueeze(0).expand(B, T)

    def _mask(
        self, T, S, offset, attention_mask, document_ids, prefix: int, device
    ) -> Mask | BlockMask:
        """True = plain causal (SDPA's fast path), False = attend to everything (one-token
        decode, or a bidirectional model without padding), else a boolean (B or 1, 1, T, P + S)
        mask where True means 'may attend', or with model.attention_backend=flex a BlockMask of
        the same pattern (lmforge/model/masks.py says which keys each query sees)."""
        if attention_mask is not None and attention_mask.dim() == 4:  # caller-built, as given
            mask = attention_mask.bool()  # (B or 1, 1, T, S)
            if prefix:  # the prefix's columns in front, seen by every query
                mask = torch.cat([mask.new_ones(*mask.shape[:-1], prefix), mask], dim=-1)
            return mask
        real = None if attention_mask is None else attention_mask[:, :S].bool()  # (B, S)
        pattern = AttentionPattern.of(
            self.config, S, offset=offset, real=real, documents=document_ids, prefix=prefix
        )
        return pattern.mask(T, S, self.config.attention_backend, device)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        prefix: Prefix | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_hidden: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, k, V) for the last k positions only
        when logits_to_keep=k > 0 (generation needs just the last one; the head is the
        largest matmul of a small model's forward at a large vocabulary), or for the positions
        a tensor names: (k,) for every row, or (B, k) each row's own (scoring takes the
        positions that predict a continuation). Without a KV cache the last block then runs
        only those positions' queries and MLP.

        attention_mask (B, S), 1 for real tokens and 0 for padding, covers the cached
        positions plus the new ones (S = cache length + T). A 4-D boolean (B, 1, T, S) mask is
        used as given (True = may attend; the model's window and global tokens are not added).
        document_ids (B, S): packed documents (lmforge/data/packing.py), each token attends
        only within its own id, -1 marking padding. position_ids (B, T) default to counting
        real tokens, so a left-padded prompt gets the positions it would have alone.

        Hooks for PEFT (lmforge/model/peft.py): `prefix` puts learned keys/values before every
        layer's own (see Prefix); `inputs_embeds` (B, T, d) replaces the token embedding of
        input_ids (then None). return_hidden=True gives the final normed hidden states (B, T or
        k, d) instead of logits, for heads of other kinds (classification, reward, value).
        """
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        keep_last = isinstance(logits_to_keep, int)
        if keep_last and logits_to_keep < 0:
            raise ValueError(f"logits_to_keep={logits_to_keep} must be >= 0 (0 = all positions)")
        if kv_cache is not None:
            require_causal(self.config, "generate with a KV cache")
        packed = kv_cache is not None and kv_cache.packed  # see KVCache
        if packed and (prefix is not None or position_ids is None):
            raise ValueError("a packed KV cache needs position_ids and takes no prefix")
        offset = kv_cache.length if kv_cache is not None and not packed else 0
        S = offset + T
        shift = prefix.shift if prefix is not None else 0
        if not packed and shift + S > self.config.block_size:
            raise ValueError(
                f"sequence length {shift + S} exceeds block_size {self.config.block_size}"
            )
        device = x.device
        pos = self._positions(B, T, offset, attention_mask, position_ids, device)  # (B, T)
        if shift:
            pos = pos + shift
        x = self.drop(self.add_positions(x, pos))
        rope = self.rope_tables(pos, compute_dtype(x))
        P = prefix.kv.size(-2) if prefix is not None else 0
        mask = (
            False if packed else self._mask(T, S, offset, attention_mask, document_ids, P, device)
        )
        if isinstance(mask, torch.Tensor):
            mask = additive_mask(mask, compute_dtype(x))
        layer_kv = [None] * len(self.blocks) if prefix is None else prefix.kv  # (L, 2, nkv, P, hd)
        # Kept positions as each row's own (B, k): the last block computes only them (its keys
        # and values still come from every position), since nothing reads its other outputs.
        # Not with a KV cache (every position's keys go in it) or a flex BlockMask.
        last_keep = None
        if not keep_last:
            rows = (logits_to_keep % T).expand(B, -1)  # (B, k); negative positions count back
            flex = BlockMask is not None and isinstance(mask, BlockMask)
            last_keep = None if kv_cache is not None or flex else rows
        for i, (block, prefix_kv) in enumerate(zip(self.blocks, layer_kv)):
            keep = last_keep if i == len(self.blocks) - 1 else None
            x = block(x, rope, mask, kv_cache, prefix_kv, keep)
        if kv_cache is not None:
            kv_cache.advance(T)
        if not keep_last and last_keep is None:
            x = at_positions(x, rows, 1)  # (B, k, d)
        elif keep_last and logits_to_keep:
            x = x[:, -logits_to_keep:]  # (B, k, d)
        x = self.norm_f(x)
        return x if return_hidden else self.logits(x)  # (B, T or k, d or V)

    def add_positions(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, d) plus the learned or sinusoidal position embeddings of
        pos (B, T); unchanged for RoPE (rotated in attention) and none."""
        if self.config.pos_encoding == "learned":
            return x + self.wpe(pos)
        if self.config.pos_encoding == "sinusoidal":
            return x + sinusoidal_embedding(pos, self.config.d_model).to(x.dtype)
        return x

    def rope_tables(self, pos: torch.Tensor, dtype: torch.dtype):
        """RoPE's tables for positions pos (B, T): cos and sin with the first half's sign
        flipped (what `rotate` takes), each (B, 1, T, hd) in `dtype` (the matmuls': queries and
        keys rotate in it, as transformers does); None without RoPE."""
        if self.config.pos_encoding != "rope":
            return None
        freqs = pos[..., None].float() * self.rope_inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        sin = emb.sin()
        sin[..., : freqs.size(-1)].neg_()  # [-sin1, sin2]
        return emb.cos().to(dtype), sin.to(dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output layer on final normed hidden states (..., d) -> logits (..., V), for
        forward and for callers that took return_hidden. With logit_softcap, cap * tanh(z /
        cap): logits stay in (-cap, cap), so none can run away (Gemma 2, modded-nanogpt)."""
        logits = self.lm_head(hidden)  # (..., V)
        cap = self.config.logit_softcap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def set_regularisation(
        self, dropout: float, drop_path: float, attention_dropout: float | None = None
    ) -> None:
        """Change dropout and stochastic depth of a built model, e.g. to fine-tune with dropout a
        base pretrained without it: neither holds weights."""
        self.config = replace(
            self.config, dropout=dropout, drop_path=drop_path, attention_dropout=attention_dropout
        )
        set_dropout(self, dropout, self.config.attention_dropout_rate)
        for layer, block in enumerate(self.blocks):
            block.drop_path.rate = drop_path_rate(self.config, layer)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (a tied head is not counted twice). non_embedding drops
        the token and position embeddings, as in the scaling-law papers' N."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token (PaLM appendix B): 6N + 12·L·d·T for a training step
        (forward + backward), a third of that for a forward pass. N counts the head; d is the
        attention width n_head * head_dim (d_model unless heads were pruned)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model
        forward = 2 * n + 2 * 2 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
        return 3 * forward if training else forward

    def estimate_mfu(
        self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None
    ) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return tokens_per_s * self.flops_per_token(seq_len) / peak_flops
