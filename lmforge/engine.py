"""Batched generation on top of GPT: preallocated KV cache, prefill + decode, sampling, streaming.

The engine knows no tokenizer: prompts are lists of token ids and so are the results. Prompts
of different lengths are left-padded and masked, so every row's next token comes right after
its own last prompt token and each row generates what it would alone.

`use_cache=False` is the simple reference path (nanoGPT's generate): a full forward over the
whole sequence at every step. The cached path is tested against it.

Shapes: B batch (prompts), P padded prompt length, L tokens so far (P + generated), V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge.common import LmforgeError
from lmforge.model.gpt import GPT, KVCache


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probabilities sum to >= top_p."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on every token already in the row (prompt or generated); 1 = off."""
    stop_ids: tuple[int, ...] = ()
    """A row ends when it samples one of these; the stop id itself is not returned."""
    seed: int | None = None
    """Seeds a private torch.Generator, so results do not depend on (or disturb) global RNG."""
    use_cache: bool = True
    """False: recompute the full forward every step (the reference path)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LmforgeError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise LmforgeError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise LmforgeError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LmforgeError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise LmforgeError(f"repetition_penalty={self.repetition_penalty} must be > 0")


# ---------------------------------------------------------------- sampling (pure functions)


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): seen tokens' logits are divided by `penalty` when positive and
    multiplied by it when negative, so a penalty > 1 always makes them less likely.
    logits (B, V) float, seen (B, V) bool -> (B, V)."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row, -inf elsewhere. (B, V) -> (B, V)."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to >= p (the most
    likely token always survives), -inf elsewhere. (B, V) -> (B, V)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= p  # (B, V), False for the first token
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row from last-position logits (B, V); seen (B, V) bool marks tokens
    already in each row, for the repetition penalty. Returns (B,) int64."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- batching helpers


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> input_ids (B, P) padded on the left, attention_mask
    (B, P) with 1 on real tokens. Left padding keeps every row's last token in the last
    column, where decoding appends."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, P - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, L) ids and 0/1 mask -> (B, V) bool, True where a real token of the row has that id.
    scatter_add (not scatter) so a pad that shares an id with a real token cannot unset it."""
    counts = torch.zeros(ids.size(0), vocab_size, device=ids.device)
    return counts.scatter_add_(1, ids, mask.float()) > 0


# ---------------------------------------------------------------- the engine


class Engine:
    """Generates from a GPT. `stream` yields tokens step by step; `generate` collects them."""

    def __init__(self, model: GPT, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id  # fills left padding and finished rows; always masked or ignored

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        block = self.model.config.block_size
        if prompt_len + max_new_tokens > block:
            raise LmforgeError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's block_size ({block}); shorten the prompt or generate fewer tokens"
            )

    def _next_logits_fn(self, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, max_len: int):
        """A step function (ids (B, L), mask (B, L)) -> last-position logits (B, V).
        Cached: the first call prefills the prompt, later calls feed only the newest token.
        Uncached: every call runs the full sequence (the reference)."""
        padded = not bool(mask.all())  # without padding, no mask: SDPA's causal fast path

        def full(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            mask = mask if padded else None
            return self.model(ids, attention_mask=mask, logits_to_keep=1)[:, -1]  # (B, V)

        if not use_cache:
            return full
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, ids.size(0), max_len, ids.device, dtype)

        def cached(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            new = ids[:, cache.length :]  # (B, P) at prefill, (B, 1) when decoding
            mask = mask if padded else None
            return self.model(new, attention_mask=mask, kv_cache=cache, logits_to_keep=1)[:, -1]

        return cached

    @torch.inference_mode()
    def stream(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> Iterator[list[int | None]]:
        """Yield one list per step with each row's new token id, or None for a row that has
        finished (it sampled a stop id, at this step or earlier). Stops when every row has
        finished or after max_new_tokens steps. The model is run in eval mode and its mode is
        restored afterwards."""
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.pad_id, device)  # (B, P) each
        self._check_length(ids.size(1), params.max_new_tokens)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device).manual_seed(params.seed)
        stop = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
        seen = (
            seen_tokens(ids, mask, self.model.config.vocab_size)
            if params.repetition_penalty != 1
            else None
        )
        next_logits = self._next_logits_fn(
            ids, mask, params.use_cache, ids.size(1) + params.max_new_tokens
        )
        done = torch.zeros(ids.size(0), dtype=torch.bool, device=device)  # (B,)

        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(params.max_new_tokens):
                logits = next_logits(ids, mask)  # (B, V)
                token = sample_next(logits, params, seen, generator)  # (B,)
                done = done | torch.isin(token, stop)
                token = token.masked_fill(done, self.pad_id)
                yield [None if d else t for t, d in zip(token.tolist(), done.tolist())]
                if done.all():
                    return
                ids = torch.cat([ids, token[:, None]], dim=1)  # (B, L + 1)
                mask = torch.cat(
                    [mask, torch.ones_like(mask[:, :1])], dim=1
                )  # finished rows: ignored
                if seen is not None:
                    seen[torch.arange(len(token)), token] |= ~done
        finally:
            self.model.train(was_training)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Each prompt's new token ids (prompt and stop id excluded)."""
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, params):
            for row, token in enumerate(step):
                if token is not None:
                    out[row].append(token)
        return out
