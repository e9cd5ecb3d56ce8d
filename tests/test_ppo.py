"""RL from a reward (PPO, GRPO): GAE against a hand-written loop, whitening and group
advantages by hand, the KL penalty at zero when policy = reference, ratio 1 and clipped loss =
plain loss on a rollout's first step, a toy reward driven up on a KL leash, checkpoints that
load as a plain policy and resume in a new process, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, rerun_from_step

import lmforge
from lmforge.chat import render_conversation
from lmforge.cli import main
from lmforge.config import build_config, model_config
from lmforge.data.rollouts import Prompt, RolloutLoader
from lmforge.model.gpt import GPT
from lmforge.model.heads import ActorCritic
from lmforge.tokenizer import END_TURN, train_bpe
from lmforge.train.distributed import init_distributed
from lmforge.train.losses import PPOLoss
from lmforge.train.rl import AdaptiveKL, gae, group_advantages, whiten
from lmforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PREFS = json.loads((ROOT / "lmforge" / "assets" / "preferences.json").read_text())[:60]
REWARDED = set(range(100, 130))  # the toy reward: +1 per answer token with one of these ids


@pytest.fixture(scope="module")
def tok():
    return train_bpe([r["instruction"] + " " + r["chosen"] for r in PREFS], vocab_size=300)


@pytest.fixture(scope="module")
def prompts(tok) -> list[Prompt]:
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in PREFS]
    return [Prompt(c, render_conversation(tok, c, True)[0]) for c in conversations]


def toy_reward(conversations: list[list[dict]], answers: list[list[int]]) -> list[float]:
    return [float(sum(t in REWARDED for t in a)) for a in answers]


def tiny_policy(tok, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config(preset="llama-tiny", vocab_size=tok.vocab_size))


def ppo_config(tok, algo: str = "ppo", **ppo):
    return build_config({
        "model": {"preset": "llama-tiny", "vocab_size": tok.vocab_size},
        "train": {"optimizer": "adamw", "micro_batch_size": 8, "lr": 1e-2, "min_lr": 1e-2,
                  "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "log_interval": 1, "eval_interval": 1000,
                  "ckpt_interval": 1000, "precision": "fp32"},
        "run": {"tensorboard": False},
        "ppo": {"algo": algo, "rollout_batch": 32, "max_new_tokens": 16, **ppo},
    })  # fmt: skip


def make_loader(tok, prompts, cfg, model, reference) -> RolloutLoader:
    end = tok.tok.token_to_id(END_TURN)
    return RolloutLoader(
        model, reference, toy_reward, prompts, cfg.ppo, cfg.train.micro_batch_size, 1, end,
        tok.pad_id or 0, seed=0,
    )  # fmt: skip


# ---------------------------------------------------------------- advantages


def test_gae_matches_a_hand_written_loop():
    torch.manual_seed(0)
    N, R, gamma, lam = 3, 6, 0.9, 0.8
    rewards, values = torch.randn(N, R), torch.randn(N, R)
    lengths = [6, 3, 1]
    mask = torch.tensor([[1] * n + [0] * (R - n) for n in lengths])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            running = delta + gamma * lam * running
            assert advantages[i, t].item() == pytest.approx(running, abs=1e-5)
            assert returns[i, t].item() == pytest.approx(running + values[i, t].item(), abs=1e-5)
        assert not advantages[i, n:].any() and not returns[i, n:].any()


def test_whitening_and_group_advantages_match_hand_computations():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    w = whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0])
    expected = (real - real.mean()) / real.std(unbiased=False)
    assert torch.allclose(w[mask.bool()], expected, atol=1e-5) and not w[~mask.bool()].any()
    scores = torch.tensor([1.0, 3.0, 5.0, 5.0])
    a = group_advantages(scores, group_size=2)
    assert torch.allclose(a[:2], torch.tensor([-1.0, 1.0]) / math.sqrt(2), atol=1e-3)
    assert not a[2:].any()  # a group that scores alike teaches nothing


def test_the_adaptive_kl_coefficient_follows_the_clipped_proportional_error():
    kl = AdaptiveKL(beta=0.1, target=4.0, horizon=100)
    kl.update(kl=5.0, n=10)  # error 0.25, clipped to 0.2
    assert kl.beta == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    kl.update(kl=3.0, n=10)  # error -0.25 -> -0.2
    assert kl.beta == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = AdaptiveKL(beta=0.1, target=0.0, horizon=100)
    fixed.update(kl=50.0, n=10)
    assert fixed.beta == 0.1


# ---------------------------------------------------------------- a rollout


def test_the_kl_penalty_is_zero_when_the_policy_is_the_reference(tok, prompts):
    policy = tiny_policy(tok)
    cfg = ppo_config(tok, kl_coef=0.5, whiten=False, gamma=1.0, lam=1.0)
    loader = make_loader(tok, prompts, cfg, ActorCritic(policy), copy.deepcopy(policy))
    loader.rollout()
    b, stats = loader.buffer, loader.step_metrics()
    assert torch.equal(b["old_logprobs"], b["ref_logprobs"])
    assert stats["kl"] == 0 and stats["non_score_reward"] == 0
    # no penalty and values of 0 (a fresh value head): with gamma = lam = 1 every answer
    # token's advantage is its answer's score
    end = tok.tok.token_to_id(END_TURN)
    answers = [[t for t in row if t not in (-1, end)] for row in _answers(b)]
    scores = torch.tensor(toy_reward([], answers))
    assert torch.allclose(b["advantages"], scores[:, None] * b["answer_mask"], atol=1e-5)
    assert stats["reward"] == pytest.approx(scores.mean().item())


def _answers(buffer) -> list[list[int]]:
    """Each row's answer ids, -1 for padding."""
    return buffer["answer_ids"].masked_fill(buffer["answer_mask"] == 0, -1).tolist()


