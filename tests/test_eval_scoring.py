"""Evaluation scoring: log-likelihoods against a plain full forward, batch-size invariance,
rolling windows that score every token once, perplexity against transformers, mc accuracy,
calibration error and CrowS-Pairs against hand computations, and bad task input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.cli import main
from lmforge.eval import bias, calibration, mc, ppl
from lmforge.eval.scoring import Scorer, rolling_windows
from lmforge.eval.tasks import TaskOptions, file_sha256
from lmforge.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "lmforge" / "assets" / "tinyshakespeare.txt").read_text()[:20_000]
BLOCK = 48


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory, save_base) -> Path:
    return save_base(tmp_path_factory.mktemp("eval") / "ckpt", tok, block_size=BLOCK)


@pytest.fixture(scope="module")
def model(base):
    return lmforge.load(base)[0]


def reference_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from one plain forward of the whole text, cut to the block."""
    ids = (ctx + cont)[-(model.config.block_size + 1) :]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]])).float(), -1)[0]  # (T, V)
    targets = torch.tensor(ids[-len(cont) :])
    return logprobs[-len(cont) :].gather(-1, targets[:, None]).sum().item()


REQUESTS = [
    ("First Citizen:", " Before we proceed any further, hear me speak."),
    ("First Citizen:", " Speak, speak."),
    ("Second Citizen:", " Before we proceed any further, hear me speak."),
    ("Second Citizen:", " Before we proceed any further, hear."),  # shares 7 tokens: run once
    ("First Citizen: ", "You are all resolved rather to die than to famish?"),
    ("", "Resolved. resolved."),
    ("We are accounted poor citizens, the patricians good. " * 6, " What authority surfeits on"),
    ("Let us kill him", ","),
]


def test_loglikelihood_equals_a_full_forward_at_any_batch_size(model, tok):
    results = {bs: Scorer(model, tok, bs).loglikelihood(REQUESTS) for bs in (1, 3, 16)}
    scorer = Scorer(model, tok)
    for r, (context, continuation) in enumerate(REQUESTS):
        ctx, cont = scorer.encode_pair(context, continuation)
        expected = reference_logprob(model, ctx, cont)
        for bs, scores in results.items():  # fp32 sums of up to ~40 token log-probabilities
            assert abs(scores[r].logprob - expected) <= 1e-6 * abs(expected), (r, bs)
            assert abs(scores[r].logprob - results[1][r].logprob) <= 1e-5, (r, bs)
    # the harness's split: trailing whitespace of the context moves to the continuation
    assert scorer.encode_pair("First Citizen: ", "You") == scorer.encode_pair(
        "First Citizen:", " You"
    )
    assert scorer.encode_pair("", "Resolved")[0] == [tok.eot_id]


