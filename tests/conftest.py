"""Fixtures shared by test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.config import build_config, model_config
from lmforge.model.gpt import GPT
from lmforge.train.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def save_base():
    """save_base(folder, tokenizer, seed=0, **model fields): a checkpoint of a randomly
    initialised model (llama-tiny unless `preset` says otherwise) sized to the tokenizer, the
    starting point of post-training tests."""

    def save(folder: Path, tokenizer, seed: int = 0, **model) -> Path:
        fields = {"preset": "llama-tiny", "vocab_size": tokenizer.vocab_size, **model}
        torch.manual_seed(seed)
        return save_checkpoint(
            folder, GPT(model_config(**fields)), build_config({"model": fields}), tokenizer
        )

    return save
