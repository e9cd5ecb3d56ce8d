"""Checkpoint folders: atomic writes, safe loads.

A checkpoint folder holds `model.safetensors` + `config.yaml` + `tokenizer/` (enough to load
the model anywhere) and, for resuming, `trainer_state.pt` (optimizer, scheduler, RNG, data
position, step). A folder is written under a temporary name, fsynced, then renamed, so a
crash mid-save leaves the previous checkpoint intact and never a folder that looks complete.

A sharded run (FSDP) writes the same folder, its model.safetensors gathered on rank 0, and in
`sharded/` its model and optimizer states as torch.distributed.checkpoint (DCP) wrote them,
one file per rank, keyed by parameter name. Resume reads `sharded/` into whatever layout the
resumed run has (4 ranks -> 2 -> 1 process): DCP reshards on load.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lmforge.common import LmforgeError
from lmforge.config import Config, ModelConfig, build_config, save_config
from lmforge.fileio import atomic_folder, atomic_write_text, contained
from lmforge.model.gpt import GPT, split_fused, unfused_keys
from lmforge.model.heads import ActorCritic, RewardModel, SequenceClassifier
from lmforge.model.peft import (
    ADAPTER_WEIGHTS,
    apply_peft,
    load_adapter,
    merge_lora,
    unfused_targets,
    write_adapter,
)
from lmforge.tokenizer import Tokenizer, load_tokenizer
from lmforge.train.pipeline import StageModel

WEIGHTS = "model.safetensors"
TRAINABLE = "trainable.safetensors"
"""PEFT runs: the parameters that train (encoders unfolded), what resume needs."""
VALUE_HEAD = "value_head.safetensors"
"""PPO runs: the value head beside the policy, what resume needs (loading ignores it)."""
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
TRAINER_STATE = "trainer_state.pt"
SHARDED = "sharded"
"""Sharded runs: model and optimizer states in DCP's format, what resume at any layout needs."""
LATEST = "latest"
BEST = "best"
POINTERS = (LATEST, BEST)


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    cfg: Config,
    tokenizer: Tokenizer | None,
    trainer_state: dict[str, Any] | None = None,
    sharded_state: Path | None = None,
) -> Path:
    """Write a checkpoint folder atomically; an existing folder of the same name is replaced
    only after the new one is complete on disk. With a PEFT method (cfg.peft) only the adapter
    is written (adapter.safetensors + adapter.yaml naming the base, cfg.run.base, by its
    weights' sha256) and, for resume, the trainable parameters as they train. A PPO
    ActorCritic is saved as its policy, with its value head in value_head.safetensors.
    `sharded_state`, a folder save_sharded_state wrote, moves into the checkpoint as
    sharded/."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        if isinstance(model, ActorCritic):
            save_model(model.value_head, str(tmp / VALUE_HEAD))
            model = model.policy
        if cfg.quantize.method != "none":
            from lmforge.compress.quantize import save_quantized

            save_quantized(model, cfg.quantize, tmp / WEIGHTS)
        elif cfg.peft.method == "none" or cfg.run.head != "lm" or cfg.classify.labels:  # heads: all
            save_model(model, str(tmp / WEIGHTS))
        else:
            base_hash = weights_sha256(resolve_checkpoint(cfg.run.base))
            write_adapter(model, tmp, cfg.peft, base_hash)
            if trainer_state is not None:
                trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
                save_file(trainable, str(tmp / TRAINABLE))
        save_config(cfg, tmp / CONFIG)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        if sharded_state is not None:
            shutil.move(sharded_state, tmp / SHARDED)
    return folder


def save_sharded_state(folder: Path, model: torch.nn.Module, optimizers: list) -> None:
    """All ranks: write the model's and optimizers' states, as sharded as they are, into
    `folder` (DCP: one file per rank and a metadata file, keys by parameter name)."""
    model_state, optim_state = get_state_dict(model, optimizers)
    dcp.save({"model": model_state, "optimizers": optim_state}, checkpoint_id=folder)


def load_sharded_state(folder: Path, model: torch.nn.Module, optimizers: list) -> None:
    """Read a checkpoint's sharded/ states into `model` and `optimizers`, resharded to their
    layout (any world size, or one process without a process group)."""
    model_state, optim_state = get_state_dict(model, optimizers)  # the layout to fill
    state = {"model": model_state, "optimizers": optim_state}
    with warnings.catch_warnings():  # one process reading many ranks' files is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder / SHARDED, no_dist=not dist.is_initialized())
    set_state_dict(
        model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizers"]
    )


def load_full_into_sharded(
    folder: Path, model: torch.nn.Module, optimizers: list, saved_optimizers: list[dict]
) -> None:
    """An unsharded checkpoint (one process or DDP) into a sharded run: the full weights and
    the optimizers' states as torch saved them (keyed by position), re-keyed by parameter
    name and cut into this rank's shards. The optimizers must list their parameters in the
    order of the run that saved them (build_optimizers does, from named_parameters)."""
    with torch.device("meta"):
        plain = GPT(model.config)
    plain.assign_weights(read_weights(folder, plain.config))  # both names of a tied weight
    names = {id(p): n for n, p in model.named_parameters()}
    by_name: dict[str, Any] = {"state": {}, "param_groups": []}
    for opt, saved in zip(optimizers, saved_optimizers):
        fqns = [names[id(p)] for group in opt.param_groups for p in group["params"]]
        by_name["state"] |= {fqns[i]: state for i, state in saved["state"].items()}
        for group in saved["param_groups"]:
            by_name["param_groups"].append(group | {"params": [fqns[i] for i in group["params"]]})
    set_state_dict(
        model,
        optimizers,
        model_state_dict=plain.state_dict(),
        optim_state_dict=by_name,
        options=StateDictOptions(full_state_dict=True),
    )


def gather_model(model: torch.nn.Module, cfg: Config) -> GPT | None:
    """All ranks: the full weights of a model split over ranks (FSDP shards or pipeline
    stages) as a plain GPT in CPU memory on rank 0 (None on the others), which every
    single-process tool can save, load and run."""
    if isinstance(model, StageModel):  # each rank holds some layers whole
        own = {name: t.detach().cpu() for name, t in model.state_dict().items()}
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(own, parts, dst=0)
        state = {name: t for part in parts or () for name, t in part.items()}
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    if not state:  # rank 0 gathers; full_state_dict with cpu_offload fills rank 0's only
        return None
    # A gathered tensor may be a view of a larger buffer; safetensors saves whole storages.
    state = {
        name: t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
        for name, t in state.items()
    }
    with torch.device("meta"):
        plain = GPT(cfg.model)
    missing, unexpected = plain.assign_weights(state)
    assert not missing and not unexpected, (missing, unexpected)
    return plain.eval()


def is_checkpoint(folder: str | Path) -> bool:
    """A full checkpoint (model.safetensors) or an adapter one (adapter.safetensors), with its
    config.yaml."""
    folder = Path(folder)
    weights = (folder / WEIGHTS).is_file() or (folder / ADAPTER_WEIGHTS).is_file()
    return weights and (folder / CONFIG).is_file()


def load_checkpoint_config(folder: str | Path) -> Config:
    """A checkpoint's config.yaml; LoRA targets saved before qkv and gate_up were split name
    the parts (peft.unfused_targets), so that its model is built as its weights load."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"checkpoint folder not found: {folder}")
    if not is_checkpoint(folder):
        raise LmforgeError(
            f"{folder} is not an lmforge checkpoint (expected {WEIGHTS} and {CONFIG}); "
            "for a Hugging Face folder use `lmforge import`"
        )
    cfg = build_config(folder / CONFIG)
    cfg.peft.targets = unfused_targets(cfg.peft.targets)
    return cfg


