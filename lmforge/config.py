"""The typed config trees: defaults live here, YAML files and `--a.b=v` overrides merge on top.

Two roots share one loader: `Config` (run/model/data/train, for `lmforge train`) and
`PrepareConfig` (sources/clean/dedup/fetch/prepare, for `lmforge prepare`). Merging and type
checks are OmegaConf's (structured configs); this module adds the preset layer (`model.preset`
fills model fields before the user's values), per-source `clean` settings laid over the global
ones, value checks in `__post_init__`, and error lines that name the nearest valid key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lmforge.common import LmforgeError, did_you_mean
from lmforge.fileio import plain_name
from lmforge.tokenizer import trained_bpe_size


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise LmforgeError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise LmforgeError(f"{name}={value} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class ModelConfig:
    """Architecture of the decoder. GPT-2 and Llama are both points in this space."""

    preset: str = "shakespeare-llama"
    """Named size from lmforge/model/presets.py; its values fill fields the user did not set."""
    vocab_size: int | None = None
    """Vocabulary size; None takes it from the tokenizer."""
    block_size: int = 128
    """Maximum sequence length (context window)."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None = n_head (MHA), 1 = multi-query."""
    d_model: int = 128
    """Width of the residual stream."""
    head_size: int | None = None
    """Width of each attention head (litgpt's name; `head_dim` reads it); None = d_model //
    n_head. Set where heads were removed (`lmforge prune --method structured`): the remaining
    heads keep their width, so n_head * head_size may be less than d_model."""
    ffn_hidden: int | None = None
    """FFN hidden size; None = 4*d_model for GELU and ReLU squared, Llama's 2/3*4*d_model rounded up to 64 for SwiGLU."""
    mlp: str = "gelu"
    """gelu (exact), gelu_tanh (GPT-2's approximation), swiglu (Llama) or relu2 (ReLU squared,
    modded-nanogpt and Primer: fc -> relu(x)^2 -> proj)."""
    norm: str = "layernorm"
    """layernorm or rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm/RMSNorm."""
    norm_position: str = "pre"
    """pre (GPT-2, Llama) or post (original Transformer)."""
    bias: bool = True
    """Bias in linear layers and LayerNorm."""
    pos_encoding: str = "learned"
    """learned, sinusoidal, rope or none."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Llama 3: 500000)."""
    sliding_window: int | None = None
    """If set, each token attends to at most this many most recent tokens (itself included);
    in a bidirectional model (causal=false), to those at most sliding_window - 1 positions
    away on either side."""
    global_tokens: int = 0
    """Longformer's local + global attention with sliding_window as the local part: the first
    global_tokens tokens of each sequence (of each document when packed; padding not counted)
    see, and are seen by, every token the causal or bidirectional rule allows, whatever the
    window. 0 = none."""
    attention_backend: str = "auto"
    """Kernel for masked attention patterns (sliding window, global tokens, padding, packed
    documents); plain causal attention always takes SDPA's causal path. sdpa: a dense boolean
    (B, 1, T, S) mask through SDPA. flex: FlexAttention (torch >= 2.5) with a block-sparse
    BlockMask from the same predicate (lmforge/model/masks.py), compiled by torch.compile (eager
    flex materialises every score); no attention dropout; on CPU, torch 2.13's flex has no
    backward, so it evaluates and generates but cannot train. auto = sdpa: on CPU-2 compiled
    flex's forward was 1.1-3.9x faster than the dense mask at 1-2k tokens (slower at 512), but
    it cannot train there and compiles per shape; on CUDA it is not yet measured
    (BENCHMARKS.md, "Efficient attention")."""
    causal: bool = True
    """Causal attention (each token sees those before it); false = bidirectional (every token
    sees every real token; padding stays hidden), for masked-LM encoders (train.objective=mlm).
    A bidirectional model cannot generate."""
    dropout: float = 0.0
    """Dropout on embeddings, residual branches and (unless attention_dropout is set)
    attention probabilities."""
    attention_dropout: float | None = None
    """Dropout on attention probabilities; None = model.dropout. On CPU it is most of
    dropout's cost (a mask over every (query, key) pair against one over the hidden width),
    so attention_dropout=0 keeps the rest of dropout at almost no cost."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block (linearly increasing from 0 over depth)."""
    tie_embeddings: bool = True
    """Share the output head's weight with the token embedding."""
    init_std: float = 0.02
    """Standard deviation of the GPT-2 weight init."""
    zero_init_proj: bool = False
    """Initialise the residual output projections (attn.proj, mlp.proj) to zero, so every
    block starts as the identity (modded-nanogpt)."""
    qk_norm: bool = False
    """RMSNorm (learnable, per head) on queries and keys before RoPE, which keeps attention
    logits bounded at high learning rates (OLMo-2, Qwen3, modded-nanogpt)."""
    logit_softcap: float | None = None
    """If set, logits = cap * tanh(logits / cap): bounds the head's output (Gemma 2,
    modded-nanogpt)."""
    low_rank: int | None = None
    """If set, every Linear in the transformer blocks is two factors in -> r -> out with
    r = min(low_rank, in, out) (`lmforge prune --method lowrank` writes them from a truncated
    SVD); None = full Linears."""

    def __post_init__(self) -> None:
        _check_choice("model.mlp", self.mlp, ("gelu", "gelu_tanh", "swiglu", "relu2"))
        _check_choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _check_choice("model.norm_position", self.norm_position, ("pre", "post"))
        _check_choice(
            "model.pos_encoding", self.pos_encoding, ("learned", "sinusoidal", "rope", "none")
        )
        for name in ("block_size", "n_layer", "n_head", "d_model"):
            _check_positive(f"model.{name}", getattr(self, name))
        _check_positive("model.vocab_size", self.vocab_size)
        _check_positive("model.n_kv_head", self.n_kv_head)
        _check_positive("model.ffn_hidden", self.ffn_hidden)
        _check_positive("model.sliding_window", self.sliding_window)
        _check_positive("model.global_tokens", self.global_tokens, allow_zero=True)
        _check_choice("model.attention_backend", self.attention_backend, ("auto", "sdpa", "flex"))
        _check_positive("model.head_size", self.head_size)
        _check_positive("model.low_rank", self.low_rank)
        if self.global_tokens and self.sliding_window is None:
            raise LmforgeError(
                f"model.global_tokens={self.global_tokens} needs model.sliding_window (global "
                "tokens are the exceptions to the window; without one every token is seen)"
            )
        if self.logit_softcap is not None and not 0 < self.logit_softcap < float("inf"):
            raise LmforgeError(
                f"model.logit_softcap={self.logit_softcap} must be a finite number > 0 "
                "(null = no capping)"
            )
        if self.head_size is None and self.d_model % self.n_head:
            raise LmforgeError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
            )
        if self.n_head % self.kv_heads:
            raise LmforgeError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.kv_heads}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise LmforgeError(f"RoPE needs an even head dim, got {self.head_dim}")
        for name in ("dropout", "attention_dropout", "drop_path"):
            if not 0 <= (getattr(self, name) or 0) < 1:
                raise LmforgeError(f"model.{name}={getattr(self, name)} must be in [0, 1)")

    @property
    def attention_dropout_rate(self) -> float:
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.mlp == "swiglu":
            hidden = int(2 * 4 * self.d_model / 3)
            return 64 * ((hidden + 63) // 64)
        return 4 * self.d_model


@dataclass
class DataConfig:
    path: str = ""
    """A text file, a folder of text files, or a prepared dataset; empty = bundled Shakespeare."""
    tokenizer: str = "auto"
    """char, byte, train:N (a byte-level BPE of N tokens trained on the training split of
    text data), or a tokenizer folder (tokenizer.json or GPT-2's encoder.json + vocab.bpe);
    auto = char for text, the dataset's own tokenizer for prepared data."""
    val_fraction: float = 0.1
    """Last fraction of the text (by characters) held out for validation, as nanoGPT does."""
    text_field: list[str] = field(default_factory=lambda: ["text"])
    """json/jsonl/parquet/csv data: the record fields joined into a document's text."""
    val_path: str = ""
    """Post-training: a file of validation records; empty = the last val_fraction of data.path."""
    sampling: str = "random"
    """Pretraining: random (windows at random offsets, as nanoGPT) or packed (each block-size
    window of the token stream once per epoch, in a seeded order). Post-training: bucketed
    (examples of similar length padded together; the default there) or packed (examples end
    to end in block-size windows, each attending only to itself)."""
    within_document: bool = False
    """packed only: attention and positions restart at each end-of-text token."""

    def __post_init__(self) -> None:
        _check_choice("data.sampling", self.sampling, ("random", "packed", "bucketed"))
        if self.within_document and self.sampling != "packed":
            raise LmforgeError("data.within_document needs data.sampling=packed")
        if not 0 < self.val_fraction < 1:
            raise LmforgeError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        trained_bpe_size(self.tokenizer, "data.tokenizer")


@dataclass
class ParallelConfig:
    """How a torchrun job's processes split the work (lmforge/train/distributed.py builds one
    DeviceMesh from these, outer to inner: pp, dp_replicate, dp_shard, tp). Their product is
    the world size; -1 in dp_replicate or dp_shard takes whatever the others leave."""

    dp_replicate: int = -1
    """Data-parallel replicas (DDP; with dp_shard > 1, HSDP: replicas of sharded groups)."""
    dp_shard: int = 1
    """Data-parallel shards (FSDP2, ZeRO-3): parameters, gradients and optimizer states split
    over these processes."""
    tp: int = 1
    """Tensor-parallel degree: each block's projections split over this many processes (each
    runs n_head / tp heads and ffn / tp channels), untied embeddings and head over the
    vocabulary; combines with dp_shard, not dp_replicate."""
    pp: int = 1
    """Pipeline stages: the blocks split into this many consecutive groups, one per process
    (no other parallelism yet; needs model.tie_embeddings=false)."""
    pp_schedule: str = "1f1b"
    """Pipeline schedule over a step's accumulation micro-batches: gpipe (all forwards, then
    all backwards) or 1f1b (one forward, one backward: fewer activations held)."""
    reshard_after_forward: bool = True
    """FSDP: free the gathered parameters after the forward (ZeRO-3); false keeps them until
    the backward (ZeRO-2-like: more memory, one all-gather less per step)."""
    cpu_offload: bool = False
    """FSDP: keep parameters, gradients and optimizer states in CPU memory between uses
    (CPUOffloadPolicy); the optimizer steps on the CPU."""

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise LmforgeError(f"train.parallel.{name}={value} must be >= 1, or -1 (the rest)")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise LmforgeError(
                "train.parallel.dp_replicate and dp_shard are both -1: set one of them"
            )
        _check_positive("train.parallel.tp", self.tp)
        _check_positive("train.parallel.pp", self.pp)
        _check_choice("train.parallel.pp_schedule", self.pp_schedule, ("gpipe", "1f1b"))

    def sizes(self, world_size: int) -> dict[str, int]:
        """{pp, dp_replicate, dp_shard, tp} for `world_size` processes, -1 filled in; a layout
        whose product is not the world size is an error."""
        fixed = self.pp * self.tp * max(self.dp_replicate, 1) * max(self.dp_shard, 1)
        rest = world_size // fixed if world_size % fixed == 0 else 0
        sizes = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard}
        sizes = {k: rest if v == -1 else v for k, v in (sizes | {"tp": self.tp}).items()}
        if math.prod(sizes.values()) != world_size:
            asked = dict(
                pp=self.pp, dp_replicate=self.dp_replicate, dp_shard=self.dp_shard, tp=self.tp
            )
            layout = ", ".join(f"{k}={v}" for k, v in asked.items() if v != 1)
            raise LmforgeError(
                f"train.parallel ({layout}) does not multiply to the world size {world_size}: "
                "the product of pp, dp_replicate, dp_shard and tp must equal torchrun's "
                "--nproc-per-node x --nnodes (-1 takes the rest)"
            )
        return sizes


