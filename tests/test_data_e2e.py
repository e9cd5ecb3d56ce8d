"""End to end: bundled Shakespeare + bundled instructions (weighted 0.7 / 0.3) -> `lmforge
prepare` -> `lmforge train` 20 steps on the prepared folder -> the training loss falls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def lmforge(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """Run `python -m lmforge ARGS` from the repository root; fail with its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_prepare_then_train_20_steps_loss_falls(tmp_path):
    data = tmp_path / "data"
    recipe = ROOT / "configs" / "prepare_shakespeare_instructions.yaml"
    lmforge(
        "prepare", "--config", str(recipe), "--out", str(data),
        "--tokenizer", "train:512", "--prepare.workers=1",
        timeout=120,
    )  # fmt: skip
    train_args = [
        "train",
        f"--data.path={data}",
        f"--data.tokenizer={data / 'tokenizer'}",
        "--model.preset=tiny",
        "--model.block_size=64",
        "--model.d_model=64",
        "--model.n_head=4",
        "--train.max_steps=20",
        "--train.micro_batch_size=8",
        "--train.lr=3e-3",
        "--train.min_lr=3e-4",
        "--train.warmup_steps=2",
        "--train.log_interval=1",
        "--train.eval_interval=20",
        "--train.eval_steps=2",
        f"--run.dir={tmp_path / 'runs'}",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
    ]
    lmforge(*train_args, "--run.name=e2e", timeout=240)
    rows = read_metrics(tmp_path / "runs" / "e2e")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses

    # the same prepared folder, each window once per epoch, attention kept within documents
    lmforge(
        *train_args,
        "--data.sampling=packed",
        "--data.within_document=true",
        "--train.max_steps=4",
        "--run.name=packed",
        timeout=240,
    )
