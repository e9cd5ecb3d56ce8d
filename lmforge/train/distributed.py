"""torch.distributed set-up from torchrun's environment, and the wrappers applied to a model
from outside, in torchtitan's order: activation checkpointing, compile, then FSDP2 or DDP.

One DeviceMesh holds the layout train.parallel asks for (outer to inner: pp, dp_replicate,
dp_shard, tp). The data-parallel ranks (dp_replicate x dp_shard) read different data; the
loaders and the gradient scale use their rank and size, not the global ones. Tensor-parallel
and pipeline ranks of one data-parallel rank read the same data.

FSDP2 (`fully_shard`, ZeRO-3) shards each block and then the root over dp_shard (HSDP over
dp_replicate x dp_shard when both are > 1); its parameters become DTensors, which the
optimizers (lmforge/train/muon.py included), gradient clipping and the sharded checkpoints
(lmforge/train/checkpoint.py) handle.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication
from torch.nn.parallel import DistributedDataParallel

from lmforge.common import LmforgeError
from lmforge.hardware import pick_device
from lmforge.train.tensor_parallel import apply_tensor_parallel

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device
    dp_rank: int = 0
    """This process's place among the data-parallel ranks: which share of each batch it reads."""
    dp_size: int = 1
    """Data-parallel ranks (dp_replicate x dp_shard): the global batch is split over these."""
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESH_DIMS, 1))
    """The layout: pp, dp_replicate, dp_shard, tp (their product is world_size)."""
    mesh: DeviceMesh | None = None
    """One mesh over all ranks with the dimensions MESH_DIMS; None in a single process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def layout(self) -> str:
        """The world size and, beyond plain data parallel, how it splits: '4 (dp_shard 4)'."""
        split = [f"{k} {v}" for k, v in self.sizes.items() if v > 1 and k != "dp_replicate"]
        if split and self.sizes["dp_replicate"] > 1:
            split.insert(0, f"dp_replicate {self.sizes['dp_replicate']}")
        return f"{self.world_size} ({' x '.join(split)})" if split else str(self.world_size)

    @property
    def sharded(self) -> bool:
        """Parameters are split over ranks (FSDP shards, tensor-parallel slices or pipeline
        stages): saving and loading gather or reshard them, and no rank can run the model
        alone."""
        return self.sizes["dp_shard"] > 1 or self.sizes["tp"] > 1 or self.sizes["pp"] > 1

    @property
    def reports(self) -> bool:
        """Whether this rank's loss figures count in the step's totals: tensor-parallel ranks
        compute the same loss, so only the first of each TP group reports it."""
        return self.mesh is None or self.mesh.get_local_rank("tp") == 0


def init_distributed(
    device_request: str = "auto", parallel=None, unsharded_verb: str = ""
) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and build the
    mesh of the layout `parallel` (a ParallelConfig; None = plain data parallel) asks for; a
    plain single-process run needs neither. A layout that does not fit the world size is an
    error before any process group is made; so is sharding for a verb that names itself in
    `unsharded_verb` (its generation and sampling run the model on one rank alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel is None:
        sizes = dict(pp=1, dp_replicate=world_size, dp_shard=1, tp=1)
    else:
        sizes = parallel.sizes(world_size)
    if unsharded_verb and sizes["dp_shard"] > 1:
        raise LmforgeError(
            f"train.parallel.dp_shard={sizes['dp_shard']}: {unsharded_verb} does not shard; "
            "use data parallel (dp_replicate) for it"
        )
    if sizes["tp"] > 1 and sizes["dp_replicate"] > 1:
        raise LmforgeError(
            f"train.parallel.tp={sizes['tp']} with dp_replicate={sizes['dp_replicate']}: "
            "combine tensor parallel with dp_shard (FSDP) instead"
        )
    if sizes["pp"] > 1 and sizes["pp"] != world_size:
        raise LmforgeError(
            f"train.parallel.pp={sizes['pp']} with other parallelism: a pipeline runs alone "
            f"for now (pp = the world size, {world_size})"
        )
    for name in ("pp", "tp"):
        if unsharded_verb and sizes[name] > 1:
            raise LmforgeError(
                f"train.parallel.{name}={sizes[name]}: {unsharded_verb} does not split the model"
            )
    device = pick_device(device_request)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    info = DistInfo(rank=rank, world_size=world_size, device=device, sizes=sizes)
    if world_size > 1:
        info.mesh = init_device_mesh(
            device.type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS
        )
        replica, shard = (
            info.mesh.get_local_rank("dp_replicate"),
            info.mesh.get_local_rank("dp_shard"),
        )
        info.dp_rank = replica * sizes["dp_shard"] + shard
        info.dp_size = sizes["dp_replicate"] * sizes["dp_shard"]
    return info


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, train_cfg, info: DistInfo, precision: str = "fp32") -> nn.Module:
    """The module the training step calls: `model` itself, split for tensor parallel,
    checkpointed, compiled and then sharded (FSDP2), all in place (`model`'s parameters become
    DTensors), or DDP-wrapped, as configured: torchtitan's order. Parameters stay shared with
    `model`, which is what gets saved."""
    if info.sizes["tp"] > 1:
        apply_tensor_parallel(model, info.mesh["tp"])
    if train_cfg.activation_checkpointing:
        model.set_activation_checkpointing(True)
    wrapped = torch.compile(model) if train_cfg.compile else model
    if info.sizes["dp_shard"] > 1:
        shard_model(model, info, train_cfg.parallel, precision)
    elif info.dp_size > 1:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        # gradients as views of the all-reduce buckets: no second copy of every gradient
        wrapped = DistributedDataParallel(
            wrapped, device_ids=device_ids, gradient_as_bucket_view=True
        )
    return wrapped


def shard_model(model: nn.Module, info: DistInfo, parallel, precision: str) -> None:
    """FSDP2: each transformer block is one unit (its parameters gathered for its forward and
    backward only), then the root takes what is left (embeddings, final norm, head). On a
    GPU, bf16 runs keep bf16 parameters for compute and reduce gradients in fp32; on a CPU
    autocast does the casting. cpu_offload keeps the shards in host memory."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise LmforgeError(
            f"train.parallel.dp_shard > 1 shards a GPT's blocks; {type(model).__name__} has none"
        )
    mesh = (
        info.mesh["dp_replicate", "dp_shard"]
        if info.sizes["dp_replicate"] > 1
        else info.mesh["dp_shard"]
    )
    options: dict = {"mesh": mesh}
    if info.device.type == "cuda" and precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if parallel.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=info.device.type == "cuda")
    for block in blocks:
        fully_shard(block, reshard_after_forward=parallel.reshard_after_forward, **options)
    fully_shard(model, **options)  # the root's parameters are needed again first in backward


