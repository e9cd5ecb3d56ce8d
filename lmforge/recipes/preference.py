"""Learning from preference pairs (chosen vs rejected answers to one prompt) on the one
Trainer, from a base checkpoint, with any PEFT method:

- `reward(cfg)`: a reward model, a scalar head on the last real token (or the mean of all,
  reward.pooling) trained with the Bradley-Terry loss; held-out `val_accuracy` (pairwise)
  and `val_margin`.
- `dpo(cfg)`: direct preference optimisation of the base against a frozen copy of itself;
  held-out `val_accuracy` (implicit reward of chosen > rejected), `val_margin` and `val_kl`
  (KL to the reference over the chosen answers' tokens, nats per answer).

Both hold out the last `data.val_fraction` of the records (lmforge/data/preference.py), log an
evaluation at step 0 and at every eval interval, and draw their curves into the run folder's
report/ (lmforge/eval/report.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.common import print0, seed_everything
from lmforge.config import Config
from lmforge.data.example_loader import ExampleLoader
from lmforge.data.preference import load_pairs, pad_pairs
from lmforge.model.heads import RewardModel
from lmforge.model.peft import apply_peft, trainable_share
from lmforge.recipes.run import fit_and_plot, load_base, run_folder
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import destroy_distributed, init_distributed
from lmforge.train.losses import DPOLoss, LossFn, RewardLoss
from lmforge.train.trainer import Trainer


def reward(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train a reward model on cfg.run.base (or continue the run folder `resume`)."""
    cfg.run.head = "reward"
    return _fit_pairs(
        cfg,
        resume,
        "reward",
        lambda base_model: RewardModel(apply_peft(base_model, cfg.peft), cfg.reward.pooling),
        lambda: RewardLoss(cfg.reward.margin),
        causal_task=None,  # a score from pooled states: a bidirectional encoder serves too
    )


def dpo(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """DPO-train cfg.run.base against a frozen copy of it (or continue `resume`)."""

    def reference_loss() -> LossFn:
        reference, _ = ckpt.load(ckpt.resolve_checkpoint(cfg.run.base))
        return DPOLoss(reference, cfg.dpo.beta, cfg.dpo.loss_type)

    return _fit_pairs(
        cfg, resume, f"dpo ({cfg.dpo.loss_type}, beta {cfg.dpo.beta})",
        lambda base_model: apply_peft(base_model, cfg.peft), reference_loss,
        causal_task="be DPO-trained (lmforge dpo)",
    )  # fmt: skip


def _fit_pairs(
    cfg: Config,
    resume: str | Path | None,
    verb: str,
    make_model: Callable[[nn.Module], nn.Module],
    make_loss: Callable[[], LossFn],
    causal_task: str | None,
) -> dict[str, Any]:
    """Train on preference pairs; `causal_task` as load_base takes it (None: any base)."""
    info = init_distributed(cfg.run.device, cfg.train.parallel, f"lmforge {verb.split()[0]}")
    try:
        seed_everything(cfg.train.seed)
        base, base_model, tokenizer = load_base(cfg, causal_task)
        block = base_model.config.block_size
        train, val, stats = load_pairs(
            tokenizer, cfg.data.path, cfg.data.val_fraction, cfg.data.val_path, block
        )
        model = make_model(base_model)
        trainable, total = trainable_share(model)
        t = cfg.train
        pad_id = tokenizer.pad_id or 0
        loader_args = (t.micro_batch_size, block, pad_id, t.seed, info.dp_rank, info.dp_size)
        train_loader = ExampleLoader(train, *loader_args, pad=pad_pairs)
        val_loader = ExampleLoader(val, *loader_args, pad=pad_pairs)
        run_dir = run_folder(cfg, resume, info)
        trainer = Trainer(
            cfg, model, train_loader, val_loader.each_batch_once, run_dir, info,
            loss_fn=make_loss(), tokenizer=tokenizer,
        )  # fmt: skip
        trainer.resume(resume)
        print0(
            f"{verb} {run_dir}: base {base}, {len(train)} train / {len(val)} held-out pairs "
            f"({stats.identical} with chosen == rejected skipped, {stats.too_long} longer than "
            f"block_size {block} dropped); peft {cfg.peft.method}: {trainable:,} of {total:,} "
            f"parameters train ({trainable / total:.2%})"
        )
        return fit_and_plot(trainer)
    finally:
        destroy_distributed()
