"""Fixtures shared by test modules."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import build_config, model_config
from lmforge.data.loader import bundled_text_path
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


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """The first 40,000 characters of the bundled Shakespeare: enough for tiny runs."""
    path = tmp_path_factory.mktemp("data") / "shakespeare_40k.txt"
    path.write_text(bundled_text_path().read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def read_metrics(run: Path) -> list[dict]:
    """A run folder's metrics.jsonl rows."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def rerun_from_step(run: Path, verb: str, step: int) -> list[dict]:
    """Rewind a finished run to its checkpoint at `step` (the `latest` pointer and the
    metrics rows after it), run `lmforge VERB --resume=RUN` in a new process, and return the
    metrics rows it ends with: the resumed steps' losses should equal the uninterrupted run's."""
    rows = read_metrics(run)
    (run / "checkpoints" / "latest").write_text(f"step_{step:07d}\n")
    kept = [r for r in rows if r["step"] <= step and "loss" in r]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    resume = [sys.executable, "-m", "lmforge", verb, f"--resume={run}"]
    proc = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"from step_{step:07d} (step {step})" in proc.stdout, proc.stdout[-2000:]
    return read_metrics(run)


def torchrun(nproc: int, *argv: str, cwd: Path) -> None:
    """`lmforge ARGV...` on `nproc` processes under torchrun (one thread each); fails the test
    with the output's tail when it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "lmforge", *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
