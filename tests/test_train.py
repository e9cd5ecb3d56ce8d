"""The Trainer against references: full batch vs accumulation, torch's AdamW, an uninterrupted
run vs resume, DDP vs one process; failure handling; schedules."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line, read_metrics, torchrun
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.data.loader import RandomWindowLoader
from lmforge.model.gpt import GPT
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo
from lmforge.train.losses import CausalLMLoss
from lmforge.train.muon import Muon
from lmforge.train.optim import build_optimizers
from lmforge.train.schedule import accum_steps_at, lr_at
from lmforge.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(text_file: Path, run_dir: Path, **train) -> object:
    overrides = {
        "run": {"dir": str(run_dir), "name": "r", "tensorboard": False, "sample_tokens": 0},
        "model": {"preset": "tiny"},
        "data": {"path": str(text_file)},
        "train": {
            "max_steps": 6,
            "micro_batch_size": 4,
            "warmup_steps": 2,
            "log_interval": 1,
            "eval_interval": 3,
            "eval_steps": 2,
            "ckpt_interval": 3,
            "keep_last": 10,
            "precision": "fp32",  # exact comparisons; 'auto' may pick bf16 on this CPU
            **train,
        },
    }
    return build_config(overrides)


def make_trainer(cfg, tokens: torch.Tensor, run_dir: Path, loss_fn=None) -> Trainer:
    torch.manual_seed(cfg.train.seed)
    cfg.model.vocab_size = 65
    model = GPT(cfg.model)
    loader = RandomWindowLoader(
        [tokens.numpy()], cfg.model.block_size, cfg.train.micro_batch_size, cfg.train.seed
    )
    info = DistInfo(rank=0, world_size=1, device=torch.device("cpu"))
    return Trainer(cfg, model, loader, None, run_dir, info, loss_fn or CausalLMLoss())


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_accumulation_equals_full_batch(text_file, tmp_path):
    tokens = torch.randint(0, 65, (5000,), generator=torch.Generator().manual_seed(0))
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        cfg = tiny_cfg(text_file, tmp_path, micro_batch_size=micro, grad_accum_steps=accum)
        trainer = make_trainer(cfg, tokens, tmp_path / f"{micro}x{accum}")
        initial = _flat(trainer.model).clone()
        for _ in range(3):
            trainer.train_step()
        results.append(_flat(trainer.model))
        assert not torch.equal(results[-1], initial)  # it trained
    full, accumulated = results
    rel = (full - accumulated).norm() / full.norm()
    assert rel <= 5e-6, rel  # fp32 sums in another order: ~1e-6 after 3 AdamW steps


def test_the_weight_average_is_evaluated_and_saved_while_the_weights_train(text_file, tmp_path):
    """train.ema_decay: after every step the average is d * average + (1 - d) * weights, d
    warming up as min(decay, t / (t + 9)); the checkpoint's weights and the evaluation are
    the average's, training goes on from the trained weights, and fit() ends with the model
    holding the average."""
    tokens = torch.randint(0, 65, (5000,), generator=torch.Generator().manual_seed(0))
    cfg = tiny_cfg(text_file, tmp_path, ema_decay=0.8, max_steps=4, ckpt_interval=2)
    trainer = make_trainer(cfg, tokens, tmp_path / "ema")
    expected, trained = _flat(trainer.model).clone(), []
    take_step = trainer.train_step

    def step_and_record():
        row = take_step()
        trained.append(_flat(trainer.model).clone())  # what the optimizer left: trained weights
        return row

    trainer.train_step = step_and_record
    trainer.fit()
    for t, weights in enumerate(trained, start=1):
        d = min(0.8, t / (t + 9))
        expected = d * expected + (1 - d) * weights
    assert not torch.equal(trained[-1], trained[-2])  # it trained
    assert torch.allclose(_flat(trainer.model), expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, trained[-1], atol=1e-4, rtol=0)
    folder = ckpt.resolve_checkpoint(tmp_path / "ema")
    saved = _weights(folder)
    model_names = dict(trainer.model.named_parameters())
    assert all(torch.equal(saved[n], p.detach()) for n, p in model_names.items() if n in saved)
    state = torch.load(folder / ckpt.TRAINER_STATE, weights_only=True)
    kept = torch.cat([state["trained_weights"][n].flatten() for n in model_names])
    assert torch.equal(kept, trained[-1])


class FixedLoader:
    """One fixed global batch every step, split into `accum` micro-batches of equal rows."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def next_step(self, accum: int) -> list[dict[str, torch.Tensor]]:
        rows = self.batch["input_ids"].size(0) // accum
        return [
            {k: v[i * rows : (i + 1) * rows] for k, v in self.batch.items()} for i in range(accum)
        ]

    def state_dict(self) -> dict:
        return {}


