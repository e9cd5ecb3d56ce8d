"""Per-rank memory and FLOPs of a training run, before it runs (`lmforge plan`).

Parameter counts come from the model built on the meta device (shapes only, so an 8B
model costs nothing); activations from lmforge/research/activations.py, which follows the
tensors the model's code saves for its backward. What it assumes:

- Parameters and gradients are fp32 (bf16/fp16 runs are autocast over fp32 master weights),
  4 bytes each. AdamW keeps two fp32 moments per parameter (plus a 4-byte step count per
  tensor); Muon one fp32 momentum buffer per matrix of the blocks (lmforge.train.optim's
  split: the rest is AdamW's). precision=auto is bf16 (what a bf16-capable GPU gets).
- Layout (train.parallel): FSDP (dp_shard) splits parameters, gradients and optimizer states
  over its ranks, in units as torchtitan wraps them (the embeddings, each block, the final
  norm with the head) and gathers one unit at a time (the next one prefetched) in the
  compute dtype, as torchtitan's MixedPrecisionPolicy does (bf16 parameters, gradients
  reduced in fp32), so autocast has no weight copies to make; each unit's gradients exist
  unsharded (and, in bf16 runs, also upcast to fp32) until they are reduce-scattered;
  reshard_after_forward=false keeps the stage's gathered parameters from the forward to the
  backward. Without FSDP, autocast's bf16/fp16 copy of each matmul weight is saved for the
  backward. dp_replicate copies everything; without FSDP it is DDP, whose gradient buckets
  are a second copy of the gradients. tp splits the blocks' matrices
  (column-parallel biases too; norms are replicated), the token embedding and the head
  (vocabulary-parallel), and the activations (activations.py). pp splits the blocks into
  consecutive stages as evenly as possible (earlier stages take the extra ones), the first
  stage holding the embeddings and the last the final norm and the head (and a copy of a
  tied embedding); the worst stage is reported. With 1F1B stage s keeps min(pp - s,
  grad_accum_steps) micro-batches of activations in flight, with GPipe all grad_accum_steps.
  cpu_offload (FSDP's CPUOffloadPolicy) keeps parameters, gradients and optimizer states in
  host memory; the device holds the gathered units.
- Peak device memory = parameters + gradients + optimizer states + activations of the
  micro-batches in flight + temporary buffers: FSDP's gathered units, DDP's buckets, and the
  larger of the logits' buffers (at the loss) and one recomputed block (checkpointing, in
  the backward), which are not alive at once. Gradients are counted as if they existed
  during the forward (true from the second micro-batch of an accumulation on); the
  optimizer step's own temporaries come after the activations are freed and are smaller.
  The CUDA caching allocator's fragmentation and the CUDA context (about 0.5-1 GB) are not
  included: leave that much headroom.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.common import LmforgeError
from lmforge.config import Config, check_model_split, stage_layers
from lmforge.research import activations as act

if TYPE_CHECKING:
    from lmforge.model.gpt import GPT

PARAM_BYTES = 4
"""fp32 parameters and gradients."""
ADAMW_STATES = 2


@dataclass
class Unit:
    """Parameters gathered together by FSDP, counted for one tensor-parallel rank."""

    numel: float = 0.0
    muon_numel: float = 0.0
    """Of numel, the elements of Muon's matrices (train.optimizer=muon)."""
    adamw_tensors: int = 0
    """Tensors AdamW steps (each has a 4-byte step count)."""
    matrix_numel: float = 0.0
    """Of numel, the blocks' matmul weights (autocast casts them; activations.py)."""

    def add(self, numel: float, muon: bool, matrix: bool = False) -> None:
        self.numel += numel
        self.muon_numel += numel if muon else 0.0
        self.adamw_tensors += not muon
        self.matrix_numel += numel if matrix else 0.0