def no_sync(module: nn.Module, skip: bool):
    """While accumulating (skip=True), gradients stay local: DDP's no_sync, or FSDP2 holding
    its reduce-scatter; they are reduced once, on the last micro-batch of a step."""
    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    if skip and isinstance(module, FSDPModule):
        return _fsdp_no_sync(module)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module: FSDPModule):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, across_ranks: bool) -> float:
    """torch's clip_grad_norm_ for parameters split every way lmforge splits them: plain
    tensors, DTensors on one or several meshes (FSDP, TP, both: each mesh's norm is reduced
    over its own ranks), and with across_ranks a pipeline stage's share of the model (the
    stages' squared norms summed over all ranks). Returns the global norm, the same on
    every rank."""
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            mesh = p.grad.device_mesh if isinstance(p.grad, DTensor) else None
            by_mesh.setdefault(mesh, []).append(p)
    if len(by_mesh) <= 1 and not across_ranks:  # one kind: torch's own, exactly
        return local_value(torch.nn.utils.clip_grad_norm_(params, max_norm)).item()
    squares = torch.zeros((), dtype=torch.float64)
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        squares += local_value(norm).double().cpu().square()
    if across_ranks:
        squares = all_reduce_sum(squares)
    total = squares.sqrt().float()
    for group in by_mesh.values():  # one mesh per call; the plain scale joins each mesh
        with implicit_replication():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total.item()


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a value that may be a DTensor (e.g. the global gradient norm over
    sharded gradients): its full value, the same on every rank."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
