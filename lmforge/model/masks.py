"""Which keys each query may see: one predicate, in FlexAttention's `mask_mod(b, h, q_idx,
kv_idx)` form, from which both the dense boolean mask SDPA takes and FlexAttention's BlockMask
are built, so that the two kernels cannot disagree about a pattern.

For query i (its index among the keys: the cache's length plus its index among the new
tokens) and key j of the same row b:
- causal: j <= i; bidirectional: any j;
- sliding window w: |i - j| < w (causal: the w most recent keys, itself included;
  bidirectional: w - 1 keys on either side and itself);
- global tokens G (Longformer's local + global attention): the first G tokens of each sequence
  see, and are seen by, every token the causal or bidirectional rule allows, whatever the
  window; "first" counts real tokens from each document's start (padding is not counted);
- documents (packed sequences): only keys of the query's own document;
- padding: padding keys are hidden from every query; a padding query sees at least itself, so
  that no row is all masked (softmax over nothing is NaN);
- prefix P (prefix tuning): P key columns in front of the sequence that every query sees.

Shapes: B batch, T queries, S keys (the prefix not counted), P prefix keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError

try:  # FlexAttention came with torch 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the dense masks only
    BlockMask = create_block_mask = flex_attention = None

HAS_FLEX = flex_attention is not None

CPU_FLEX_KEY_MULTIPLE = 16
"""Key count a CPU BlockMask is padded to. torch 2.13's compiled CPU flex kernel computes
q @ k.T in tiles of 16 keys. For a last tile of 8 keys on an AVX2 CPU (8 floats a vector),
with head dim 8 or 16, it takes its full-tile path: it reads 8 key rows past the tensor and
writes 16 scores per query, the last over the softmax's running maximum. Outputs came out
wrong or NaN, differently from run to run (a Zen 3: 8, 24, 40, 56, 72 and 120 keys failed,
16 and 32 did not). With the keys padded no tile has a tail."""

Mask = torch.Tensor | bool
"""What SDPA takes: True = plain causal (its is_causal fast path), False = every key visible,
else a boolean (B or 1, 1, T, P + S) tensor, True where the query may attend the key."""


def run_positions(ids: torch.Tensor) -> torch.Tensor:
    """(B, S) ids -> (B, S): each token's index within its run of equal ids, i.e. its position
    in its own document when ids are document ids (runs restart where the id changes)."""
    B, S = ids.shape
    idx = torch.arange(S, device=ids.device).expand(B, S)
    is_start = torch.ones_like(ids, dtype=torch.bool)
    is_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return idx - torch.cummax(torch.where(is_start, idx, 0), dim=1).values  # (B, S)


@dataclass(frozen=True, eq=False)  # tensor fields: compared by identity
class AttentionPattern:
    """The rule above with its settings; `predicate()` is the one definition, `dense` and
    `block_mask` evaluate it for SDPA and for FlexAttention."""

    causal: bool = True
    window: int | None = None
    """Sliding window w (None = unlimited)."""
    global_tokens: int = 0
    """G: the first G tokens of each sequence (document) are exempt from the window."""
    offset: int | torch.Tensor = 0
    """Index of the first query among the keys (a KV cache's length), or (B,) one per row."""
    real: torch.Tensor | None = None
    """(B, S) bool: False on padding keys. None = no padding."""
    documents: torch.Tensor | None = None
    """(B, S) document id of every key; -1 is padding. None = one document per row."""
    prefix: int = 0
    """P always-visible key columns in front (lmforge/model/gpt.py's Prefix)."""

    @classmethod
    def of(cls, cfg, S: int, **kwargs) -> AttentionPattern:
        """The model's pattern over S keys, with settings that cannot matter dropped (a window
        of >= S keys limits nothing; global tokens are only exceptions to the window), so that
        `shortcut` finds SDPA's fast paths wherever they apply."""
        window = cfg.sliding_window if cfg.sliding_window and cfg.sliding_window < S else None
        G = cfg.global_tokens if window else 0
        return cls(causal=cfg.causal, window=window, global_tokens=G, **kwargs)

    @property
    def per_row(self) -> bool:
        """Whether the mask differs between rows of the batch (else it broadcasts)."""
        return (
            self.real is not None
            or self.documents is not None
            or isinstance(self.offset, torch.Tensor)
        )

    def _positions(self) -> torch.Tensor | None:
        """(B, S) each key's position in its document, padding not counted; None when that is
        its index (no padding, one document)."""
        if self.real is None and self.documents is None:
            return None
        ids = self.documents if self.documents is not None else torch.zeros_like(self.real).long()
        if self.real is not None:
            ids = ids.masked_fill(~self.real, -1)
        return run_positions(ids)

    def predicate(self) -> Callable:
        """mask_mod(b, h, q_idx, kv_idx) -> bool tensor: whether query q_idx of row b may see
        key column kv_idx (prefix columns first). Elementwise ops and indexing only, so that it
        runs both on broadcast index grids (dense) and under FlexAttention's vmap."""
        causal, window, G, P = self.causal, self.window, self.global_tokens, self.prefix
        offset, real, docs = self.offset, self.real, self.documents
        positions = self._positions() if G else None

        def is_global(b, idx):
            return (idx if positions is None else positions[b, idx]) < G

        def visible(b, h, q_idx, kv_idx):
            i = q_idx + (offset[b] if isinstance(offset, torch.Tensor) else offset)
            j = (kv_idx - P).clamp(min=0) if P else kv_idx  # prefix columns are decided last
            ok = i >= j if causal else torch.ones_like(i >= j)
            if window is not None:
                near = (i - j if causal else (i - j).abs()) < window
                if G:
                    near = near | is_global(b, i) | is_global(b, j)
                ok = ok & near
            if docs is not None:
                ok = ok & (docs[b, i] == docs[b, j]) & (docs[b, j] >= 0)
            if real is not None:
                ok = ok & real[b, j]
            if docs is not None or real is not None:
                ok = ok | (i == j)  # a padding query sees itself: no all-masked row
            return ok | (kv_idx < P) if P else ok

        return visible

    def shortcut(self, T: int) -> bool | None:
        """True when the pattern is plain causal from the first key (SDPA's is_causal), False
        when every key is visible (a bidirectional model, or one decode token seeing its whole
        cache), None when it takes a mask."""
        if self.window is not None or self.per_row:
            return None
        if not self.causal:
            return False
        if self.offset == 0:
            return True if not self.prefix else None  # is_causal aligns top-left: not with P
        return False if T == 1 else None

    def dense(self, T: int, S: int, device) -> torch.Tensor:
        """The predicate on every (query, key): (B or 1, 1, T, P + S) bool."""
        B = self._batch() if self.per_row else 1
        b = torch.arange(B, device=device)[:, None, None, None]  # (B, 1, 1, 1)
        q = torch.arange(T, device=device)[None, None, :, None]  # (1, 1, T, 1)
        kv = torch.arange(self.prefix + S, device=device)[None, None, None, :]  # (1, 1, 1, P+S)
        return self.predicate()(b, 0, q, kv).expand(B, 1, T, self.prefix + S)

    def block_mask(self, T: int, S: int, device) -> BlockMask:
        """FlexAttention's BlockMask of the predicate: which (128 x 128) blocks to skip, and
        the predicate itself for the blocks it cuts through. On CPU its key columns run on to
        a multiple of CPU_FLEX_KEY_MULTIPLE, hidden from every query; flex_attend pads the
        keys and values to match."""
        B = self._batch() if self.per_row else None
        visible, keys = self.predicate(), self.prefix + S
        padded = keys
        if torch.device(device).type == "cpu":
            padded = -(-keys // CPU_FLEX_KEY_MULTIPLE) * CPU_FLEX_KEY_MULTIPLE
        if padded == keys:
            return create_block_mask(visible, B, None, T, keys, device=device)

        def visible_or_padding(b, h, q_idx, kv_idx):  # padding columns: index a real key, hide
            return visible(b, h, q_idx, kv_idx.clamp(max=keys - 1)) & (kv_idx < keys)

        return create_block_mask(visible_or_padding, B, None, T, padded, device=device)

    def _batch(self) -> int:
        for t in (self.real, self.documents, self.offset):
            if isinstance(t, torch.Tensor):
                return t.size(0)
        raise AssertionError("per_row without a per-row tensor")

    def mask(self, T: int, S: int, backend: str, device) -> Mask | BlockMask:
        """What `attend` takes for this pattern: SDPA's shortcut where one applies, else with
        backend 'flex' a BlockMask, and a dense boolean mask otherwise. A one-token decode step
        takes the dense (B or 1, 1, 1, P + S) row with either backend: one query has no block
        to skip, and every step's new key length would be another flex compile."""
        shortcut = self.shortcut(T)
        if shortcut is not None:
            return shortcut
        if backend == "flex" and T > 1:
            return self.block_mask(T, S, device)
        return self.dense(T, S, device)


@functools.cache
def compiled_flex() -> Callable:
    """flex_attention under torch.compile. Called eagerly, flex_attention materialises every
    score and took 5-10x as long as the dense mask on CPU-2 (forward, torch 2.13); compiled,
    inductor writes a C++ kernel that skips the masked blocks (a C++ compiler is needed on
    CPU). Static shapes: each new (B, T, S) compiles once (seconds), because torch 2.13's CPU
    kernel fails to build with dynamic shapes when the mask reads two per-row tensors (e.g.
    padding and global-token positions). Past dynamo's recompile limit (8 shapes or patterns
    in one process) flex runs eagerly: still correct, slower. benchmarks/attention_patterns.py
    has the figures."""
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, dropout_p: float
) -> torch.Tensor:
    """FlexAttention with nkv <= nh key/value heads: q (B, nh, T, hd), k and v (B, nkv, P+S,
    hd) -> (B, nh, T, hd). It has no attention dropout, and torch 2.13 has no backward for it
    on CPU (flex_attention refuses inputs that require grad there): both are one clear error
    rather than a silent switch to the dense mask."""
    if dropout_p:
        raise LmforgeError(
            "model.attention_backend=flex has no attention dropout: set "
            "model.attention_dropout=0 or use model.attention_backend=auto"
        )
    if q.requires_grad:
        require_flex_backward(q.device.type)
    gqa = k.size(1) != q.size(1)  # flex pairs query head h with kv head h // (nh/nkv)
    hidden_keys = block_mask.seq_lengths[1] - k.size(2)  # block_mask's CPU key padding
    if hidden_keys:
        k, v = (F.pad(t, (0, 0, 0, hidden_keys)) for t in (k, v))  # (B, nkv, padded, hd)
    return compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def require_flex_backward(device_type: str) -> None:
    """One clear line where FlexAttention cannot be trained through: torch 2.13 has no
    backward for it on CPU (nor MPS). The Trainer asks before its first step."""
    if device_type in ("cpu", "mps"):
        raise LmforgeError(
            f"model.attention_backend=flex cannot train on {device_type}: this torch's "
            "FlexAttention has no backward there; train with model.attention_backend=auto "
            "and use flex to evaluate or generate"
        )


def check_backend(backend: str) -> None:
    """One clear line where model.attention_backend=flex cannot work with this torch."""
    if backend == "flex" and not HAS_FLEX:
        raise LmforgeError(
            f"model.attention_backend=flex needs torch >= 2.5 (this is {torch.__version__}); "
            "use model.attention_backend=auto"
        )
