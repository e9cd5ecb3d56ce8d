"""Sequence classification: a linear head on the last real token (or the mean of all real
tokens, classify.pooling) of a base checkpoint, trained with cross-entropy on the one
Trainer; the base fine-tuned fully, frozen (transfer learning: only the head trains) or
through any PEFT method.

Evaluation (step 0, every eval_interval, the end) reports val_loss, val_accuracy and
val_f1 (macro-F1) on the held-out split; the run folder gets confusion.json at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.common import LmforgeError, print0, seed_everything
from lmforge.config import Config
from lmforge.data.classify import load_labelled, pad_batch
from lmforge.data.example_loader import ExampleLoader
from lmforge.model.heads import SequenceClassifier
from lmforge.model.peft import apply_peft, trainable_share
from lmforge.recipes.run import load_base, run_folder
from lmforge.train.distributed import destroy_distributed, init_distributed
from lmforge.train.losses import ClassificationLoss
from lmforge.train.trainer import Trainer


def pad_labelled(examples, pad_id: int) -> dict[str, torch.Tensor]:
    return pad_batch([e.input_ids for e in examples], [e.label for e in examples], pad_id)


@torch.no_grad()
def confusion(model: SequenceClassifier, batches) -> torch.Tensor:
    """(C, C) counts: row = true label, column = predicted."""
    was_training = model.training
    model.eval()
    n = len(model.labels)
    matrix = torch.zeros(n, n, dtype=torch.long)
    for batch in batches:
        predicted = model(batch["input_ids"], batch["attention_mask"]).argmax(-1)
        matrix += torch.bincount(batch["label"] * n + predicted, minlength=n * n).view(n, n)
    model.train(was_training)
    return matrix


def macro_f1(matrix: torch.Tensor) -> float:
    tp = matrix.diag().double()
    precision = tp / matrix.sum(0).clamp(min=1)
    recall = tp / matrix.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return f1.mean().item()


def classify(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Train a classifier on cfg.run.base (or continue the run folder `resume`)."""
    info = init_distributed(cfg.run.device, cfg.train.parallel, "lmforge classify")
    try:
        seed_everything(cfg.train.seed)
        base, base_model, tokenizer = load_base(cfg)
        block = base_model.config.block_size
        train_ex, val_ex, labels = load_labelled(
            tokenizer, cfg.data.path, cfg.data.val_fraction, cfg.data.val_path, cfg.classify, block
        )
        if cfg.classify.labels and cfg.classify.labels != labels:
            raise LmforgeError(
                f"the data's labels {labels} are not the run's {cfg.classify.labels}"
            )
        cfg.classify.labels = labels
        cfg.run.head = "classifier"
        backbone = apply_peft(base_model, cfg.peft)
        if cfg.classify.freeze_base:
            backbone.requires_grad_(False)
        model = SequenceClassifier(backbone, labels, cfg.classify.pooling)
        trainable, total = trainable_share(model)
        t = cfg.train
        pad_id = tokenizer.pad_id or 0
        loader_args = (t.micro_batch_size, block, pad_id, t.seed, info.dp_rank, info.dp_size)
        train_loader = ExampleLoader(train_ex, *loader_args, pad=pad_labelled)
        val_loader = ExampleLoader(val_ex, *loader_args, pad=pad_labelled)

        def f1() -> dict[str, float]:
            return {"val_f1": macro_f1(confusion(model, val_loader.each_batch_once()))}

        run_dir = run_folder(cfg, resume, info)
        trainer = Trainer(
            cfg, model, train_loader, val_loader.each_batch_once, run_dir, info,
            loss_fn=ClassificationLoss(), tokenizer=tokenizer, extra_eval=f1,
        )  # fmt: skip
        trainer.resume(resume)
        counts = {name: sum(e.label == i for e in train_ex) for i, name in enumerate(labels)}
        print0(
            f"classify {run_dir}: base {base}, {len(train_ex)} train / {len(val_ex)} held-out "
            f"texts, labels {counts}; {trainable:,} of {total:,} parameters train "
            f"({trainable / total:.2%}{', base frozen' if cfg.classify.freeze_base else ''})"
        )
        result = trainer.fit()
        if info.is_main:
            matrix = confusion(model, val_loader.each_batch_once())
            (run_dir / "confusion.json").write_text(
                json.dumps(
                    {"labels": labels, "rows_true_columns_predicted": matrix.tolist()}, indent=2
                )
            )
            print0(
                f"held-out confusion (rows true, columns predicted; {labels}): {matrix.tolist()}"
            )
        return result
    finally:
        destroy_distributed()
