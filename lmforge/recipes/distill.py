"""Knowledge distillation (Hinton et al. 2015): a new student model pretrained on a frozen
teacher's softened next-token distributions as well as the hard labels (DistillLoss), on the
one Trainer and the pretraining data and loaders (lmforge/recipes/pretrain.py).

`distill_config(teacher, preset)` builds the student's config over the teacher's data section,
so by default the student reads the data the teacher was trained on; `distill(cfg)` checks
that the pair fits (one tokenizer, one vocabulary, a context the teacher covers), trains and
reports as `lmforge train` does. Evaluation gives the student's plain cross-entropy
(val_loss), comparable with a student trained from scratch; the run folder and checkpoints
are those of any pretraining run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lmforge.common import LmforgeError, print0, seed_everything
from lmforge.config import Config, build_config
from lmforge.data.loader import load_pretrain_data
from lmforge.model.gpt import GPT
from lmforge.recipes.pretrain import loaders, report
from lmforge.recipes.run import run_folder
from lmforge.tokenizer import Tokenizer, load_tokenizer, tokenizer_hash
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import destroy_distributed, init_distributed
from lmforge.train.losses import CausalLMLoss, DistillLoss
from lmforge.train.trainer import Trainer

MISMATCH = "teacher/student tokenizer mismatch"


def distill_config(
    teacher: str | Path,
    student_preset: str,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """The teacher's data section <- the student's preset <- --config <- overrides, with
    distill.teacher set."""
    teacher_cfg = ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(teacher))
    layers = [
        {"data": dataclasses.asdict(teacher_cfg.data)},
        {"model": {"preset": student_preset}},
        *([config_file] if config_file else []),
    ]
    return build_config(*layers, overrides=[f"--distill.teacher={teacher}", *overrides])


def distill(
    cfg: Config,
    resume: str | Path | None = None,
    on_eval: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Distil cfg.distill.teacher into a new model per cfg.model (or continue the run folder
    `resume`). Returns the last metrics, as pretrain.train does."""
    info = init_distributed(cfg.run.device, cfg.train.parallel)
    try:
        if not cfg.distill.teacher:
            raise LmforgeError("no teacher: give --teacher CKPT (a checkpoint or run folder)")
        teacher_dir = ckpt.resolve_checkpoint(cfg.distill.teacher)
        cfg.distill.teacher = str(teacher_dir.resolve())  # a resumed run finds it from anywhere
        teacher_cfg = ckpt.load_checkpoint_config(teacher_dir)
        _check_student(cfg, teacher_cfg, teacher_dir)
        teacher, tokenizer = ckpt.load(teacher_dir)
        if tokenizer is None:
            raise LmforgeError(f"{teacher_dir} has no tokenizer/, so the data cannot be encoded")
        _check_tokenizer(cfg, teacher_cfg, tokenizer, teacher_dir)
        seed_everything(cfg.train.seed)  # as pretraining: same seed, same data and init
        data = load_pretrain_data(cfg.data, tokenizer)
        if data.tokenizer is not tokenizer and tokenizer_hash(data.tokenizer) != tokenizer_hash(
            tokenizer
        ):  # prepared data brings its own
            raise LmforgeError(
                f"{MISMATCH}: {cfg.data.path} was prepared with another tokenizer than the "
                f"teacher's ({teacher_dir}); prepare it with the teacher's tokenizer/ folder"
            )
        model = GPT(cfg.model)
        if info.enabled:
            torch.manual_seed(cfg.train.seed + info.rank)  # distinct dropout per rank
        run_dir = run_folder(cfg, resume, info)
        train_loader, validation = loaders(cfg, data, info)
        d = cfg.distill
        trainer = Trainer(
            cfg, model, train_loader, validation, run_dir, info,
            loss_fn=DistillLoss(teacher, d.alpha, d.temperature, cfg.train.label_smoothing),
            eval_loss_fn=CausalLMLoss(), tokenizer=tokenizer,
            bytes_per_token=data.bytes_per_token, on_eval=on_eval,
        )  # fmt: skip
        trainer.resume(resume)
        print0(
            f"distill {run_dir}: student {_millions(model)} parameters ({cfg.model.preset}), "
            f"teacher {_millions(teacher)} ({teacher_dir}); "
            f"alpha {d.alpha}, temperature {d.temperature}; device {info.device}, "
            f"precision {trainer.precision}, world size {info.layout}"
        )
        result = trainer.fit()
        if info.sharded:  # the sample runs on rank 0 alone: a plain copy of the weights
            model = ckpt.gather_model(trainer.model, cfg)
        if info.is_main:
            report(cfg, model, tokenizer, run_dir, result)
        return result
    finally:
        destroy_distributed()


def _millions(model: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"


def _check_student(cfg: Config, teacher_cfg: Config, teacher_dir: Path) -> None:
    """The student is a whole new causal LM over the teacher's vocabulary (which fills
    model.vocab_size) and within its context."""
    if teacher_cfg.run.head != "lm" or not teacher_cfg.model.causal:
        raise LmforgeError(
            f"teacher {teacher_dir} is not a causal language model (run.head="
            f"{teacher_cfg.run.head}, model.causal={teacher_cfg.model.causal})"
        )
    if not cfg.model.causal or cfg.train.objective != "causal":
        raise LmforgeError("lmforge distill trains a causal student: drop model.causal=false")
    if cfg.peft.method != "none":
        raise LmforgeError(
            f"peft.method={cfg.peft.method}: lmforge distill trains every weight of a new "
            "student; drop --peft.method"
        )
    vocab = teacher_cfg.model.vocab_size
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size != vocab:
        raise LmforgeError(
            f"{MISMATCH}: the student's model.vocab_size={cfg.model.vocab_size} differs from "
            f"the teacher's {vocab} ({teacher_dir}); drop it (the student takes the teacher's)"
        )
    if cfg.model.block_size > teacher_cfg.model.block_size:
        raise LmforgeError(
            f"model.block_size={cfg.model.block_size} is longer than the teacher's context "
            f"({teacher_cfg.model.block_size}); give --model.block_size="
            f"{teacher_cfg.model.block_size} or less"
        )


def _check_tokenizer(
    cfg: Config, teacher_cfg: Config, tokenizer: Tokenizer, teacher_dir: Path
) -> None:
    """data.tokenizer, if the user changed it from the teacher's, must name the teacher's
    tokenizer: the student always learns with the teacher's."""
    spec = cfg.data.tokenizer
    if spec == teacher_cfg.data.tokenizer:
        return
    if Path(spec).is_dir() and tokenizer_hash(load_tokenizer(spec)) == tokenizer_hash(tokenizer):
        return
    raise LmforgeError(
        f"{MISMATCH}: data.tokenizer={spec} is not the teacher's tokenizer ({tokenizer.kind}, "
        f"{tokenizer.vocab_size} tokens, in {teacher_dir}); drop --data.tokenizer, the "
        "student learns with the teacher's"
    )
