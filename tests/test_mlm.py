"""Masked-language modelling (BERT): bidirectional attention (model.causal=false), the masking
of lmforge/data/mlm.py and its statistics, the loss against cross-entropy by hand, next-sentence
pairs, tiny MLM runs that learn, classification from an MLM checkpoint, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics

import lmforge
from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.config import build_config, model_config
from lmforge.data.loader import RandomWindowLoader, bundled_text_path
from lmforge.data.mlm import (
    Masker,
    MaskingLoader,
    MLMTokens,
    SentencePairLoader,
    mlm_vocab_size,
)
from lmforge.model.gpt import GPT, KVCache
from lmforge.model.heads import SequenceClassifier
from lmforge.train.distributed import DistInfo
from lmforge.train.losses import MaskedLMLoss
from lmforge.train.trainer import Trainer

V = 65
ROOT = Path(__file__).resolve().parents[1]
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def make_model(causal: bool, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = {"preset": "tiny", "vocab_size": V, **overrides}
    return GPT(model_config(causal=causal, **fields)).eval()


# ---------------------------------------------------------------- bidirectional attention


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_a_bidirectional_model_sees_later_tokens_and_a_causal_one_does_not(preset):
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % V  # a later token
    for causal in (True, False):
        model = make_model(causal, preset=preset)
        with torch.no_grad():
            diff = (model(ids)[:, :9] - model(changed)[:, :9]).abs().max()
        assert (diff == 0) if causal else (diff > 1e-4), (causal, diff)


def test_a_bidirectional_model_still_hides_padding():
    model = make_model(False)
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        alone = model(ids)
        right = model(torch.cat([ids, pad], 1), torch.tensor([[1] * 8 + [0] * 4]))[:, :8]
        other_pad = model(torch.cat([ids, pad + 7], 1), torch.tensor([[1] * 8 + [0] * 4]))[:, :8]
    assert (right - alone).abs().max() < 1e-5 and torch.equal(right, other_pad)


def test_kv_cache_generation_refuses_a_bidirectional_model():
    model = make_model(False)
    cache = KVCache(model.config, 1, 8, device="cpu", dtype=torch.float32)
    with pytest.raises(LmforgeError, match="bidirectional") as err:
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- masking


def test_masking_selects_15_percent_of_real_tokens_then_80_10_10():
    B, T, eot, pad = 400, 128, 0, 1
    masker = Masker(V, never=[eot, pad])
    mask_id = MLMTokens.after(V).mask
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V, (B, T), generator=g)
    ids[torch.rand(B, T, generator=g) < 0.05] = eot  # specials scattered through the rows
    attention = torch.ones(B, T, dtype=torch.long)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    attention[torch.arange(T)[None, :] >= lengths[:, None]] = 0  # right padding
    ids[attention == 0] = pad
    inputs, labels = masker(ids, list(range(B)), attention)
    selected = labels != -100
    candidate = (ids != eot) & (attention == 1)
    assert not (selected & ~candidate).any()  # never a special or a padding position
    assert torch.equal(labels[selected], ids[selected])
    assert ((selected.sum(-1) - 0.15 * candidate.sum(-1)).abs() <= 0.5).all()  # per row
    n = selected.sum().item()
    masked = (inputs[selected] == mask_id).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    randomised = 1 - masked - kept  # a random token equal to the original counts as kept
    assert abs(masked - 0.8) < 0.02 and abs(randomised - 0.1 * (V - 1) / V) < 0.015
    assert abs(kept - 0.1 * (V + 1) / V) < 0.015
    assert torch.equal(inputs[~selected], ids[~selected])  # only selected positions change
    assert inputs.max() <= mask_id and not (inputs[selected & (inputs != mask_id)] >= V).any()


def _masking_loader(micro: int, tokens: np.ndarray) -> MaskingLoader:
    windows = RandomWindowLoader([tokens], 32, micro, seed=3)
    return MaskingLoader(windows, Masker(V), seed=3)


def test_masking_is_the_same_at_any_accumulation_split_and_after_a_resume():
    tokens = np.random.default_rng(0).integers(0, V, 5000)
    whole = _masking_loader(8, tokens)
    split = _masking_loader(4, tokens)
    for _ in range(2):
        a, b = whole.next_step(1)[0], split.next_step(2)
        for key in ("input_ids", "labels"):
            assert torch.equal(a[key], torch.cat([x[key] for x in b]))
    state = whole.state_dict()
    expected = whole.next_step(1)[0]
    resumed = _masking_loader(8, tokens)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.next_step(1)[0]["input_ids"], expected["input_ids"])


# ---------------------------------------------------------------- the loss


def test_the_mlm_loss_is_cross_entropy_on_the_selected_positions_by_hand():
    torch.manual_seed(0)
    model = GPT(model_config(preset="tiny", vocab_size=mlm_vocab_size(V), causal=False))
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    inputs, labels = Masker(V)(ids, [7, 8, 9])
    batch = {"input_ids": inputs, "labels": labels}
    loss_fn = MaskedLMLoss()
    loss, metrics = loss_fn(model, batch)
    logits = model(inputs)
    by_hand, correct = torch.tensor(0.0), 0
    for b, t in (labels != -100).nonzero().tolist():
        by_hand += F.cross_entropy(logits[b, t][None], labels[b, t][None])
        correct += int(logits[b, t].argmax() == labels[b, t])
    assert loss_fn.units(batch) == (labels != -100).sum() == 3 * 3  # round(0.15 * 20) per row
    assert torch.allclose(loss, by_hand) and metrics["mlm_accuracy"] == correct


def test_mlm_and_nsp_accumulation_equals_the_full_batch(tmp_path):
    stream = np.random.default_rng(0).integers(0, V, 5000)
    tokens = MLMTokens.after(V)
    results = []
    for micro, accum in ((8, 1), (2, 4)):
        overrides = {"model.preset": "tiny", "model.causal": False, "train.objective": "mlm"}
        overrides |= {"train.nsp": True, "train.micro_batch_size": micro, "train.warmup_steps": 1}
        overrides |= {"train.grad_accum_steps": accum, "train.precision": "fp32"}
        overrides |= {"model.vocab_size": mlm_vocab_size(V), "run.tensorboard": False}
        cfg = build_config(overrides=[f"--{k}={v}" for k, v in overrides.items()])
        torch.manual_seed(0)
        pairs = SentencePairLoader([stream], cfg.model.block_size, micro, 5, tokens)
        loader = MaskingLoader(pairs, Masker(V), seed=5)
        info = DistInfo(rank=0, world_size=1, device=torch.device("cpu"))
        loss_fn = MaskedLMLoss((tokens.is_next, tokens.not_next))
        trainer = Trainer(cfg, GPT(cfg.model), loader, None, tmp_path, info, loss_fn)
        initial = [p.detach().clone() for p in trainer.model.parameters()]
        for _ in range(3):
            trainer.train_step()
        params = list(trainer.model.parameters())
        assert all(not torch.equal(a, b) for a, b in zip(initial, params))  # every one trained
        results.append(torch.cat([p.detach().flatten() for p in params]))
    full, accumulated = results
    assert (full - accumulated).norm() / full.norm() <= 5e-6


# ---------------------------------------------------------------- next-sentence prediction


def test_sentence_pairs_are_half_real_continuations_laid_out_as_cls_a_sep_b_sep():
    stream = np.array([ord(c) - ord("a") for c in ALPHABET * 400])
    tokens = MLMTokens.after(26)
    loader = SentencePairLoader([stream], 24, 500, seed=0, tokens=tokens)
    batch = loader.next_step(2)[1]
    rows, not_next = batch["input_ids"], batch["nsp_label"]
    assert abs(not_next.float().mean().item() - 0.5) < 0.05
    assert (rows[:, 0] == tokens.cls).all() and (rows[:, -1] == tokens.sep).all()
    assert ((rows == tokens.sep).sum(-1) == 2).all() and ((rows == tokens.cls).sum(-1) == 1).all()
    sep = (rows[:, 1:-1] == tokens.sep).float().argmax(-1) + 1  # (n,) the first [SEP]
    i = torch.arange(len(rows))
    follows = rows[i, sep + 1] == (rows[i, sep - 1] + 1) % 26  # B goes on where A stopped
    assert follows[not_next == 0].all()
    assert follows[not_next == 1].float().mean() < 0.1  # a random place: 1 in 26


# ---------------------------------------------------------------- tiny runs and the verbs


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shakespeare_40k.txt"
    path.write_text(bundled_text_path().read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def _train(data: Path, run_dir: Path, name: str, *extra: str) -> int:
    argv = [
        "train", f"--data.path={data}", "--model.preset=llama-tiny", "--model.causal=false",
        "--train.objective=mlm", f"--run.dir={run_dir}", f"--run.name={name}",
        "--run.tensorboard=false", "--train.precision=fp32", "--train.micro_batch_size=16",
        "--train.warmup_steps=10", "--train.lr=1e-2", "--train.min_lr=1e-3", *extra,
    ]  # fmt: skip
    return main(argv)


def _evals(run: Path) -> list[dict]:
    rows = read_metrics(run)
    return [r for r in rows if "val_loss" in r]


def test_a_tiny_mlm_run_learns_and_beats_the_most_frequent_token(text_file, tmp_path, capsys):
    args = ("--model.block_size=32", "--train.micro_batch_size=32", "--train.max_steps=300")
    args += ("--train.eval_interval=300",)
    assert _train(text_file, tmp_path, "mlm", *args) == 0, capsys.readouterr().err
    first, last = _evals(tmp_path / "mlm")
    assert last["val_mlm_loss"] < first["val_mlm_loss"] - 1.0
    assert "val_bpb" not in last and "val_ppl" not in last  # not a next-token loss
    text = text_file.read_text()
    chance = max(text.count(c) for c in set(text)) / len(text)  # always the commonest char
    assert last["val_mlm_accuracy"] > chance + 0.08, (last, chance)  # 0.27 against 0.15
    print(last, chance)
    assert "masked-token accuracy" in capsys.readouterr().out


def test_next_sentence_prediction_trains_beside_the_mlm(tmp_path, capsys):
    data = tmp_path / "abc.txt"
    data.write_text(ALPHABET * 800)  # one document without a newline: no separator needed
    args = ("--train.nsp=true", "--model.block_size=16", "--train.micro_batch_size=32")
    args += ("--train.max_steps=400", "--train.eval_interval=400")
    assert _train(data, tmp_path, "nsp", *args) == 0, capsys.readouterr().err
    first, last = _evals(tmp_path / "nsp")
    assert last["val_nsp_loss"] < first["val_nsp_loss"] - 0.1
    assert last["val_nsp_accuracy"] > 0.65 and last["val_mlm_accuracy"] > 0.8
    assert last["val_loss"] == pytest.approx(last["val_mlm_loss"] + last["val_nsp_loss"])


def test_classify_starts_from_an_mlm_checkpoint_and_causal_lm_verbs_refuse_it(tmp_path, capsys):
    prefs = json.loads((ROOT / "lmforge" / "assets" / "preferences.json").read_text())[:60]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(prefs))
    base_args = ("--data.tokenizer=byte", "--train.max_steps=5", "--train.eval_interval=5")
    texts = tmp_path / "texts.txt"
    texts.write_text(" ".join(r["chosen"] + " " + r["rejected"] for r in prefs))
    assert _train(texts, tmp_path, "base", *base_args) == 0, capsys.readouterr().err
    base = tmp_path / "base"
    argv = [
        "classify", "--base", str(base), "--data", str(data),
        "--classify.pairs=chosen=polite,rejected=rude", f"--run.dir={tmp_path}",
        "--run.name=cls", "--train.max_steps=4", "--train.eval_interval=4",
        "--run.tensorboard=false", "--train.precision=fp32",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert [r["step"] for r in _evals(tmp_path / "cls")] == [0, 4]
    classifier, _ = lmforge.load(tmp_path / "cls")
    assert isinstance(classifier, SequenceClassifier) and not classifier.config.causal
    assert set(classifier.predict([prefs[0]["chosen"]])) <= {"polite", "rude"}
    capsys.readouterr()
    runs = tmp_path / "refused"
    run_args = [f"--run.dir={runs}", "--run.tensorboard=false"]
    for verb in (
        ["generate", "--checkpoint", str(base), "--prompt", "Hi", "--max-new-tokens", "3"],
        ["export", "--checkpoint", str(base), "--out", str(tmp_path / "hf")],
        ["serve", "--checkpoint", str(base)],
        ["sft", "--base", str(base), "--data", str(data), *run_args],
        ["dpo", "--base", str(base), "--data", str(data), *run_args],
        ["ppo", "--policy", str(base), "--reward", str(base), "--prompts", str(data), *run_args],
    ):
        assert main(verb) == 1, verb
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("bidirectional" in err[0] or "causal=false" in err[0]), err
    assert not (tmp_path / "hf").exists() and not runs.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--train.objective=mlm"], "train.objective=mlm needs a bidirectional model"),
        (["--train.nsp=true"], "train.nsp=true needs train.objective=mlm"),
        (["--model.causal=false"], "model.causal=false needs train.objective=mlm"),
        (["--train.objective=masked"], "train.objective='masked' is not one of causal, mlm"),
        (
            ["--train.objective=mlm", "--model.causal=false", "--train.eval_steps=0"],
            "train.eval_steps=0 (the whole validation split) is for objective=causal",
        ),
    ],
)
def test_bad_mlm_configs_are_one_clear_error_line(text_file, tmp_path, capsys, overrides, message):
    argv = ["train", f"--data.path={text_file}", f"--run.dir={tmp_path}", *overrides]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())  # no run folder left behind
