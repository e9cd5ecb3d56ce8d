"""Hugging Face conversion: parity with transformers both ways, bitwise round trips, tokenizers, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import load  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.config import build_config, model_config  # noqa: E402
from lmforge.model.gpt import GPT  # noqa: E402
from lmforge.model.hf import family  # noqa: E402
from lmforge.tokenizer import ByteTokenizer, CharTokenizer  # noqa: E402
from lmforge.train.checkpoint import save_checkpoint  # noqa: E402

VOCAB = 97
TEXT = "the quick brown fox jumps over the lazy dog\nand then the dog sleeps.\n"


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random init leaves biases at 0 and norms at 1; perturb everything so each tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _ids(vocab: int = VOCAB, T: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))


def _lmforge_checkpoint(folder: Path, tokenizer=None, **overrides) -> GPT:
    cfg = build_config({"model": {"vocab_size": VOCAB, **overrides}})
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    _perturb(model)
    save_checkpoint(folder, model, cfg, tokenizer)
    return model


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run `lmforge ARGV` in-process -> (exit code, stderr lines of that call only)."""
    capsys.readouterr()  # drop earlier output (transformers' progress bars)
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err.splitlines() if err else []


GPT2_CASES = [
    dict(preset="tiny", mlp="gelu"),
    dict(preset="tiny", mlp="gelu_tanh", tie_embeddings=False, ffn_hidden=48),
    dict(preset="shakespeare-char", n_layer=1, bias=False),  # exported with zero biases
]
LLAMA_CASES = [
    dict(preset="llama-tiny", rope_theta=500000.0, norm_eps=1e-6),  # GQA: 4 heads, 2 kv heads
    dict(preset="llama-tiny", n_kv_head=1, bias=True, tie_embeddings=True),
]