@dataclass
class Stage:
    """One pipeline stage's memory on one rank, in bytes."""

    index: int
    blocks: int
    in_flight: int
    """Micro-batches whose activations the stage holds at once."""
    params: int
    grads: int
    optimizer: int
    activations: dict[str, int]
    """Grouped: the blocks, the embeddings' and the head's tensors, over every micro-batch in
    flight."""
    temporary: dict[str, int]
    """Buffers alive during a step besides the activations, by kind (see temporary_total)."""
    offload: bool

    @property
    def temporary_total(self) -> int:
        """FSDP's and DDP's buffers, plus the larger of the logits' buffers and a recomputed
        block (one is freed before the other exists)."""
        t = dict(self.temporary)
        peak = max(t.pop(LOGITS, 0), t.pop(RECOMPUTE, 0))
        return sum(t.values()) + peak

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def device(self) -> int:
        resident = 0 if self.offload else self.states
        return resident + sum(self.activations.values()) + self.temporary_total

    @property
    def host(self) -> int:
        return self.states if self.offload else 0


LOGITS = "logits and their gradients (at the loss)"
RECOMPUTE = "one block recomputed (backward)"


@dataclass
class Plan:
    """The plan of one config on `world_size` processes: every stage, checkpointing off and on."""

    cfg: Config
    world_size: int
    layout: dict[str, int]
    precision: str
    pp_schedule: str
    vocab_size: int
    vocab_note: str
    n_params: int
    n_params_non_embedding: int
    flops_per_token: float
    tokens_per_step: int
    stages: dict[bool, list[Stage]] = field(default_factory=dict)
    """checkpointing (False/True) -> every stage."""

    @property
    def checkpointing(self) -> bool:
        """The setting the config asks for (train.activation_checkpointing)."""
        return self.cfg.train.activation_checkpointing

    def worst(self, checkpointing: bool | None = None) -> Stage:
        ckpt = self.checkpointing if checkpointing is None else checkpointing
        return max(self.stages[ckpt], key=lambda s: s.device)

    @property
    def device_bytes(self) -> int:
        """Peak device memory per rank of the configured run (its worst stage)."""
        return self.worst().device

    @property
    def flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    def tokens_per_s(self, mfu: float, peak_flops: float) -> float:
        """Training tokens per second of the whole job at `mfu` of `peak_flops` per device."""
        return mfu * peak_flops * self.world_size / self.flops_per_token


def resolve_precision(precision: str, device: str) -> str:
    """precision=auto as a run would pick it: bf16 on a GPU; on a CPU it depends on a
    measurement, so the planner takes fp32 there."""
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" else "fp32"


def resolve_vocab(cfg: Config) -> tuple[int, str]:
    """(vocab size, how it was found). model.vocab_size unset means the tokenizer's: byte's,
    a tokenizer folder's, a prepared dataset's, or the char vocabulary of a text; where none
    can be read without a training run's data, GPT-2's padded 50,304, said in the note."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size, ""
    size, source = _tokenizer_vocab(cfg)
    if size is None:
        size, source = 50304, f"{source} is not readable here; assumed GPT-2's 50,304"
    if cfg.train.objective == "mlm":
        from lmforge.data.mlm import mlm_vocab_size

        size = mlm_vocab_size(size)
    return size, f"model.vocab_size from {source} (--model.vocab_size=N to set it)"


def _tokenizer_vocab(cfg: Config) -> tuple[int | None, str]:
    from lmforge.data.loader import _tokenizer_for_text, read_documents
    from lmforge.tokenizer import ByteTokenizer, load_tokenizer, trained_bpe_size

    spec, path = cfg.data.tokenizer, cfg.data.path
    if spec == "byte":
        return ByteTokenizer.vocab_size, "the byte tokenizer"
    if vocab := trained_bpe_size(spec, "data.tokenizer"):
        return vocab, f"the BPE data.tokenizer={spec} will train"
    if spec not in ("auto", "char"):
        if not Path(spec).is_dir():
            return None, f"the tokenizer {spec}"
        return load_tokenizer(spec).vocab_size, f"the tokenizer {spec}"
    if path and (Path(path) / "manifest.json").is_file():
        from lmforge.data.shards import read_prepared

        return read_prepared(path).tokenizer.vocab_size, f"the tokenizer of {path}"
    if path and not Path(path).exists():
        return None, f"the tokenizer of data.path={path}"
    docs = read_documents(path, cfg.data.text_field)
    tokenizer = _tokenizer_for_text(spec, docs, train_docs=docs)  # char: from all the text
    return tokenizer.vocab_size, f"a char tokenizer of {path or 'Shakespeare'}"


def check_layout(cfg: Config, world_size: int) -> dict[str, int]:
    """train.parallel's sizes on `world_size` processes, or one clear error."""
    if world_size < 1:
        raise LmforgeError(f"--world-size={world_size} must be >= 1")
    sizes = cfg.train.parallel.sizes(world_size)
    check_model_split(cfg.model, sizes["tp"], sizes["pp"])
    return sizes


