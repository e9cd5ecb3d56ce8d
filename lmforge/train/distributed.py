"""torch.distributed set-up from torchrun's environment, and the wrappers applied to a model
from outside, in torchtitan's order: activation checkpointing, compile, then DDP."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.hardware import pick_device


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_request: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a plain
    single-process run needs no group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_request)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, train_cfg, info: DistInfo) -> nn.Module:
    """The module the training step calls: `model` itself, checkpointed/compiled/DDP-wrapped
    as configured. Parameters stay shared with `model`, which is what gets saved."""
    if train_cfg.activation_checkpointing:
        model.set_activation_checkpointing(True)
    wrapped = torch.compile(model) if train_cfg.compile else model
    if info.enabled:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped


def no_sync(module: nn.Module, skip: bool):
    """DDP's no_sync while accumulating (skip=True): gradients are all-reduced only on the
    last micro-batch of a step."""
    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