def check_model_split(m: ModelConfig, tp: int, pp: int) -> None:
    """What tensor and pipeline parallel need of the model alone: equal shares of heads and
    channels per TP rank, full factors, no more stages than blocks (Config checks it, and so
    does `lmforge plan` for the world sizes it plans)."""
    if tp > 1:
        for name, value in (
            ("n_head", m.n_head),
            ("n_kv_head", m.kv_heads),
            ("ffn_hidden", m.ffn_dim),
        ):
            if value % tp:
                raise LmforgeError(
                    f"train.parallel.tp={tp} does not divide model.{name}={value}: each "
                    "rank takes an equal share of the heads and hidden channels"
                )
        if m.low_rank is not None:
            raise LmforgeError("train.parallel.tp > 1 cannot split model.low_rank's factors")
    if pp > m.n_layer:
        raise LmforgeError(f"train.parallel.pp={pp} is more stages than model.n_layer={m.n_layer}")


def stage_layers(n_layer: int, stages: int, stage: int) -> range:
    """The blocks of `stage`: consecutive, as even as possible, earlier stages taking the
    remainder (the last stage also runs the head)."""
    base, extra = divmod(n_layer, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


@dataclass
class TrainConfig:
    """How to train. The defaults are the default job's recipe without dropout (Muon, 2,800
    steps of 8 x 256 tokens), chosen by measured time to quality on a 2-core CPU
    (BENCHMARKS.md); `lmforge train` with no arguments adds late dropout and a time limit
    (lmforge/cli/train.py DEFAULT_JOB); post-training verbs put their own defaults on top
    (lmforge/cli/options.py FINE_TUNING_DEFAULTS)."""

    seed: int = 1337
    """Fixes init, data order and dropout: same seed, same run (bitwise on CPU)."""
    max_steps: int = 2800
    """Optimizer steps; the LR schedule is laid out over them."""
    micro_batch_size: int = 8
    """Sequences per forward/backward pass (per process)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (per process); global batch = micro * accum * world."""
    batch_ramp_interval: int = 0
    """If > 0, start at 1 accumulation step and double it every this many steps up to grad_accum_steps."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    schedule: str = "cosine"
    """cosine (warmup + cosine to min_lr), wsd (warmup-stable-decay), inverse_sqrt, constant."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final linear decay to min_lr."""
    optimizer: str = "muon"
    """adamw, or muon: Muon (momentum orthogonalised by Newton-Schulz) for the transformer
    blocks' 2-D weight matrices, AdamW (lr, weight_decay, betas) for everything else:
    embeddings, head, norms, biases."""
    muon_lr: float = 0.02
    """muon: peak learning rate of the Muon matrices (the schedule scales it as it scales lr)."""
    muon_momentum: float = 0.95
    """muon: Nesterov momentum of the Muon matrices."""
    muon_weight_decay: float = 0.0
    """muon: decoupled weight decay of the Muon matrices."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, on parameters of dim >= 2 only."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing (training loss only; eval is plain)."""
    dropout_start: int = 0
    """Steps trained without dropout before model.dropout and model.attention_dropout turn
    on ("late dropout", Liu et al. 2023): the first steps learn at full speed, dropout then
    holds back overfitting."""
    ema_decay: float = 0.0
    """> 0: evaluate and save an exponential moving average of the weights with this decay
    (Polyak averaging; ~1 / (1 - decay) steps long; lmforge/train/ema.py) while training the
    weights themselves; 0 = off. The decay warms up as n / (n + 9) at update n, so it reaches
    0.95 at update 171 and 0.99 at 891: a shorter run averages with the warm-up's decay. One
    process or DDP only (not sharded, tensor or pipeline parallel)."""
    objective: str = "causal"
    """Pretraining objective: causal (next-token prediction) or mlm (BERT's masked-language
    modelling: predict the tokens hidden in the input; needs model.causal=false)."""
    mask_prob: float = 0.15
    """mlm: share of each sequence's real tokens selected for prediction (of those 80% become
    [MASK], 10% a random token, 10% stay)."""
    nsp: bool = False
    """mlm: add BERT's next-sentence prediction: each sequence is [CLS] A [SEP] B [SEP], B the
    text after A or a random span (half each), classified from the [CLS] position."""
    precision: str = "auto"
    """auto (bf16 on capable GPUs; on CPUs bf16 where native bf16 matmuls measure faster, else
    fp32), fp32, bf16 or fp16 (with dynamic loss scaling)."""
    compile: bool = False
    """torch.compile the model (pays off on GPUs; not on small CPU models)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass to save memory."""
    log_interval: int = 10
    """Steps between metrics rows."""
    eval_interval: int = 250
    """Steps between evaluations on the validation split."""
    eval_steps: int = 20
    """Validation batches per evaluation, the same batches every time; 0: the whole validation
    split, every token once (causal pretraining; post-training always evaluates every
    held-out example)."""
    eval_generations: int = 32
    """Post-training: held-out prompts answered greedily at each evaluation (val_end_rate)."""
    eval_max_new_tokens: int = 96
    """Post-training: longest answer generated at evaluation; one that has not ended with the
    end-of-turn token by then counts as not ended."""
    ckpt_interval: int = 500
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    best_metric: str | None = None
    """The evaluation figure that picks the best checkpoint (`checkpoints/best`, kept from
    pruning) among those written at an evaluation: lower is better for a loss, perplexity,
    bits per byte or KL (val_loss, val_ppl, val_bpb, val_kl), higher for anything else
    (val_accuracy, val_f1, val_reward...). null: val_loss, or val_reward for `lmforge ppo`,
    whose held-out figures have no loss."""
    max_minutes: float | None = None
    """Stop cleanly (final eval and checkpoint) after this much training wall time; null or 0 =
    no limit (`lmforge train` with no arguments, the default job, sets 5)."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses or gradients after which the run stops."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How torchrun's processes split the work: data, sharded, tensor and pipeline parallel."""

    def __post_init__(self) -> None:
        _check_choice(
            "train.schedule", self.schedule, ("cosine", "wsd", "inverse_sqrt", "constant")
        )
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check_choice("train.optimizer", self.optimizer, ("adamw", "muon"))
        _check_choice("train.objective", self.objective, ("causal", "mlm"))
        if not 0 < self.mask_prob < 1:
            raise LmforgeError(f"train.mask_prob={self.mask_prob} must be in (0, 1)")
        if self.nsp and self.objective != "mlm":
            raise LmforgeError("train.nsp=true needs train.objective=mlm (BERT pretraining)")
        for name in (
            "max_steps",
            "micro_batch_size",
            "grad_accum_steps",
            "log_interval",
            "eval_interval",
            "ckpt_interval",
            "max_bad_steps",
        ):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.eval_steps", self.eval_steps, allow_zero=True)
        if self.best_metric is not None and not self.best_metric.startswith("val_"):
            raise LmforgeError(
                f"train.best_metric={self.best_metric!r} must name an evaluation figure "
                "(val_loss, val_accuracy, ...)"
            )
        if self.eval_steps == 0 and self.objective != "causal":
            raise LmforgeError(
                "train.eval_steps=0 (the whole validation split) is for objective=causal; "
                "a masked LM's validation draws its masks per batch: give a number of batches"
            )
        _check_positive("train.lr", self.lr)
        _check_positive("train.muon_lr", self.muon_lr)
        _check_positive("train.max_minutes", self.max_minutes, allow_zero=True)
        for name in (
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "batch_ramp_interval",
            "keep_last",
            "label_smoothing",
            "dropout_start",
            "muon_momentum",
            "muon_weight_decay",
        ):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if self.min_lr > self.lr:
            raise LmforgeError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise LmforgeError(f"train.ema_decay={self.ema_decay} must be in [0, 1) (0 = off)")
        par = self.parallel
        if self.ema_decay and (par.dp_shard != 1 or par.tp > 1 or par.pp > 1):
            raise LmforgeError(
                "train.ema_decay averages whole weights: it works on one process or DDP, "
                "not with train.parallel.dp_shard, tp or pp > 1"
            )


HEADS = ("lm", "classifier", "reward")


@dataclass
class RunConfig:
    name: str = ""
    """Run folder name under run.dir; empty = a timestamped name."""
    dir: str = "runs"
    """Folder that holds the run folders."""
    device: str = "auto"
    """auto (cuda > mps > cpu), or a torch device string."""
    tensorboard: bool = True
    """Write TensorBoard events to <run>/tensorboard."""
    wandb_project: str = ""
    """Log to this Weights & Biases project as well (needs `pip install wandb`)."""
    mlflow: bool = False
    """Log to MLflow as well (needs `pip install mlflow`)."""
    sample_tokens: int = 300
    """Length of the sample printed at the end of training (0: none)."""
    base: str = ""
    """Post-training: the checkpoint (or run folder) the run starts from (`--base`)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device, the MFU denominator; None = a table of known GPUs,
    else a matmul measured at start-up in the run's precision."""
    head: str = "lm"
    """What the model outputs: lm (next-token logits), classifier (classify.labels) or reward
    (one score per text). Set by the verb that trains it; lmforge.load builds the model by it."""

    def __post_init__(self) -> None:
        _check_positive("run.peak_tflops", self.peak_tflops)
        if self.head not in HEADS:
            raise LmforgeError(
                f"run.head={self.head!r} must be one of {', '.join(HEADS)}"
                f"{did_you_mean(self.head, HEADS)}"
            )


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning, applied from outside the model (lmforge/model/peft.py)
    and usable with every training objective: only the method's parameters train."""

    method: str = "none"
    """none (every parameter trains), lora, prefix or ptuning."""
    rank: int = 8
    """lora: rank r of the update B @ A added to each targeted Linear."""
    alpha: float = 16.0
    """lora: the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """lora: dropout on the adapter's input."""
    targets: list[str] = field(default_factory=lambda: ["attn.q", "attn.k", "attn.v", "attn.proj"])
    """lora: Linear layers to adapt, by name pattern (fnmatch on the module name, e.g.
    'attn.*', '*.mlp.proj'); a pattern without '*' matches names ending with it. A block's
    Linears: attn.q, attn.k, attn.v, attn.proj; mlp.fc (or SwiGLU's mlp.gate and mlp.up),
    mlp.proj."""
    num_virtual_tokens: int = 16
    """prefix: learned key/value positions per layer; ptuning: learned input embeddings."""
    encoder_hidden: int = 16
    """prefix/ptuning: hidden size of the reparametrisation MLP (ptuning: of the prompt encoder)
    used during training and folded into plain parameters when saved. Its parameters train,
    so it sets most of the trainable share (16: under 1% of a 5.5M-parameter model)."""
    encoder: str = "mlp"
    """ptuning: the prompt encoder, mlp or lstm."""

    def __post_init__(self) -> None:
        _check_choice("peft.method", self.method, ("none", "lora", "prefix", "ptuning"))
        _check_choice("peft.encoder", self.encoder, ("mlp", "lstm"))
        _check_positive("peft.rank", self.rank)
        _check_positive("peft.alpha", self.alpha)
        _check_positive("peft.num_virtual_tokens", self.num_virtual_tokens, allow_zero=True)
        _check_positive("peft.encoder_hidden", self.encoder_hidden)
        if not 0 <= self.dropout < 1:
            raise LmforgeError(f"peft.dropout={self.dropout} must be in [0, 1)")
        if self.method == "lora" and not self.targets:
            raise LmforgeError("peft.targets is empty: name the Linear layers LoRA adapts")


POOLINGS = ("last", "mean")


def check_pooling(option: str, pooling: str) -> None:
    """One error line unless `pooling` is one of POOLINGS; `option` names the setting."""
    if pooling not in POOLINGS:
        raise LmforgeError(
            f"{option}={pooling!r} must be {' or '.join(POOLINGS)}{did_you_mean(pooling, POOLINGS)}"
        )


@dataclass
class ClassifyConfig:
    """Sequence classification (`lmforge classify`): a head on the pooled hidden states."""

    text_field: str = "text"
    """The record field holding the text to classify."""
    label_field: str = "label"
    """The record field holding its label."""
    pairs: str = ""
    """Turn each record into one example per FIELD=LABEL pair instead, e.g.
    'chosen=polite,rejected=rude' for preference data."""
    unless_equal_to: str = ""
    """With pairs: skip a pair's text when it equals this field of its record. In the bundled
    preferences one answer of each pair is the neutral original (`output`) and only the other
    was made polite or rude, so the originals carry no sign of their label."""
    labels: list[str] = field(default_factory=list)
    """The label names, in the head's order; filled from the training data (a checkpoint's
    config keeps them, which makes lmforge.load return a classifier)."""
    freeze_base: bool = False
    """Train only the head (transfer learning); the base model stays as it was."""
    lm_weight: float = 0.0
    """Weight of an auxiliary next-token loss on the same texts (GPT-1's lambda, 0.5 there);
    0 trains on the labels alone."""
    pooling: str = "last"
    """What the head reads: 'last' (the last real token, the only one that has seen the whole
    text) or 'mean' (the mean of every real token's final hidden state)."""

    def __post_init__(self) -> None:
        check_pooling("classify.pooling", self.pooling)
        if self.lm_weight < 0:
            raise LmforgeError(f"classify.lm_weight={self.lm_weight} must be >= 0")
        for item in filter(None, self.pairs.split(",")):
            if "=" not in item:
                raise LmforgeError(f"classify.pairs item {item!r} must look like FIELD=LABEL")


@dataclass
class RewardConfig:
    """Reward model (`lmforge reward`): a scalar head trained on preference pairs."""

    margin: float = 0.0
    """Bradley-Terry with a margin: -log sigmoid(r_chosen - r_rejected - margin)."""
    pooling: str = "last"
    """What the scalar head reads: 'last' or 'mean', as classify.pooling."""

    def __post_init__(self) -> None:
        check_pooling("reward.pooling", self.pooling)


@dataclass
class DPOConfig:
    """Direct preference optimisation (`lmforge dpo`) against a frozen reference (the base)."""

    beta: float = 0.1
    """Strength of the leash to the reference (the implicit reward is beta * log-ratio)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo or hinge (SLiC)."""

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise LmforgeError(f"dpo.beta={self.beta} must be > 0")
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            raise LmforgeError(
                f"dpo.loss_type={self.loss_type!r} must be sigmoid, ipo or hinge"
                f"{did_you_mean(self.loss_type, ['sigmoid', 'ipo', 'hinge'])}"
            )


PPO_ALGOS = ("ppo", "grpo")


@dataclass
class PPOConfig:
    """RL from a reward model (`lmforge ppo`): rollouts sampled from the policy, scored, and
    optimised with clipped policy-gradient steps on a KL leash to the frozen base."""

    algo: str = "ppo"
    """ppo (value head + GAE, KL penalty in the reward) or grpo (group-normalised rewards as
    advantages, no value head, KL term in the loss)."""
    reward: str = ""
    """The reward model checkpoint (`lmforge reward`) that scores the answers."""
    rollout_batch: int = 64
    """Answers sampled per rollout (per rank); a multiple of the optimizer batch."""
    group_size: int = 4
    """grpo: answers sampled per prompt, normalised within the group (ppo samples each once)."""
    epochs: int = 2
    """Passes of optimizer steps over each rollout batch."""
    max_new_tokens: int = 64
    """Longest answer sampled; prompts that leave less room in the block are dropped."""
    temperature: float = 1.0
    """Sampling temperature; log-probabilities are taken at the same temperature."""
    kl_coef: float = 0.05
    """beta: ppo's per-token KL penalty in the reward, grpo's KL term in the loss."""
    kl_target: float = 0.0
    """ppo: > 0 adapts kl_coef to hold this KL per answer (nats; Ziegler et al. 2019);
    0 keeps it fixed."""
    kl_horizon: int = 10000
    """Adaptive KL: answers over which kl_coef may move by about the proportional error."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip: float = 0.2
    """Policy ratio clip range (1 - clip, 1 + clip)."""
    value_clip: float = 0.2
    """Clip of the value prediction around its rollout value."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    whiten: bool = True
    """ppo: normalise advantages over each rollout's answer tokens."""
    missing_end_penalty: float = 0.0
    """Subtracted from the reward of an answer cut at max_new_tokens without ending its turn."""
    eval_prompts: int = 0
    """Held-out prompts answered at each evaluation (0 = all)."""

    def __post_init__(self) -> None:
        if self.algo not in PPO_ALGOS:
            raise LmforgeError(
                f"ppo.algo={self.algo!r} must be one of {', '.join(PPO_ALGOS)}"
                f"{did_you_mean(self.algo, PPO_ALGOS)}"
            )
        for name in ("rollout_batch", "group_size", "epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"ppo.{name}={getattr(self, name)} must be >= 1")
        if self.algo == "grpo" and self.group_size < 2:
            raise LmforgeError(f"ppo.group_size={self.group_size}: grpo needs >= 2 per prompt")
        if self.algo == "grpo" and self.rollout_batch % self.group_size:
            raise LmforgeError(
                f"ppo.rollout_batch={self.rollout_batch} must be a multiple of "
                f"ppo.group_size={self.group_size}"
            )
        if self.temperature <= 0:
            raise LmforgeError(f"ppo.temperature={self.temperature} must be > 0 (sampled)")
        for name in ("kl_coef", "kl_target", "clip", "value_clip", "vf_coef", "entropy_coef",
                     "missing_end_penalty", "eval_prompts"):  # fmt: skip
            if getattr(self, name) < 0:
                raise LmforgeError(f"ppo.{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise LmforgeError(f"ppo.gamma={self.gamma} and ppo.lam={self.lam} must be in [0, 1]")


@dataclass
class QuantizeConfig:
    """How a checkpoint's weights are stored and run (`lmforge quantize` sets it; loading
    rebuilds the quantized layers from it)."""

    method: str = "none"
    """none, int8 (weight-only, one scale per output channel) or int4 (weight-only, one scale
    and zero point per group of group_size input columns)."""
    group_size: int = 128
    """int4: input columns per scale; must divide every quantized layer's input width."""
    activations: str = "none"
    """none, or int8: activations quantized per token on the fly, so matmuls run int8 x int8
    (int8 weights only)."""

    def __post_init__(self) -> None:
        _check_choice("quantize.method", self.method, ("none", "int8", "int4"))
        _check_choice("quantize.activations", self.activations, ("none", "int8"))
        _check_positive("quantize.group_size", self.group_size)
        if self.activations == "int8" and self.method != "int8":
            raise LmforgeError("quantize.activations=int8 needs quantize.method=int8")


@dataclass
class DistillConfig:
    """Knowledge distillation (`lmforge distill`, Hinton et al. 2015): a new student trained
    on a frozen teacher's softened next-token distributions and on the hard labels."""

    teacher: str = ""
    """The teacher checkpoint (or run folder), `--teacher`; its tokenizer and, unless data.path
    is given, its training data are the student's."""
    alpha: float = 0.9
    """Weight of the soft-target term, in [0, 1]; the hard labels' cross-entropy gets 1 - alpha
    (0 = plain pretraining). 0.9 and T = 1 did best of alpha 0.5-0.9, T 1-2 in
    benchmarks/distill_vs_scratch.py (Shakespeare, llama-tiny student)."""
    temperature: float = 1.0
    """T > 0 softening both distributions; the soft term is scaled by T^2 so its gradients
    keep their size as T changes."""

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise LmforgeError(f"distill.alpha={self.alpha} must be in [0, 1]")
        if not 0 < self.temperature < float("inf"):
            raise LmforgeError(f"distill.temperature={self.temperature} must be a number > 0")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        self._check_parallel()
        if self.train.objective == "mlm":
            if self.model.causal:
                raise LmforgeError(
                    "train.objective=mlm needs a bidirectional model: add --model.causal=false"
                )
            if self.data.within_document:
                raise LmforgeError(
                    "train.objective=mlm cannot use data.within_document (its masks are causal)"
                )
        if self.train.nsp and self.data.sampling != "random":
            raise LmforgeError(
                "train.nsp=true draws its own sentence pairs: use data.sampling=random"
            )

    def _check_parallel(self) -> None:
        """What tensor and pipeline parallel need of the model and data, before any process
        group or run folder exists: equal shares of heads and channels per TP rank; no more
        stages than blocks, untied embeddings (the first stage holds one, the last the other),
        enough micro-batches for 1F1B, plain causal windows between stages."""
        m, t, tp, pp = self.model, self.train, self.train.parallel.tp, self.train.parallel.pp
        check_model_split(m, tp, pp)
        if pp == 1:
            return
        if m.tie_embeddings:
            raise LmforgeError(
                "train.parallel.pp > 1 needs model.tie_embeddings=false: the embedding sits on "
                "the first stage and the head on the last"
            )
        if t.parallel.pp_schedule == "1f1b" and (t.grad_accum_steps < pp or t.batch_ramp_interval):
            raise LmforgeError(
                f"train.parallel.pp_schedule=1f1b needs train.grad_accum_steps >= pp ({pp}) "
                "micro-batches in every step (and no batch ramp); raise it or use gpipe"
            )
        if self.data.within_document or t.objective != "causal":
            raise LmforgeError(
                "train.parallel.pp > 1 trains plain causal windows: it cannot pass "
                "data.within_document's document ids or train.objective=mlm between stages"
            )


# ---------------------------------------------------------------- `lmforge prepare`'s tree


def record_slice(spec: str, what: str) -> slice:
    """'start:stop' (either may be empty) -> slice(start, stop); '' -> every record."""
    bounds = spec.split(":") if spec else ["", ""]
    try:
        start, stop = (int(x) if x.strip() else None for x in bounds)
    except ValueError:
        start = stop = -1  # reported below
    if len(bounds) != 2 or any(x is not None and x < 0 for x in (start, stop)):
        raise LmforgeError(
            f"{what}={spec!r} is not 'start:stop' (counts >= 0, either may be empty)"
        )
    return slice(start, stop)


@dataclass
class CleanConfig:
    """Thresholds of the cleaning stage; 0 or None disables a rule."""

    min_words: int = 50
    """Documents with fewer words are dropped."""
    max_words: int = 100_000
    """Documents with more words are dropped (0 = no limit)."""
    min_mean_word_length: float = 3.0
    """Lowest mean word length in characters (Gopher: 3)."""
    max_mean_word_length: float = 10.0
    """Highest mean word length in characters (Gopher: 10; 0 = no limit)."""
    max_symbol_word_ratio: float = 0.1
    """'#' and ellipses per word (Gopher: 0.1)."""
    min_alpha_word_fraction: float = 0.8
    """Fraction of words holding at least one letter (Gopher: 0.8)."""
    min_punct_line_fraction: float = 0.0
    """Fraction of non-empty lines ending in punctuation (C4 keeps only such lines; 0 = off)."""
    max_dup_line_fraction: float = 0.3
    """Fraction of lines that repeat an earlier line (Gopher: 0.3)."""
    max_top_ngram_fraction: dict[int, float] = field(
        default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16}
    )
    """n -> max share of characters in the single most frequent word n-gram (Gopher)."""
    max_dup_ngram_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 7: 0.13, 10: 0.10}
    )
    """n -> max share of characters inside word n-grams that occur more than once (Gopher)."""
    languages: list[str] = field(default_factory=list)
    """Keep only these ISO 639-1 codes (py3langid); empty = no language filter."""
    min_language_score: float = 0.5
    """Lowest language-identification probability of a kept document."""
    pii: bool = False
    """Replace e-mails, phone numbers and IP addresses with <EMAIL>, <PHONE>, <IP>."""
    blocklist: list[str] = field(default_factory=list)
    """Words or phrases (case-insensitive, whole words) that drop a document."""
    blocklist_file: str = ""
    """A file with one blocked word or phrase per line, added to `blocklist`."""

    def __post_init__(self) -> None:
        for name in ("min_words", "max_words", "min_mean_word_length", "max_symbol_word_ratio"):
            if getattr(self, name) < 0:
                raise LmforgeError(f"clean.{name} must be >= 0")
        for name in ("min_alpha_word_fraction", "min_punct_line_fraction", "max_dup_line_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise LmforgeError(f"clean.{name} must be in [0, 1]")
        if self.blocklist_file and not Path(self.blocklist_file).is_file():
            raise LmforgeError(f"clean.blocklist_file not found: {self.blocklist_file}")


@dataclass
class SourceConfig:
    """One named source of the mixture."""

    name: str = ""
    """Names the source in reports and its intermediate files: a plain file-name component."""
    paths: list[str] = field(default_factory=list)
    """Files, folders (read recursively), globs, http(s) URLs, or `.urls` files listing URLs."""
    weight: float | None = None
    """Share of training tokens; None everywhere = every source in its natural proportion."""
    text_field: list[str] = field(default_factory=lambda: ["text"])
    """Fields (json/jsonl), columns (parquet/csv) joined by a blank line into a document."""
    records: str = ""
    """Only these records of each json/jsonl/parquet/csv file, as a Python slice 'start:stop'
    (e.g. ':990' = the first 990, to keep held-out records out of pretraining); empty = all.
    Records without the text fields do not count."""
    split: str = "file"
    """How plain-text files become documents: file (one each), blank_lines (paragraphs), lines."""
    chunk_bytes: int = 65536
    """If > 0, plain-text documents are cut at line ends into pieces of about this size (a
    book becomes many documents, which the mixture can sample and dedup can compare; 0 =
    never cut)."""
    on_invalid_utf8: str = "replace"
    """replace (U+FFFD, counted) or skip (the document is dropped, counted)."""
    clean: CleanConfig | None = None
    """This source's cleaning: the global `clean` section with the keys given here laid over it
    (a recipe gives only those that differ, e.g. {min_words: 3}); None = the global section."""

    def __post_init__(self) -> None:
        record_slice(self.records, f"source {self.name!r}: records")
        plain_name(self.name, "source name")
        if self.split not in ("file", "blank_lines", "lines"):
            raise LmforgeError(
                f"source {self.name!r}: split={self.split!r} is not file, blank_lines or lines"
            )
        if self.on_invalid_utf8 not in ("replace", "skip"):
            raise LmforgeError(f"source {self.name!r}: on_invalid_utf8 must be replace or skip")
        if self.weight is not None and self.weight < 0:
            raise LmforgeError(f"source {self.name!r}: weight must be >= 0")


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal across all sources."""

    exact: bool = True
    """Drop documents whose case- and whitespace-normalised text was seen before."""
    near: bool = True
    """Drop near-duplicates (MinHash LSH over word shingles)."""
    shingle_size: int = 5
    """Words per shingle."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    bands: int = 16
    """LSH bands; num_perm / bands rows each. Pairs with Jaccard above ~(1/bands)^(1/rows)
    become candidates (0.71 for 16 x 8)."""
    threshold: float = 0.7
    """Estimated Jaccard similarity of shingle sets at or above which two documents are duplicates."""
    seed: int = 1
    """Seed of the MinHash permutations."""

    def __post_init__(self) -> None:
        if self.shingle_size < 1 or self.num_perm < 1 or self.bands < 1:
            raise LmforgeError("dedup.shingle_size, num_perm and bands must be >= 1")
        if self.num_perm % self.bands:
            raise LmforgeError(
                f"dedup.num_perm={self.num_perm} is not divisible by dedup.bands={self.bands}"
            )
        if not 0 < self.threshold <= 1:
            raise LmforgeError(f"dedup.threshold={self.threshold} must be in (0, 1]")


@dataclass
class FetchConfig:
    """HTTP(S) fetching of URL sources."""

    timeout_s: float = 10.0
    """One deadline per request for connecting, the headers, redirects and the whole body."""
    retries: int = 2
    """Extra attempts after timeouts, connection errors and 5xx answers (not after 4xx)."""
    max_bytes: int = 10_000_000
    """Bodies larger than this are skipped (outcome `too_large`)."""
    user_agent: str = "lmforge"
    """User-Agent header, also the name looked up in robots.txt."""
    respect_robots: bool = True
    """Skip URLs that the host's robots.txt disallows (outcome `robots_disallowed`)."""
    allow_private_addresses: bool = False
    """Fetch from private, loopback, link-local (cloud metadata) and other non-global
    addresses too. Off by default: a URL list must not reach into the machine's own network;
    checked against the address actually connected to, redirects and DNS changes included."""


@dataclass
class PrepareSettings:
    """The `prepare` section: tokenizer, validation split, mixture size, shards, processes."""

    tokenizer: str = "train:8192"
    """train:VOCAB (byte-level BPE trained on the cleaned train documents), char, byte, or a
    tokenizer folder."""
    tokenizer_sample_bytes: int = 500_000_000
    """At most this much text (drawn round-robin from the sources) trains the tokenizer."""
    val_fraction: float = 0.05
    """Share of each source's text held out for validation, 0 to 0.5, in UTF-8 bytes (decided
    before the tokenizer exists): whole documents when they reach it within about a point,
    else the rest is the tail of one document."""
    min_split_tokens: int = 1025
    """A split with fewer tokens is warned about: training needs block_size + 1 tokens per
    split (1025 for a 1024-token model)."""
    seed: int = 1337
    """Fixes the validation split and the mixture's sampling."""
    total_tokens: int = 0
    """Training tokens to write when sources have weights; 0 = as many as the sources hold."""
    tokens_per_shard: int = 100_000_000
    """Tokens per shard file (a document never straddles two)."""
    workers: int = 0
    """Processes for cleaning and MinHash (those of the local cluster too); 0 = all cores."""
    executor: str = "local"
    """Where cleaning and MinHash run: local (processes on this machine) or dask (the workers
    of a Dask cluster: `pip install 'lmforge[cluster]'`). Both give the same bytes: dedup,
    split, mixture and shards stay in this process."""
    cluster_address: str = ""
    """executor=dask: the scheduler of a running cluster (tcp://HOST:8786); empty = start a
    local cluster of `workers` processes for this run and stop it after."""
    cluster_timeout_s: float = 10.0
    """executor=dask: seconds to wait for the scheduler to answer and for a worker, then stop
    with an error instead of hanging."""

    def __post_init__(self) -> None:
        _check_choice("prepare.executor", self.executor, ("local", "dask"))
        _check_positive("prepare.cluster_timeout_s", self.cluster_timeout_s)
        if not 0 <= self.val_fraction <= 0.5:
            raise LmforgeError(
                f"prepare.val_fraction={self.val_fraction} must be in [0, 0.5] (--val-fraction)"
            )
        trained_bpe_size(self.tokenizer, "prepare.tokenizer")
        _check_positive("prepare.tokenizer_sample_bytes", self.tokenizer_sample_bytes)
        _check_positive("prepare.tokens_per_shard", self.tokens_per_shard)
        _check_positive("prepare.total_tokens", self.total_tokens, allow_zero=True)
        _check_positive("prepare.workers", self.workers, allow_zero=True)
        _check_positive("prepare.min_split_tokens", self.min_split_tokens, allow_zero=True)


@dataclass
class PrepareConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """The mixture: a YAML list of {name, paths, weight, text_field, split, chunk_bytes,
    on_invalid_utf8, clean} mappings, e.g. [{name: web, paths: [web/], weight: 0.7}]."""
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)

    def __post_init__(self) -> None:
        weights = [s.weight for s in self.sources]
        if any(w is None for w in weights) and any(w is not None for w in weights):
            raise LmforgeError("give every source a weight, or none (natural proportions)")
        if weights and all(w is not None for w in weights) and sum(weights) <= 0:
            raise LmforgeError("source weights must not all be zero")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise LmforgeError(f"source names must be unique, got {names}")
        for src in self.sources:  # built in Python rather than by build_prepare_config
            if src.clean is None:
                src.clean = self.clean