def parameter_units(cfg: Config, vocab: int, tp: int) -> tuple[Unit, list[Unit], Unit, GPT]:
    """(embedding unit, one unit per block, head unit, the meta model): parameter counts per
    tensor-parallel rank from the model built on the meta device."""
    import torch

    from lmforge.model.gpt import GPT
    from lmforge.train.optim import is_muon_matrix
    from lmforge.train.tensor_parallel import COLUMN_WISE  # their biases split too

    with torch.device("meta"):
        model = GPT(replace(cfg.model, vocab_size=vocab))
    muon = cfg.train.optimizer == "muon"
    embed, head = Unit(), Unit()  # wte (+ wpe); final norm + lm_head
    blocks = [Unit() for _ in range(cfg.model.n_layer)]
    for name, p in model.named_parameters():  # a tied head is wte.weight, listed once
        parts = name.split(".")
        if parts[0] == "blocks":
            module = ".".join(parts[2:-1])  # e.g. attn.q, or attn.q.0 (low-rank)
            column = any(module == c or module.startswith(c + ".") for c in COLUMN_WISE)
            numel = p.numel() / tp if p.dim() == 2 or column else p.numel()  # norms: whole
            blocks[int(parts[1])].add(numel, muon and is_muon_matrix(name, p), p.dim() == 2)
        elif parts[0] == "wte":
            embed.add(p.numel() / tp, False)
        elif parts[0] == "wpe":
            embed.add(p.numel(), False)
        else:
            head.add(p.numel() / tp if parts[0] == "lm_head" else p.numel(), False)
    return embed, blocks, head, model


def uses_fsdp(cfg: Config, sizes: dict[str, int]) -> bool:
    """FSDP wraps the model when it shards (dp_shard > 1) or offloads to the CPU."""
    return sizes["dp_shard"] > 1 or cfg.train.parallel.cpu_offload


def _dense_mask_rows(cfg: Config, batch: int) -> int:
    """Rows of the explicit mask SDPA receives (activations.Shapes.dense_mask_rows)."""
    m = cfg.model
    if m.attention_backend == "flex":
        return 0
    if cfg.data.within_document:
        return batch
    return 1 if m.sliding_window and m.sliding_window < m.block_size else 0