@pytest.mark.parametrize(
    "n, block, stride", [(2, 4, 4), (10, 4, 4), (11, 4, 1), (37, 8, 3), (8, 8, 8)]
)
def test_rolling_windows_score_every_target_exactly_once(n, block, stride):
    scored = []
    for begin, end, first in rolling_windows(n, block, stride):
        assert end - begin - 1 <= block and begin < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_perplexity_of_an_imported_gpt2_matches_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tokenizers import ByteLevelBPETokenizer

    hf_dir = tmp_path / "hf"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"])
    hf_dir.mkdir()
    bpe.save_model(str(hf_dir))
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=bpe.get_vocab_size(), n_positions=BLOCK, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(hf_dir)
    assert main(["import", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    model, tokenizer = lmforge.load(tmp_path / "ckpt")
    text_file = tmp_path / "held_out.txt"
    text_file.write_text(TEXT[:3000])
    stride = 20
    ours = ppl.run(Scorer(model, tokenizer, 4), text_file, TaskOptions(stride=stride)).metrics

    seq = [bpe.token_to_id("<|endoftext|>")] + tokenizer.encode(TEXT[:3000])
    nats = 0.0
    for begin, end, first in rolling_windows(len(seq), BLOCK, stride):
        with torch.no_grad():
            logits = hf(torch.tensor([seq[begin : end - 1]])).logits[0].float()  # (T, V)
        logprobs = F.log_softmax(logits, -1)[first - begin - 1 :]
        nats -= logprobs.gather(-1, torch.tensor(seq[first:end])[:, None]).sum().item()
    theirs = nats / (len(seq) - 1)
    assert ours["tokens"] == len(seq) - 1
    assert abs(ours["nats_per_token"] - theirs) / theirs <= 1e-4
    assert math.isclose(ours["perplexity"], math.exp(ours["nats_per_token"]))
    nbytes = len(TEXT[:3000].encode())
    assert math.isclose(
        ours["bits_per_byte"], theirs * (len(seq) - 1) / nbytes / math.log(2), rel_tol=1e-4
    )


def _mc_file(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


MC_ITEMS = [
    {"context": "Question: who speaks first?\nAnswer:", "choices": ["the citizen", "a king of old Rome"], "label": 0},
    {"context": "Question: what do they want?\nAnswer:", "choices": ["corn", "to famish", "peace at any price"], "label": 2},
    {"context": "The patricians are", "choices": ["good", "poor", "rich and proud"], "label": 1},
    {"context": "Speak, speak.", "choices": ["Resolved.", "You are all resolved rather to die?"], "label": 1},
]  # fmt: skip


def test_mc_acc_and_acc_norm_equal_a_hand_computation_and_any_batch_size(model, tok, tmp_path):
    path = _mc_file(tmp_path / "task.jsonl", MC_ITEMS)
    scorer = Scorer(model, tok)
    correct = correct_norm = 0
    for item in MC_ITEMS:
        lls = [
            reference_logprob(model, *scorer.encode_pair(item["context"], " " + c))
            for c in item["choices"]
        ]
        per_byte = [ll / len(c.encode()) for ll, c in zip(lls, item["choices"])]
        correct += max(range(len(lls)), key=lls.__getitem__) == item["label"]
        correct_norm += max(range(len(lls)), key=per_byte.__getitem__) == item["label"]
    for bs in (1, 16):
        metrics = mc.run(Scorer(model, tok, bs), path, TaskOptions()).metrics
        assert metrics["acc"] == correct / len(MC_ITEMS)
        assert metrics["acc_norm"] == correct_norm / len(MC_ITEMS)
    lls1 = mc.choice_loglikelihoods(Scorer(model, tok, 1), mc.load_items(path))
    lls16 = mc.choice_loglikelihoods(Scorer(model, tok, 16), mc.load_items(path))
    assert max((a - b).abs().max().item() for a, b in zip(lls1, lls16)) <= 1e-5


def test_ppl_does_not_depend_on_the_batch_size(model, tok, tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text(TEXT[:4000])
    runs = [
        ppl.run(Scorer(model, tok, bs), text_file, TaskOptions(stride=16)).metrics for bs in (1, 16)
    ]
    assert abs(runs[0]["nats_per_token"] - runs[1]["nats_per_token"]) <= 1e-5


def test_ece_equals_a_hand_computation_and_is_zero_when_calibrated():
    confidence = torch.tensor([0.95, 0.9, 0.55, 0.5, 0.3, 0.05], dtype=torch.float64)
    correct = torch.tensor([1, 0, 1, 1, 0, 0])
    # bins of width 1/15: 0.95 -> bin 14, 0.9 -> 13, 0.55 -> 8, 0.5 -> 7, 0.3 -> 4, 0.05 -> 0,
    # one prediction per bin, so ECE is the mean |correct - confidence|
    expected = (
        abs(1 - 0.95) + abs(0 - 0.9) + abs(1 - 0.55) + abs(1 - 0.5) + abs(0 - 0.3) + abs(0 - 0.05)
    ) / 6
    bins = calibration.reliability_bins(confidence, correct)
    assert sum(b["count"] for b in bins) == 6
    assert calibration.ece(bins) == pytest.approx(expected, abs=1e-12)
    # two predictions share a bin: their mean confidence against their mean accuracy
    shared = calibration.reliability_bins(torch.tensor([0.62, 0.64]), torch.tensor([1, 0]))
    assert calibration.ece(shared) == pytest.approx(abs(0.5 - 0.63))
    # perfectly calibrated: in each bin, the share correct equals the confidence
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(200_000, generator=gen)
    hits = torch.rand(200_000, generator=gen) < conf
    assert calibration.ece(calibration.reliability_bins(conf, hits)) < 0.01


def test_crows_pairs_slice_equals_a_hand_computation(tok, tmp_path, save_base):
    model = lmforge.load(save_base(tmp_path / "wide", tok, block_size=256))[0]  # whole sentences
    pairs = bias.load_pairs(bias.DEFAULT, limit=20)
    result = bias.run(Scorer(model, tok, 8), None, TaskOptions(limit=20))
    scorer = Scorer(model, tok)
    diffs = [
        [
            reference_logprob(model, *scorer.encode_pair("", p[k]))
            for k in ("sent_more", "sent_less")
        ]
        for p in pairs
    ]
    assert result.metrics["stereo_pct"] == pytest.approx(100 * sum(m > s for m, s in diffs) / 20)
    assert result.metrics["mean_diff"] == pytest.approx(
        sum(abs(m - s) for m, s in diffs) / 20, abs=1e-4
    )
    assert sum(t["pairs"] for t in result.details["per_type"].values()) == 20


def test_a_context_longer_than_the_block_is_truncated_counted_and_reported(model, tok, tmp_path):
    long = {
        "context": "Before we proceed any further, hear me speak. " * 40,
        "choices": ["Speak.", "No."],
        "label": 0,
    }
    path = _mc_file(tmp_path / "long.jsonl", [long, *MC_ITEMS[:1]])
    result = mc.run(Scorer(model, tok), path, TaskOptions())
    assert (
        result.details["truncated"]["requests"] == 1 and result.details["truncated"]["tokens"] > 0
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"context": "a", "choices": ["b", "c"]}\n', "item 0 has no 'label' field"),
        (
            '{"context": "a", "choices": ["b", "c"], "label": 2}\n',
            "label 2 is out of range for 2 choices",
        ),
        ("", "holds no records"),
    ],
)
def test_bad_task_files_are_one_line(base, tmp_path, capsys, content, message):
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(base),
                "--task",
                f"mc={path}",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("option", ["--limit", "--stride", "--batch-size"])
def test_a_count_below_one_is_one_line(base, tmp_path, capsys, option):
    argv = [
        "eval",
        "--checkpoint",
        str(base),
        "--task",
        "ppl",
        option,
        "0",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be >= 1" in err


def test_an_unknown_task_names_the_nearest(base, tmp_path, capsys):
    assert (
        main(["eval", "--checkpoint", str(base), "--task", "ppx", "--out", str(tmp_path / "o")])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown task 'ppx'; did you mean 'ppl'?" in err


def test_a_continuation_longer_than_the_block_is_scored_in_rolling_windows(model, tok):
    scorer = Scorer(model, tok)
    ctx, cont = scorer.encode_pair("First Citizen:", " " + TEXT[200:900])
    assert len(cont) > BLOCK
    seq = ctx + cont
    expected = 0.0
    for begin, end, first in rolling_windows(len(seq), BLOCK, BLOCK):
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([seq[begin : end - 1]])).float(), -1)[0]
        for t in range(max(first, len(ctx)), end):
            expected += logprobs[t - begin - 1, seq[t]].item()
    score = scorer.loglikelihood_ids([(ctx, cont), (ctx, cont[:5])])[0]
    assert score.tokens == len(cont) and abs(score.logprob - expected) <= 1e-3


def test_eval_writes_a_report_that_records_what_produced_it(base, tmp_path, capsys):
    from lmforge.train.checkpoint import weights_sha256

    task = _mc_file(tmp_path / "task.jsonl", MC_ITEMS)
    out = tmp_path / "report"
    argv = ["eval", "--checkpoint", str(base), "--task", f"mc={task}", "--task", "ppl",
            "--limit", "2", "--batch-size", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"]["sha256"] == weights_sha256(base)
    assert set(report["tasks"]) == {"mc", "ppl"} and "acc" in report["tasks"]["mc"]
    settings = report["settings"]
    assert settings["batch_size"] == 3 and settings["dtype"] == "fp32" and settings["limit"] == 2
    assert settings["task_files"][str(task)] == file_sha256(task)
    assert {"torch_version", "lmforge_version", "seed"} <= set(settings)
    assert "## mc" in (out / "report.md").read_text()
    # a second run never writes over the first
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text()) == report


def test_ppl_of_a_prepared_dataset_equals_ppl_of_its_documents_as_a_folder(
    tmp_path, save_base, capsys
):
    from lmforge.data.shards import read_prepared

    records = tmp_path / "data.jsonl"
    records.write_text(
        "".join(json.dumps({"text": line}) + "\n" for line in TEXT.split("\n\n")[:120])
    )
    data = tmp_path / "prepared"
    argv = ["prepare", str(records), "--out", str(data), "--workers", "1", "--val-fraction", "0.2"]
    assert main([*argv, "--tokenizer", "train:300", "--clean.min_words=3"]) == 0
    ds = read_prepared(data)
    model = lmforge.load(save_base(tmp_path / "base", ds.tokenizer, block_size=BLOCK))[0]
    scorer = Scorer(model, ds.tokenizer, 8)
    prepared = ppl.run(scorer, data, TaskOptions()).metrics
    folder = tmp_path / "docs"
    folder.mkdir()
    val = np.concatenate(ds.val)
    docs = [d for d in np.split(val, np.flatnonzero(val == ds.eot_id) + 1) if len(d) > 1]
    for k, doc in enumerate(docs):
        (folder / f"{k:04d}.txt").write_text(ds.tokenizer.decode(doc[:-1].tolist()))
    as_text = ppl.run(scorer, folder, TaskOptions()).metrics
    assert prepared["tokens"] == as_text["tokens"] == sum(len(d) - 1 for d in docs)
    assert prepared["nats_per_token"] == pytest.approx(as_text["nats_per_token"], rel=1e-6)
    assert prepared["bits_per_byte"] == pytest.approx(as_text["bits_per_byte"], rel=1e-6)
    other = save_base(tmp_path / "other", train_bpe([TEXT], vocab_size=280), block_size=BLOCK)
    argv = [
        "eval",
        "--checkpoint",
        str(other),
        "--task",
        f"ppl={data}",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another tokenizer" in err