# ---------------------------------------------------------------- loading


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass a field holds directly, optionally or as list items, else None."""
    for t in (tp, *typing.get_args(tp)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def dataclass_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree, sections included ('train', 'train.lr', ...; list
    items without an index: 'sources.clean.min_words'): the candidates for 'did you mean'."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        keys.append(f"{prefix}{f.name}")
        nested = _nested_dataclass(hints[f.name])
        if nested is not None:
            keys += dataclass_keys(nested, f"{prefix}{f.name}.")
    return keys


@contextmanager
def _friendly_errors(candidates: list[str], where: str = "") -> Iterator[None]:
    """OmegaConf's merge and assignment errors as one line; an unknown key names the nearest
    of `candidates`. `where` prefixes the keys of a node checked on its own ('sources[1]')."""
    try:
        yield
    except OmegaConfBaseException as e:
        if isinstance(e.__cause__, LmforgeError):  # a __post_init__ check
            raise e.__cause__ from None
        key = ".".join(k for k in (where, getattr(e, "full_key", None) or "") if k)
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
            raise LmforgeError(
                f"unknown config key '{key}'{did_you_mean(key, candidates)}"
            ) from None
        raise LmforgeError(f"bad value for config key '{key}': {str(e).splitlines()[0]}") from None


def _parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['--train.lr=3e-4', 'model.n_layer=2'] -> nested dict (values parsed as YAML scalars)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise LmforgeError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LmforgeError(f"config key '{key}' is set twice with different shapes")
        node[parts[-1]] = value
    return nested


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping, or one clear error line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LmforgeError(
            f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise LmforgeError(f"config file {path} must hold a mapping of sections")
    return data


def _read_layers(
    layers: tuple[dict[str, Any] | str | Path, ...],
    overrides: list[str],
    on_yaml: Callable[[dict[str, Any], Path], dict[str, Any]] = lambda data, folder: data,
) -> list[dict[str, Any]]:
    """Each layer as a dict (YAML files read, then passed through `on_yaml` with their
    folder), and the overrides parsed into the last one."""
    dicts = [
        on_yaml(read_yaml(x), Path(x).parent) if isinstance(x, (str, Path)) else x for x in layers
    ]
    return [*dicts, _parse_overrides(list(overrides))]


def build_config(*layers: dict[str, Any] | str | Path, overrides: list[str] = ()) -> Config:
    """Merge defaults <- preset <- each layer (dict or YAML path) <- overrides into a checked Config."""
    from lmforge.model.presets import preset_values

    dicts = _read_layers(layers, overrides)
    with _friendly_errors(dataclass_keys(Config)):
        schema = OmegaConf.structured(Config)
        preset = preset_values(OmegaConf.merge(schema, *dicts).model.preset)
        return OmegaConf.to_object(OmegaConf.merge(schema, {"model": preset}, *dicts))


def _recipe_relative_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A recipe's relative source paths that are missing from the working directory but exist
    next to the recipe point there (globs and URLs are left alone)."""
    sources = data.get("sources")
    for src in sources if isinstance(sources, list) else []:
        if isinstance(src, dict) and isinstance(src.get("paths"), list):
            src["paths"] = [
                str(folder / p)
                if isinstance(p, str)
                and not Path(p).exists()
                and not any(c in p for c in "*?[")
                and "://" not in p
                and (folder / p).exists()
                else p
                for p in src["paths"]
            ]
    return data


