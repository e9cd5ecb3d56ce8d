"""PEFT (lmforge/model/peft.py): LoRA, prefix tuning and P-tuning start from the base model,
train only their own parameters under the one Trainer, merge/fold, round-trip through adapter
files, generate the same with and without the KV cache, and refuse bad input in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lmforge.common import LmforgeError
from lmforge.config import PeftConfig, build_config, model_config
from lmforge.data.loader import RandomWindowLoader
from lmforge.engine import Engine, SamplingParams
from lmforge.model.gpt import GPT, split_fused
from lmforge.model.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRALinear,
    apply_peft,
    load_adapter,
    merge_lora,
    peft_parameters,
    save_adapter,
    trainable_share,
    unfused_targets,
)
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import DistInfo
from lmforge.train.losses import CausalLMLoss
from lmforge.train.trainer import Trainer

V = 65
# An untied head and a larger init: random models whose greedy output depends on context.
BASE = dict(preset="tiny", vocab_size=V, tie_embeddings=False, init_std=0.1)
METHODS = {
    "lora": PeftConfig(
        method="lora", rank=4, targets=["attn.q", "attn.k", "attn.v", "attn.proj", "mlp.*"]
    ),
    "prefix": PeftConfig(method="prefix", num_virtual_tokens=4),
    "ptuning": PeftConfig(method="ptuning", num_virtual_tokens=4),
    "ptuning_lstm": PeftConfig(method="ptuning", num_virtual_tokens=4, encoder="lstm"),
}


def make_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(model_config(**{**BASE, **overrides}))


def perturb(module: torch.nn.Module) -> None:
    """Move every PEFT parameter off its initial value (LoRA's B starts at zero)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_parameters(module):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def tokens(B: int = 3, T: int = 12) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- LoRA


def test_lora_with_zero_b_is_the_base_model():
    model = make_model(pos_encoding="rope", n_head=4, n_kv_head=2, mlp="swiglu")
    x = tokens()
    base = model(x)
    module = apply_peft(model, METHODS["lora"])
    assert module is model
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * 7  # 4 attn, 3 mlp
    assert (module(x) - base).abs().max() <= 1e-6


def test_merged_and_unmerged_lora_agree():
    model = apply_peft(make_model(), METHODS["lora"])
    perturb(model)
    x = tokens()
    unmerged = model(x)
    q = model.blocks[0].attn.q
    weight_before = q.base.weight.clone()
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    assert (model(x) - unmerged).abs().max() <= 1e-5
    assert not torch.equal(q.base.weight, weight_before)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
    assert (q.base.weight - weight_before).abs().max() <= 1e-6  # restored up to rounding
    assert (model(x) - unmerged).abs().max() <= 1e-5

    plain = merge_lora(model)  # a plain GPT again: an ordinary checkpoint's names and shapes
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert plain.state_dict().keys() == make_model().state_dict().keys()
    assert all(p.requires_grad for p in plain.parameters())
    assert (plain(x) - unmerged).abs().max() <= 1e-5


# ---------------------------------------------------------------- training


def make_trainer(module: torch.nn.Module, run_dir) -> Trainer:
    cfg = build_config(
        {
            "model": BASE,
            "train": {"micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "precision": "fp32"},
        }
    )
    data = torch.randint(0, V, (2000,), generator=torch.Generator().manual_seed(3)).numpy()
    loader = RandomWindowLoader([data], module.config.block_size, 4, cfg.train.seed)
    info = DistInfo(rank=0, world_size=1, device=torch.device("cpu"))
    return Trainer(cfg, module, loader, None, run_dir, info, CausalLMLoss())


@pytest.mark.parametrize("method", list(METHODS))
def test_trainer_steps_change_only_the_peft_parameters(method, tmp_path):
    model = make_model()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    module = apply_peft(model, METHODS[method])
    peft_before = [p.detach().clone() for p in peft_parameters(module)]
    trainer = make_trainer(module, tmp_path)
    for _ in range(3):
        row = trainer.train_step()
        assert "skipped" not in row
    base_after = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for name, value in base_before.items():
        assert torch.equal(base_after[name], value), name  # bitwise unchanged
    for before, p in zip(peft_before, peft_parameters(module)):
        if p.numel():
            assert not torch.equal(p, before)


# ---------------------------------------------------------------- adapter files


@pytest.mark.parametrize("method", list(METHODS))
def test_adapter_round_trip(method, tmp_path):
    model = make_model()
    base_dir = ckpt.save_checkpoint(tmp_path / "base", model, build_config({"model": BASE}), None)
    sha = ckpt.weights_sha256(base_dir)
    module = apply_peft(model, METHODS[method]).eval()
    perturb(module)
    x = tokens()
    expected = module(x)
    save_adapter(module, tmp_path / "adapter", METHODS[method], sha)

    fresh, _ = ckpt.load(base_dir)
    loaded = load_adapter(fresh, tmp_path / "adapter", sha).eval()
    assert (loaded(x) - expected).abs().max() <= 1e-6
    trained = {id(p) for p in loaded.parameters() if p.requires_grad}
    assert trained == {id(p) for p in peft_parameters(loaded)}
    adapter_bytes = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert adapter_bytes < (base_dir / ckpt.WEIGHTS).stat().st_size / 5


def test_adapter_of_the_fused_layout_loads(tmp_path, fused_layout):
    """A LoRA adapter saved while q, k, v were one Linear attn.qkv and SwiGLU's gate, up one
    mlp.gate_up (its targets name them; one A served all the parts, B stacked their rows), on
    a base of that layout: it loads onto the separate Linears and computes what it did."""
    fields = dict(BASE, pos_encoding="rope", n_head=4, n_kv_head=2, mlp="swiglu", bias=False)
    model = make_model(**fields).eval()
    base_dir = ckpt.save_checkpoint(tmp_path / "base", model, build_config({"model": fields}), None)
    weights = base_dir / ckpt.WEIGHTS
    save_file(fused_layout(load_file(weights)), weights)
    sha = ckpt.weights_sha256(base_dir)
    cfg = PeftConfig(method="lora", rank=4, targets=["attn.qkv", "mlp.gate_up"])
    gen = torch.Generator().manual_seed(3)
    fused = fused_layout(model.state_dict())
    adapter = {}
    for name in (f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.gate_up")):
        rows, d = fused[f"{name}.weight"].shape
        a, b = torch.randn(4, d, generator=gen), torch.randn(rows, 4, generator=gen) * 0.1
        adapter |= {f"{name}.lora_A": a, f"{name}.lora_B": b}
        fused[f"{name}.weight"] += b @ a * cfg.alpha / cfg.rank  # what merging did
    (tmp_path / "adapter").mkdir()
    save_file(adapter, str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    meta = {"base_sha256": sha, "peft": dataclasses.asdict(cfg)}
    (tmp_path / "adapter" / ADAPTER_CONFIG).write_text(yaml.safe_dump(meta))

    merged = make_model(**fields).eval()
    merged.load_state_dict(split_fused(fused, merged.config))
    loaded = load_adapter(ckpt.load(base_dir)[0], tmp_path / "adapter", sha).eval()
    assert sum(isinstance(m, LoRALinear) for m in loaded.modules()) == 2 * 5
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged(x))
    old = ["*.attn.qkv", "mlp.gate_up", "attn.proj", "mlp.*"]  # as config.yaml files hold them
    want = ["*.attn.q", "*.attn.k", "*.attn.v", "mlp.gate", "mlp.up", "attn.proj", "mlp.*"]
    assert unfused_targets(old) == want


def test_adapter_on_the_wrong_base_is_refused(tmp_path):
    model = make_model()
    base_dir = ckpt.save_checkpoint(tmp_path / "base", model, build_config({"model": BASE}), None)
    sha = ckpt.weights_sha256(base_dir)
    save_adapter(apply_peft(model, METHODS["lora"]), tmp_path / "adapter", METHODS["lora"], sha)
    other = make_model(init_std=0.2)
    other_dir = ckpt.save_checkpoint(tmp_path / "other", other, build_config({"model": BASE}), None)
    other_sha = ckpt.weights_sha256(other_dir)
    assert other_sha != sha
    with pytest.raises(LmforgeError, match="wrong base") as err:
        load_adapter(other, tmp_path / "adapter", other_sha)
    assert sha in one_line(err) and other_sha in one_line(err)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())


# ---------------------------------------------------------------- prefix, P-tuning


def test_zero_length_prefix_is_the_base_model():
    model = make_model(pos_encoding="rope", n_head=4, n_kv_head=2)
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    base, base_padded = model(x), model(x, attention_mask=mask)
    module = apply_peft(model, PeftConfig(method="prefix", num_virtual_tokens=0))
    assert (module(x) - base).abs().max() <= 1e-6
    assert (module(x, attention_mask=mask) - base_padded).abs().max() <= 1e-6


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_ptuning_equals_prepending_virtual_tokens(pos_encoding):
    """T logit rows for T real tokens, and the same logits as a forward over the virtual
    embeddings followed by the real ones (the definition of P-tuning)."""
    model = make_model(pos_encoding=pos_encoding, n_head=4, n_kv_head=2)
    module = apply_peft(model, METHODS["ptuning"]).eval()
    x = tokens(T=12)
    logits = module(x)
    assert logits.shape == (3, 12, V)
    virtual = module.source()[None].expand(3, -1, -1)  # (B, P, d)
    prepended = model(None, inputs_embeds=torch.cat([virtual, model.wte(x)], dim=1))[:, 4:]
    assert (logits - prepended).abs().max() <= 1e-5


VARIANTS = {
    "learned": {},
    "rope_gqa": dict(pos_encoding="rope", n_head=4, n_kv_head=2),
    "sliding_window": dict(pos_encoding="rope", n_head=4, n_kv_head=1, sliding_window=6),
}
PROMPTS = [[5, 17, 3, 44, 9, 12, 30], [8, 1], [60, 2, 33, 4]]
GREEDY = SamplingParams(max_new_tokens=30, temperature=0)  # past block_size: crops too


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["prefix", "ptuning"])
def test_generation_with_and_without_cache_and_padding(method, variant):
    module = apply_peft(make_model(**VARIANTS[variant]), METHODS[method])
    perturb(module)
    engine = Engine(module)
    cached = engine.generate(PROMPTS, GREEDY)
    uncached = engine.generate(PROMPTS, SamplingParams(**{**GREEDY.__dict__, "use_cache": False}))
    assert cached == uncached
    assert cached == [engine.generate([p], GREEDY)[0] for p in PROMPTS]
    assert len({tuple(row) for row in cached}) > 1


# ---------------------------------------------------------------- bad input, shares


def test_lora_target_that_matches_nothing_is_one_clear_line():
    model = make_model()
    with pytest.raises(LmforgeError, match="'attn.q_proj' matches no Linear") as err:
        apply_peft(model, PeftConfig(method="lora", targets=["attn.q", "attn.q_proj"]))
    assert "blocks.0.attn.q," in one_line(err)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # left as it was
    assert all(p.requires_grad for p in model.parameters())


def test_trainable_shares_by_hand():
    """llama-tiny at V=65: d 64, 4 query and 2 kv heads of 16, SwiGLU hidden 192, 2 layers."""
    d, q, kv, L, P, H = 64, 4 * 16, 2 * 16, 2, 16, 128
    per_layer = 2 * d + d * (q + 2 * kv) + d * d + d * 2 * 192 + 192 * d  # norms, attn, mlp
    base = 2 * V * d + L * per_layer + d  # untied embedding and head, final norm
    assert make_model(preset="llama-tiny").num_params() == base == 106_944

    lora = apply_peft(make_model(preset="llama-tiny"), PeftConfig(method="lora", rank=8))
    # A (r, in) and B (out, r) of attn.q, attn.k, attn.v, attn.proj
    lora_params = L * 8 * ((d + q) + 2 * (d + kv) + (d + d))
    assert trainable_share(lora) == (lora_params, base + lora_params) == (7168, 114_112)

    kv = L * 2 * 2 * 16  # every layer's keys and values
    prefix = P * d + (d * H + H) + (H * kv + kv)  # embeddings, MLP d -> H -> kv
    module = apply_peft(
        make_model(preset="llama-tiny"), PeftConfig(method="prefix", encoder_hidden=H)
    )
    assert trainable_share(module) == (prefix, base + prefix) == (25_856, 132_800)

    ptuning = P * d + (d * H + H) + (H * d + d)  # embeddings, MLP d -> H -> d
    module = apply_peft(
        make_model(preset="llama-tiny"), PeftConfig(method="ptuning", encoder_hidden=H)
    )
    assert trainable_share(module) == (ptuning, base + ptuning) == (17_600, 124_544)
