"""Compression: quantized checkpoints (int8 / int4 through torchao) against the float model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.cli import main
from lmforge.compress.quantize import QUANTIZED, pack_int4, quantize_model, unpack_int4
from lmforge.config import QuantizeConfig, build_config
from lmforge.model.gpt import GPT
from lmforge.tokenizer import CharTokenizer
from lmforge.train.checkpoint import save_checkpoint

TEXT = "First Citizen: Before we proceed any further, hear me speak.\n" * 4

pytest.importorskip("torchao")


def float_checkpoint(folder, **model) -> tuple[GPT, CharTokenizer]:
    """A random model whose logits depend on context (untied head or larger init), saved."""
    tokenizer = CharTokenizer.from_text(TEXT)
    fields = dict(preset="llama-tiny", vocab_size=tokenizer.vocab_size, init_std=0.1) | model
    cfg = build_config({"model": fields})
    torch.manual_seed(0)
    gpt = GPT(cfg.model).eval()
    save_checkpoint(folder, gpt, cfg, tokenizer)
    return gpt, tokenizer


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("tie", [True, False])
def test_int8_logits_within_three_percent_of_float(tmp_path, tie):
    """int8 weights, one scale per output channel (absmax / 127): each weight is off by at
    most half a step, 0.4% of its row's largest. Stated tolerance: on a random model with
    large weights (init 0.1, where errors compound most) the logits differ from fp32's by at
    most 3% of the largest logit (measured: 1.6% tied, 2.4% untied; int4 in groups of 32:
    20-29%). A trained model's perplexity moves far less (BENCHMARKS.md)."""
    model, tok = float_checkpoint(tmp_path / "f", tie_embeddings=tie)
    x = ids(tok.vocab_size)
    with torch.no_grad():
        want = model(x)
        got = quantize_model(model, QuantizeConfig("int8"))(x)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    assert type(model.blocks[0].attn.q.weight).__name__ == "Int8Tensor"  # torchao's


@pytest.mark.parametrize(
    "method, group, activations, tie",
    [
        ("int8", 128, "none", True),
        ("int8", 128, "none", False),
        ("int8", 128, "int8", True),
        ("int4", 32, "none", True),
        ("int4", 64, "none", False),
    ],
)
def test_quantized_checkpoint_round_trips(tmp_path, capsys, method, group, activations, tie):
    """`lmforge quantize` writes a checkpoint that lmforge.load rebuilds into the same model:
    logits equal bitwise to the quantized model in memory, a smaller file (int4 < int8 <
    fp32; a tied int8 table stored once), and it generates."""
    model, tok = float_checkpoint(tmp_path / "f", tie_embeddings=tie, d_model=128)
    args = ["--method", method, "--group-size", str(group), "--activations", activations]
    code, err = cli(capsys, "quantize", "--checkpoint", str(tmp_path / "f"), *args,
                    "--out", str(tmp_path / "q"))  # fmt: skip
    assert code == 0, err
    loaded, loaded_tok = lmforge.load(tmp_path / "q")
    assert loaded_tok.vocab_size == tok.vocab_size
    x = ids(tok.vocab_size)
    with torch.no_grad():
        want = quantize_model(model, QuantizeConfig(method, group, activations))(x)
        assert torch.equal(loaded(x), want)
    sizes = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("f", "q")}
    assert sizes["q"] < (0.3 if method == "int8" else 0.25) * sizes["f"]
    code, err = cli(capsys, "generate", "--checkpoint", str(tmp_path / "q"), "--prompt", "First",
                    "--max-new-tokens", "5", "--device", "cpu")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_of_the_fused_layout_loads(tmp_path, capsys, fused_layout, method):
    """A quantized checkpoint written while q, k, v were one Linear attn.qkv and SwiGLU's gate,
    up one mlp.gate_up: torchao's parts of those weights (integer values, scales, zero points;
    rows are the weight's rows) split into the separate Linears, the same logits bitwise."""
    _, tok = float_checkpoint(tmp_path / "f")
    args = ["--method", method, "--group-size", "32", "--out", str(tmp_path / "q")]
    assert cli(capsys, "quantize", "--checkpoint", str(tmp_path / "f"), *args)[0] == 0
    x = ids(tok.vocab_size)
    with torch.no_grad():
        want = lmforge.load(tmp_path / "q")[0](x)

    path = str(tmp_path / "q" / "model.safetensors")
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()

    def old(name: str) -> str | None:  # a weight's name in the fused layout; None: k, v, up
        if re.search(r"\.(attn\.[kv]|mlp\.up)\.", name):
            return None
        return name.replace(".attn.q.", ".attn.qkv.").replace(".mlp.gate.", ".mlp.gate_up.")

    metadata = {old(k): v for k, v in metadata.items() if old(k)}  # torchao's type per weight
    info = json.loads(metadata[QUANTIZED])
    info["int4_packed"] = [old(k) for k in info["int4_packed"] if old(k)]
    metadata[QUANTIZED] = json.dumps(info)
    tensors = fused_layout(load_file(path))
    assert "blocks.0.attn.qkv._weight_qdata" in tensors
    save_file(tensors, path, metadata=metadata)
    with torch.no_grad():
        assert torch.equal(lmforge.load(tmp_path / "q")[0](x), want)


def test_int4_packs_two_values_per_byte():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # (3, 32)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), q)


def test_bad_quantize_requests_are_one_line_each(tmp_path, capsys):
    float_checkpoint(tmp_path / "f", d_model=64)
    base = ["quantize", "--checkpoint", str(tmp_path / "f")]
    code, err = cli(
        capsys, *base, "--method", "int4", "--group-size", "48", "--out", str(tmp_path / "a")
    )
    assert code == 1 and "group_size=48 does not divide the input width 64" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "a").exists()
    code, err = cli(
        capsys, *base, "--method", "int4", "--activations", "int8", "--out", str(tmp_path / "b")
    )
    assert code == 1 and "activations=int8 needs quantize.method=int8" in err
    assert cli(capsys, *base, "--out", str(tmp_path / "q"))[0] == 0
    code, err = cli(
        capsys, "quantize", "--checkpoint", str(tmp_path / "q"), "--out", str(tmp_path / "c")
    )
    assert code == 1 and "already quantized" in err
    code, err = cli(capsys, *base, "--out", str(tmp_path / "q"))  # never over what the user had
    assert code == 1 and len(err.splitlines()) == 1


def test_hf_export_refuses_a_quantized_checkpoint(tmp_path, capsys):
    float_checkpoint(tmp_path / "f")
    assert (
        cli(capsys, "quantize", "--checkpoint", str(tmp_path / "f"), "--out", str(tmp_path / "q"))[
            0
        ]
        == 0
    )
    code, err = cli(
        capsys, "export", "--checkpoint", str(tmp_path / "q"), "--out", str(tmp_path / "hf")
    )
    assert code == 1 and "is quantized (int8); export the float checkpoint" in err