def _masked_batch() -> dict[str, torch.Tensor]:
    """8 rows whose target counts differ: rows 2-3 have none at all (every label -100, as
    in SFT prompts), rows 4-7 only a few."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 65, (8, 33), generator=gen)
    labels = ids[:, 1:].clone()
    labels[2:4] = -100
    labels[4:, :28] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


def _train_on(cfg, batch, run_dir, steps=3) -> tuple[torch.Tensor, list[dict]]:
    trainer = make_trainer(cfg, torch.zeros(100, dtype=torch.long), run_dir)
    trainer.train_loader = FixedLoader(batch)
    rows = [trainer.train_step() for _ in range(steps)]
    return _flat(trainer.model), rows


def test_micro_batches_with_unequal_and_zero_targets_equal_the_full_batch(text_file, tmp_path):
    batch = _masked_batch()
    full, full_rows = _train_on(
        tiny_cfg(text_file, tmp_path, micro_batch_size=8), batch, tmp_path / "a"
    )
    cfg = tiny_cfg(text_file, tmp_path, micro_batch_size=2, grad_accum_steps=4)
    accumulated, rows = _train_on(cfg, batch, tmp_path / "b")
    assert all(math.isfinite(r["loss"]) and not r.get("skipped") for r in rows)
    assert (full - accumulated).norm() / full.norm() <= 1e-6
    assert abs(rows[0]["loss"] - full_rows[0]["loss"]) <= 1e-6


def test_a_step_with_no_targets_is_skipped_not_nan(text_file, tmp_path):
    batch = _masked_batch()
    batch["labels"][:] = -100
    trainer = make_trainer(
        tiny_cfg(text_file, tmp_path), torch.zeros(100, dtype=torch.long), tmp_path
    )
    trainer.train_loader = FixedLoader(batch)
    before = _flat(trainer.model).clone()
    row = trainer.train_step()
    assert row["skipped"] and "loss" not in row and torch.equal(_flat(trainer.model), before)
    assert trainer.bad_steps == 0


def test_fp16_overflow_steps_are_flagged(text_file, tmp_path):
    class Huge(CausalLMLoss):  # finite loss, but scaled gradients overflow
        def __call__(self, model, batch):
            loss, metrics = super().__call__(model, batch)
            return loss * 1e30, metrics

    cfg = tiny_cfg(text_file, tmp_path, precision="fp16")
    trainer = make_trainer(cfg, torch.randint(0, 65, (3000,)), tmp_path, loss_fn=Huge())
    before = _flat(trainer.model).clone()
    row = trainer.train_step()
    assert row["skipped"] == "fp16 gradients overflowed" and row["loss_scale"] < 65536.0
    assert torch.equal(_flat(trainer.model), before)


def test_every_metric_a_loss_returns_is_logged(text_file, tmp_path):
    class WithAccuracy(CausalLMLoss):
        def __call__(self, model, batch):
            loss, metrics = super().__call__(model, batch)
            return loss, {**metrics, "correct": self.units(batch) * 0.25}

    cfg = tiny_cfg(text_file, tmp_path, grad_accum_steps=2)
    trainer = make_trainer(cfg, torch.randint(0, 65, (3000,)), tmp_path, loss_fn=WithAccuracy())
    row = trainer.train_step()
    assert row["correct"] == pytest.approx(0.25)
    assert row["tokens"] == 2 * 4 * cfg.model.block_size


def test_adamw_matches_torch_and_the_formula(text_file, tmp_path):
    cfg = tiny_cfg(text_file, tmp_path, optimizer="adamw", weight_decay=0.1, lr=1e-2)
    torch.manual_seed(0)
    cfg.model.vocab_size = 65
    ours_model = GPT(cfg.model)
    ref_model = GPT(cfg.model)
    ref_model.load_state_dict(ours_model.state_dict())
    (ours,) = build_optimizers(ours_model, cfg.train, torch.device("cpu"))
    decay = [p for p in ref_model.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref_model.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-2,
        betas=(cfg.train.beta1, cfg.train.beta2),
        eps=cfg.train.eps,
    )
    # the update written out: decoupled decay, bias-corrected moments
    by_hand = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    m = {n: torch.zeros_like(p) for n, p in by_hand.items()}
    v = {n: torch.zeros_like(p) for n, p in by_hand.items()}
    b1, b2, eps, lr = cfg.train.beta1, cfg.train.beta2, cfg.train.eps, 1e-2
    x = torch.randint(0, 65, (2, 16))
    for t in range(1, 4):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            if model is ours_model:
                for n, p in model.named_parameters():
                    g = p.grad
                    wd = 0.1 if p.dim() >= 2 else 0.0
                    by_hand[n].mul_(1 - lr * wd)
                    m[n].mul_(b1).add_(g, alpha=1 - b1)
                    v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v[n] / (1 - b2**t)).sqrt().add_(eps)
                    by_hand[n].addcdiv_(m[n] / (1 - b1**t), denom, value=-lr)
            opt.step()
    for (n, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(
            p, q, rtol=1e-5, atol=1e-6
        )  # fused kernel vs torch's reference path
        torch.testing.assert_close(p, by_hand[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_trainable_parameter_in_exactly_one_group(text_file, tmp_path, optimizer):
    cfg = tiny_cfg(text_file, tmp_path, optimizer=optimizer)
    cfg.model.vocab_size = 65
    model = GPT(cfg.model)  # the tiny preset ties lm_head to the token embedding
    model.blocks[0].attn.q.weight.requires_grad_(False)  # frozen: in no group
    optimizers = build_optimizers(model, cfg.train, torch.device("cpu"))
    adamw = optimizers[-1]
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.1, 0.0]
    grouped = [id(p) for opt in optimizers for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == trainable
    assert id(model.lm_head.weight) in grouped and id(model.blocks[0].attn.q.weight) not in grouped
    decay, no_decay = adamw.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(
        p.dim() < 2 for p in no_decay["params"]
    )
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    # embeddings (the tied head), norms and biases always go to AdamW; block matrices to Muon
    assert id(model.wte.weight) in in_adamw
    assert all(id(p) in in_adamw for p in model.parameters() if p.dim() < 2)
    if optimizer == "muon":
        muon = optimizers[0]
        assert isinstance(muon, Muon) and len(optimizers) == 2
        matrices = [p for n, p in model.named_parameters() if n.startswith("blocks.")]
        matrices = [p for p in matrices if p.dim() == 2 and p.requires_grad]
        assert [id(p) for p in muon.param_groups[0]["params"]] == [id(p) for p in matrices]
    else:
        assert len(optimizers) == 1


def newton_schulz_by_hand(g: torch.Tensor) -> torch.Tensor:
    """Jordan's quintic Newton-Schulz iteration, 5 steps, written out in fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


