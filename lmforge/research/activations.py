"""Bytes of the tensors lmforge/model/gpt.py saves for its backward pass, per micro-batch.

Every figure is the storage autograd keeps alive from the forward to the backward, named by
the op that keeps it, and counted once per storage (a view of a tensor keeps all of it).
Parameters are not activations and are left out. The kernels the model reaches differ
between devices and save different tensors, so `device` picks them:

- "cuda" (what `lmforge plan` plans for): SDPA's flash kernel where it applies (bf16/fp16,
  no explicit mask; GQA through enable_gqa), else the memory-efficient kernel with k/v
  repeated to every query head (fp32, or an explicit mask: lmforge.model.gpt.sdpa_gqa);
  fused RMSNorm (saves its input and 1/rms); dropout keeps a 1-byte mask; attention dropout
  is fused into the kernel (a random seed, no mask).
- "cpu" (what the tests measure): SDPA's CPU flash kernel; causal attention written out
  (gpt.causal_attention) in bf16/fp16 over at most EXPLICIT_ATTENTION_MAX_T tokens and
  whenever attention dropout is on (SDPA's math path instead under an explicit mask, both
  materialising probabilities and masks); RMSNorm as its
  composite (also saves the normalised input); dropout keeps its 0/1 mask in the
  input's dtype.

Precision: fp32 keeps everything in fp32. bf16/fp16 autocast over fp32 master weights keeps
the residual stream (embeddings plus each block's output) in fp32; over FSDP's bf16/fp16
parameters (`low_precision_params`) the stream is bf16/fp16. Either way autocast runs the
norms (QK-norm too) in fp32, so they save fp32 inputs, while every matmul's input and
output, attention and the MLP's activation functions are in the low-precision dtype; the
loss's log-probabilities are fp32 (the loss upcasts the logits). Attention and the MLP cast
their input once, and their Linears (q, k and v; gate and up) share that one copy.

Tensor parallelism over `tp` ranks (Megatron-style, with torchtitan's sequence parallelism):
heads and the MLP's hidden channels split over the ranks, and so do the norms' tensors
(sequence-sharded); the inputs of the column-parallel matmuls (q, k, v, fc or gate and up,
the head) are the all-gathered full tensors. The head is vocabulary-parallel: logits split
by `tp`.

Not modelled (small, or not reached by a pretraining step): stochastic-depth masks (B
numbers per block), PEFT prefixes, a KV cache, masked-LM's selection of positions.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ModelConfig

LOW_PRECISION = ("bf16", "fp16")
INT64 = 8
FP32 = 4
EXPLICIT_ATTENTION_MAX_T = 512
"""lmforge.model.gpt.EXPLICIT_ATTENTION_MAX_T, repeated here so that this module needs no torch."""


@dataclass(frozen=True)
class Shapes:
    """One micro-batch's sizes as one tensor-parallel rank sees them."""

    cfg: ModelConfig
    precision: str
    batch: int
    seq: int
    tp: int = 1
    device: str = "cuda"
    low_precision_params: bool = False
    """The forward runs on bf16/fp16 parameters (FSDP's mixed-precision units) rather than
    autocast's casts of fp32 ones."""
    dense_mask_rows: int = 0
    """Rows of the explicit attention mask SDPA gets (sliding window or packed documents with
    the sdpa backend): 1 when one mask serves the batch, B when each row has its own, 0 for
    none (plain causal or bidirectional attention)."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def act(self) -> int:
        """Bytes per element of the matmuls' inputs and outputs."""
        return 2 if self.precision in LOW_PRECISION else FP32

    @property
    def resid(self) -> int:
        """Bytes per element of the residual stream: fp32 master weights keep it fp32 under
        autocast; FSDP's low-precision parameters (low_precision_params) make it bf16/fp16."""
        return self.act if self.low_precision_params else FP32

    @property
    def nh(self) -> int:
        return self.cfg.n_head // self.tp

    @property
    def nkv(self) -> int:
        return self.cfg.kv_heads // self.tp

    @property
    def hd(self) -> int:
        return self.cfg.head_dim

    @property
    def hidden(self) -> int:
        return self.cfg.ffn_dim // self.tp

    @property
    def d_shard(self) -> float:
        """Residual-stream width per rank in the norm regions (sequence parallel)."""
        return self.cfg.d_model / self.tp

    @property
    def low_precision(self) -> bool:
        return self.precision in LOW_PRECISION

    def dropout_mask(self, elements: float, dtype_bytes: int) -> float:
        """A dropout's saved mask over `elements` per token: 1 byte on CUDA, the scaled noise
        in the input's dtype on CPU."""
        if not self.cfg.dropout:
            return 0.0
        return self.tokens * elements * (1 if self.device == "cuda" else dtype_bytes)


