"""What pruning costs and what a short fine-tune wins back: a model's validation loss on its
pretraining data, and the recovery fine-tune, which is pretraining continued from the pruned
weights on the one Trainer (lmforge/recipes/pretrain.py, `train(cfg, start=...)`), with
magnitude pruning's zeros kept (lmforge/compress/prune.py, keep_masks)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch

from lmforge.compress.prune import keep_masks
from lmforge.config import Config, build_config, to_dict
from lmforge.data.loader import PretrainData, load_pretrain_data
from lmforge.model.gpt import GPT
from lmforge.recipes.pretrain import train, val_batches
from lmforge.tokenizer import Tokenizer
from lmforge.train.distributed import DistInfo
from lmforge.train.losses import CausalLMLoss


def pretrain_data(cfg: Config, tokenizer: Tokenizer) -> PretrainData:
    """The checkpoint's own pretraining data (data.path), split as its run split it."""
    return load_pretrain_data(cfg.data, tokenizer)


@torch.no_grad()
def val_loss(model: GPT, cfg: Config, data: PretrainData) -> float:
    """Mean next-token loss (fp32) on the validation batches that pretraining evaluates on."""
    model.eval()
    device = model.wte.weight.device
    loss_fn = CausalLMLoss()
    total = units = 0.0
    for batch in val_batches(cfg, data, DistInfo(rank=0, world_size=1, device=device)):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _ = loss_fn(model, batch)
        total += loss.item()
        units += loss_fn.units(batch).item()
    return total / max(units, 1.0)


def recovery_config(cfg: Config, model: GPT, steps: int, overrides: list[str] = ()) -> Config:
    """The fine-tune's config: the checkpoint's data and train sections and the pruned model's
    architecture, for `steps` steps from the learning rate the pretraining ended at
    (train.min_lr; a tenth of it at the end, a tenth of the steps of warmup), a new run folder
    (run section at its defaults), then --section.key=value overrides."""
    t = cfg.train
    recovery = {
        "max_steps": steps,
        "lr": t.min_lr,
        "min_lr": t.min_lr / 10,
        "warmup_steps": steps // 10,
        "eval_interval": steps,
        "ckpt_interval": steps,
        "max_minutes": None,
    }
    layers = [
        {"model": dataclasses.asdict(model.config), "data": to_dict(cfg.data)},
        {"train": to_dict(cfg.train) | recovery},
    ]
    return build_config(*layers, overrides=list(overrides))


def finetune(
    model: GPT, tokenizer: Tokenizer, cfg: Config, masks: list[torch.Tensor] | None = None
) -> dict:
    """Train `model` in place per `cfg` (recovery_config); with `masks`, zeros stay zeros.
    Returns the Trainer's last metrics."""
    with keep_masks(model, masks) if masks else nullcontext():
        return train(cfg, start=(model, tokenizer))