def read_weights(folder: Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A checkpoint's model.safetensors as today's state dict: one written before attention's
    qkv and SwiGLU's gate_up were split into separate Linears has them split (gpt.split_fused)."""
    return split_fused(load_file(str(folder / WEIGHTS)), cfg)


def fused_layout(folder: Path) -> bool:
    """Whether a checkpoint's weights, or a PEFT run's trainable parameters, were written
    before qkv and gate_up were split: such weights load, but optimizer states do not fit."""
    names: list[str] = []
    for file in (folder / WEIGHTS, folder / TRAINABLE):
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                names += f.keys()
    return any(unfused_keys(name) != [name] for name in names)


def load_weights(model: GPT, folder: str | Path, assign: bool = False) -> None:
    """Load model.safetensors into `model`, strictly: a shape or name mismatch is a user error.
    assign=True takes the file's tensors as the model's own (GPT.assign_weights), for a model
    built on the meta device; otherwise they are copied into the existing parameters (which an
    optimizer may already hold). An ActorCritic takes its policy's weights and its value head.
    Weights written before qkv and gate_up were split load too (read_weights)."""
    if isinstance(model, ActorCritic):
        path = Path(folder) / VALUE_HEAD
        if not path.is_file():
            raise LmforgeError(f"{folder} has no {VALUE_HEAD}: it is not a PPO checkpoint")
        load_model(model.value_head, str(path))
        model = model.policy
    if (Path(folder) / TRAINABLE).is_file():  # a PEFT run: the adapter's parameters only
        _load_trainable(model, Path(folder) / TRAINABLE)
        return
    path = Path(folder) / WEIGHTS
    try:
        state = read_weights(Path(folder), model.config)
        if assign:
            missing, unexpected = model.assign_weights(state)
        else:
            missing, unexpected = _copy_weights(model, state)
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


def _copy_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]):
    """load_state_dict(strict=False) as safetensors' load_model does it: a weight shared by
    two names (a tied head) is in the file once, and its other name is not missing."""
    own = model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {own[name].data_ptr() for name in state if name in own}
    return [name for name in missing if own[name].data_ptr() not in loaded], unexpected