def test_a_muon_step_is_newton_schulz_orthogonalised_nesterov_momentum(text_file, tmp_path):
    cfg = tiny_cfg(text_file, tmp_path, optimizer="muon", muon_lr=0.02, muon_weight_decay=0.1)
    cfg.model.vocab_size = 65
    torch.manual_seed(0)
    model = GPT(cfg.model)
    optimizers = build_optimizers(model, cfg.train, torch.device("cpu"))
    weight = model.blocks[0].mlp.fc.weight  # (4d, d): tall, its lr scaled by sqrt(4)
    by_hand, buf = weight.detach().clone(), torch.zeros_like(weight)
    x = torch.randint(0, 65, (2, 16))
    for _ in range(3):
        for opt in optimizers:
            opt.zero_grad()
        model(x).square().mean().backward()
        g = weight.grad
        buf = 0.95 * buf + 0.05 * g  # momentum as an EMA
        update = newton_schulz_by_hand(0.05 * g + 0.95 * buf)  # Nesterov
        by_hand = (
            by_hand * (1 - 0.02 * 0.1) - 0.02 * (weight.size(0) / weight.size(1)) ** 0.5 * update
        )
        for opt in optimizers:
            opt.step()
    torch.testing.assert_close(weight.detach(), by_hand, rtol=0, atol=1e-5)


def test_muon_orthogonalising_in_bf16_is_torch_muon():
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32)]
    ours_params = [torch.randn(shape, requires_grad=True) for shape in shapes]
    torch_params = [p.detach().clone().requires_grad_() for p in ours_params]
    ours = Muon(ours_params, lr=0.02, momentum=0.95, weight_decay=0.1, ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon(torch_params, lr=0.02, momentum=0.95, weight_decay=0.1)
    for _ in range(3):
        grads = [torch.randn(shape) for shape in shapes]
        for params, opt in ((ours_params, ours), (torch_params, reference)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours_params, torch_params))
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(3, requires_grad=True)], lr=0.02)


