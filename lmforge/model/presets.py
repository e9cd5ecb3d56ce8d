"""Named model sizes. A preset fills ModelConfig fields; anything the user sets wins."""

from __future__ import annotations

from typing import Any

from lmforge.common import LmforgeError, did_you_mean

_GPT2 = dict(
    mlp="gelu_tanh", norm="layernorm", bias=True, pos_encoding="learned", tie_embeddings=True
)
_LLAMA = dict(mlp="swiglu", norm="rmsnorm", bias=False, pos_encoding="rope", tie_embeddings=False)

PRESETS: dict[str, dict[str, Any]] = {
    # No preset: every field is ModelConfig's default or set explicitly (imported models use it).
    "custom": {},
    # For tests: < 100k parameters with a character vocabulary.
    "tiny": dict(_GPT2, mlp="gelu", block_size=32, n_layer=2, n_head=2, d_model=32),
    # nanoGPT's CPU recipe for shakespeare_char (bias off, as nanoGPT's train.py defaults).
    "shakespeare-char": dict(
        _GPT2, mlp="gelu", bias=False, block_size=64, n_layer=4, n_head=4, d_model=128
    ),
    # The default job: a Llama-style model sized by measurement to train well in 5 CPU minutes
    # (BENCHMARKS.md, recipe search: 6 layers learn faster per step than 4, and 256 tokens of
    # context beat 128 and 512 at equal tokens per step).
    "shakespeare-llama": dict(
        _LLAMA,
        tie_embeddings=True,
        block_size=256,
        n_layer=6,
        n_head=4,
        n_kv_head=4,
        d_model=128,
        qk_norm=True,
    ),
    "gpt2-124m": dict(_GPT2, vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768),
    "gpt2-350m": dict(
        _GPT2, vocab_size=50257, block_size=1024, n_layer=24, n_head=16, d_model=1024
    ),
    "llama-tiny": dict(_LLAMA, block_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64),
    # Llama-3.2-1B's shapes (its "llama3" RoPE frequency scaling is not modelled).
    "llama-1b": dict(
        _LLAMA,
        vocab_size=128256,
        block_size=131072,
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        d_model=2048,
        ffn_hidden=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    # Llama-3.1-8B's shapes (untied head; its RoPE frequency scaling is not modelled).
    "llama-8b": dict(
        _LLAMA,
        vocab_size=128256,
        block_size=131072,
        n_layer=32,
        n_head=32,
        n_kv_head=8,
        d_model=4096,
        ffn_hidden=14336,
        rope_theta=500000.0,
    ),
}


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise LmforgeError(
            f"unknown model preset '{name}'{did_you_mean(name, PRESETS)} "
            f"(choices: {', '.join(PRESETS)})"
        )
    return dict(PRESETS[name])
