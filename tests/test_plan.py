"""`lmforge plan`: the planner's parameter, gradient, optimizer-state and activation bytes
against the tensors of a real CPU training step (two model sizes, checkpointing off and on,
then each model option that changes what the blocks save); the layout arithmetic (FSDP, TP,
PP, offload); the CLI's table, JSON, fit verdict and suggestions, and its one-line errors;
every shipped training config plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import error_line

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.config import build_config
from lmforge.hardware import autocast_context
from lmforge.model.gpt import GPT
from lmforge.research.memory_plan import parse_bytes, plan
from lmforge.train.losses import CausalLMLoss
from lmforge.train.optim import build_optimizers

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.10
CPU = torch.device("cpu")
BIGGER = [  # a Llama-style model: GQA, RoPE, SwiGLU, RMSNorm, Muon on the block matrices
    "--model.preset=llama-tiny",
    "--model.n_layer=4",
    "--model.d_model=256",
    "--model.n_head=8",
    "--model.n_kv_head=2",
    "--train.optimizer=muon",
]


def _config(*overrides: str):
    base = ["--model.vocab_size=300", "--train.precision=fp32", "--train.micro_batch_size=4"]
    return build_config(overrides=[*base, *overrides])


def _batch(cfg) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    B, T = cfg.train.micro_batch_size, cfg.model.block_size
    ids = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_bytes(model: GPT, batch, precision: str) -> int:
    """Bytes of the storages autograd keeps for the backward of one forward + loss, each
    storage once (however many views of it are saved), parameters left out. Under
    checkpointing, torch.utils.checkpoint saves a block's tensor arguments but keeps the rest
    (the RoPE cos/sin tuple) by reference for the recompute: a pre-hook counts those."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    def block_inputs(block, args):
        if block.activation_checkpointing:
            for arg in args:
                for t in arg if isinstance(arg, tuple) else (arg,):
                    if isinstance(t, torch.Tensor):
                        count(t)

    hooks = [b.register_forward_pre_hook(block_inputs) for b in model.blocks]
    try:
        saving = torch.autograd.graph.saved_tensors_hooks(count, lambda t: t)
        with saving, autocast_context(precision, CPU):
            CausalLMLoss()(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())


def measured(cfg) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes after one real training step with the
    run's optimizers, and activation bytes with checkpointing off and on."""
    torch.manual_seed(0)
    model = GPT(cfg.model).train()
    batch = _batch(cfg)
    precision = cfg.train.precision
    out = {}
    for ckpt in (False, True):
        model.set_activation_checkpointing(ckpt)
        out[f"activations {'on' if ckpt else 'off'}"] = saved_bytes(model, batch, precision)
    model.set_activation_checkpointing(False)
    optimizers = build_optimizers(model, cfg.train, CPU, precision)
    with autocast_context(precision, CPU):
        loss, _ = CausalLMLoss()(model, batch)
    loss.backward()
    for opt in optimizers:
        opt.step()
    params = list(model.parameters())  # a tied weight once
    out["parameters"] = _bytes(params)
    out["gradients"] = _bytes(p.grad for p in params)
    out["optimizer"] = _bytes(
        v
        for opt in optimizers
        for state in opt.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    return out


def planned(cfg) -> dict[str, int]:
    p = plan(cfg, world_size=1, device="cpu")
    off, on = p.worst(False), p.worst(True)
    return {
        "parameters": off.params,
        "gradients": off.grads,
        "optimizer": off.optimizer,
        "activations off": sum(off.activations.values()),
        "activations on": sum(on.activations.values()),
    }


@pytest.mark.parametrize(
    "overrides",
    [["--model.preset=tiny", "--train.optimizer=adamw"], BIGGER],
    ids=["tiny-adamw", "llama-4x256-muon"],
)
def test_the_planner_matches_a_real_step_within_10_percent(overrides):
    cfg = _config(*overrides)
    got, want = planned(cfg), measured(cfg)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=TOLERANCE), key
    assert want["activations on"] < want["activations off"] / 2  # checkpointing matters


@pytest.mark.parametrize(
    "option",
    [
        "--model.mlp=relu2",
        "--model.dropout=0.1",
        "--model.qk_norm=true",
        "--model.sliding_window=16",
        "--model.norm_position=post",
        "--model.logit_softcap=30",
        "--model.low_rank=8",
        "--model.pos_encoding=learned",
        "--train.precision=bf16",
    ],
)
def test_activations_follow_each_model_option(option):
    """Each option changes what the blocks save (masks, extra norms, a float attention mask,
    factor outputs, weight copies under autocast); the planner follows every one."""
    cfg = _config("--model.preset=llama-tiny", "--model.block_size=64", option)
    got, want = planned(cfg), measured(cfg)
    for key in ("activations off", "activations on"):
        assert got[key] == pytest.approx(want[key], rel=TOLERANCE), key


LLAMA_8B = ["--model.preset=llama-8b", "--train.optimizer=adamw"]


def test_sharding_splits_states_and_tensor_parallelism_splits_the_blocks():
    one = plan(build_config(overrides=LLAMA_8B), 1).worst(False)
    shard = build_config(overrides=[*LLAMA_8B, "--train.parallel.dp_shard=8"])
    s = plan(shard, 8).worst(False)
    assert s.params == pytest.approx(one.params / 8, rel=1e-6)
    assert s.optimizer == pytest.approx(one.optimizer / 8, rel=1e-3)
    assert "FSDP gathered parameters" in s.temporary
    replicated = plan(build_config(overrides=LLAMA_8B), 8).worst(False)
    assert replicated.params == one.params and "DDP gradient buckets" in replicated.temporary
    tp = plan(build_config(overrides=[*LLAMA_8B, "--train.parallel.tp=8"]), 8).worst(False)
    assert tp.params == pytest.approx(one.params / 8, rel=1e-3)  # norms stay whole
    assert sum(tp.activations.values()) < sum(one.activations.values()) / 5
    shard.train.parallel.cpu_offload = True
    offload = plan(shard, 8).worst(False)
    assert offload.host == s.states and offload.device == s.device - s.states


