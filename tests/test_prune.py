"""Pruning and low-rank factorisation (lmforge/compress/prune.py, lowrank.py, `lmforge prune`):
removing units of zero importance changes nothing, the smaller model is exactly GPT(new config)
and loads again, magnitude pruning reaches its sparsity and keeps it through a fine-tune, a
full-rank factorisation reproduces the model, and bad input is one clear error."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.compress.lowrank import low_rank
from lmforge.compress.prune import block_linears, magnitude_prune, sparsity, structured_prune
from lmforge.config import build_config
from lmforge.engine import Engine, SamplingParams
from lmforge.model.gpt import GPT
from lmforge.model.hf import load_hf
from lmforge.tokenizer import CharTokenizer
from lmforge.train.checkpoint import save_checkpoint

TEXT = "".join(
    f"Citizen {i}: we are accounted poor citizens, the patricians good.\n" for i in range(60)
)
GPT2_STYLE = dict(preset="tiny", n_head=4)  # MHA, biases, GELU, learned positions
LLAMA_STYLE = dict(preset="llama-tiny")  # GQA (4 query heads on 2 kv heads), SwiGLU, RoPE
STYLES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}


def make(seed: int = 0, **model) -> GPT:
    cfg = build_config({"model": {"vocab_size": 50, "init_std": 0.1, **model}})
    torch.manual_seed(seed)
    return GPT(cfg.model).eval()


def ids(vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))


def checkpoint(tmp_path, **model):
    """A random model saved with a char tokenizer of TEXT and data.path pointing at TEXT."""
    (tmp_path / "text.txt").write_text(TEXT)
    tokenizer = CharTokenizer.from_text(TEXT)
    fields = dict(LLAMA_STYLE, vocab_size=tokenizer.vocab_size, init_std=0.1) | model
    cfg = build_config(
        {
            "model": fields,
            "data": {"path": str(tmp_path / "text.txt")},
            "train": {"micro_batch_size": 4, "eval_steps": 2, "log_interval": 1},
        }
    )
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", GPT(cfg.model), cfg, tokenizer)
    return tmp_path / "ckpt"


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["prune", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.err.strip() if code else captured.out


@torch.no_grad()
def zero_groups(model: GPT, groups: list[int]) -> None:
    """Silence these kv groups of every layer: the output columns of their query heads in even
    layers, their value rows (and biases) in odd ones."""
    cfg = model.config
    g, hd = cfg.n_head // cfg.kv_heads, cfg.head_dim
    for i, block in enumerate(model.blocks):
        a = block.attn
        for j in groups:
            if i % 2 == 0:
                a.proj.weight[:, j * g * hd : (j + 1) * g * hd] = 0
            else:
                a.v.weight[j * hd : (j + 1) * hd] = 0
                if a.v.bias is not None:
                    a.v.bias[j * hd : (j + 1) * hd] = 0


@torch.no_grad()
def zero_channels(model: GPT, channels: list[int]) -> None:
    """Silence these MLP channels: their output columns in even layers, their input rows
    (fc, or SwiGLU's gate, with biases) in odd ones."""
    for i, block in enumerate(model.blocks):
        mlp = block.mlp
        if i % 2 == 0:
            mlp.proj.weight[:, channels] = 0
        else:
            fc = mlp.gate if mlp.kind == "swiglu" else mlp.fc
            fc.weight[channels] = 0
            if fc.bias is not None:
                fc.bias[channels] = 0


@pytest.mark.parametrize("style", STYLES)
def test_removing_zero_importance_heads_leaves_outputs_unchanged(style):
    model = make(**STYLES[style])
    nkv = model.config.kv_heads
    zero_groups(model, [1])
    pruned = structured_prune(model, heads_fraction=1 / nkv, ffn_fraction=0.0)
    assert pruned.config.kv_heads == nkv - 1
    assert pruned.config.n_head == model.config.n_head - model.config.n_head // nkv
    assert pruned.config.head_dim == model.config.head_dim
    with torch.no_grad():
        assert (pruned(ids()) - model(ids())).abs().max() <= 1e-6


@pytest.mark.parametrize("style", STYLES)
def test_removing_zero_importance_mlp_channels_leaves_outputs_unchanged(style):
    model = make(**STYLES[style])
    hidden = model.config.ffn_dim
    zero_channels(model, [0, 5, 17, hidden - 1])
    pruned = structured_prune(model, heads_fraction=0.0, ffn_fraction=4 / hidden)
    assert pruned.config.ffn_hidden == hidden - 4
    with torch.no_grad():
        assert (pruned(ids()) - model(ids())).abs().max() <= 1e-6


def test_structured_checkpoint_is_gpt_of_its_config_and_loads_and_generates(tmp_path, capsys):
    src = checkpoint(tmp_path)
    code, out = cli(
        capsys, "--checkpoint", src, "--out", tmp_path / "p", "--method", "structured",
        "--heads-fraction", 0.5, "--ffn-fraction", 0.5,
    )  # fmt: skip
    assert code == 0 and "parameters:" in out and "val loss:" in out, out
    model, tokenizer = lmforge.load(tmp_path / "p")
    original, _ = lmforge.load(src)
    cfg = model.config
    assert (cfg.n_head, cfg.kv_heads, cfg.head_dim) == (2, 1, original.config.head_dim)
    assert cfg.ffn_hidden == original.config.ffn_dim // 2
    assert model.num_params() == GPT(cfg).num_params() < original.num_params()
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert len(Engine(model).generate([tokenizer.encode("Citizen")], params)[0]) == 8


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_reaches_the_requested_sparsity(scope):
    model = make(**LLAMA_STYLE)
    magnitude_prune(model, 0.6, scope)
    weights = [m.weight for m in block_linears(model)]
    total = sum(w.numel() for w in weights)
    if scope == "global":
        assert sparsity(model) == round(0.6 * total) / total
        assert len({round(float((w == 0).float().mean()), 2) for w in weights}) > 1  # uneven
    else:
        for w in weights:
            assert int((w == 0).sum()) == round(0.6 * w.numel())


def test_magnitude_zeros_survive_a_recovery_fine_tune(tmp_path, capsys):
    src = checkpoint(tmp_path)
    model, _ = lmforge.load(src)
    masks = magnitude_prune(model, 0.5, "global")  # what the CLI will choose
    code, out = cli(
        capsys, "--checkpoint", src, "--out", tmp_path / "p", "--sparsity", 0.5,
        "--finetune-steps", 3, f"--run.dir={tmp_path / 'runs'}", "--run.sample_tokens=0",
    )  # fmt: skip
    assert code == 0 and "after 3 fine-tune steps" in out, out
    tuned, _ = lmforge.load(tmp_path / "p")
    for pruned_w, tuned_m, mask in zip(
        (m.weight for m in block_linears(model)), block_linears(tuned), masks
    ):
        assert torch.all(tuned_m.weight[mask == 0] == 0)
        assert not torch.equal(tuned_m.weight[mask == 1], pruned_w[mask == 1])  # it trained
    assert sparsity(tuned) == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("style", STYLES)
def test_low_rank_at_full_rank_reproduces_the_logits(style):
    model = make(**STYLES[style])
    full = low_rank(model, rank=model.config.ffn_dim)
    assert isinstance(full.blocks[0].attn.q, torch.nn.Sequential)
    with torch.no_grad():
        assert (full(ids()) - model(ids())).abs().max() <= 1e-4


def test_low_rank_checkpoint_is_smaller_and_loads(tmp_path, capsys):
    src = checkpoint(tmp_path)
    code, out = cli(
        capsys, "--checkpoint", src, "--out", tmp_path / "lr", "--method", "lowrank", "--rank", 8
    )
    assert code == 0, out
    loaded, _ = lmforge.load(tmp_path / "lr")
    original, _ = lmforge.load(src)
    assert loaded.config.low_rank == 8
    assert loaded.num_params() < original.num_params()
    with torch.no_grad():
        want = low_rank(original, 8)(ids(original.config.vocab_size))
        assert torch.equal(loaded(ids(original.config.vocab_size)), want)


def test_pruned_llama_exports_to_hugging_face_and_back(tmp_path, capsys):
    model = structured_prune(make(**LLAMA_STYLE), heads_fraction=0.5, ffn_fraction=0.25)
    cfg = build_config({"model": vars(model.config)})
    save_checkpoint(tmp_path / "ckpt", model, cfg, None)
    assert (
        main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    )
    imported, imported_cfg, _ = load_hf(tmp_path / "hf")
    assert imported_cfg.model.head_dim == model.config.head_dim
    with torch.no_grad():
        assert torch.equal(imported(ids()), model(ids()))


@pytest.mark.parametrize(
    "model, named",
    [
        (lambda: structured_prune(make(**GPT2_STYLE), 0.5, 0.0), "head_dim=8 with n_head=2"),
        (lambda: low_rank(make(**LLAMA_STYLE), 4), "low_rank=4"),
    ],
)
def test_hf_export_refuses_pruned_heads_in_gpt2_and_low_rank(tmp_path, capsys, model, named):
    model = model()
    save_checkpoint(tmp_path / "ckpt", model, build_config({"model": vars(model.config)}), None)
    capsys.readouterr()
    code = main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and named in err[0], err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sparsity", 1.0], "--sparsity 1.0 must be in [0, 1)"),
        (["--sparsity", -0.1], "--sparsity -0.1 must be in [0, 1)"),
        (["--method", "structured", "--heads-fraction", 0.9], "would remove all 2 kv head"),
        (["--method", "lowrank", "--rank", 0], "--rank 0 must be > 0"),
        (["--method", "lowrank", "--rank", -3], "--rank -3 must be > 0"),
        (["--train.lr=1e-3"], "only tune the recovery fine-tune"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_code_1(tmp_path, capsys, flags, message):
    src = checkpoint(tmp_path)
    code, err = cli(capsys, "--checkpoint", src, "--out", tmp_path / "p", *flags)
    assert code == 1 and message in err and "\n" not in err, err
    assert not (tmp_path / "p").exists()