def test_a_stopped_answer_trains_on_its_end_of_turn_token(tok, prompts):
    """TRL's users found chat templates whose end-of-turn token sat outside the mask; here the
    token that ended the answer is its last masked token."""
    end = tok.tok.token_to_id(END_TURN)
    policy = tiny_policy(tok)
    with torch.no_grad():  # make ending likely: the end token's logit along the mean hidden state
        hidden = policy(torch.tensor([prompts[0].ids]), return_hidden=True)[0].mean(0)  # (d,)
        policy.lm_head.weight[end] = 3 * hidden / hidden.norm() ** 2
    cfg = ppo_config(tok)
    loader = make_loader(tok, prompts, cfg, ActorCritic(policy), copy.deepcopy(policy))
    loader.rollout()
    b = loader.buffer
    ended = [0, 0]  # answers cut at max_new_tokens, answers that ended their turn
    for ids, mask in zip(b["answer_ids"], b["answer_mask"]):
        n = int(mask.sum())
        if ids[n - 1].item() == end:
            assert (ids[: n - 1] != end).all() and n <= cfg.ppo.max_new_tokens
        else:
            assert n == cfg.ppo.max_new_tokens and (ids[:n] != end).all()
        ended[ids[n - 1].item() == end] += 1
    assert ended[1] > 0, ended
    assert loader.step_metrics()["end_rate"] == ended[1] / sum(ended)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_on_a_rollouts_first_step_the_ratio_is_1_and_clipping_changes_nothing(algo, tok, prompts):
    policy = tiny_policy(tok)
    model = ActorCritic(policy) if algo == "ppo" else policy
    cfg = ppo_config(tok, algo)
    loader = make_loader(tok, prompts, cfg, model, copy.deepcopy(policy))
    batch = loader.next_step(1)[0]
    units = batch["answer_mask"].sum()
    loss, metrics = PPOLoss(clip=0.2, kl_coef=0.1)(model, batch)
    plain, _ = PPOLoss(clip=1e9, kl_coef=0.1)(model, batch)
    assert metrics["ratio"].item() / units.item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["clip_fraction"].item() == 0 and metrics["approx_kl"].item() < 1e-10
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    assert loss.requires_grad


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_toy_reward_is_driven_up_while_the_kl_stays_bounded(algo, tok, prompts, tmp_path):
    policy = tiny_policy(tok)
    model = ActorCritic(policy) if algo == "ppo" else policy
    cfg = ppo_config(tok, algo, kl_coef=0.3)
    cfg.train.max_steps = 64
    loader = make_loader(tok, prompts, cfg, model, copy.deepcopy(policy))
    loss = PPOLoss(kl_coef=0.3 if algo == "grpo" else 0.0)
    Trainer(cfg, model, loader, None, tmp_path, init_distributed("cpu"), loss_fn=loss).fit()
    rows = read_metrics(tmp_path)
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert max(r["kl"] for r in rows if "kl" in r) <= 10.0
    assert sum(rewards[-8:]) / 8 >= rewards[0] + 1.5, rewards  # the last rollout vs the first
    for key in ("clip_fraction", "entropy", "answer_length", "policy_loss", "kl_coef"):
        assert key in rows[-1], key
    assert ("value_loss" in rows[-1]) == (algo == "ppo")