def weights_sha256(folder: str | Path) -> str:
    """sha256 of a checkpoint's model.safetensors: the identity of its weights (an adapter
    records the base it was trained on). Cached per file, size and modification time."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise LmforgeError(f"{path} not found: {folder} is not a full lmforge checkpoint")
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_trainable(module: torch.nn.Module, path: Path) -> None:
    """A PEFT run's trainable parameters, by name, into a module built the same way."""
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    saved = load_file(str(path))
    if {n: tuple(p.shape) for n, p in own.items()} != {n: tuple(t.shape) for n, t in saved.items()}:
        raise LmforgeError(f"{path} does not fit this run's PEFT setup (peft section changed?)")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(saved[name])


def load(
    folder: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Tokenizer | None]:
    """Load a checkpoint folder -> (model in eval mode, tokenizer or None). The model is built
    on the meta device and takes the file's tensors as its own, so a large model is not
    randomly initialised first only to be overwritten. An adapter checkpoint (PEFT) loads its
    base (run.base in its config) and applies the adapter, after checking the base's hash."""
    folder = Path(folder)
    cfg = load_checkpoint_config(folder)
    if (folder / ADAPTER_WEIGHTS).is_file():
        base = resolve_checkpoint(cfg.run.base)
        model, base_tokenizer = load(base)
        module = load_adapter(model, folder, weights_sha256(base))
        tokenizer = (
            load_tokenizer(folder / TOKENIZER) if (folder / TOKENIZER).is_dir() else base_tokenizer
        )
        return module.to(device).eval(), tokenizer
    tokenizer = load_tokenizer(folder / TOKENIZER) if (folder / TOKENIZER).is_dir() else None
    if cfg.run.head != "lm" or cfg.classify.labels:  # a head on a backbone (any PEFT)
        backbone = apply_peft(GPT(cfg.model), cfg.peft)
        if cfg.run.head == "reward":
            headed: SequenceClassifier = RewardModel(backbone, cfg.reward.pooling)
        else:
            headed = SequenceClassifier(backbone, cfg.classify.labels, cfg.classify.pooling)
        load_weights(headed, folder)
        headed.tokenizer = tokenizer
        return headed.to(device).eval(), tokenizer
    if cfg.quantize.method != "none":  # torchao rebuilds the layers from float ones first
        from lmforge.compress.quantize import load_quantized

        model = load_quantized(GPT(cfg.model), cfg.quantize, folder / WEIGHTS)
        return model.to(device), tokenizer
    with torch.device("meta"):
        model = GPT(cfg.model)
    load_weights(model, folder, assign=True)
    return model.to(device).eval(), tokenizer


def load_plain(path: str | Path, merge: bool = False) -> tuple[GPT, Tokenizer | None, Config]:
    """A checkpoint (or run folder) as a plain GPT, its tokenizer and config: a full
    checkpoint as it is; a LoRA adapter checkpoint with merge=True folded into its base
    (peft.method none in the returned config). Other adapters cannot become a plain model."""
    folder = resolve_checkpoint(path)
    cfg = load_checkpoint_config(folder)
    model, tokenizer = load(folder)
    if cfg.peft.method == "none":
        return model, tokenizer, cfg
    if not merge:
        raise LmforgeError(
            f"{folder} is a {cfg.peft.method} adapter on {cfg.run.base}; add --merge to fold "
            "a LoRA adapter into its base"
        )
    if cfg.peft.method != "lora":
        raise LmforgeError(
            f"only LoRA adapters merge into plain weights; {folder} is a {cfg.peft.method} adapter"
        )
    cfg.peft.method = "none"
    return merge_lora(model), tokenizer, cfg


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (-> its `latest` checkpoint), or a run's
    `checkpoints/latest` or `checkpoints/best` pointer file (-> the checkpoint it names)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    if path.name in POINTERS and path.is_file():
        target = _followed(path)
        if target is None:
            raise LmforgeError(f"{path} names no complete checkpoint")
        return target
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if not path.exists():
        raise LmforgeError(f"checkpoint folder not found: {path}")
    raise LmforgeError(f"{path} is neither a checkpoint nor a run folder with checkpoints")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint a run folder's `checkpoints/latest` pointer names, if it is complete."""
    return _followed(Path(run_dir) / "checkpoints" / LATEST)


def _followed(pointer: Path) -> Path | None:
    """The checkpoint a pointer file names, if the file exists and the checkpoint is complete."""
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not name:
        return None
    # The pointer is a file anyone can edit: a name leading elsewhere is refused, not followed.
    target = contained(pointer.parent, name, f"checkpoint named by {pointer}")
    return target if is_checkpoint(target) else None


def set_pointer(folder: Path, pointer: str = LATEST) -> None:
    """Point the run's `latest` (or `best`) file at `folder` (a sibling checkpoint),
    atomically."""
    atomic_write_text(folder.parent / pointer, folder.name + "\n")
