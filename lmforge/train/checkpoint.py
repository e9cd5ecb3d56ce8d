"""Checkpoint folders: atomic writes, safe loads.

A checkpoint folder holds `model.safetensors` + `config.yaml` + `tokenizer/` (enough to load
the model anywhere) and, for resuming, `trainer_state.pt` (optimizer, scheduler, RNG, data
position, step). A folder is written under a temporary name, fsynced, then renamed, so a
crash mid-save leaves the previous checkpoint intact and never a folder that looks complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_model

from lmforge.common import LmforgeError
from lmforge.config import Config, build_config, save_config
from lmforge.fileio import atomic_folder, atomic_write_text, contained
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"


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
    with atomic_folder(folder) as tmp:
        save_model(model, str(tmp / WEIGHTS))
        save_config(cfg, tmp / CONFIG)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
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


def load_weights(model: GPT, folder: str | Path, assign: bool = False) -> None:
    """Load model.safetensors into `model`, strictly: a shape or name mismatch is a user error.
    assign=True takes the file's tensors as the model's own (GPT.assign_weights), for a model
    built on the meta device; otherwise they are copied into the existing parameters (which an
    optimizer may already hold)."""
    path = Path(folder) / WEIGHTS
    try:
        if assign:
            missing, unexpected = model.assign_weights(load_file(str(path)))
        else:
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
    """Load a checkpoint folder -> (model in eval mode, tokenizer or None). The model is built
    on the meta device and takes the file's tensors as its own, so a large model is not
    randomly initialised first only to be overwritten."""
    folder = Path(folder)
    cfg = load_checkpoint_config(folder)
    with torch.device("meta"):
        model = GPT(cfg.model)
    load_weights(model, folder, assign=True)
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
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not name:
        return None
    # The pointer is a file anyone can edit: a name leading elsewhere is refused, not followed.
    target = contained(pointer.parent, name, f"checkpoint named by {pointer}")
    return target if is_checkpoint(target) else None


def set_latest(folder: Path) -> None:
    """Point the run's `latest` file at `folder` (a sibling checkpoint), atomically."""
    atomic_write_text(folder.parent / LATEST, folder.name + "\n")
