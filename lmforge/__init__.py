"""lmforge: raw text in, a trained, evaluated, aligned and servable language model out."""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a checkpoint folder (or a run folder's latest checkpoint) -> (model, tokenizer)."""
    from lmforge.train.checkpoint import load as _load
    from lmforge.train.checkpoint import resolve_checkpoint

    return _load(resolve_checkpoint(path), device)


def load_tokenizer(path):
    """Load a tokenizer folder (tokenizer.json, GPT-2 encoder.json + vocab.bpe, char/byte file)."""
    from lmforge.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


__all__ = ["load", "load_tokenizer", "__version__"]
