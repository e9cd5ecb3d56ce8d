"""Best-of-n (rejection sampling): sample n answers to a prompt and keep the one a reward
model scores highest, the seeds' "safety constraints by rejection sampling". The policy and
the reward model must share a tokenizer (the reward model reads the same chat rendering)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lmforge.chat import render_conversation
from lmforge.common import LmforgeError
from lmforge.engine import Engine, SamplingParams
from lmforge.model.heads import RewardModel
from lmforge.tokenizer import END_TURN, Tokenizer, tokenizer_hash
from lmforge.train.checkpoint import load, resolve_checkpoint


@dataclass
class Choice:
    text: str
    """The best answer."""
    reward: float
    rewards: list[float]
    """Every sample's reward, in sampling order."""


def load_reward_model(path: str, policy_tokenizer: Tokenizer) -> RewardModel:
    """The reward model at `path`; one line if it is not one or reads another tokenizer."""
    folder = resolve_checkpoint(path)
    model, tokenizer = load(folder)
    if not isinstance(model, RewardModel):
        raise LmforgeError(
            f"{folder} is not a reward model (train one with `lmforge reward`), so it cannot "
            "score answers"
        )
    if tokenizer is None or tokenizer_hash(tokenizer) != tokenizer_hash(policy_tokenizer):
        raise LmforgeError(
            f"the reward model {folder} uses another tokenizer than the policy: it would read "
            "different tokens than the policy wrote"
        )
    return model


def best_of_n(
    model,
    tokenizer: Tokenizer,
    reward_model: RewardModel,
    prompt: str,
    n: int,
    params: SamplingParams,
) -> Choice:
    """n sampled chat answers to the user message `prompt`, scored; the best one."""
    if n < 1:
        raise LmforgeError(f"--best-of {n} must be >= 1")
    ids = render_conversation(tokenizer, [{"role": "user", "content": prompt}], True)[0]
    end = tokenizer.tok.token_to_id(END_TURN)
    params = replace(params, stop_ids=(end, *params.stop_ids))
    samples = Engine(model, pad_id=tokenizer.pad_id or 0).generate([ids] * n, params)
    texts = [tokenizer.decode(s) for s in samples]  # stop ids are not part of a sample
    rewards = reward_model.score([prompt] * n, texts)
    best = max(range(n), key=rewards.__getitem__)
    return Choice(texts[best], rewards[best], rewards)
