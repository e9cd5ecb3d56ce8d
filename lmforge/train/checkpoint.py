"""Checkpoint folders: atomic writes, safe loads.

A checkpoint folder holds `model.safetensors` + `config.yaml` + `tokenizer/` (enough to load
the model anywhere) and, for resuming, `trainer_state.pt` (optimizer, scheduler, RNG, data
position, step). A folder is written under a temporary name, fsynced, then renamed, so a
crash mid-save leaves the previous checkpoint intact and never a folder that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from lmforge.common import LmforgeError
from lmforge.config import Config, build_config, save_config
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    cfg: Config,
    tokenizer: Tokenizer | None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically; an existing folder of the same name is replaced
    only after the new one is complete on disk."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS))
    save_config(cfg, tmp / CONFIG)
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    _fsync_tree(tmp)
    if folder.exists():
        old = folder.with_name(f".old-{folder.name}")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def is_checkpoint(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()


def load_checkpoint_config(folder: str | Path) -> Config:
    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"checkpoint folder not found: {folder}")
    if not is_checkpoint(folder):
        raise LmforgeError(
            f"{folder} is not an lmforge checkpoint (expected {WEIGHTS} and {CONFIG}); "
            "for a Hugging Face folder use `lmforge import`"
        )
    return build_config(folder / CONFIG)


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load model.safetensors into `model`, strictly: a shape or name mismatch is a user error."""
    path = Path(folder) / WEIGHTS
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()
        detail = next(
            (line.strip() for line in first if "size mismatch" in line), first[0] if first else ""
        )
        raise LmforgeError(f"weights in {path} do not fit the model config: {detail}") from None
    if missing or unexpected:
        raise LmforgeError(
            f"weights in {path} do not fit the model config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )


def load(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None]:
    """Load a checkpoint folder -> (model in eval mode, tokenizer or None)."""
    folder = Path(folder)
    cfg = load_checkpoint_config(folder)
    model = GPT(cfg.model)
    load_weights(model, folder)
    tokenizer = load_tokenizer(folder / TOKENIZER) if (folder / TOKENIZER).is_dir() else None
    return model.to(device).eval(), tokenizer


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its `latest` checkpoint)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not path.exists():
        raise LmforgeError(f"checkpoint folder not found: {path}")
    raise LmforgeError(f"{path} is neither a checkpoint nor a run folder with checkpoints")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a run folder's `checkpoints/latest` pointer names, if it is complete."""
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return target if is_checkpoint(target) else None


def set_latest(folder: Path) -> None:
    """Point the run's `latest` file at `folder` (a sibling checkpoint), atomically."""
    pointer = folder.parent / LATEST
    tmp = pointer.with_name(LATEST + ".tmp")
    tmp.write_text(folder.name + "\n", encoding="utf-8")
    tmp.replace(pointer)
