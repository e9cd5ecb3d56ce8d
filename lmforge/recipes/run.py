"""What every recipe does around its own data and loss: choosing the run folder, for
post-training loading the base checkpoint the run starts from, and drawing a run's curves."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from lmforge.common import LmforgeError
from lmforge.config import Config, ModelConfig
from lmforge.model.gpt import GPT, require_causal
from lmforge.tokenizer import Tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo, broadcast_object


def new_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise LmforgeError(
            f"run folder {run_dir} already exists; resume it with --resume={run_dir} "
            "or choose another --run.name"
        )
    return run_dir


def run_folder(cfg: Config, resume: str | Path | None, info: DistInfo) -> Path:
    """The folder being resumed, or a new one chosen on rank 0 and shared with every rank."""
    if resume:
        return Path(resume)
    return broadcast_object(new_run_dir(cfg) if info.is_main else None)


def load_base(cfg: Config, causal_task: str | None = None) -> tuple[Path, object, Tokenizer]:
    """(checkpoint, model in train mode, tokenizer) of cfg.run.base, which is rewritten as an
    absolute path: adapter checkpoints find their base by it. Needs --base and --data. A verb
    that learns from next-token log-probabilities names itself in `causal_task`, and a
    bidirectional base (a masked-LM encoder) is refused before anything loads."""
    if not cfg.run.base:
        raise LmforgeError("no base model: give --base CKPT (a checkpoint or run folder)")
    if not cfg.data.path:
        raise LmforgeError("no data: give --data FILE (json/jsonl records)")
    base = ckpt.resolve_checkpoint(cfg.run.base)
    cfg.run.base = str(base.resolve())
    base_model = ckpt.load_checkpoint_config(base).model
    if causal_task:
        require_causal(base_model, causal_task)
    check_architecture(cfg.model, base_model, base)
    model, tokenizer = ckpt.load(base)
    if tokenizer is None:
        raise LmforgeError(f"{base} has no tokenizer/, so the data cannot be encoded")
    for module in model.modules():
        if isinstance(module, GPT):
            module.set_regularisation(
                cfg.model.dropout, cfg.model.drop_path, cfg.model.attention_dropout
            )
    return base, model.train(), tokenizer


# model fields that hold no weights: a fine-tuning run may set its own
REGULARISATION = {"dropout", "attention_dropout", "drop_path"}


def check_architecture(wanted: ModelConfig, base_model: ModelConfig, base: Path) -> None:
    """A post-training run's model section is its base's, plus overrides: only regularisation
    may differ, since the weights fix everything else."""
    for name in (f.name for f in dataclasses.fields(ModelConfig)):
        ours, theirs = getattr(wanted, name), getattr(base_model, name)
        if name not in REGULARISATION and ours != theirs:
            raise LmforgeError(
                f"model.{name}={ours} differs from the base's {theirs} ({base}); fine-tuning "
                f"keeps the base's architecture and may change only {sorted(REGULARISATION)}"
            )


def fit_and_plot(trainer) -> dict:
    """trainer.fit(), then the run's curves (loss, reward, KL, ...) drawn into its report/
    folder on the main rank. Returns fit()'s result."""
    from lmforge.common import print0

    result = trainer.fit()
    if trainer.dist.is_main:
        from lmforge.eval.report import write_run_report

        print0(f"curves: {write_run_report(trainer.run_dir)}")
    return result
