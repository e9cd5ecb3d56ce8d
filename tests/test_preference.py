"""Learning from preferences: the DPO losses against their formulas, DPO at step 0 (policy =
reference: zero rewards, loss log 2), a reference that never changes, the reward model's
Bradley-Terry loss and accuracy against a hand computation, padding invariance, bad pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, rerun_from_step

import lmforge
from lmforge.cli import main
from lmforge.config import model_config
from lmforge.data.preference import load_pairs, pad_pairs
from lmforge.model.gpt import GPT
from lmforge.model.heads import RewardModel
from lmforge.tokenizer import train_bpe
from lmforge.train.losses import DPOLoss, RewardLoss, dpo_loss

ROOT = Path(__file__).resolve().parents[1]
PREFS = json.loads((ROOT / "lmforge" / "assets" / "preferences.json").read_text())[:60]


@pytest.fixture(scope="module")
def tok():
    texts = [r["instruction"] + " " + r["chosen"] + " " + r["rejected"] for r in PREFS]
    return train_bpe(texts, vocab_size=400)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory, save_base) -> Path:
    return save_base(tmp_path_factory.mktemp("pref") / "ckpt", tok, block_size=160)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prefs.json"
    path.write_text(json.dumps(PREFS))
    return path


def test_dpo_losses_equal_their_formulas_on_fixed_logprobs():
    pc = torch.tensor([-10.0, -20.0, -5.0])
    pr = torch.tensor([-12.0, -18.0, -5.0])
    rc = torch.tensor([-11.0, -19.0, -6.0])
    rr = torch.tensor([-11.5, -19.5, -4.0])
    beta = 0.5
    for i in range(3):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        expected = {
            "sigmoid": -math.log(1 / (1 + math.exp(-beta * h))),
            "ipo": (h - 1 / (2 * beta)) ** 2,
            "hinge": max(0.0, 1 - beta * h),
        }
        for loss_type, value in expected.items():
            got = dpo_loss(pc, pr, rc, rr, beta, loss_type)[i].item()
            assert got == pytest.approx(float(value), rel=1e-6, abs=1e-7), loss_type


def test_dpo_at_step_0_has_zero_rewards_and_loss_log_2(tok, base, data):
    model, _ = lmforge.load(base)
    reference, _ = lmforge.load(base)
    train, _, _ = load_pairs(tok, str(data), 0.1, "", 160)
    batch = pad_pairs(train[:4], tok.pad_id)
    loss, metrics = DPOLoss(reference, beta=0.1)(model, batch)
    assert loss.item() / 4 == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["margin"].item() == pytest.approx(0.0, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-4)


def test_the_kl_is_that_of_the_next_token_distributions_on_labelled_positions():
    from lmforge.train.losses import sequence_kl

    p, q = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[-100, 1, 2], [3, -100, -100]])
    kl = (F.softmax(p, -1) * (F.log_softmax(p, -1) - F.log_softmax(q, -1))).sum(-1)  # (2, 3)
    expected = torch.stack([kl[0, 1] + kl[0, 2], kl[1, 0]])
    assert torch.allclose(sequence_kl(p, q, labels), expected, atol=1e-6)
    assert (sequence_kl(p, p, labels).abs() < 1e-6).all()


def test_dpo_trains_the_policy_and_never_the_reference(base, data, tmp_path, capsys, monkeypatch):
    import lmforge.train.losses as losses

    seen = {}
    original = losses.DPOLoss.__init__

    def spy(self, reference, *args, **kwargs):
        seen["reference"] = reference
        seen["before"] = {k: v.clone() for k, v in reference.state_dict().items()}
        original(self, reference, *args, **kwargs)

    monkeypatch.setattr(losses.DPOLoss, "__init__", spy)
    argv = ["dpo", "--base", str(base), "--data", str(data), f"--run.dir={tmp_path}",
            "--run.name=dpo", "--train.max_steps=4", "--train.eval_interval=4",
            "--train.micro_batch_size=4", "--train.lr=1e-3", "--run.tensorboard=false",
            "--train.precision=fp32"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    after = seen["reference"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())
    policy, _ = lmforge.load(tmp_path / "dpo")
    assert not all(torch.equal(policy.state_dict()[k], v) for k, v in seen["before"].items())
    rows = read_metrics(tmp_path / "dpo")
    evals = [r for r in rows if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"val_accuracy", "val_margin", "val_kl"} <= set(evals[-1])
    assert "skipped" in capsys.readouterr().out


def test_reward_loss_and_accuracy_equal_a_hand_computation():
    class Fixed(torch.nn.Module):  # returns the rewards it was given
        def forward(self, input_ids, attention_mask=None):
            return input_ids[:, 0].float() / 10

    ids = torch.tensor(
        [[30], [5], [12], [20], [7], [12]]
    )  # chosen 3.0 0.5 1.2; rejected 2.0 0.7 1.2
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    loss, metrics = RewardLoss(margin=0.25)(Fixed(), batch)
    gaps = [1.0, -0.2, 0.0]
    assert loss.item() == pytest.approx(
        sum(-math.log(1 / (1 + math.exp(-(g - 0.25)))) for g in gaps), rel=1e-6
    )
    assert metrics["accuracy"].item() == 1  # only the strictly larger chosen reward counts
    assert metrics["margin"].item() == pytest.approx(sum(gaps), abs=1e-6)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_the_reward_does_not_depend_on_padding(pooling):
    torch.manual_seed(0)
    model = RewardModel(GPT(model_config(preset="llama-tiny", vocab_size=65)), pooling).eval()
    text = torch.tensor([[5, 9, 2, 44, 7]])
    alone = model(text)
    right = model(torch.tensor([[5, 9, 2, 44, 7, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1, 0, 0]]))
    left = model(torch.tensor([[0, 0, 5, 9, 2, 44, 7]]), torch.tensor([[0, 0, 1, 1, 1, 1, 1]]))
    assert alone.shape == (1,)
    assert (alone - right).abs().item() <= 1e-5 and (alone - left).abs().item() <= 1e-5


def test_a_reward_run_loads_as_a_scorer(base, data, tmp_path, capsys):
    argv = ["reward", "--base", str(base), "--data", str(data), f"--run.dir={tmp_path}",
            "--run.name=rm", "--train.max_steps=3", "--train.eval_interval=3",
            "--train.micro_batch_size=4", "--run.tensorboard=false", "--train.precision=fp32",
            "--reward.pooling=mean"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rm, _ = lmforge.load(tmp_path / "rm")
    assert isinstance(rm, RewardModel) and rm.pooling == "mean"
    scores = rm.score([PREFS[0]["instruction"]] * 2, [PREFS[0]["chosen"], PREFS[0]["rejected"]])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)
    assert (tmp_path / "rm" / "report" / "loss.png").is_file()


def test_identical_answers_are_skipped_and_counted(tok, tmp_path):
    records = [dict(r) for r in PREFS[:20]]
    records[3]["rejected"] = records[3]["chosen"]
    records[7]["rejected"] = records[7]["chosen"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(records))
    train, val, stats = load_pairs(tok, str(path), 0.1, "", 160)
    assert stats.identical == 2 and len(train) + len(val) == 18


def test_a_prompt_longer_than_the_block_is_one_line(base, tmp_path, capsys):
    record = dict(PREFS[0], instruction="word " * 400)
    path = tmp_path / "p.json"
    path.write_text(json.dumps([record] + PREFS[1:20]))
    assert main(["reward", "--base", str(base), "--data", str(path), f"--run.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "record 0: the prompt is" in err


def test_a_pair_without_a_rejected_answer_is_one_line(base, tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"instruction": "Say hi.", "chosen": "Hi!"}] * 20))
    assert main(["dpo", "--base", str(base), "--data", str(path), f"--run.dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no 'rejected' answer" in err


def test_an_unknown_pooling_is_one_line(base, data, capsys):
    argv = ["reward", "--base", str(base), "--data", str(data), "--reward.pooling=maen"]
    assert main(argv) == 1
    assert "reward.pooling='maen' must be last or mean; did you mean 'mean'?" in (
        capsys.readouterr().err
    )


def test_dpo_loss_type_is_checked(base, data, tmp_path, capsys):
    argv = ["dpo", "--base", str(base), "--data", str(data), "--dpo.loss_type=ipoo"]
    assert main(argv) == 1
    assert "did you mean 'ipo'" in capsys.readouterr().err


def test_sequence_logprobs_sum_only_labelled_positions():
    from lmforge.train.losses import sequence_logprobs

    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 3, 1, -100], [2, -100, -100, 6]])
    lp = F.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 1, 3] + lp[0, 2, 1], lp[1, 0, 2] + lp[1, 3, 6]])
    assert torch.allclose(sequence_logprobs(logits, labels), expected)


def test_best_of_n_keeps_the_answer_the_reward_model_scores_highest(
    tok, base, tmp_path, save_reward_model
):
    from lmforge.engine import SamplingParams
    from lmforge.recipes.best_of_n import best_of_n, load_reward_model

    policy, _ = lmforge.load(base)
    reward_model = load_reward_model(str(save_reward_model(tmp_path / "rm", tok)), tok)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)
    choice = best_of_n(policy, tok, reward_model, "Say something kind.", 4, params)
    assert len(choice.rewards) == 4 and choice.reward == max(choice.rewards)
    assert reward_model.score(["Say something kind."], [choice.text])[0] == pytest.approx(
        choice.reward, abs=1e-5
    )


def test_best_of_n_refuses_a_non_reward_model_and_another_tokenizer(
    tok, base, tmp_path, capsys, save_reward_model
):
    other = save_reward_model(tmp_path / "other", train_bpe(["a different corpus " * 50], 300))
    for reward, message in [(base, "is not a reward model"), (other, "another tokenizer")]:
        argv = ["generate", "--checkpoint", str(base), "--chat", "--prompt", "hi",
                "--best-of", "2", "--reward", str(reward)]  # fmt: skip
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("verb", ["reward", "dpo"])
def test_a_preference_run_resumes_in_a_new_process_with_the_same_losses(
    verb, base, data, tmp_path, capsys
):
    run = tmp_path / verb
    argv = [verb, "--base", str(base), "--data", str(data), f"--run.dir={tmp_path}",
            f"--run.name={verb}", "--train.max_steps=4", "--train.ckpt_interval=2",
            "--train.log_interval=1",
            "--train.eval_interval=4", "--train.micro_batch_size=4", "--train.lr=1e-3",
            "--run.tensorboard=false", "--train.precision=fp32"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rows = read_metrics(run)
    resumed = rerun_from_step(run, verb, 2)
    losses = lambda rs: [(r["step"], r["loss"]) for r in rs if "loss" in r]  # noqa: E731
    assert losses(resumed) == losses(rows) and len(losses(rows)) >= 2
