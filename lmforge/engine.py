"""Batched generation on top of GPT: preallocated KV cache, prefill + decode, sampling, streaming.

The engine knows no tokenizer: prompts are lists of token ids and so are the results. Prompts
of different lengths are left-padded and masked, so every row's next token comes right after
its own last prompt token and each row generates what it would alone.

Generation goes on past the model's context window (block_size), as nanoGPT's crop does: a
row's context holds at most block_size tokens; when it is full and a new token comes, the
newest `window` tokens are kept, the new one is appended, and the cache is recomputed for
them with positions restarting at 0. A prompt longer than block_size is cut from the left
(with a one-line notice). Each row is cropped when its own context fills, so a batch row
generates what it would alone. With window = block_size - 1 every token is predicted from
the last block_size tokens: exactly nanoGPT's crop-and-recompute; a smaller window
recomputes less often (every block_size - window tokens) on a shorter context.

`use_cache=False` is the simple reference path (nanoGPT's generate): a full forward over each
row's context at every step. The cached path is tested against it.

Shapes: B batch (prompts), P padded context length, V vocab.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
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
    window: int | None = None
    """Tokens of a full context kept when generation goes past block_size (1 to block_size - 1;
    None = 3/4 of block_size). block_size - 1 equals nanoGPT's crop (a recompute every token);
    smaller windows recompute less often."""

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
        if self.window is not None and self.window < 1:
            raise LmforgeError(f"window={self.window} must be >= 1")


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
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs (B, V), by inverse CDF: one uniform number per row.
    torch.multinomial draws an exponential number per vocabulary entry instead, which on CPU
    took 30x as long (1 ms at 16 x 4096), as long as a small model's whole decode step. The
    CDF is summed in float64, so float error cannot shift mass between tokens; a token of
    probability 0 is never drawn (its CDF step is empty). Returns (B,) int64."""
    cdf = probs.double().cumsum(dim=-1)  # (B, V)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1): first cdf > u
    return tokens.clamp_(max=probs.size(-1) - 1).squeeze(-1)


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


def print_notice(message: str) -> None:
    print(f"lmforge: notice: {message}", file=sys.stderr, flush=True)


class _Contexts:
    """What the model sees of each row: left-padded ids and mask over every row's context, and
    a KV cache holding them (none on the reference path). `prefill` (re)computes everything,
    `decode` appends one token per row."""

    def __init__(self, model: GPT, pad_id: int, use_cache: bool, max_len: int):
        self.model, self.pad_id, self.use_cache, self.max_len = model, pad_id, use_cache, max_len
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = None  # allocated once, by the first prefill
        self.mask: torch.Tensor | None = None  # (B, P); None when no row is padded

    @property
    def full(self) -> bool:
        """No room for one more token: the next one needs a prefill (and maybe a crop)."""
        return self.cache is None or self.cache.length >= self.max_len

    def prefill(self, contexts: list[list[int]]) -> torch.Tensor:
        """Run every row's context -> last-position logits (B, V)."""
        ids, mask = left_pad(contexts, self.pad_id, self.device)  # (B, P) each
        self.mask = None if bool(mask.all()) else mask  # no padding: SDPA's causal fast path
        if self.use_cache:
            if self.cache is None:
                dtype = next(self.model.parameters()).dtype
                self.cache = KVCache(
                    self.model.config, len(contexts), self.max_len, self.device, dtype
                )
            self.cache.length = 0  # positions restart: the cache is recomputed from here
        return self._forward(ids)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """Append token (B,) to every row -> logits (B, V) for the next position."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self._forward(token[:, None])

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids, attention_mask=self.mask, kv_cache=self.cache, logits_to_keep=1)
        return logits[:, -1]  # (B, V)


class Engine:
    """Generates from a GPT. `stream` yields tokens step by step; `generate` collects them.
    `notice` receives one-line notices (a prompt cut to fit the context), stderr by default."""

    def __init__(self, model: GPT, pad_id: int = 0, notice: Callable[[str], None] = print_notice):
        self.model = model
        self.pad_id = pad_id  # fills left padding and finished rows; always masked or ignored
        self.notice = notice

    def window(self, params: SamplingParams) -> int:
        """Tokens of a full context kept when generation runs past it."""
        block = self.model.config.block_size
        window = params.window if params.window is not None else max(1, 3 * block // 4)
        if not 1 <= window < block:
            raise LmforgeError(
                f"window={window} must be between 1 and the model's block_size - 1 ({block - 1})"
            )
        return window

    def _fit_prompt(self, prompt: list[int]) -> list[int]:
        """A prompt cut from the left to the context window, with a notice when it is."""
        block = self.model.config.block_size
        if len(prompt) > block:
            self.notice(
                f"the prompt has {len(prompt)} tokens, more than the model's context of "
                f"{block}: its first {len(prompt) - block} tokens were dropped"
            )
            return list(prompt[-block:])
        return list(prompt)

    @torch.inference_mode()
    def stream(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> Iterator[list[int | None]]:
        """Yield one list per step with each row's new token id, or None for a row that has
        finished (it sampled a stop id, at this step or earlier). Stops when every row has
        finished or after max_new_tokens steps. The model is run in eval mode and its mode is
        restored afterwards."""
        block, window = self.model.config.block_size, self.window(params)
        contexts = [self._fit_prompt(p) for p in prompts]
        device = next(self.model.parameters()).device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device).manual_seed(params.seed)
        stop = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
        seen = None  # (B, V): every token of each row so far, the whole prompt included
        if params.repetition_penalty != 1:
            seen = seen_tokens(
                *left_pad(prompts, self.pad_id, device), self.model.config.vocab_size
            )
        longest = max(map(len, contexts), default=0)  # no prompt, or an empty one: prefill says
        model_view = _Contexts(
            self.model, self.pad_id, params.use_cache, min(block, longest + params.max_new_tokens)
        )
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # (B,)

        was_training = self.model.training
        self.model.eval()
        try:
            logits = model_view.prefill(contexts)  # (B, V)
            for step in range(params.max_new_tokens):
                token = sample_next(logits, params, seen, generator)  # (B,)
                done = done | torch.isin(token, stop)
                token = token.masked_fill(done, self.pad_id)
                yield [None if d else t for t, d in zip(token.tolist(), done.tolist())]
                if done.all() or step == params.max_new_tokens - 1:
                    return
                if seen is not None:
                    seen[torch.arange(len(token)), token] |= ~done
                for row, (t, finished) in enumerate(zip(token.tolist(), done.tolist())):
                    if finished:  # its context stays as it was; its outputs are ignored
                        continue
                    if model_view.full and len(contexts[row]) >= block:
                        contexts[row] = contexts[row][-window:]
                    contexts[row].append(t)
                if model_view.full:
                    logits = model_view.prefill(contexts)
                else:
                    logits = model_view.decode(token)
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