def test_muon_orthogonalises_joint_matrices_as_their_stack(text_file, tmp_path):
    """q, k, v (and gate, up) step as the one stacked matrix the fused layout had."""
    torch.manual_seed(0)
    parts = [torch.randn(16, 8, requires_grad=True) for _ in range(3)]
    stack = torch.cat([p.detach() for p in parts]).requires_grad_()  # (48, 8)
    joint = Muon(parts, lr=0.02, weight_decay=0.1, joint=[parts])
    fused = Muon([stack], lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(48, 8)
        stack.grad = grad.clone()
        for p, g in zip(parts, grad.split(16)):
            p.grad = g.clone()
        joint.step()
        fused.step()
    torch.testing.assert_close(
        torch.cat([p.detach() for p in parts]), stack.detach(), rtol=0, atol=1e-6
    )
    cfg = tiny_cfg(text_file, tmp_path, optimizer="muon")
    cfg.model = build_config({"model": {"preset": "llama-tiny"}}).model
    cfg.model.vocab_size = 65
    model = GPT(cfg.model)
    muon = build_optimizers(model, cfg.train, torch.device("cpu"))[0]
    attn, mlp = model.blocks[1].attn, model.blocks[1].mlp
    units = [tuple(map(id, unit)) for unit in muon._units(muon.param_groups[0]["params"])]
    assert tuple(map(id, (attn.q.weight, attn.k.weight, attn.v.weight))) in units
    assert tuple(map(id, (mlp.gate.weight, mlp.up.weight))) in units


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # step 0, end of warmup (step 9), middle (step 55), end (step 100)
        ("cosine", [1e-4, 1e-3, 0.55e-3, 1e-4]),
        ("wsd", [1e-4, 1e-3, 1e-3, 1e-4]),
        ("inverse_sqrt", [1e-4, 1e-3, 1e-3 * math.sqrt(10 / 56), 1e-3 * math.sqrt(10 / 101)]),
        ("constant", [1e-4, 1e-3, 1e-3, 1e-3]),
    ],
)
def test_schedule_values(schedule, expected):
    cfg = build_config(
        {
            "train": {
                "schedule": schedule,
                "lr": 1e-3,
                "min_lr": 1e-4,
                "warmup_steps": 10,
                "max_steps": 100,
                "decay_fraction": 0.2,
            }
        }
    ).train
    got = [lr_at(s, cfg) for s in (0, 9, 55, 100)]
    assert got == pytest.approx(expected, rel=1e-9)


def test_wsd_decays_only_at_the_end_and_batch_ramp_doubles():
    cfg = build_config(
        {
            "train": {
                "schedule": "wsd",
                "lr": 1e-3,
                "min_lr": 0.0,
                "warmup_steps": 0,
                "max_steps": 100,
                "decay_fraction": 0.2,
            }
        }
    ).train
    assert lr_at(79, cfg) == 1e-3 and lr_at(90, cfg) == pytest.approx(0.5e-3)
    assert [accum_steps_at(s, 8, 10) for s in (0, 9, 10, 20, 30, 100)] == [1, 1, 2, 4, 8, 8]
    assert accum_steps_at(5, 4, 0) == 4


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / ckpt.WEIGHTS))


def _lmforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", *args]


def _train_args(text_file: Path, run_dir: Path, name: str, steps: int, *extra: str) -> list[str]:
    return [
        "train",
        *extra,
        f"--data.path={text_file}",
        "--model.preset=tiny",
        "--model.dropout=0.1",
        f"--train.max_steps={steps}",
        "--train.log_interval=1",
        "--train.eval_interval=40",
        "--train.eval_steps=2",
        "--train.ckpt_interval=1000000",
        f"--run.dir={run_dir}",
        f"--run.name={name}",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
    ]


def _train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]


