"""Fixtures shared by test modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config, model_config
from lmforge.model.gpt import FUSED, GPT
from lmforge.model.heads import RewardModel
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


@pytest.fixture(scope="session")
def save_reward_model():
    """save_reward_model(folder, tokenizer, block_size=160): a checkpoint of a randomly
    initialised llama-tiny reward model reading that tokenizer."""

    def save(folder: Path, tokenizer, block_size: int = 160) -> Path:
        fields = {
            "preset": "llama-tiny",
            "vocab_size": tokenizer.vocab_size,
            "block_size": block_size,
        }
        torch.manual_seed(1)
        model = RewardModel(GPT(model_config(**fields)))
        cfg = build_config({"model": fields, "run": {"head": "reward"}})
        return save_checkpoint(folder, model, cfg, tokenizer)

    return save


@pytest.fixture(scope="session")
def fused_layout():
    """fused_layout(state): a state dict in the layout lmforge wrote before attention's q, k, v
    and SwiGLU's gate, up were separate Linears, their rows stacked into attn.qkv and
    mlp.gate_up (any key prefix and suffix: a head's backbone., torchao's flattened parts)."""

    def fuse(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(state)
        for fused, parts in FUSED.items():
            parent = fused.split(".")[0]
            for key in state:
                match = re.fullmatch(rf"(.*\.)?{parent}\.{parts[0]}\.(.+)", key)
                if match:
                    prefix, rest = match[1] or "", match[2]
                    rows = [out.pop(f"{prefix}{parent}.{part}.{rest}") for part in parts]
                    out[f"{prefix}{fused}.{rest}"] = torch.cat(rows)
        return out

    return fuse


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a failure: its stderr, checked to be one line without a
    traceback."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err