def _source_node(i: int, raw: Any, clean: DictConfig) -> DictConfig:
    """sources[i] checked against SourceConfig, holding its full clean settings: the global
    `clean` section with the source's own keys assigned over it one by one (a value replaces,
    so `max_top_ngram_fraction: {}` turns that rule off for this source)."""
    where = f"sources[{i}]"
    if dataclasses.is_dataclass(raw):
        raw = dataclasses.asdict(raw)
    if not isinstance(raw, dict):
        raise LmforgeError(f"config key '{where}' must be a mapping (name, paths, weight, ...)")
    raw = dict(raw)
    own_clean = raw.pop("clean", None) or {}
    if not isinstance(own_clean, dict):
        raise LmforgeError(f"config key '{where}.clean' must be a mapping, e.g. {{min_words: 3}}")
    candidates = [f"{where}.{k}" for k in dataclass_keys(SourceConfig)]
    with _friendly_errors(candidates, where):
        node = OmegaConf.merge(OmegaConf.structured(SourceConfig), raw)
        node.clean = copy.deepcopy(clean)
        for key, value in own_clean.items():
            node.clean[key] = value
    return node


def build_prepare_config(
    *layers: dict[str, Any] | str | Path, overrides: list[str] = ()
) -> PrepareConfig:
    """Merge defaults <- each layer (dict or YAML path) <- overrides into a checked PrepareConfig.

    `sources` is a list: the last layer that gives one replaces earlier ones (as OmegaConf does
    with lists). Each source is checked on its own, so errors name it (`sources[1].weight`).
    Relative source paths in a YAML file resolve against its folder when they are not found
    from the working directory."""
    dicts = _read_layers(layers, overrides, on_yaml=_recipe_relative_paths)
    sources = None
    for d in dicts:
        sources = d.get("sources", sources)
    if sources is not None and not isinstance(sources, (list, tuple)):
        raise LmforgeError("config key 'sources' must be a list of {name, paths, ...} mappings")
    candidates = dataclass_keys(PrepareConfig)
    with _friendly_errors(candidates):
        merged = OmegaConf.merge(
            OmegaConf.structured(PrepareConfig),
            *({k: v for k, v in d.items() if k != "sources"} for d in dicts),
        )
    merged.sources = [_source_node(i, s, merged.clean) for i, s in enumerate(sources or [])]
    with _friendly_errors(candidates):
        return OmegaConf.to_object(merged)


