"""Knowledge distillation: DistillLoss against its formula on fixed logits (alpha = 0 is plain
cross-entropy, a student equal to its teacher has no KL), a distill run at alpha = 0 equal to
pretraining, a teacher that never changes, the CLI end to end, and one-line errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, rerun_from_step
from torch import nn

import lmforge
from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.config import build_config, model_config
from lmforge.data.loader import bundled_text_path
from lmforge.engine import Engine, SamplingParams
from lmforge.model.gpt import GPT
from lmforge.recipes import distill as distill_recipe
from lmforge.recipes.distill import distill, distill_config
from lmforge.recipes.pretrain import train
from lmforge.train.checkpoint import resolve_checkpoint
from lmforge.train.losses import CausalLMLoss, DistillLoss

TRAIN = {
    "max_steps": 4,
    "micro_batch_size": 4,
    "warmup_steps": 1,
    "log_interval": 1,
    "eval_interval": 2,
    "eval_steps": 2,
    "precision": "fp32",  # exact comparisons; 'auto' may pick bf16 on this CPU
}
RUN = {"tensorboard": False, "sample_tokens": 0}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A run folder of a tiny char-level model, briefly trained on 40k characters."""
    root = tmp_path_factory.mktemp("teacher")
    text = root / "shakespeare_40k.txt"
    text.write_text(bundled_text_path().read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    cfg = build_config(
        {
            "run": {**RUN, "dir": str(root), "name": "t"},
            "model": {"preset": "tiny"},
            "data": {"path": str(text)},
            "train": TRAIN,
        }
    )
    train(cfg)
    return root / "t"


def student_cfg(teacher: Path, run_dir: Path, name: str, *overrides: str):
    return distill_config(
        teacher,
        "tiny",
        overrides=[f"--run.dir={run_dir}", f"--run.name={name}", "--model.n_layer=1", *overrides]
        + [f"--train.{k}={v}" for k, v in TRAIN.items()]
        + [f"--run.{k}={v}" for k, v in RUN.items()],
    )


class Fixed(nn.Module):
    """A 'model' whose logits are given, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, input_ids, **_):
        return self.logits


def tiny_batch(vocab: int = 40) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8))
    labels = torch.randint(0, vocab, (2, 8))
    labels[0, :3] = -100  # positions without loss take no part in either term
    return {"input_ids": ids, "labels": labels}


def test_the_loss_is_its_formula_on_fixed_logits():
    student = torch.tensor([[[0.3, -1.0, 2.0], [1.5, 0.0, -0.5]]])  # (1, 2, 3)
    teacher = torch.tensor([[[1.0, 2.0, 0.5], [-1.0, 0.5, 3.0]]])
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.tensor([[2, 0]])}
    alpha, T = 0.7, 2.0

    def softmax(z):
        e = [math.exp(x / T) for x in z]
        return [x / sum(e) for x in e]

    kl = ce = 0.0
    for s, t, label in zip(student[0].tolist(), teacher[0].tolist(), [2, 0]):
        p, q = softmax(t), softmax(s)
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
        ce += -(s[label] - math.log(sum(math.exp(x) for x in s)))  # at T = 1
    loss, metrics = DistillLoss(Fixed(teacher), alpha, T)(Fixed(student), batch)
    assert metrics["kd_kl"].item() == pytest.approx(kl, rel=1e-6)
    assert metrics["kd_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(alpha * T**2 * kl + (1 - alpha) * ce, rel=1e-6)


def test_alpha_0_is_plain_cross_entropy_exactly():
    torch.manual_seed(0)
    student = GPT(model_config(preset="tiny", vocab_size=40))
    teacher = GPT(model_config(preset="tiny", vocab_size=40, n_layer=1))
    batch = tiny_batch()
    loss, _ = DistillLoss(teacher, alpha=0.0, temperature=2.0)(student, batch)
    plain, _ = CausalLMLoss()(student, batch)
    assert torch.equal(loss, plain)
    assert DistillLoss(teacher, 0.0, 2.0).units(batch) == CausalLMLoss().units(batch) == 13


def test_a_student_equal_to_its_teacher_has_no_kl():
    torch.manual_seed(0)
    teacher = GPT(model_config(preset="tiny", vocab_size=40))
    student = GPT(model_config(preset="tiny", vocab_size=40))
    student.load_state_dict(teacher.state_dict())
    loss, metrics = DistillLoss(teacher, alpha=1.0, temperature=1.5)(student, tiny_batch())
    assert metrics["kd_kl"].item() == pytest.approx(0.0, abs=1e-5)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_distilling_at_alpha_0_is_pretraining_bitwise(teacher, tmp_path):
    """Same config, seed, data and init: only the loss differs from a run from scratch, so the
    benchmark's comparison is fair."""
    cfg = student_cfg(teacher, tmp_path, "d", "--distill.alpha=0")
    distill(cfg)
    train(student_cfg(teacher, tmp_path, "s"))
    ours, scratch = read_metrics(tmp_path / "d"), read_metrics(tmp_path / "s")
    assert [r.get("loss") for r in ours] == [r.get("loss") for r in scratch]
    assert [r.get("val_loss") for r in ours] == [r.get("val_loss") for r in scratch]


def test_the_teacher_never_changes(teacher, tmp_path, monkeypatch):
    used = []

    class Recording(DistillLoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            used.append(self.teacher)

    monkeypatch.setattr(distill_recipe, "DistillLoss", Recording)
    distill(student_cfg(teacher, tmp_path, "d", "--distill.alpha=1"))
    original, _ = lmforge.load(teacher)
    (model,) = used
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for (name, p), q in zip(model.state_dict().items(), original.state_dict().values()):
        assert torch.equal(p, q), name


def test_the_cli_trains_a_student_that_loads_and_generates(teacher, tmp_path):
    args = ["distill", "--teacher", str(teacher), "--student-preset", "tiny"]
    args += [f"--run.dir={tmp_path}", "--run.name=s", "--model.n_layer=1"]
    args += [f"--train.{k}={v}" for k, v in TRAIN.items()] + ["--run.tensorboard=false"]
    assert main(args) == 0
    rows = read_metrics(tmp_path / "s")
    assert {"kd_kl", "kd_ce", "loss"} <= set(rows[1]) and "val_ppl" in rows[-1]
    model, tok = lmforge.load(resolve_checkpoint(tmp_path / "s"))
    assert model.config.n_layer == 1 and tok.vocab_size == lmforge.load(teacher)[1].vocab_size
    params = SamplingParams(max_new_tokens=5, temperature=0)
    (ids,) = Engine(model).generate([tok.encode("ROMEO:")], params)
    assert len(ids) == 5


def test_a_distill_run_resumes_in_a_new_process_with_the_same_losses(teacher, tmp_path):
    args = ["distill", "--teacher", str(teacher), "--student-preset", "tiny"]
    args += [f"--run.dir={tmp_path}", "--run.name=s", "--model.n_layer=1"]
    args += [f"--train.{k}={v}" for k, v in TRAIN.items()] + ["--run.tensorboard=false"]
    assert main([*args, "--train.ckpt_interval=2", "--model.dropout=0.1"]) == 0
    rows = read_metrics(tmp_path / "s")
    resumed = rerun_from_step(tmp_path / "s", "distill", 2)
    figures = lambda rs: [(r["step"], r["loss"], r["kd_kl"]) for r in rs if "loss" in r]  # noqa: E731
    assert figures(resumed) == figures(rows) and len(figures(rows)) == 4


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.tokenizer=byte", "teacher/student tokenizer mismatch: data.tokenizer=byte"),
        ("--model.vocab_size=300", "teacher/student tokenizer mismatch: the student's model."),
        ("--distill.alpha=1.5", "distill.alpha=1.5 must be in [0, 1]"),
        ("--distill.temperature=0", "distill.temperature=0.0 must be a number > 0"),
    ],
)
def test_errors_are_one_line_and_exit_1(teacher, tmp_path, capsys, override, message):
    args = ["distill", "--teacher", str(teacher), "--student-preset", "tiny", override]
    assert main([*args, f"--run.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lmforge: error: {message}") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing was written


def test_bad_alpha_and_temperature_are_config_errors():
    for section, message in [
        ({"alpha": -0.1}, "distill.alpha=-0.1 must be in [0, 1]"),
        ({"temperature": -1.0}, "distill.temperature=-1.0 must be a number > 0"),
    ]:
        with pytest.raises(LmforgeError, match=re.escape(message)):
            build_config({"distill": section})