def _stage(
    cfg: Config,
    s: int,
    blocks: range,
    units: tuple[Unit, list[Unit], Unit],
    shapes: act.Shapes,
    vocab: int,
    sizes: dict[str, int],
    checkpointing: bool,
    pp_schedule: str,
) -> Stage:
    embed, block_units, head = units
    pp, first, last = sizes["pp"], s == 0, s == sizes["pp"] - 1
    mine = [block_units[i] for i in blocks]
    mine = ([embed] if first else []) + mine + ([head] if last else [])
    if last and pp > 1 and cfg.model.tie_embeddings:  # the last stage's copy of the tied head
        mine.append(Unit(numel=vocab * cfg.model.d_model / sizes["tp"], adamw_tensors=1))
    par = cfg.train.parallel
    fsdp = uses_fsdp(cfg, sizes)
    shard = sizes["dp_shard"] if fsdp else 1
    numel = sum(u.numel for u in mine)
    muon_numel = sum(u.muon_numel for u in mine)
    adamw_tensors = sum(u.adamw_tensors for u in mine)
    params = math.ceil(numel * PARAM_BYTES / shard)
    optimizer = math.ceil(
        (ADAMW_STATES * (numel - muon_numel) + muon_numel) * PARAM_BYTES / shard
        + adamw_tensors * PARAM_BYTES
    )

    one_block = act.block_saved(shapes)
    per_block = act.checkpointed_block_saved(shapes) if checkpointing else one_block
    micro: dict[str, float] = {}
    if first:
        micro["embeddings"] = sum(act.embedding_saved(shapes).values())
    micro[f"{len(blocks)} blocks"] = len(blocks) * sum(per_block.values()) + sum(
        act.shared_saved(shapes, checkpointing).values()
    )
    if last:
        micro["final norm, head and loss"] = sum(act.head_saved(shapes, vocab).values())
    if shapes.low_precision and not fsdp:  # FSDP gathers low-precision units: nothing to cast
        cast = 0.0 if checkpointing else sum(block_units[i].matrix_numel for i in blocks)
        cast += vocab * cfg.model.d_model / sizes["tp"] if last else 0.0
        micro["autocast weight copies"] = act.autocast_weight_copies(shapes, cast)
    accum = cfg.train.grad_accum_steps
    in_flight = 1 if pp == 1 else accum if pp_schedule == "gpipe" else min(pp - s, accum)
    activations = {k: math.ceil(v * in_flight) for k, v in micro.items()}

    temporary: dict[str, int] = {}
    largest = max(u.numel for u in mine)
    if fsdp:  # units gathered in the compute dtype; gradients reduced in fp32
        gathered = 2 * largest if par.reshard_after_forward else numel
        temporary["FSDP gathered parameters"] = math.ceil(min(gathered, numel) * shapes.act)
        grad_bytes = PARAM_BYTES + (shapes.act if shapes.low_precision else 0)
        temporary["FSDP unsharded gradients (one unit)"] = math.ceil(largest * grad_bytes)
    elif sizes["dp_replicate"] > 1:
        temporary["DDP gradient buckets"] = params
    if last:
        temporary[LOGITS] = math.ceil(act.logits_buffers(shapes, vocab))
    if checkpointing:
        recompute = sum(one_block.values())
        if not fsdp:
            recompute += act.autocast_weight_copies(shapes, block_units[blocks[0]].matrix_numel)
        temporary[RECOMPUTE] = math.ceil(recompute)
    return Stage(
        index=s,
        blocks=len(blocks),
        in_flight=in_flight,
        params=params,
        grads=params,
        optimizer=optimizer,
        activations=activations,
        temporary=temporary,
        offload=par.cpu_offload,
    )


def plan(cfg: Config, world_size: int, device: str = "cuda") -> Plan:
    """The memory and FLOPs plan of `cfg` on `world_size` processes (see the module's
    docstring for what it assumes). device picks the kernels whose saved tensors are counted
    (activations.py): "cuda" for planning GPU runs, "cpu" to compare with a CPU run."""
    sizes = check_layout(cfg, world_size)
    pp_schedule = cfg.train.parallel.pp_schedule
    vocab, vocab_note = resolve_vocab(cfg)
    precision = resolve_precision(cfg.train.precision, device)
    embed, blocks, head, model = parameter_units(cfg, vocab, sizes["tp"])
    t = cfg.train
    shapes = act.Shapes(
        cfg.model,
        precision,
        t.micro_batch_size,
        cfg.model.block_size,
        tp=sizes["tp"],
        device=device,
        low_precision_params=precision in act.LOW_PRECISION and uses_fsdp(cfg, sizes),
        dense_mask_rows=_dense_mask_rows(cfg, t.micro_batch_size),
    )
    dp = sizes["dp_replicate"] * sizes["dp_shard"]
    result = Plan(
        cfg=cfg,
        world_size=world_size,
        layout=sizes,
        precision=precision,
        pp_schedule=pp_schedule,
        vocab_size=vocab,
        vocab_note=vocab_note,
        n_params=model.num_params(),
        n_params_non_embedding=model.num_params(non_embedding=True),
        flops_per_token=model.flops_per_token(cfg.model.block_size),
        tokens_per_step=t.micro_batch_size * t.grad_accum_steps * dp * cfg.model.block_size,
    )
    ranges = [stage_layers(cfg.model.n_layer, sizes["pp"], s) for s in range(sizes["pp"])]
    for ckpt in (False, True):
        result.stages[ckpt] = [
            _stage(cfg, s, r, (embed, blocks, head), shapes, vocab, sizes, ckpt, pp_schedule)
            for s, r in enumerate(ranges)
        ]
    return result