def norm_saved(s: Shapes, width: float) -> float:
    """A norm over `width` channels per token: its input in fp32 (the fp32 residual stream,
    or autocast's fp32 copy of a low-precision one: autocast runs both norms in fp32),
    LayerNorm's mean and 1/std or RMSNorm's 1/rms, and on CPU RMSNorm's composite also the
    normalised input."""
    stats = 2 if s.cfg.norm == "layernorm" else 1
    normalised = width if s.cfg.norm == "rmsnorm" and s.device == "cpu" else 0
    return s.tokens * (FP32 * (width + normalised) + FP32 * stats / s.tp)


def attention_saved(s: Shapes) -> dict[str, float]:
    """The attention half of a block: q, k and v, optional QK-norm and RoPE, the attention
    kernel's own saved tensors, and the output projection's input."""
    cfg, n = s.cfg, s.tokens
    q_width, kv_width = s.nh * s.hd, s.nkv * s.hd
    out: dict[str, float] = {"attn.q/k/v input": n * s.act * cfg.d_model}
    explicit_mask = s.dense_mask_rows > 0
    dropout = cfg.attention_dropout_rate > 0
    cpu_explicit = (
        s.device == "cpu"
        and s.low_precision
        and not explicit_mask
        and cfg.causal
        and s.seq <= EXPLICIT_ATTENTION_MAX_T
    )
    cpu_math = s.device == "cpu" and dropout and not cpu_explicit
    # QK-norm under autocast (RMSNorm is on its fp32 list) hands q and k on in fp32, so on
    # CUDA sdpa_gqa, which looks at q's dtype, repeats k and v as it does for fp32 runs
    q_in_fp32 = not s.low_precision or cfg.qk_norm
    repeat_kv = s.nkv != s.nh and (
        cpu_explicit or (s.device == "cuda" and (explicit_mask or q_in_fp32))
    )
    # QK-norm saves its input: q's and k's Linear outputs (views) in fp32 runs, else an fp32
    # copy of them (autocast's, or the CPU composite's upcast); the CPU composite also keeps
    # the normalised heads (fp32)
    qk_norm_keeps_view = cfg.qk_norm and not s.low_precision
    if cfg.qk_norm:
        copies = (s.device == "cpu") + s.low_precision
        out["attn.q_norm/k_norm"] = n * FP32 * (s.nh + s.nkv + copies * (q_width + kv_width))
    rope = cfg.pos_encoding == "rope"
    qk_fresh = rope or cfg.qk_norm  # q and k are new tensors, not views of the Linears' outputs
    if cpu_explicit or cpu_math:
        # q * scale, k and v as contiguous copies, and the (T, T) probabilities: softmax's
        # output, and with dropout its noise and the dropped probabilities
        probs = 3 if dropout else 1
        out["attention (written out)"] = n * s.act * (3 * q_width + probs * s.nh * s.seq)
        if qk_norm_keeps_view:  # the kernel copies q, k and v: only QK-norm keeps q's and k's
            out["attn.q, k outputs"] = n * s.act * (q_width + kv_width)
    else:
        # SDPA saves q, k and v: the Linears' outputs where it gets views of them, rather
        # than rotated or normed q and k, or repeated k and v; QK-norm keeps q's and k's too
        keeps_q = not qk_fresh or qk_norm_keeps_view
        keeps_k = (not qk_fresh and not repeat_kv) or qk_norm_keeps_view
        if keeps_q or keeps_k:
            out["attn.q, k outputs"] = n * s.act * (keeps_q * q_width + keeps_k * kv_width)
        if not repeat_kv:
            out["attn.v output"] = n * s.act * kv_width
        if qk_fresh:
            k_fresh = 0 if repeat_kv else kv_width  # repeated k replaces the fresh one
            out["attn.q, k (rotated/normed)"] = n * s.act * (q_width + k_fresh)
        if repeat_kv:
            out["attn.k, v repeated"] = n * s.act * 2 * q_width
        out["attn.sdpa output + logsumexp"] = n * (s.act * q_width + FP32 * s.nh)
    # SDPA writes its output in q's memory layout: (B, T, nh, hd)-major when q is a view of its
    # Linear's output (or rotated elementwise from one), so the projection's input is a view
    # of it; QK-norm's kernels return q contiguous as (B, nh, T, hd), and reshaping for the
    # projection copies, as after the written-out paths
    if cpu_explicit or cpu_math or cfg.qk_norm:
        out["attn.proj input"] = n * s.act * q_width
    if explicit_mask and not cpu_math:  # the fused kernels get it additive, made per call
        out["attention mask (additive)"] = s.dense_mask_rows * s.seq * s.seq * s.act
    out["attn dropout mask"] = s.dropout_mask(s.d_shard, s.act)
    return out