# ---------------------------------------------------------------- through the CLI


@pytest.fixture(scope="module")
def files(tok, tmp_path_factory, save_base, save_reward_model):
    folder = tmp_path_factory.mktemp("ppo")
    data = folder / "prompts.json"
    data.write_text(json.dumps(PREFS))
    policy = save_base(folder / "policy", tok, block_size=160)
    reward = save_reward_model(folder / "rm", tok)
    return policy, reward, data


def _ppo_argv(files, tmp_path, name: str, *extra: str) -> list[str]:
    policy, reward, data = files
    return ["ppo", "--policy", str(policy), "--reward", str(reward), "--prompts", str(data),
            f"--run.dir={tmp_path}", f"--run.name={name}", "--train.max_steps=4",
            "--train.micro_batch_size=8", "--ppo.rollout_batch=16", "--ppo.max_new_tokens=12",
            "--train.log_interval=1", "--train.eval_interval=4", "--ppo.eval_prompts=4",
            "--train.precision=fp32", "--run.tensorboard=false", *extra]  # fmt: skip


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_run_saves_a_plain_policy_and_resumes_in_a_new_process(algo, files, tmp_path, capsys):
    run = tmp_path / algo
    argv = _ppo_argv(files, tmp_path, algo, f"--algo={algo}", "--train.ckpt_interval=2")
    assert main(argv) == 0, capsys.readouterr().err
    rows = read_metrics(run)
    assert rows[0]["step"] == 0 and "val_reward" in rows[0] and rows[0]["val_kl"] == 0
    step = run / "checkpoints" / "step_0000004"
    assert (step / "value_head.safetensors").is_file() == (algo == "ppo")
    model, _ = lmforge.load(step)
    assert type(model) is GPT  # generation, eval and export take it as it is
    assert (run / "report" / "loss.png").is_file()
    best = max((r["val_reward"], -r["step"]) for r in rows if r["step"] > 0 and "val_reward" in r)
    assert (run / "checkpoints" / "best").read_text().strip() == f"step_{-best[1]:07d}"

    resumed = rerun_from_step(run, "ppo", 2)
    figures = lambda rs: [(r["step"], r["loss"], r["reward"]) for r in rs if "loss" in r]  # noqa: E731
    assert figures(resumed) == figures(rows) and len(figures(rows)) == 4


def test_bad_input_is_one_line(tok, files, tmp_path, capsys, save_reward_model):
    policy, reward, data = files
    other = save_reward_model(tmp_path / "other", train_bpe(["a different corpus " * 50], 300))
    cases = [
        (["--reward", str(policy)], "is not a reward model"),
        (["--reward", str(other)], "another tokenizer"),
        (["--ppo.max_new_tokens=200"], "no prompt leaves room"),
        (["--model.dropout=0.1"], "must be 0 for PPO"),
        (["--ppo.rollout_batch=12"], "multiple of the optimizer batch"),
        (["--algo=grpo", "--ppo.group_size=3"], "multiple of ppo.group_size"),
    ]
    for i, (extra, message) in enumerate(cases):
        assert main([*_ppo_argv(files, tmp_path, f"bad{i}"), *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(["ppo", "--policy", str(policy), "--prompts", str(data)]) == 1
    assert "no reward model" in capsys.readouterr().err