@dataclass(frozen=True)
class Suggestion:
    """Config overrides that bring the run under the device memory, checked by re-planning."""

    overrides: tuple[str, ...]
    device_bytes: int


def _with(cfg: Config, changes: dict[str, object]) -> Config:
    """A copy of cfg with dotted keys set (values already valid for their fields)."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        *path, name = key.split(".")
        node = out
        for part in path:
            node = getattr(node, part)
        setattr(node, name, value)
    return out


def _overrides(changes: dict[str, object]) -> tuple[str, ...]:
    return tuple(
        f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()
    )


CHANGES = ("dp_shard", "checkpointing", "micro_batch", "tp", "cpu_offload")
"""What `suggest` may change, cheapest in throughput first: sharding instead of replicating
costs communication only; checkpointing a recomputed forward (about a third more compute);
smaller micro-batches and more tensor parallelism lower each matmul's efficiency; offloading
moves every optimizer step to the CPU."""


def _variants(kind: str, cfg: Config, world_size: int) -> list[dict[str, object]]:
    """The ways to make one change to cfg, mildest first. The global batch stays the same:
    fewer sequences per micro-batch or fewer data-parallel ranks mean more accumulation."""
    t, par, m = cfg.train, cfg.train.parallel, cfg.model
    sizes = par.sizes(world_size)
    if kind == "dp_shard" and sizes["dp_replicate"] > 1:
        change: dict[str, object] = {
            "train.parallel.dp_shard": sizes["dp_shard"] * sizes["dp_replicate"]
        }
        if par.dp_replicate != -1:
            change["train.parallel.dp_replicate"] = 1
        return [change]
    if kind == "checkpointing" and not t.activation_checkpointing:
        return [{"train.activation_checkpointing": True}]
    if kind == "micro_batch":
        mbs = t.micro_batch_size
        return [
            {"train.micro_batch_size": b, "train.grad_accum_steps": t.grad_accum_steps * mbs // b}
            for b in range(mbs - 1, 0, -1)
            if mbs % b == 0
        ]
    if kind == "tp":
        out = []
        for k in (2, 4, 8):
            tp = sizes["tp"] * k
            key = next((x for x in ("dp_shard", "dp_replicate") if sizes[x] % k == 0), None)
            if key is None or any(n % tp for n in (m.n_head, m.kv_heads, m.ffn_dim)):
                break
            change = {"train.parallel.tp": tp}
            if getattr(par, key) != -1:
                change[f"train.parallel.{key}"] = sizes[key] // k
            change["train.grad_accum_steps"] = t.grad_accum_steps * k
            out.append(change)
        return out
    if kind == "cpu_offload" and not par.cpu_offload:
        return [{"train.parallel.cpu_offload": True}]
    return []


def suggest(cfg: Config, world_size: int, budget: int, device: str = "cuda") -> list[Suggestion]:
    """Ways to fit `budget` bytes per device, each checked by planning again: every single
    change that fits on its own (its mildest variant that does), else the shortest run of
    the changes, taken in CHANGES' order, that fits together; [] when nothing does."""

    def device_bytes(changes: dict[str, object]) -> int:
        return plan(_with(cfg, changes), world_size, device).device_bytes

    singles = []
    for kind in CHANGES:
        for change in _variants(kind, cfg, world_size):
            used = device_bytes(change)
            if used <= budget:
                singles.append(Suggestion(_overrides(change), used))
                break
    if singles:
        return singles
    combined: dict[str, object] = {}
    for kind in CHANGES:
        options = _variants(kind, _with(cfg, combined), world_size)
        for change in options:
            used = device_bytes(combined | change)
            if used <= budget:
                return [Suggestion(_overrides(combined | change), used)]
        if options:
            combined |= options[-1]
    return []


_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' or '80G' (2^30, as Slurm and Docker read it), '1.5TB', plain
    bytes -> bytes; anything else is one clear error."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise LmforgeError(
            f"--device-memory={text!r} is not a size: a number > 0 with an optional unit "
            "(80GB = 80e9 bytes, 80GiB or 80G = 80 x 2^30, plain bytes)"
        )
    return int(float(match.group(1)) * _UNITS[unit])