def test_pipeline_stages_hold_their_blocks_and_micro_batches_in_flight():
    base = ["--model.preset=llama-8b", "--train.grad_accum_steps=8", "--train.parallel.pp=4"]
    p = plan(build_config(overrides=base), 4)
    stages = p.stages[False]
    assert [s.blocks for s in stages] == [8, 8, 8, 8]
    assert [s.in_flight for s in stages] == [4, 3, 2, 1]  # 1F1B
    assert "embeddings" in stages[0].activations and "embeddings" not in stages[1].activations
    assert LOGITS_KEY in stages[-1].temporary and LOGITS_KEY not in stages[0].temporary
    gpipe_cfg = build_config(overrides=[*base, "--train.parallel.pp_schedule=gpipe"])
    gpipe = plan(gpipe_cfg, 4).stages[False]
    assert [s.in_flight for s in gpipe] == [8, 8, 8, 8]
    uneven = plan(build_config(overrides=[*base[:2], "--train.parallel.pp=3"]), 3)
    assert [s.blocks for s in uneven.stages[False]] == [11, 11, 10]


LOGITS_KEY = "logits and their gradients (at the loss)"


def test_flops_and_tokens_per_step_come_from_the_model():
    cfg = build_config(REPO / "configs" / "train_gpt2_124m.yaml")
    p = plan(cfg, 8)
    assert p.tokens_per_step == 16 * 4 * 8 * 1024
    with torch.device("meta"):
        assert p.flops_per_token == GPT(cfg.model).flops_per_token(1024)
    assert p.tokens_per_s(0.4, 1e15) == pytest.approx(0.4 * 1e15 * 8 / p.flops_per_token)


@pytest.mark.parametrize(
    "text, expected",
    [("80GB", 80 * 10**9), ("80GiB", 80 * 2**30), ("24G", 24 * 2**30), ("1000", 1000)],
)
def test_device_memory_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


def test_the_cli_prints_the_table_and_json(capsys):
    argv = ["plan", "--world-size", "8", "--config", str(REPO / "configs/train_gpt2_124m.yaml")]
    assert main([*argv, "--train.parallel.dp_shard=8"]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "gradients", "optimizer states", "activations", "temporary buffers"):
        assert row in out
    assert "checkpointing off *" in out and "total on the device" in out and "tokens/s" in out
    assert main([*argv, "--train.parallel.dp_shard=8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["layout"]["dp_shard"] == 8 and report["fits"] is None
    off = report["memory"]["checkpointing_off"]
    assert off["device_total"] > report["memory"]["checkpointing_on"]["device_total"]
    assert report["compute"]["tokens_per_step"] == 524288


def test_a_run_that_does_not_fit_gets_settings_that_do(capsys):
    argv = ["plan", "--world-size", "8", "--config", str(REPO / "configs/train_gpt2_124m.yaml")]
    assert main([*argv, "--device-memory", "80GB"]) == 0
    assert "fit in 74.51 GiB per device: yes" in capsys.readouterr().out
    assert main([*argv, "--device-memory", "4GiB"]) == 0
    out = capsys.readouterr().out
    assert "NO, needs" in out and "settings that fit" in out
    assert main([*argv, "--device-memory", "4GiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["suggestions"]
    for suggestion in report["suggestions"]:  # each one, planned again, fits
        assert main([*argv, "--json", *suggestion["overrides"]]) == 0
        again = json.loads(capsys.readouterr().out)
        assert again["memory"][again["configured"]]["device_total"] <= 4 * 2**30


def test_bad_settings_are_one_clear_line(capsys):
    gpt2 = ["plan", "--config", str(REPO / "configs/train_gpt2_124m.yaml")]
    lines = {
        "does not multiply to the world size 8": [
            *gpt2,
            "--world-size=8",
            "--train.parallel.dp_shard=3",
        ],
        "tp=8 does not divide model.n_head=12": [*gpt2, "--world-size=8", "--train.parallel.tp=8"],
        "pp=13 is more stages than model.n_layer=12": [
            *gpt2,
            "--world-size=13",
            "--train.parallel.pp=13",
        ],
        "--device-memory='80XB' is not a size": [*gpt2, "--world-size=8", "--device-memory=80XB"],
        "does not divide model.n_kv_head=2": [
            "plan",
            "--world-size=4",
            "--model.preset=llama-tiny",
            "--model.vocab_size=256",
            "--train.parallel.tp=4",
        ],
    }
    for expected, argv in lines.items():
        assert expected in error_line(capsys, argv)
    with pytest.raises(LmforgeError, match="must be >= 1"):
        plan(build_config(), 0)


@pytest.mark.parametrize(
    "recipe",
    [
        p
        for p in sorted((REPO / "configs").glob("*.yaml"))
        if not p.name.startswith(("prepare_", "sweep_space_"))
    ],
    ids=lambda p: p.name,
)
def test_every_shipped_training_config_plans(recipe, capsys):
    for world in ("1", "8"):
        assert main(["plan", "--config", str(recipe), "--world-size", world, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["memory"]["checkpointing_off"]["device_total"] > 0