@pytest.mark.parametrize("overrides", GPT2_CASES + LLAMA_CASES)
def test_export_matches_transformers_and_round_trips(tmp_path, capsys, overrides):
    model = _lmforge_checkpoint(tmp_path / "ckpt", **overrides)
    assert (
        _cli(
            capsys, "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")
        )[0]
        == 0
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = "gpt2" if family(model.config) == "gpt2" else "llama"
    assert hf.config.model_type == expected
    ids = _ids()
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, diff

    assert (
        _cli(capsys, "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))[0]
        == 0
    )
    back, _ = load(tmp_path / "back")
    before, after = model.state_dict(), back.state_dict()
    for name, tensor in before.items():
        if name in after:
            assert torch.equal(after[name], tensor), name
        else:  # GPT-2 without biases comes back with zero biases; nothing else may differ
            assert not model.config.bias
    for name in set(after) - set(before):
        assert name.endswith(".bias") and not after[name].any(), name
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def _tiny_gpt2(vocab: int = VOCAB, tie: bool = True):
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=1234.0, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize(
    "make, weights",
    [
        (_tiny_gpt2, "safetensors"),
        (lambda: _tiny_gpt2(tie=False), "bin"),
        (_tiny_llama, "safetensors"),
        (_tiny_llama, "bin"),
    ],
)
def test_import_matches_transformers(tmp_path, capsys, make, weights):
    torch.manual_seed(0)
    hf = make().eval()
    _perturb(hf)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    if weights == "bin":  # the older format: a plain state dict, read with weights_only=True
        (src / "model.safetensors").unlink()
        torch.save(hf.state_dict(), src / "pytorch_model.bin")
    code, err = _cli(capsys, "import", "--hf", str(src), "--out", str(tmp_path / "ckpt"))
    assert code == 0, err
    model, tokenizer = load(tmp_path / "ckpt")
    assert tokenizer is None
    ids = _ids()
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_gpt2_124m_has_transformers_parameter_count():
    with torch.device("meta"):
        ours = GPT(model_config(preset="gpt2-124m")).num_params()
        theirs = sum(
            p.numel() for p in transformers.GPT2LMHeadModel(transformers.GPT2Config()).parameters()
        )
    assert ours == theirs == 124_439_808


def _bpe_folder(folder: Path) -> tuple[Path, object]:
    """A tiny GPT-2-style tokenizer saved the old way: vocab.json + merges.txt."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT.splitlines() * 5, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return folder, bpe


def test_gpt2_tokenizer_comes_along_both_ways(tmp_path, capsys):
    src, bpe = _bpe_folder(tmp_path / "hf")
    _tiny_gpt2(vocab=bpe.get_vocab_size()).save_pretrained(src)
    assert _cli(capsys, "import", "--hf", str(src), "--out", str(tmp_path / "ckpt"))[0] == 0
    _, tokenizer = load(tmp_path / "ckpt")
    sample = "the lazy fox jumps<|endoftext|>"
    assert tokenizer.encode(sample) == bpe.encode(sample).ids
    assert tokenizer.eot_id == bpe.token_to_id("<|endoftext|>")

    assert (
        _cli(
            capsys, "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")
        )[0]
        == 0
    )
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert auto(sample)["input_ids"] == bpe.encode(sample).ids
    assert auto.eos_token == "<|endoftext|>"
    assert (
        json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"]
        == tokenizer.eot_id
    )


@pytest.mark.parametrize(
    "tokenizer", [CharTokenizer.from_text(TEXT, with_eot=True), ByteTokenizer()]
)
def test_char_and_byte_tokenizers_export_as_equivalent_tokenizer_json(tmp_path, capsys, tokenizer):
    from tokenizers import Tokenizer

    _lmforge_checkpoint(
        tmp_path / "ckpt", tokenizer, preset="tiny", vocab_size=tokenizer.vocab_size
    )
    assert (
        _cli(
            capsys, "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")
        )[0]
        == 0
    )
    exported = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    sample = "the dog\n  jumps over"
    ids = tokenizer.encode(sample) + [tokenizer.eot_id]
    assert exported.encode(sample + "<|endoftext|>").ids == ids
    assert exported.decode(ids, skip_special_tokens=True) == sample


def test_unsupported_features_are_named(tmp_path, capsys):
    _lmforge_checkpoint(tmp_path / "ckpt", preset="tiny", pos_encoding="sinusoidal")
    code, err = _cli(
        capsys, "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")
    )
    assert code == 1 and len(err) == 1 and "pos_encoding=sinusoidal" in err[0]
    assert not (tmp_path / "hf").exists()

    src = tmp_path / "llama3"
    _tiny_llama().save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}
    (src / "config.json").write_text(json.dumps(config))
    code, err = _cli(capsys, "import", "--hf", str(src), "--out", str(tmp_path / "x"))
    assert code == 1 and len(err) == 1 and "llama3" in err[0]


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _lmforge_checkpoint(tmp_path / "ckpt", preset="tiny")
    cases = {
        ("import", "--hf", str(tmp_path / "missing"), "--out", str(tmp_path / "a")): "not found",
        ("import", "--hf", str(foreign), "--out", str(tmp_path / "a")): "no config.json",
        ("import", "--hf", str(bert), "--out", str(tmp_path / "a")): "'bert'",
        ("import", "--hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a")): "no config.json",
        (
            "export",
            "--checkpoint",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "a"),
        ): "not found",
        ("export", "--checkpoint", str(foreign), "--out", str(tmp_path / "a")): "neither",
        ("export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(foreign)): "not empty",
    }
    for argv, expected in cases.items():
        code, err = _cli(capsys, *argv)
        assert code == 1 and len(err) == 1 and expected in err[0], (argv, err)
        assert not (tmp_path / "a").exists()
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    src = tmp_path / "hf"
    assert _cli(capsys, "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(src))[0] == 0
    code, err = _cli(capsys, "import", "--hf", str(src), "--out", str(foreign))
    assert code == 1 and len(err) == 1 and "not empty" in err[0]
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- building on the meta device


@pytest.mark.parametrize("make", [_tiny_gpt2, _tiny_llama, lambda: _tiny_gpt2(tie=False)])
def test_import_and_load_build_on_meta_without_random_init(tmp_path, capsys, monkeypatch, make):
    """Import and checkpoint loading skip GPT.init_weights (a 1B model would spend most of the
    import drawing random weights) and give the same model as copying into an initialised one."""
    torch.manual_seed(0)
    hf = make().eval()
    _perturb(hf)
    hf.save_pretrained(tmp_path / "hf")
    from lmforge.model.hf import from_hf_state_dict, load_hf, read_hf_weights

    cfg = load_hf(tmp_path / "hf")[1]  # the reference: a random init, then weights copied in
    torch.manual_seed(0)
    ref = GPT(cfg.model).eval()
    ref.load_state_dict(from_hf_state_dict(read_hf_weights(tmp_path / "hf"), cfg.model))

    monkeypatch.setattr(GPT, "init_weights", lambda self: pytest.fail("init_weights called"))
    code, err = _cli(capsys, "import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "c"))
    assert code == 0, err
    imported, _, _ = load_hf(tmp_path / "hf")
    loaded, _ = load(tmp_path / "c")
    ids = _ids()
    for model in (imported, loaded):
        assert not model.training
        assert (model.lm_head.weight is model.wte.weight) == ref.config.tie_embeddings
        assert model.num_params() == ref.num_params()
        tensors = [*model.parameters(), *model.buffers()]
        assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        with torch.no_grad():
            assert torch.equal(model(ids), ref(ids))
        for name, tensor in ref.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
    if ref.config.pos_encoding == "rope":
        assert torch.equal(loaded.rope_inv_freq, ref.rope_inv_freq)


# ---------------------------------------------------------------- Llama BOS / EOS / stopping

LLAMA_TEXT = "the quick brown fox jumps over the lazy dog\nand then the dog sleeps.\n"


def _llama_tokenizer(folder: Path):
    """A tiny Llama-2-style tokenizer: Metaspace BPE, <s> prepended by the post-processor,
    tokenizer_config.json with add_bos_token and AddedToken dicts (as transformers writes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=120, min_frequency=1, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", "<|eot_id|>"])  # fmt: skip
    tok.train_from_iterator(LLAMA_TEXT.splitlines() * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(folder / "tokenizer.json"))

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False,
                "normalized": False, "rstrip": False, "single_word": False, "special": True}  # fmt: skip

    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": added("<s>"), "eos_token": added("</s>"), "unk_token": "<unk>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def _llama_that_stops(folder: Path, vocab: int, prompt_ids: list[int], chain: list[int]) -> None:
    """A LlamaForCausalLM whose greedy continuation of prompt_ids is `chain`: attention and MLP
    outputs are zeroed, so the last hidden state is the current token's embedding, and the
    head maps each token of [prompt[-1], *chain[:-1]] to the next one of `chain`."""
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=[2, 3],
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = hf.model.embed_tokens.weight
        normed = emb / emb.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
        hf.lm_head.weight.zero_()
        for current, following in zip([prompt_ids[-1], *chain[:-1]], chain):
            hf.lm_head.weight[following] = 10 * normed[current]
    hf.save_pretrained(folder)
    generation = {"bos_token_id": 1, "eos_token_id": [2, 3]}
    (folder / "generation_config.json").write_text(json.dumps(generation))


def test_imported_llama_has_bos_eos_and_stops_generating(tmp_path, capsys):
    from lmforge.engine import Engine, SamplingParams
    from lmforge.model.hf import load_hf

    src = tmp_path / "hf"
    src.mkdir()
    tok = _llama_tokenizer(src)
    prompt = "the lazy fox"
    prompt_ids = tok.encode(prompt).ids  # with <s>
    vocab = tok.get_vocab_size()
    a, b = [i for i in range(10, vocab) if i != prompt_ids[-1]][:2]  # two ordinary tokens
    _llama_that_stops(src, vocab, prompt_ids, [a, b, 2])
    assert _cli(capsys, "import", "--hf", str(src), "--out", str(tmp_path / "ckpt"))[0] == 0

    model, tokenizer = load(tmp_path / "ckpt")
    assert (tokenizer.bos_id, tokenizer.eot_id, tokenizer.add_bos) == (1, 2, True)
    assert tokenizer.stop_ids == (2, 3)
    auto = transformers.AutoTokenizer.from_pretrained(src)
    for text in (prompt, "and then the dog sleeps.", ""):
        assert tokenizer.encode(text) == auto(text)["input_ids"]
    assert tokenizer.encode(prompt) == prompt_ids

    free = Engine(model).generate([prompt_ids], SamplingParams(max_new_tokens=6, temperature=0))
    assert free[0][:3] == [a, b, 2]  # without stop ids it runs on past </s>
    params = SamplingParams(max_new_tokens=6, temperature=0, stop_ids=tokenizer.stop_ids)
    assert Engine(model).generate([prompt_ids], params) == [[a, b]]

    capsys.readouterr()
    args = ["--prompt", prompt, "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]
    for extra in ([], ["--stream"]):
        assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), *args, *extra]) == 0
        assert capsys.readouterr().out == prompt + tokenizer.decode([a, b]) + "\n"

    # the extra stop id from generation_config.json ends generation too
    _llama_that_stops(src, vocab, prompt_ids, [b, 3])
    model, _, _ = load_hf(src)
    assert Engine(model).generate([prompt_ids], params) == [[b]]

    # export keeps BOS/EOS for transformers, and importing the export gives them back
    out = tmp_path / "out"
    assert _cli(capsys, "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(out))[0] == 0
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert (auto.bos_token, auto.eos_token) == ("<s>", "</s>")
    assert auto(prompt)["input_ids"] == prompt_ids
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (1, [2, 3])
    assert _cli(capsys, "import", "--hf", str(out), "--out", str(tmp_path / "back"))[0] == 0
    _, back = load(tmp_path / "back")
    assert (back.bos_id, back.eot_id, back.stop_ids, back.add_bos) == (1, 2, (2, 3), True)