@pytest.mark.parametrize("optimizer, ema_decay", [("adamw", 0.0), ("muon", 0.0), ("muon", 0.95)])
def test_sigterm_then_resume_in_a_new_process_is_bitwise_equal(
    text_file, tmp_path, optimizer, ema_decay
):
    """A real SIGTERM mid-run, then `--resume` in a fresh process, with dropout on: every
    step's loss and the final weights equal an uninterrupted run's, bit for bit; with a
    weight average too (the checkpoint holds the average, its trainer state the weights)."""
    import signal
    import time

    steps = 400
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = (steps, f"--train.optimizer={optimizer}", f"--train.ema_decay={ema_decay}")
    straight = subprocess.run(
        _lmforge(*_train_args(text_file, tmp_path, "straight", *args)),
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(
        _lmforge(*_train_args(text_file, tmp_path, "cut", *args)),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics, deadline = tmp_path / "cut" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (
        not metrics.is_file() or len(metrics.read_text().splitlines()) < 30
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    stopped = _train_losses(tmp_path / "cut")[-1][0]
    assert 25 <= stopped < steps, f"SIGTERM landed at step {stopped}, not mid-run"
    resumed = subprocess.run(
        _lmforge("train", f"--resume={tmp_path / 'cut'}"),
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _train_losses(tmp_path / "cut") == _train_losses(tmp_path / "straight")
    a = _weights(ckpt.resolve_checkpoint(tmp_path / "straight"))
    b = _weights(ckpt.resolve_checkpoint(tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp32_matmuls_use_tf32_on_cuda():
    from lmforge.hardware import enable_tf32

    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]
    try:
        for f in flags:
            f.allow_tf32 = False
        enable_tf32(torch.device("cpu"))
        assert not any(f.allow_tf32 for f in flags)
        enable_tf32(torch.device("cuda", 0))  # only sets flags: runs without a GPU
        assert all(f.allow_tf32 for f in flags)
    finally:
        for f, value in zip(flags, before):
            f.allow_tf32 = value


def test_fit_restores_the_signal_handlers(text_file, tmp_path):
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    trainer = make_trainer(
        tiny_cfg(text_file, tmp_path, max_steps=2), torch.randint(0, 65, (3000,)), tmp_path
    )
    trainer.fit()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_only_the_default_job_has_a_time_limit_and_its_recipe(monkeypatch, tmp_path):
    import lmforge.cli.train as train_cli

    seen = []
    monkeypatch.setattr(train_cli, "train", lambda cfg, resume=None: seen.append(cfg))
    assert main(["train"]) == 0
    assert main(["train", "--config", str(REPO / "configs" / "train_gpt2_124m.yaml")]) == 0
    assert main(["train", "--train.lr=1e-3"]) == 0
    assert main(["train", f"--run.dir={tmp_path}", "--run.tensorboard=false"]) == 0
    assert [c.train.max_minutes for c in seen] == [5.0, None, None, 5.0]
    assert [c.train.dropout_start for c in seen] == [700, 0, 0, 700]
    assert [c.model.dropout for c in seen] == [0.1, 0.0, 0.0, 0.1]
    assert [c.train.ema_decay for c in seen] == [0.995, 0.0, 0.0, 0.995]
    assert [c.data.tokenizer for c in seen] == ["train:512", "auto", "auto", "train:512"]
    assert build_config(overrides=train_cli.default_job_overrides()) == seen[0]  # benchmarks
    assert seen[3].run.dir == str(tmp_path)  # where outputs go keeps the default job
    assert build_config().train.max_minutes is None


def test_jsonl_data_trains_on_the_text_field_not_the_json(tmp_path):
    from lmforge.config import DataConfig
    from lmforge.data.loader import load_pretrain_data

    path = tmp_path / "data.jsonl"
    records = [{"text": f"line {i} of plain prose.", "id": i} for i in range(400)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    data = load_pretrain_data(DataConfig(path=str(path)))
    text = data.tokenizer.decode(np.concatenate([data.train[0], data.val[0]]).tolist())
    assert "line 7 of plain prose." in text
    assert '"text"' not in text and "{" not in text
    assert data.tokenizer.eot_id is not None  # documents stay apart


def test_a_folder_of_any_supported_format_is_read(tmp_path):
    from lmforge.config import DataConfig
    from lmforge.data.loader import load_pretrain_data

    (tmp_path / "a.txt").write_text("plain words here. " * 20, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json words there. " * 20}) + "\n")
    data = load_pretrain_data(DataConfig(path=str(tmp_path)))
    text = data.tokenizer.decode(np.concatenate([data.train[0], data.val[0]]).tolist())
    assert "plain words here." in text and "json words there." in text


def _with_dropout(cfg):
    cfg.model.dropout = 0.1
    return cfg


def test_a_crash_mid_checkpoint_keeps_the_previous_one(text_file, tmp_path, monkeypatch):
    cfg = tiny_cfg(text_file, tmp_path)
    trainer = make_trainer(cfg, torch.randint(0, 65, (3000,)), tmp_path / "run")
    trainer.train_step()
    first = trainer.save_checkpoint()
    trainer.train_step()

    def crash(*args, **kwargs):
        raise OSError("disk vanished mid-write")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (trainer.ckpt_root / "latest").read_text().strip() == first.name
    assert ckpt.resolve_checkpoint(trainer.run_dir) == first
    model, _ = ckpt.load(first)
    assert not ckpt.is_checkpoint(trainer.ckpt_root / "step_0000002")


def test_nan_loss_is_skipped_and_training_goes_on(text_file, tmp_path):
    class Flaky(CausalLMLoss):
        calls = 0

        def __call__(self, model, batch):
            self.calls += 1
            loss, metrics = super().__call__(model, batch)
            return (loss * float("nan") if self.calls == 2 else loss), metrics

    cfg = tiny_cfg(text_file, tmp_path, max_steps=5, ckpt_interval=100)
    trainer = make_trainer(cfg, torch.randint(0, 65, (3000,)), tmp_path / "run", loss_fn=Flaky())
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    row = trainer.train_step()
    assert row.get("skipped") and all(
        torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())
    )
    trainer.fit()
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["step"] == 5 and math.isfinite(rows[-1]["loss"])


def test_repeated_nan_stops_with_a_clear_message(text_file, tmp_path):
    from lmforge.common import LmforgeError

    class AlwaysNan(CausalLMLoss):
        def __call__(self, model, batch):
            loss, metrics = super().__call__(model, batch)
            return loss * float("nan"), metrics

    cfg = tiny_cfg(text_file, tmp_path, max_steps=20, max_bad_steps=3)
    trainer = make_trainer(
        cfg, torch.randint(0, 65, (3000,)), tmp_path / "run", loss_fn=AlwaysNan()
    )
    with pytest.raises(LmforgeError, match="3 non-finite steps in a row"):
        trainer.fit()


def test_ddp_two_processes_match_one_process(text_file, tmp_path):
    common = [
        f"--data.path={text_file}",
        "--model.preset=tiny",
        "--train.max_steps=4",
        "--train.log_interval=1",
        "--train.eval_interval=2",
        "--train.eval_steps=2",
        "--train.precision=fp32",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
        "--run.peak_tflops=1",
        f"--run.dir={tmp_path}",
    ]
    torchrun(
        2,
        "train",
        *common,
        "--run.name=ddp",
        "--train.micro_batch_size=2",
        "--train.grad_accum_steps=2",
        cwd=tmp_path,
    )
    assert (
        main(
            [
                "train",
                *common,
                "--run.name=single",
                "--train.micro_batch_size=4",
                "--train.grad_accum_steps=2",
            ]
        )
        == 0
    )
    ddp, single = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    # MFU divides the tokens/s of all ranks by all devices' peak (1 TFLOP/s each, as set)
    cfg = build_config(tmp_path / "ddp" / "config.yaml")
    flops = GPT(cfg.model).flops_per_token(cfg.model.block_size)
    for rows, world in ((ddp, 2), (single, 1)):
        rows = [r for r in rows if "mfu" in r]
        assert rows and all(
            r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / (world * 1e12)) for r in rows
        )
    for key in ("loss", "val_loss"):
        a = [r[key] for r in ddp if key in r]
        b = [r[key] for r in single if key in r]
        assert len(a) == len(b) > 0
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (key, a, b)
    # a DDP run's checkpoint resumes in one process (any world size)
    assert main(["train", f"--resume={tmp_path / 'ddp'}", "--train.max_steps=6"]) == 0
    assert read_metrics(tmp_path / "ddp")[-1]["step"] == 6


def test_bad_input_gives_one_clear_line(text_file, tmp_path, capsys):
    base = ["train", f"--run.dir={tmp_path}", "--model.preset=tiny"]
    assert "'train.lr'" in error_line(capsys, [*base, "--train.lrr=1"])
    assert "train.lr" in error_line(capsys, [*base, "--train.lr=fast"])
    assert "train.optimizer" in error_line(capsys, [*base, "--train.optimizer=sgd"])
    assert "train.muon_lr" in error_line(capsys, [*base, "--train.muon_lr=0"])
    assert "train.ema_decay" in error_line(capsys, [*base, "--train.ema_decay=1"])
    sharded = ["--train.ema_decay=0.9", "--train.parallel.dp_shard=2"]
    assert "one process or DDP" in error_line(capsys, [*base, *sharded])
    assert "not found" in error_line(capsys, [*base, f"--data.path={tmp_path / 'missing.txt'}"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in error_line(capsys, [*base, f"--data.path={empty}"])
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "binary" in error_line(capsys, [*base, f"--data.path={binary}"])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    assert "UTF-8" in error_line(capsys, [*base, f"--data.path={latin1}"])
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be\n")
    assert "too short" in error_line(capsys, [*base, f"--data.path={short}"])
    assert "not an lmforge run" in error_line(capsys, ["train", f"--resume={tmp_path}"])
    assert not any(tmp_path.glob("*/config.yaml")), "a failed start must not leave a run behind"


def test_existing_run_is_never_overwritten(text_file, tmp_path, capsys):
    argv = [
        "train",
        f"--data.path={text_file}",
        "--model.preset=tiny",
        f"--run.dir={tmp_path}",
        "--run.name=keep",
        "--train.max_steps=1",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
    ]
    assert main(argv) == 0
    before = (tmp_path / "keep" / "metrics.jsonl").read_text()
    assert "already exists" in error_line(capsys, argv)
    assert (tmp_path / "keep" / "metrics.jsonl").read_text() == before


def test_a_run_of_the_fused_layout_is_not_resumed(text_file, tmp_path, capsys, fused_layout):
    """A run saved while q, k, v were one Linear (attn.qkv): its weights load (test_model.py),
    but its optimizer holds one state where the model now has three, so --resume says so."""
    argv = [
        "train",
        f"--data.path={text_file}",
        "--model.preset=tiny",
        f"--run.dir={tmp_path}",
        "--run.name=old",
        "--train.max_steps=1",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
    ]
    assert main(argv) == 0
    weights = ckpt.latest_checkpoint(tmp_path / "old") / "model.safetensors"
    save_file(fused_layout(load_file(weights)), weights)
    assert "cannot be resumed" in error_line(capsys, ["train", f"--resume={tmp_path / 'old'}"])


def test_every_shipped_config_parses():
    recipes = [
        p
        for p in sorted((REPO / "configs").glob("*.yaml"))
        if not p.name.startswith(("prepare_", "sweep_space_"))
    ]
    assert len(recipes) >= 4
    for path in recipes:  # prepare_*.yaml: test_data_pipeline.py; sweep_space_*: test_sweep.py
        build_config(path)


def test_sigint_saves_a_checkpoint_and_exits_cleanly(text_file, tmp_path):
    import signal
    import time

    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "train",
        f"--data.path={text_file}",
        "--model.preset=tiny",
        f"--run.dir={tmp_path}",
        "--run.name=sig",
        "--train.max_steps=100000",
        "--train.log_interval=1",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
        "--train.ckpt_interval=100000",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (
        not metrics.is_file() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "resume with --resume=" in out
    folder = ckpt.resolve_checkpoint(tmp_path / "sig")
    state = torch.load(folder / ckpt.TRAINER_STATE, weights_only=True)
    assert state["step"] >= 3


@pytest.mark.parametrize(
    "metric, evaluations, best",
    [  # one evaluation per step, None: no evaluation at that step's checkpoint
        ("val_loss", [3.0, 2.0, None, 2.5, 2.0, 4.0], 2),
        ("val_accuracy", [0.5, 0.7, 0.9, 0.95, 0.95, 0.6], 4),  # a tie keeps the first
    ],
)
def test_keeps_the_last_k_and_the_best_checkpoint(text_file, tmp_path, metric, evaluations, best):
    cfg = tiny_cfg(text_file, tmp_path, keep_last=2, best_metric=metric)
    trainer = make_trainer(cfg, torch.randint(0, 65, (3000,)), tmp_path / "run")
    for value in evaluations:
        trainer.train_step()
        if value is not None:  # an evaluation of an earlier step does not judge this one
            trainer.last_eval = {"step": trainer.step, metric: value}
        trainer.save_checkpoint()
    names = sorted(p.name for p in trainer.ckpt_root.glob("step_*"))
    assert names == [f"step_{best:07d}", "step_0000005", "step_0000006"]
    assert (trainer.ckpt_root / "latest").read_text().strip() == "step_0000006"
    assert ckpt.resolve_checkpoint(trainer.ckpt_root / "best").name == f"step_{best:07d}"


def test_a_best_metric_the_run_does_not_report_is_one_line(text_file, tmp_path, capsys):
    argv = ["train", f"--data.path={text_file}", f"--run.dir={tmp_path}", "--model.preset=tiny"]
    argv += ["--train.max_steps=2", "--train.eval_interval=2", "--train.eval_steps=1"]
    err = error_line(capsys, [*argv, "--train.best_metric=val_accuracy"])
    assert "train.best_metric='val_accuracy' is not among" in err and "val_loss" in err
    err = error_line(capsys, [*argv, "--train.best_metric=loss"])
    assert "must name an evaluation figure" in err


def _params_after(cfg, tokens, run_dir, steps=2) -> torch.Tensor:
    trainer = make_trainer(cfg, tokens, run_dir)
    rows = [trainer.train_step() for _ in range(steps)]
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()]), rows


def test_activation_checkpointing_changes_nothing_but_memory(text_file, tmp_path):
    tokens = torch.randint(0, 65, (4000,))
    plain, _ = _params_after(tiny_cfg(text_file, tmp_path), tokens, tmp_path / "a")
    ckpt_cfg = tiny_cfg(text_file, tmp_path, activation_checkpointing=True)
    checkpointed, _ = _params_after(ckpt_cfg, tokens, tmp_path / "b")
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(text_file, tmp_path, precision):
    tokens = torch.randint(0, 65, (4000,))
    _, fp32_rows = _params_after(tiny_cfg(text_file, tmp_path), tokens, tmp_path / "fp32", steps=3)
    cfg = tiny_cfg(text_file, tmp_path, precision=precision)
    trainer = make_trainer(cfg, tokens, tmp_path / precision)
    assert trainer.scaler.is_enabled() == (precision == "fp16")  # dynamic loss scaling for fp16
    rows = [trainer.train_step() for _ in range(3)]
    for ours, ref in zip(rows, fp32_rows):
        assert not ours.get("skipped") and abs(ours["loss"] - ref["loss"]) < 0.05


def test_batch_ramp_uses_more_accumulation_steps_over_time(text_file, tmp_path):
    cfg = tiny_cfg(text_file, tmp_path, grad_accum_steps=4, batch_ramp_interval=2)
    trainer = make_trainer(cfg, torch.randint(0, 65, (4000,)), tmp_path / "ramp")
    rows = [trainer.train_step() for _ in range(6)]
    assert [r["accum"] for r in rows] == [1, 1, 2, 2, 4, 4]
    assert [r["tokens"] for r in rows][:3] == [4 * 32, 8 * 32, 16 * 32]


def test_wandb_and_mlflow_receive_the_same_scalars(text_file, tmp_path, monkeypatch):
    """The trackers are optional installs; stand-ins record what the logger sends them."""
    import types

    from lmforge.train.metrics import MetricsLogger

    calls: dict[str, list] = {"wandb": [], "mlflow": []}
    wandb = types.SimpleNamespace(
        init=lambda **kw: types.SimpleNamespace(
            log=lambda scalars, step: calls["wandb"].append((step, scalars)), finish=lambda: None
        )
    )
    mlflow = types.SimpleNamespace(
        start_run=lambda **kw: None,
        log_params=lambda params: None,
        log_metrics=lambda scalars, step: calls["mlflow"].append((step, scalars)),
        end_run=lambda: None,
    )
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    cfg = tiny_cfg(text_file, tmp_path)
    cfg.run.wandb_project, cfg.run.mlflow = "p", True
    logger = MetricsLogger(tmp_path, cfg.run, {"train": {"lr": 1.0}})
    logger.log({"step": 3, "loss": 2.5, "lr": 1e-3, "skipped": True})
    logger.close()
    assert calls["wandb"] == calls["mlflow"] == [(3, {"loss": 2.5, "lr": 1e-3, "skipped": True})]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.5


def test_late_dropout_is_off_before_its_start_step_and_on_after(text_file, tmp_path):
    """train.dropout_start: the first steps equal a run without dropout bitwise; from the
    start step on, dropout is at the model's rates (and the runs part)."""
    tokens = torch.randint(0, 65, (5000,), generator=torch.Generator().manual_seed(0))
    plain = make_trainer(tiny_cfg(text_file, tmp_path), tokens, tmp_path / "plain")
    cfg = tiny_cfg(text_file, tmp_path, dropout_start=2)
    cfg.model.dropout, cfg.model.attention_dropout = 0.3, 0.2
    late = make_trainer(cfg, tokens, tmp_path / "late")
    for step in range(3):
        a, b = plain.train_step()["loss"], late.train_step()["loss"]
        assert (a == b) == (step < 2), step
    attention = late.model.blocks[0].attn
    assert (late.model.drop.p, attention.dropout) == (0.3, 0.2)
