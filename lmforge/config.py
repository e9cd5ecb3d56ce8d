"""The one typed config tree: defaults live here, YAML files and `--a.b=v` overrides merge on top.

Merging and type checks are OmegaConf's (structured configs); this module adds the preset
layer (`model.preset` fills model fields before the user's values), value checks in
`__post_init__`, and error lines that name the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lmforge.common import LmforgeError


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
    ffn_hidden: int | None = None
    """FFN hidden size; None = 4*d_model for GELU, Llama's 2/3*4*d_model rounded up to 64 for SwiGLU."""
    mlp: str = "gelu"
    """gelu (exact), gelu_tanh (GPT-2's approximation) or swiglu (Llama)."""
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
    """If set, each token attends to at most this many most recent tokens (itself included)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block (linearly increasing from 0 over depth)."""
    tie_embeddings: bool = True
    """Share the output head's weight with the token embedding."""
    init_std: float = 0.02
    """Standard deviation of the GPT-2 weight init."""

    def __post_init__(self) -> None:
        _check_choice("model.mlp", self.mlp, ("gelu", "gelu_tanh", "swiglu"))
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
        if self.d_model % self.n_head:
            raise LmforgeError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
            )
        if self.n_head % self.kv_heads:
            raise LmforgeError(
                f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.kv_heads}"
            )
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise LmforgeError(f"RoPE needs an even head dim, got {self.head_dim}")
        if not 0 <= self.dropout < 1 or not 0 <= self.drop_path < 1:
            raise LmforgeError("model.dropout and model.drop_path must be in [0, 1)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

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
    tokenizer: str = "char"
    """char, byte, or a tokenizer folder (tokenizer.json or GPT-2's encoder.json + vocab.bpe)."""
    val_fraction: float = 0.1
    """Last fraction of the text (by position) held out for validation, as nanoGPT does."""
    sampling: str = "random"
    """random: windows at random offsets (nanoGPT); packed: each block-size window of the
    token stream once per epoch, in a seeded order."""
    within_document: bool = False
    """packed only: attention and positions restart at each end-of-text token."""

    def __post_init__(self) -> None:
        _check_choice("data.sampling", self.sampling, ("random", "packed"))
        if self.within_document and self.sampling != "packed":
            raise LmforgeError("data.within_document needs data.sampling=packed")
        if not 0 < self.val_fraction < 1:
            raise LmforgeError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")


@dataclass
class TrainConfig:
    seed: int = 1337
    """Fixes init, data order and dropout: same seed, same run (bitwise on CPU)."""
    max_steps: int = 1350
    """Optimizer steps; the LR schedule is laid out over them."""
    micro_batch_size: int = 32
    """Sequences per forward/backward pass (per process)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (per process); global batch = micro * accum * world."""
    batch_ramp_interval: int = 0
    """If > 0, start at 1 accumulation step and double it every this many steps up to grad_accum_steps."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr: float = 3e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    schedule: str = "cosine"
    """cosine (warmup + cosine to min_lr), wsd (warmup-stable-decay), inverse_sqrt, constant."""
    decay_fraction: float = 0.2
    """wsd: fraction of max_steps spent in the final linear decay to min_lr."""
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
    precision: str = "auto"
    """auto (bf16 on capable GPUs, fp32 on CPU), fp32, bf16 or fp16 (with dynamic loss scaling)."""
    compile: bool = False
    """torch.compile the model (pays off on GPUs; not on small CPU models)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass to save memory."""
    log_interval: int = 10
    """Steps between metrics rows."""
    eval_interval: int = 250
    """Steps between evaluations on the validation split."""
    eval_steps: int = 20
    """Validation batches per evaluation (the same batches every time)."""
    ckpt_interval: int = 500
    """Steps between checkpoints (one is always written at the end)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    max_minutes: float | None = 5.0
    """Stop cleanly (final eval and checkpoint) after this much training wall time; 0 or null = no limit."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses or gradients after which the run stops."""

    def __post_init__(self) -> None:
        _check_choice(
            "train.schedule", self.schedule, ("cosine", "wsd", "inverse_sqrt", "constant")
        )
        _check_choice("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        for name in (
            "max_steps",
            "micro_batch_size",
            "grad_accum_steps",
            "log_interval",
            "eval_interval",
            "eval_steps",
            "ckpt_interval",
            "max_bad_steps",
        ):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.lr", self.lr)
        _check_positive("train.max_minutes", self.max_minutes, allow_zero=True)
        for name in (
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "batch_ramp_interval",
            "keep_last",
            "label_smoothing",
        ):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if self.min_lr > self.lr:
            raise LmforgeError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}")


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


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def dataclass_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass tree, sections included ('train', 'train.lr', ...):
    the candidates for 'did you mean' suggestions."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += dataclass_keys(type(default), f"{prefix}{f.name}.")
        keys.append(f"{prefix}{f.name}")
    return keys


def _friendly(err: OmegaConfBaseException) -> LmforgeError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        near = difflib.get_close_matches(key, dataclass_keys(Config), n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return LmforgeError(f"unknown config key '{key}'{hint}")
    return LmforgeError(f"bad value for config key '{key}': {msg}")


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


def build_config(*layers: dict[str, Any] | str | Path, overrides: list[str] = ()) -> Config:
    """Merge defaults <- preset <- each layer (dict or YAML path) <- overrides into a checked Config."""
    dicts = [read_yaml(x) if isinstance(x, (str, Path)) else x for x in layers]
    dicts.append(_parse_overrides(list(overrides)))
    try:
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, *dicts)
        from lmforge.model.presets import preset_values

        preset = preset_values(merged.model.preset)
        merged = OmegaConf.merge(schema, {"model": preset}, *dicts)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        cause = e.__cause__ if isinstance(e.__cause__, LmforgeError) else None
        if cause is not None:
            raise cause from None
        raise _friendly(e) from None


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


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, resolved default, doc) for every config key, defaults as the default job has them."""
    defaults = to_dict(build_config())
    rows = []
    for section in dataclasses.fields(Config):
        section_cls = type(section.default_factory())
        docs = field_docs(section_cls)
        for f in dataclasses.fields(section_cls):
            rows.append(
                (f"{section.name}.{f.name}", defaults[section.name][f.name], docs.get(f.name, ""))
            )
    return rows