def model_config(**overrides: Any) -> ModelConfig:
    """A ModelConfig from a preset plus field overrides, e.g. model_config(preset='tiny', n_layer=3)."""
    return build_config({"model": overrides}).model


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each dataclass field (litgpt's habit), for --help."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


_DEFAULTS: dict[type, Callable[[], Any]] = {
    Config: build_config,
    PrepareConfig: build_prepare_config,
}
"""How each root's defaults are resolved for --help (train's through its preset)."""


def describe_keys(root: type = Config) -> list[tuple[str, Any, str]]:
    """(key, resolved default, doc) for every key of a root's tree (Config, PrepareConfig): one
    row per field of each section; a list section (`sources`) is one row."""
    defaults = to_dict(_DEFAULTS[root]())
    hints = typing.get_type_hints(root)
    rows = []
    for section in dataclasses.fields(root):
        section_cls = hints[section.name]
        if not dataclasses.is_dataclass(section_cls):
            doc = field_docs(root).get(section.name, "")
            rows.append((section.name, defaults[section.name], doc))
            continue
        docs = field_docs(section_cls)
        for f in dataclasses.fields(section_cls):
            rows.append(
                (f"{section.name}.{f.name}", defaults[section.name][f.name], docs.get(f.name, ""))
            )
    return rows