def mlp_saved(s: Shapes) -> dict[str, float]:
    """The MLP half: its input, the activation function's saved tensors, proj's input."""
    n, h = s.tokens, s.hidden
    inner = {"swiglu": 4 * h, "relu2": 2 * h}.get(s.cfg.mlp, 2 * h)
    # gelu: fc output (gelu's input) + gelu output; relu2: relu output (kept by both relu and
    # square) + its square; swiglu: gate's and up's outputs + silu(gate) + the product
    return {
        "mlp input": n * s.act * s.cfg.d_model,
        f"mlp {s.cfg.mlp} activations": n * s.act * inner,
        "mlp dropout mask": s.dropout_mask(s.d_shard, s.act),
    }


def low_rank_saved(s: Shapes) -> float:
    """model.low_rank: each block Linear is in -> r -> out, and the second factor saves the
    first one's (B, T, r) output."""
    cfg = s.cfg
    if cfg.low_rank is None:
        return 0.0
    d, q_width, kv_width = cfg.d_model, cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    mlp_in = 2 if cfg.mlp == "swiglu" else 1  # gate and up, or fc
    shapes = [(d, q_width), (d, kv_width), (d, kv_width), (q_width, d)]
    shapes += [(d, cfg.ffn_dim)] * mlp_in + [(cfg.ffn_dim, d)]
    return s.tokens * s.act * sum(min(cfg.low_rank, i, o) for i, o in shapes)


def block_saved(s: Shapes) -> dict[str, float]:
    """Everything one transformer block saves for its backward (checkpointing off)."""
    return {
        "norm1": norm_saved(s, s.d_shard),
        **attention_saved(s),
        "norm2": norm_saved(s, s.d_shard),
        **mlp_saved(s),
        "low-rank factors' middle outputs": low_rank_saved(s),
    }


def checkpointed_block_saved(s: Shapes) -> dict[str, float]:
    """A checkpointed block keeps only its input (torch.utils.checkpoint saves the arguments
    it will recompute from; the rest is recomputed in the backward)."""
    return {"block input": s.tokens * s.resid * s.d_shard}


def shared_saved(s: Shapes, checkpointing: bool) -> dict[str, float]:
    """Tensors every block of a stage shares: RoPE's cos and sin (B, 1, T, hd) each, and
    under checkpointing the boolean attention mask (an argument every block recomputes from)."""
    out = {}
    if s.cfg.pos_encoding == "rope":
        out["rope cos/sin"] = s.tokens * s.act * 2 * s.hd
    if checkpointing and s.dense_mask_rows:
        out["attention mask (boolean)"] = s.dense_mask_rows * s.seq * s.seq
    return out


def embedding_saved(s: Shapes) -> dict[str, float]:
    """The first stage's: token ids (the embedding's backward indexes with them), learned
    positions (one arange of T), the embedding dropout's mask."""
    out = {"input ids": s.tokens * INT64}
    if s.cfg.pos_encoding == "learned":
        out["positions"] = s.seq * INT64
    out["embedding dropout mask"] = s.dropout_mask(s.d_shard, s.resid)
    return out


def head_saved(s: Shapes, vocab: int) -> dict[str, float]:
    """The last stage's: the final norm (pre-norm models), the head's input, soft-capped
    logits, fp32 log-probabilities (cross-entropy's log_softmax output) and the labels."""
    n, v = s.tokens, vocab / s.tp
    out = {}
    if s.cfg.norm_position == "pre":
        out["final norm"] = norm_saved(s, s.d_shard)
    out["head input"] = n * s.act * s.cfg.d_model
    if s.cfg.logit_softcap is not None:
        out["logit softcap (tanh)"] = n * s.act * v
    out["log-probabilities (fp32)"] = n * FP32 * v
    out["labels"] = n * INT64
    return out


def autocast_weight_copies(s: Shapes, matrix_numel: float) -> float:
    """Under bf16/fp16 autocast, each Linear's weight is cast to the low-precision dtype and
    the copy is saved for the backward (the input's gradient needs it): `matrix_numel`
    elements of the matmul weights the forward saved (none in fp32)."""
    return matrix_numel * s.act if s.low_precision else 0.0


def logits_buffers(s: Shapes, vocab: int) -> float:
    """Transient, not saved: the logits and their fp32 upcast in the forward, then in the
    backward the fp32 gradients of the log-probabilities and of the logits; 8 bytes per
    logit covers either phase."""
    return s.tokens * 2 * FP32 * vocab / s.tp
