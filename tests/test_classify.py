"""Sequence classification: last-real-token pooling under any padding, held-out splits with no
shared text, `lmforge classify` end to end (full, frozen base), loading for predict(), bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, rerun_from_step

import lmforge
from lmforge.cli import main
from lmforge.config import ClassifyConfig, model_config
from lmforge.data.classify import load_labelled
from lmforge.model.gpt import GPT
from lmforge.model.heads import SequenceClassifier, pool
from lmforge.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
PREFS = json.loads((ROOT / "lmforge" / "assets" / "preferences.json").read_text())[:150]
PAIRS = "chosen=polite,rejected=rude"


@pytest.fixture(scope="module")
def tok():
    return train_bpe([r["chosen"] + " " + r["rejected"] for r in PREFS], vocab_size=400)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory, save_base) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "ckpt", tok, block_size=128)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_the_head_pools_the_real_tokens_under_left_or_right_padding(pooling):
    torch.manual_seed(0)
    model = SequenceClassifier(
        GPT(model_config(preset="llama-tiny", vocab_size=65)), ["a", "b", "c"], pooling
    ).eval()
    text = torch.tensor([[5, 9, 2, 44, 7]])
    alone = model(text)
    pad = torch.zeros(1, 3, dtype=torch.long)
    right = model(torch.cat([text, pad], 1), torch.tensor([[1] * 5 + [0] * 3]))
    left = model(torch.cat([pad, text], 1), torch.tensor([[0] * 3 + [1] * 5]))
    assert (right - alone).abs().max() <= 1e-5 and (left - alone).abs().max() <= 1e-5


def test_mean_pooling_averages_the_real_tokens_hidden_states():
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    pooled = pool(hidden, mask, "mean")
    torch.testing.assert_close(pooled[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, 1:].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "last"), hidden[[0, 1], [1, 3]])


def test_no_text_is_in_both_splits_and_the_last_records_are_held_out(tok, tmp_path):
    path = tmp_path / "p.json"
    records = PREFS[:40] + [PREFS[0]]  # the first record again, now in the held-out tail
    path.write_text(json.dumps(records))
    cfg = ClassifyConfig(pairs=PAIRS)
    train, val, labels = load_labelled(tok, str(path), 0.1, "", cfg, 128)
    assert labels == ["polite", "rude"]
    assert len(val) == 2 * 4  # the last 4 records, two texts each
    assert not {e.text for e in train} & {e.text for e in val}
    assert len(train) == 2 * 37 - 2  # record 0's texts were dropped from training


def _run(base: Path, data: Path, tmp_path: Path, name: str, *extra: str) -> int:
    argv = [
        "classify", "--base", str(base), "--data", str(data), f"--classify.pairs={PAIRS}",
        f"--run.dir={tmp_path}", f"--run.name={name}", "--train.max_steps=30", "--train.lr=3e-3",
        "--train.eval_interval=30", "--train.micro_batch_size=16", "--run.tensorboard=false",
        "--train.precision=fp32", *extra,
    ]  # fmt: skip
    return main(argv)


def test_classify_trains_evaluates_and_loads_as_a_predictor(base, tmp_path, capsys):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(PREFS))
    assert _run(base, data, tmp_path, "full") == 0, capsys.readouterr().err
    rows = read_metrics(tmp_path / "full")
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30]
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["val_f1"] <= 1 for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns (a random base: slowly)
    matrix = json.loads((tmp_path / "full" / "confusion.json").read_text())
    assert sum(map(sum, matrix["rows_true_columns_predicted"])) == 2 * 15
    classifier, _ = lmforge.load(tmp_path / "full")
    assert isinstance(classifier, SequenceClassifier)
    assert set(classifier.predict([PREFS[-1]["chosen"], PREFS[-1]["rejected"]])) <= {
        "polite",
        "rude",
    }


def test_a_classify_run_resumes_in_a_new_process_with_the_same_losses(base, tmp_path, capsys):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(PREFS))
    run = tmp_path / "r"
    extra = ["--train.max_steps=4", "--train.ckpt_interval=2", "--train.log_interval=1"]
    assert _run(base, data, tmp_path, "r", *extra, "--model.dropout=0.1") == 0
    rows = read_metrics(run)
    resumed = rerun_from_step(run, "classify", 2)
    losses = lambda rs: [(r["step"], r["loss"]) for r in rs if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(rows) and len(losses(rows)) == 4
    assert [r["val_accuracy"] for r in resumed if "val_accuracy" in r] == [
        r["val_accuracy"] for r in rows if "val_accuracy" in r and r["step"] > 2
    ]


def test_freeze_base_trains_only_the_head_and_the_pooling_is_kept(base, tmp_path, capsys):
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(PREFS[:60]))
    extra = ("--freeze-base", "--train.max_steps=3", "--classify.pooling=mean")
    assert _run(base, data, tmp_path, "frozen", *extra) == 0
    assert "base frozen" in capsys.readouterr().out
    classifier, _ = lmforge.load(tmp_path / "frozen")
    assert classifier.pooling == "mean"  # the checkpoint's config rebuilds its head
    base_model, _ = lmforge.load(base)
    assert all(
        torch.equal(a, b)
        for a, b in zip(classifier.backbone.state_dict().values(), base_model.state_dict().values())
    )


def test_a_label_set_with_one_class_is_one_line(base, tmp_path, capsys):
    data = tmp_path / "one.json"
    data.write_text(json.dumps([{"text": f"text {i}", "label": "same"} for i in range(20)]))
    argv = ["classify", "--base", str(base), "--data", str(data), f"--run.dir={tmp_path}"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "two or more classes" in err


def test_the_neutral_original_of_an_edited_pair_can_be_left_out(tok, tmp_path):
    path = tmp_path / "p.json"
    records = []
    for i in range(10):
        records += [
            {
                "chosen": f"Could you please pass {i}?",
                "rejected": f"Pass {i}.",
                "output": f"Pass {i}.",
            },
            {
                "chosen": f"It is {i}.",
                "rejected": f"It is {i}, obviously.",
                "output": f"It is {i}.",
            },
        ]
    path.write_text(json.dumps(records))
    cfg = ClassifyConfig(pairs=PAIRS, unless_equal_to="output")
    train, val, labels = load_labelled(tok, str(path), 0.1, "", cfg, 128)
    texts = {(e.text, labels[e.label]) for e in train + val}
    assert len(texts) == 20  # one edited text per record; the originals are left out
    assert ("Could you please pass 3?", "polite") in texts and (
        "It is 3, obviously.",
        "rude",
    ) in texts
    assert not any(t in {"Pass 3.", "It is 3."} for t, _ in texts)


def test_a_base_with_a_char_tokenizer_classifies_too(tmp_path, capsys, save_base):
    from lmforge.tokenizer import CharTokenizer

    texts = [r["chosen"] for r in PREFS[:40]] + [r["rejected"] for r in PREFS[:40]]
    tok = CharTokenizer.from_text("".join(texts))  # no pad token: padding uses id 0, masked
    save_base(tmp_path / "c", tok, preset="tiny", block_size=128)
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(PREFS[:40]))
    assert _run(tmp_path / "c", data, tmp_path, "char", "--train.max_steps=2") == 0, (
        capsys.readouterr().err
    )
    classifier, _ = lmforge.load(tmp_path / "char")
    assert len(classifier.predict(texts[:3])) == 3


def test_a_fine_tuning_run_sets_its_own_dropout_but_keeps_the_base_architecture(
    base, tmp_path, capsys
):
    from dataclasses import asdict

    from lmforge.config import build_config
    from lmforge.recipes.run import load_base
    from lmforge.train.checkpoint import load_checkpoint_config

    overrides = [f"--run.base={base}", "--data.path=unused.json", "--model.dropout=0.2"]
    layers = {"model": asdict(load_checkpoint_config(base).model)}
    _, model, _ = load_base(build_config(layers, overrides=[*overrides, "--model.drop_path=0.1"]))
    assert model.drop.p == 0.2 and model.blocks[0].attn.dropout == 0.2
    assert model.blocks[-1].drop_path.rate == pytest.approx(0.1)
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(PREFS[:60]))
    assert _run(base, data, tmp_path, "deeper", "--model.n_layer=7") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.n_layer=7 differs from the base's" in err
