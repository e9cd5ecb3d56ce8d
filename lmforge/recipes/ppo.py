"""RL from a reward model on the one Trainer: `ppo(cfg)` runs PPO (Schulman et al. 2017, as
Ziegler et al. 2019 and InstructGPT apply it to language models) or GRPO (Shao et al. 2024)
from a policy checkpoint (cfg.run.base), with any PEFT method.

The rollout phase is the train loader (lmforge/data/rollouts.py): it samples answers to the
training prompts from the current policy, scores them with the reward model (cfg.ppo.reward)
and computes advantages; the loss is PPOLoss (lmforge/train/losses.py). PPO adds a value head
to the policy (heads.ActorCritic); the frozen reference is the policy checkpoint itself.

Evaluation (step 0 = the starting policy, every eval interval, the end) samples one answer
per held-out prompt with a fixed seed and reports `val_reward` (the reward model's mean
score), `val_kl` (KL(policy || reference) summed over each answer's tokens, nats per answer,
exact over the vocabulary), `val_answer_length` and `val_end_rate`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.common import LmforgeError, print0, seed_everything
from lmforge.config import Config, PPOConfig
from lmforge.data.rollouts import (
    Prompt,
    RewardFn,
    RolloutLoader,
    load_prompts,
    sample_answers,
    score_answers,
)
from lmforge.engine import SamplingParams
from lmforge.hardware import autocast_context
from lmforge.model.heads import ActorCritic, RewardModel
from lmforge.model.peft import apply_peft, trainable_share
from lmforge.recipes.best_of_n import load_reward_model
from lmforge.recipes.run import fit_and_plot, load_base, run_folder
from lmforge.tokenizer import END_TURN, Tokenizer
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import destroy_distributed, init_distributed
from lmforge.train.losses import PPOLoss
from lmforge.train.trainer import Trainer

EVAL_SEED = 1234
"""Held-out answers are sampled with this seed at every evaluation, so steps compare alike."""


def reward_model_fn(reward_model: RewardModel, tokenizer: Tokenizer, batch_size: int) -> RewardFn:
    """The reward model's score of each answer, read as the text it decodes to (the reward
    model re-renders the conversation, as it did in training)."""

    def reward(conversations: list[list[dict]], answers: list[list[int]]) -> list[float]:
        return reward_model.score_conversations(
            [
                [*c, {"role": "assistant", "content": tokenizer.decode(a)}]
                for c, a in zip(conversations, answers)
            ],
            batch_size,
        )

    return reward


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module,
    reward_fn: RewardFn,
    prompts: list[Prompt],
    cfg: PPOConfig,
    end_id: int,
    pad_id: int,
    chunk: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, float]:
    """One sampled answer (seed EVAL_SEED) per prompt: mean reward, KL to the reference per
    answer, answer length in tokens (end-of-turn included) and the share that ended."""
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        stop_ids=(end_id,),
        seed=EVAL_SEED,
    )
    answers = sample_answers(policy, prompts, params, end_id, pad_id)
    scores = reward_fn([p.messages for p in prompts], answers.texts_ids)
    seen = score_answers(policy, reference, answers.batch, cfg.temperature, chunk, context)
    return {
        "val_reward": sum(scores) / len(scores),
        "val_kl": seen["kl"].sum(-1).mean().item(),
        "val_answer_length": answers.batch["answer_mask"].sum(-1).float().mean().item(),
        "val_end_rate": answers.ended.float().mean().item(),
    }


def check_settings(cfg: Config) -> None:
    if not cfg.ppo.reward:
        raise LmforgeError("no reward model: give --reward RM_CKPT (trained by `lmforge reward`)")
    if cfg.model.dropout or cfg.model.attention_dropout or cfg.model.drop_path:
        raise LmforgeError(
            f"model.dropout={cfg.model.dropout}, model.attention_dropout="
            f"{cfg.model.attention_dropout} and model.drop_path={cfg.model.drop_path} "
            "must be 0 for PPO: the rollout's log-probabilities are taken without dropout, "
            "so any would bias the policy ratio"
        )
    if cfg.train.batch_ramp_interval:
        raise LmforgeError("train.batch_ramp_interval must be 0 for PPO (fixed rollout batches)")


def ppo(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """PPO or GRPO (cfg.ppo.algo) on cfg.run.base's policy (or continue the run `resume`)."""
    check_settings(cfg)
    cfg.train.best_metric = cfg.train.best_metric or "val_reward"  # no held-out loss here
    info = init_distributed(cfg.run.device, cfg.train.parallel, "lmforge ppo")
    try:
        seed_everything(cfg.train.seed)
        base, policy, tokenizer = load_base(cfg, "be a policy that generates (lmforge ppo)")
        reward_model = load_reward_model(cfg.ppo.reward, tokenizer).to(info.device)
        reference = ckpt.load(base, info.device)[0].requires_grad_(False)
        block = policy.config.block_size
        train, val, dropped = load_prompts(
            tokenizer, cfg.data.path, cfg.data.val_fraction, cfg.data.val_path, block,
            cfg.ppo.max_new_tokens,
        )  # fmt: skip
        if cfg.ppo.eval_prompts:
            val = val[: cfg.ppo.eval_prompts]
        policy = apply_peft(policy, cfg.peft)
        model = ActorCritic(policy) if cfg.ppo.algo == "ppo" else policy
        t, p = cfg.train, cfg.ppo
        end_id, pad_id = tokenizer.tok.token_to_id(END_TURN), tokenizer.pad_id or 0
        reward_fn = reward_model_fn(reward_model, tokenizer, t.micro_batch_size)
        loader = RolloutLoader(
            model, reference, reward_fn, train, p, t.micro_batch_size, t.grad_accum_steps,
            end_id, pad_id, t.seed, info.dp_rank, info.dp_size,
        )  # fmt: skip
        loss = PPOLoss(
            p.clip, p.value_clip, p.vf_coef, p.entropy_coef,
            kl_coef=p.kl_coef if p.algo == "grpo" else 0.0, temperature=p.temperature,
        )  # fmt: skip
        run_dir = run_folder(cfg, resume, info)
        trainer: Trainer | None = None

        def context():
            return autocast_context(trainer.precision, trainer.device)

        def held_out() -> dict[str, float]:
            return evaluate_policy(
                policy, reference, reward_fn, val, p, end_id, pad_id, t.micro_batch_size, context
            )

        trainer = Trainer(
            cfg, model, loader, None, run_dir, info, loss_fn=loss, tokenizer=tokenizer,
            extra_eval=held_out,
        )  # fmt: skip
        loader.context = context
        trainer.resume(resume)
        trainable, total = trainable_share(model)
        print0(
            f"{p.algo} {run_dir}: policy {base}, reward {cfg.ppo.reward}; {len(train)} train / "
            f"{len(val)} held-out prompts ({dropped} too long for a {p.max_new_tokens}-token "
            f"answer dropped); rollouts of {p.rollout_batch} answers, {p.epochs} epochs; peft "
            f"{cfg.peft.method}: {trainable:,} of {total:,} parameters train "
            f"({trainable / total:.2%})"
        )
        return fit_and_plot(trainer)
    finally:
        destroy_distributed()
