"""Rollouts for RL from a reward (PPO, GRPO): the Trainer's data loader for `lmforge ppo`.

This is the rollout phase as a loader hook. When the Trainer asks for a step's micro-batches
and the current rollout has been used up, the loader samples answers to the next prompts
from the policy being trained (the KV-cache Engine, batched), scores them with the reward
function, runs the policy and the frozen reference over them once, and turns that into
per-token advantages. The next `ppo.epochs` passes of optimizer steps then read shuffled
micro-batches of this one rollout. The Trainer's loop does the optimisation unchanged.

- PPO: the reward of an answer's token t is -kl_coef * (log p(t) - log q(t)) (the per-token
  KL penalty to the reference q), plus the reward model's score on the last token. GAE over
  the value head's predictions gives the advantages, whitened over the rollout.
- GRPO: `group_size` answers per prompt; each answer's advantage is its score normalised
  within its group, the same on all its tokens. The KL term is in the loss.

Layout of a rollout (N answers, P prompt columns left-padded, R answer columns right-padded):
input_ids/attention_mask (N, P + R - 1) are prompt + answer minus the last token, so the
last R positions predict answer_ids (N, R); answer_mask (N, R) marks real answer tokens. An
answer that stopped ends with the end-of-turn token, which is trained on like any other (so
the policy learns when to stop); an answer cut at max_new_tokens has none.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmforge.chat import render_conversation
from lmforge.common import LmforgeError
from lmforge.config import PPOConfig
from lmforge.data.sft import prompt_messages, split_records
from lmforge.engine import Engine, SamplingParams, left_pad
from lmforge.model.heads import ActorCritic
from lmforge.tokenizer import Tokenizer
from lmforge.train.losses import answer_logprobs
from lmforge.train.rl import AdaptiveKL, gae, group_advantages, whiten

RewardFn = Callable[[list[list[dict]], list[list[int]]], list[float]]
"""(conversations up to the assistant's turn, answer ids without the end-of-turn token) ->
one score per answer."""


@dataclass
class Prompt:
    messages: list[dict]
    ids: list[int]
    """The rendered conversation, ending with the assistant role token."""


def load_prompts(
    tokenizer: Tokenizer,
    path: str,
    val_fraction: float,
    val_path: str,
    block_size: int,
    max_new_tokens: int,
) -> tuple[list[Prompt], list[Prompt], int]:
    """(train, held-out, dropped): the records' prompts (lmforge/data/sft.prompt_messages),
    the last val_fraction held out unless val_path names a file. A prompt that leaves fewer
    than max_new_tokens of the block for its answer is dropped (counted)."""
    train_records, val_records = split_records(path, val_fraction, val_path)
    dropped = 0

    def prompts(records: list, name: str) -> list[Prompt]:
        nonlocal dropped
        out = []
        for i, record in enumerate(records):
            messages = prompt_messages(record, f"{name} record {i}")
            ids = render_conversation(tokenizer, messages, add_generation_prompt=True)[0]
            if len(ids) + max_new_tokens > block_size:
                dropped += 1
                continue
            out.append(Prompt(messages, ids))
        if not out:
            raise LmforgeError(
                f"{name}: no prompt leaves room for a {max_new_tokens}-token answer in the "
                f"model's block_size {block_size}; lower ppo.max_new_tokens"
            )
        return out

    return prompts(train_records, path), prompts(val_records, val_path or path), dropped


# ---------------------------------------------------------------- sampling and scoring


@dataclass
class Answers:
    batch: dict[str, torch.Tensor]
    """input_ids, attention_mask (N, P + R - 1); answer_ids, answer_mask (N, R)."""
    ended: torch.Tensor
    """(N,) bool: the answer ended its turn within max_new_tokens."""
    texts_ids: list[list[int]]
    """Each answer's ids without the end-of-turn token (what a reward reads)."""


def sample_answers(
    policy: nn.Module,
    prompts: list[Prompt],
    params: SamplingParams,
    end_id: int,
    pad_id: int,
) -> Answers:
    """One sampled answer per prompt (params.stop_ids must hold end_id), laid out as above."""
    engine = Engine(policy, pad_id=pad_id)
    answers = engine.generate([p.ids for p in prompts], params)
    ended = [len(a) < params.max_new_tokens for a in answers]
    full = [a + [end_id] if e else a for a, e in zip(answers, ended)]
    device = next(policy.parameters()).device
    prompt_ids, prompt_mask = left_pad([p.ids for p in prompts], pad_id, device)  # (N, P)
    R = max(len(a) for a in full)
    answer_ids = torch.full((len(full), R), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(full), R), dtype=torch.long)
    for row, answer in enumerate(full):
        answer_ids[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
        answer_mask[row, : len(answer)] = 1
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    batch = {
        "input_ids": torch.cat([prompt_ids, answer_ids], 1)[:, :-1],
        "attention_mask": torch.cat([prompt_mask, answer_mask], 1)[:, :-1],
        "answer_ids": answer_ids,
        "answer_mask": answer_mask,
    }
    return Answers(batch, torch.tensor(ended, device=device), answers)


@torch.no_grad()
def score_answers(
    model: nn.Module,
    reference: nn.Module,
    batch: dict[str, torch.Tensor],
    temperature: float,
    chunk: int,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, torch.Tensor]:
    """The policy's and the reference's view of the answers, `chunk` rows per forward, in
    eval mode: logprobs and ref_logprobs of each answer token (N, R), values (N, R; zeros
    without a value head) and kl (N, R), the exact KL(policy || reference) of each token's
    next-token distributions (zero on padding)."""
    out: dict[str, list[torch.Tensor]] = {
        "logprobs": [],
        "ref_logprobs": [],
        "values": [],
        "kl": [],
    }
    modes = model.training, reference.training
    model.eval(), reference.eval()
    try:
        for i in range(0, batch["input_ids"].size(0), chunk):
            part = {k: v[i : i + chunk] for k, v in batch.items()}
            R = part["answer_ids"].size(1)
            with context():
                policy_out = model(part["input_ids"], attention_mask=part["attention_mask"])
                ref_logits = reference(part["input_ids"], attention_mask=part["attention_mask"])
            logits, values = policy_out if isinstance(policy_out, tuple) else (policy_out, None)
            logp, all_logp = answer_logprobs(logits, part["answer_ids"], temperature)
            ref_logp, ref_all = answer_logprobs(ref_logits, part["answer_ids"], temperature)
            mask = part["answer_mask"].float()
            out["logprobs"].append(logp * mask)
            out["ref_logprobs"].append(ref_logp * mask)
            out["kl"].append((all_logp.exp() * (all_logp - ref_all)).sum(-1) * mask)
            values = torch.zeros_like(logp) if values is None else values[:, -R:].float()
            out["values"].append(values * mask)
    finally:
        model.train(modes[0]), reference.train(modes[1])
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------- the loader


class RolloutLoader:
    """next_step(accum) -> accum micro-batches of rollout rows; a new rollout when the last
    one has had its `epochs` passes. `step_metrics()` reports the rollout a step trains on.
    `context` wraps the scoring forwards (the Trainer's autocast, so that a rollout's
    log-probabilities are computed as the training forward computes them)."""

    def __init__(
        self,
        model: nn.Module,
        reference: nn.Module,
        reward_fn: RewardFn,
        prompts: list[Prompt],
        cfg: PPOConfig,
        micro_batch_size: int,
        grad_accum_steps: int,
        end_id: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.model, self.reference, self.reward_fn, self.cfg = model, reference, reward_fn, cfg
        self.policy = model.policy if isinstance(model, ActorCritic) else model
        self.prompts = prompts[rank::world_size]
        self.micro_batch_size, self.end_id, self.pad_id = micro_batch_size, end_id, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.context: Callable[[], AbstractContextManager] = nullcontext
        self.group = cfg.group_size if cfg.algo == "grpo" else 1
        optimizer_batch = micro_batch_size * grad_accum_steps
        if cfg.rollout_batch % optimizer_batch:
            raise LmforgeError(
                f"ppo.rollout_batch={cfg.rollout_batch} must be a multiple of the optimizer "
                f"batch, train.micro_batch_size x train.grad_accum_steps = {optimizer_batch}"
            )
        if cfg.rollout_batch // self.group > len(self.prompts):
            raise LmforgeError(
                f"a rollout needs {cfg.rollout_batch // self.group} prompts per rank but there "
                f"are {len(self.prompts)}; lower ppo.rollout_batch or add prompts"
            )
        self.kl = AdaptiveKL(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.rollouts = 0  # rollouts made so far
        self.pass_, self.row = cfg.epochs, 0  # position in the current rollout: none yet
        self.prompt_epoch, self.prompt_row = 0, 0
        self.buffer: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}

    # ---------------------------------------------------------------- the rollout phase
    def _rng(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, self.rank, *salt)) % 2**63)

    def _next_prompts(self) -> list[Prompt]:
        """The next rollout's prompts, each repeated group times, in a shuffled pass."""
        n = self.cfg.rollout_batch // self.group
        if self.prompt_row + n > len(self.prompts):
            self.prompt_epoch, self.prompt_row = self.prompt_epoch + 1, 0
        order = torch.randperm(len(self.prompts), generator=self._rng(-1, self.prompt_epoch))
        picked = order[self.prompt_row : self.prompt_row + n].tolist()
        self.prompt_row += n
        return [self.prompts[i] for i in picked for _ in range(self.group)]

    def rollout(self) -> None:
        """Sample, score and turn the next prompts into this rollout's rows."""
        cfg = self.cfg
        prompts = self._next_prompts()
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            stop_ids=(self.end_id,),
            seed=hash((self.seed, self.rank, self.rollouts)) % 2**63,
        )
        answers = sample_answers(self.policy, prompts, params, self.end_id, self.pad_id)
        batch = answers.batch
        device = batch["input_ids"].device
        scores = torch.tensor(
            self.reward_fn([p.messages for p in prompts], answers.texts_ids),
            dtype=torch.float32,
            device=device,
        )  # (N,)
        scores = scores - cfg.missing_end_penalty * (~answers.ended).float()
        seen = score_answers(
            self.model, self.reference, batch, cfg.temperature, self.micro_batch_size,
            self.context,
        )  # fmt: skip
        mask = batch["answer_mask"].float()  # (N, R)
        kl_per_answer = seen["kl"].sum(-1)  # (N,)
        if cfg.algo == "ppo":
            penalty = -self.kl.beta * (seen["logprobs"] - seen["ref_logprobs"]) * mask
            last = mask.sum(-1).long() - 1  # (N,)
            rewards = penalty.clone()
            rewards[torch.arange(len(last), device=device), last] += scores
            advantages, returns = gae(rewards, seen["values"], mask, cfg.gamma, cfg.lam)
            if cfg.whiten:
                advantages = whiten(advantages, mask)
            self.stats = {"non_score_reward": penalty.sum(-1).mean().item()}
        else:
            advantages = group_advantages(scores, self.group)[:, None] * mask
            returns = torch.zeros_like(advantages)
            self.stats = {}
        self.stats |= {
            "reward": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            "kl": kl_per_answer.mean().item(),
            "kl_coef": self.kl.beta,
            "answer_length": mask.sum(-1).mean().item(),
            "end_rate": answers.ended.float().mean().item(),
        }
        self.kl.update(self.stats["kl"], len(scores))
        self.buffer = batch | {
            "old_logprobs": seen["logprobs"],
            "ref_logprobs": seen["ref_logprobs"],
            "old_values": seen["values"],
            "advantages": advantages,
            "returns": returns,
        }
        self.rollouts += 1
        self.pass_, self.row = 0, 0

    # ---------------------------------------------------------------- the loader contract
    def next_step(self, accum_steps: int = 1) -> list[dict[str, torch.Tensor]]:
        n = accum_steps * self.micro_batch_size
        if self.pass_ >= self.cfg.epochs:
            self.rollout()
        order = torch.randperm(
            self.cfg.rollout_batch, generator=self._rng(self.rollouts, self.pass_)
        )
        rows = order[self.row : self.row + n]
        self.row += n
        if self.row >= self.cfg.rollout_batch:
            self.pass_, self.row = self.pass_ + 1, 0
        m = self.micro_batch_size
        return [
            {k: v[rows[i : i + m].to(v.device)] for k, v in self.buffer.items()}
            for i in range(0, n, m)
        ]

    def step_metrics(self) -> dict[str, float]:
        """The current rollout's figures: mean reward (and its spread), KL to the reference
        per answer (nats), kl_coef, answer length, the share that ended their turn."""
        return dict(self.stats)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rollouts": self.rollouts,
            "pass": self.pass_,
            "row": self.row,
            "prompt_epoch": self.prompt_epoch,
            "prompt_row": self.prompt_row,
            "kl_coef": self.kl.beta,
            "buffer": {k: v.cpu() for k, v in self.buffer.items()},
            "stats": self.stats,
            "seed": self.seed,
            "n": len(self.prompts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["n"] != len(self.prompts):
            raise LmforgeError("cannot resume the rollouts: different prompts or seed")
        self.rollouts, self.pass_, self.row = state["rollouts"], state["pass"], state["row"]
        self.prompt_epoch, self.prompt_row = state["prompt_epoch"], state["prompt_row"]
        self.kl.beta, self.stats = state["kl_coef"], dict(state["stats"])
        device = next(self.model.parameters()).device
        self.buffer = {k: v.to(device) for k, v in state["buffer"].items()}
