"""Log-likelihoods from a causal LM: the scoring code under every evaluation task and the
lm-evaluation-harness adapter.

Scores do not depend on the batch size. Continuations are right-padded after their context
(a causal model's real positions never see what comes after them), contexts are left-padded
with the padding masked out and positions counted over real tokens only, and every number is
computed in fp32 from logits.

Two kinds of request, as in the harness:
- `loglikelihood(context, continuation)`: the log-probability of the continuation after the
  context (multiple choice, CrowS-Pairs). Requests that share a context (the choices of one
  question) run it once: its keys and values are cached and copied to each choice's row. A
  context too long for the block loses its oldest tokens (counted in `truncations`); a
  continuation longer than the block is scored in rolling windows after its context.
- `rolling`: every token of a long text scored exactly once, in windows of the model's
  block size that move by `stride` tokens and keep the rest of the window as context
  (perplexity, next-token calibration).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.common import LmforgeError
from lmforge.engine import left_pad
from lmforge.model.gpt import KVCache


@dataclass
class PairScore:
    logprob: float
    """Sum of the continuation tokens' log-probabilities (nats)."""
    is_greedy: bool
    """Every continuation token is the model's argmax (the harness's second output)."""
    tokens: int
    """Continuation tokens scored."""


@dataclass
class TokenStats:
    """Per scored token of a rolling pass, each (N,) in text order."""

    logprob: torch.Tensor
    """log p(target)."""
    confidence: torch.Tensor
    """p of the most likely token."""
    correct: torch.Tensor
    """The most likely token is the target (bool)."""
    sum_sq: torch.Tensor
    """sum over the vocabulary of p^2 (the Brier score is sum_sq - 2 p(target) + 1)."""


@dataclass
class Truncations:
    """Contexts cut from the left to fit the block, counted for the report."""

    requests: int = 0
    tokens: int = 0
    examples: list[int] = field(default_factory=list)


@dataclass
class _Group:
    """Requests sharing one context. The tokens their continuations all begin with (PIQA's
    two solutions often share half their words) join the context, run once, and are scored
    from its last positions; each request keeps only its own suffix."""

    context: list[int]
    """The shared ids: the context (cut to fit the block), then the common tokens."""
    shared: int
    """How many of them are continuation tokens (the last `shared` of context)."""
    members: list[int]
    """The requests' indices."""
    longest: int
    """The longest suffix after the shared tokens."""


class Scorer:
    """Scores text with `model` (a GPT or a PEFT module around one, in eval mode) and its
    tokenizer, `batch_size` rows per forward pass."""

    def __init__(self, model, tokenizer, batch_size: int = 16, progress: bool = False):
        if not hasattr(model, "lm_head") and not hasattr(model, "model"):
            raise LmforgeError(
                "this checkpoint is not a language model (a classifier?): it cannot be scored"
            )
        if batch_size < 1:
            raise LmforgeError(f"batch size {batch_size} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.block = model.config.block_size
        self.device = next(model.parameters()).device
        self.progress = progress
        self.truncations = Truncations()
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
        self.prefix_id: int | None = prefix
        """Stands before a text with no context (the harness's prefix token): BOS, else the
        end-of-text token; None when the tokenizer has neither."""

    # ------------------------------------------------------------------ encoding

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) the way the harness splits them: the context's
        trailing whitespace moves to the continuation, the pair is encoded as one text and
        the continuation is what follows the context's own encoding (so a token that merges
        across the boundary is not split). An empty context becomes the prefix token."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            if self.prefix_id is None:
                raise LmforgeError(
                    "an empty context needs a BOS or end-of-text token, and this tokenizer "
                    "has neither"
                )
            return [self.prefix_id], self.encode_texts([continuation])[0]
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return ctx, whole[len(ctx) :]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of whole texts without the BOS a tokenizer may add: the prefix token
        (BOS itself, when there is one) is what stands before a text here."""
        ids = self.tokenizer.encode_batch(texts)
        return [x[1:] for x in ids] if self.tokenizer.add_bos else ids

    # ------------------------------------------------------------------ log-likelihood

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[PairScore]:
        """Score each (context, continuation) pair; results in request order."""
        return self.loglikelihood_ids([self.encode_pair(c, x) for c, x in requests])

    @torch.no_grad()
    def loglikelihood_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[PairScore]:
        results: list[PairScore | None] = [None] * len(pairs)
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise LmforgeError(f"request {i}: the continuation is empty")
            if len(cont) > self.block:  # rare: scored in rolling windows, one request at a time
                stats = self._rolling_seq(ctx + cont, self.block)
                results[i] = PairScore(
                    stats.logprob[len(ctx) - 1 :].sum().item(),
                    bool(stats.correct[len(ctx) - 1 :].all()),
                    len(cont),
                )
        groups = self._groups([p if r is None else None for p, r in zip(pairs, results)])
        bar = tqdm(total=len(pairs), disable=not self.progress, desc="loglikelihood", leave=False)
        for batch in self._batches(groups):
            for i, score in self._score_groups(batch, pairs):
                results[i] = score
            bar.update(sum(len(g.members) for g in batch))
        bar.close()
        return results  # type: ignore[return-value]

    def _groups(self, pairs: list[tuple[list[int], list[int]] | None]) -> list[_Group]:
        """Requests grouped by context, each context cut from the left so that it and its
        group's longest continuation fit the block (counted in self.truncations); longest
        first, so that a batch too large for memory fails at once."""
        members: dict[tuple[int, ...], list[int]] = {}
        for i, pair in enumerate(pairs):
            if pair is not None:  # None: already scored
                members.setdefault(tuple(pair[0]), []).append(i)
        groups = []
        for ctx, idx in members.items():
            conts = [pairs[i][1] for i in idx]
            fitted = self._fit(list(ctx), max(map(len, conts)), idx[0])
            shared = common_prefix_length(conts)
            longest = max(map(len, conts)) - shared
            groups.append(_Group(fitted + conts[0][:shared], shared, idx, longest))
        return sorted(groups, key=lambda g: -(len(g.context) + g.longest))

    def _batches(self, groups: list[_Group]) -> Iterable[list[_Group]]:
        """Whole groups, up to batch_size rows, whose padded context and continuation widths
        fit the block together (a batch is left-padded to its longest context)."""
        batch: list[_Group] = []
        for g in groups:
            rows = sum(len(b.members) for b in batch) + len(g.members)
            width = max(len(b.context) for b in [*batch, g]) + max(b.longest for b in [*batch, g])
            if batch and (rows > self.batch_size or width - 1 > self.block):
                yield batch
                batch = []
            batch.append(g)
        if batch:
            yield batch

    def _score_groups(self, groups: list[_Group], pairs) -> Iterable[tuple[int, PairScore]]:
        """One forward over the groups' shared ids (left-padded, cached), then one over all
        the requests' own suffixes but their last token (right-padded), each row reading its
        group's cache row. The last `shared + 1` positions of a group's row predict its shared
        continuation tokens and the first token of each suffix."""
        suffixes = [pairs[i][1][g.shared :] for g in groups for i in g.members]
        C = max(map(len, suffixes))
        keep = max(g.shared for g in groups) + 1
        ctx_ids, ctx_mask = left_pad([g.context for g in groups], 0, self.device)  # (G, P)
        G, P = ctx_ids.shape
        cache = KVCache(self.model.config, G, P + C - 1, self.device, self._dtype())
        head = F.log_softmax(
            self._logits(ctx_ids, ctx_mask, cache, logits_to_keep=keep).float(), dim=-1
        )  # (G, keep, V): the last `keep` positions of every row
        owner = torch.tensor(
            [g for g, group in enumerate(groups) for _ in group.members], device=self.device
        )  # (N,) the group of each request row
        cont_ids = torch.zeros(len(suffixes), C, dtype=torch.long, device=self.device)
        cont_mask = torch.zeros_like(cont_ids)
        for r, suffix in enumerate(suffixes):
            cont_ids[r, : len(suffix)] = torch.tensor(suffix)
            cont_mask[r, : len(suffix)] = 1
        logprobs = head[owner, -1:]  # (N, 1, V) predicting each suffix's first token
        if C > 1:
            cache.k, cache.v = cache.k[:, owner], cache.v[:, owner]  # (L, N, nkv, S, hd)
            mask = torch.cat([ctx_mask[owner], cont_mask[:, :-1]], dim=1)  # (N, P + C - 1)
            rest = self._logits(cont_ids[:, :-1], mask, cache)  # (N, C - 1, V)
            logprobs = torch.cat([logprobs, F.log_softmax(rest.float(), dim=-1)], dim=1)
        picked = logprobs.gather(-1, cont_ids[..., None])[..., 0] * cont_mask  # (N, C)
        greedy = (logprobs.argmax(-1) == cont_ids) | (cont_mask == 0)  # (N, C)
        shared = [self._shared_score(head[g], group) for g, group in enumerate(groups)]
        r = 0
        for g, group in enumerate(groups):
            shared_logprob, shared_greedy = shared[g]
            for i in group.members:
                yield (
                    i,
                    PairScore(
                        shared_logprob + picked[r].sum().item(),
                        shared_greedy and bool(greedy[r].all()),
                        group.shared + len(suffixes[r]),
                    ),
                )
                r += 1

    @staticmethod
    def _shared_score(head: torch.Tensor, group: _Group) -> tuple[float, bool]:
        """(log-probability, all greedy) of a group's shared continuation tokens from its
        row's last positions (head (keep, V) log-probabilities)."""
        if not group.shared:
            return 0.0, True
        targets = torch.tensor(group.context[-group.shared :], device=head.device)  # (k,)
        predictions = head[-group.shared - 1 : -1]  # (k, V)
        picked = predictions.gather(-1, targets[:, None])[:, 0]
        return picked.sum().item(), bool((predictions.argmax(-1) == targets).all())

    def _fit(self, ctx: list[int], longest: int, request: int) -> list[int]:
        room = self.block - longest + 1  # the last continuation token is never an input
        if len(ctx) <= room:
            return ctx
        t = self.truncations
        t.requests += 1
        t.tokens += len(ctx) - room
        if len(t.examples) < 5:
            t.examples.append(request)
        return ctx[len(ctx) - room :]

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _logits(self, ids, mask, cache=None, logits_to_keep: int = 0) -> torch.Tensor:
        return self.model(ids, attention_mask=mask, kv_cache=cache, logits_to_keep=logits_to_keep)

    # ------------------------------------------------------------------ rolling windows

    @torch.no_grad()
    def rolling(self, ids: list[int], stride: int | None = None) -> TokenStats:
        """Score every token of `ids` once. The prefix token (when there is one) stands first
        so that the first token is scored too; without one the first token is context only.
        Windows hold up to block_size inputs and advance by `stride` (default: the block,
        i.e. disjoint windows); each scores only the targets no earlier window scored."""
        stride = stride or self.block
        if not 1 <= stride <= self.block:
            raise LmforgeError(f"stride {stride} must be between 1 and the block size {self.block}")
        seq = ([self.prefix_id] if self.prefix_id is not None else []) + list(ids)
        return self._rolling_seq(seq, stride)

    def _rolling_seq(self, seq: list[int], stride: int) -> TokenStats:
        """Stats of seq[1:], each target once (see rolling)."""
        windows = rolling_windows(len(seq), self.block, stride)
        stats: list[TokenStats] = []
        for b in range(0, len(windows), self.batch_size):
            stats.append(self._score_windows(seq, windows[b : b + self.batch_size]))
        return concat_stats(stats)

    def _score_windows(self, seq: list[int], windows: list[tuple[int, int, int]]) -> TokenStats:
        longest = max(end - begin for begin, end, _ in windows) - 1
        inputs = torch.zeros(len(windows), longest, dtype=torch.long)
        for r, (begin, end, _) in enumerate(windows):
            inputs[r, : end - begin - 1] = torch.tensor(seq[begin : end - 1])
        logits = self._logits(inputs.to(self.device), None).float()  # (W, T, V)
        out = []
        for r, (begin, end, first_target) in enumerate(windows):
            positions = slice(first_target - begin - 1, end - begin - 1)
            targets = torch.tensor(seq[first_target:end], device=self.device)  # (n,)
            probs_log = F.log_softmax(logits[r, positions], dim=-1)  # (n, V)
            probs = probs_log.exp()
            top_p, top = probs.max(-1)
            out.append(
                TokenStats(
                    logprob=probs_log.gather(-1, targets[:, None])[:, 0].cpu(),
                    confidence=top_p.cpu(),
                    correct=(top == targets).cpu(),
                    sum_sq=probs.pow(2).sum(-1).cpu(),
                )
            )
        return concat_stats(out)


def rolling_windows(n: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target) of each window over a sequence of n tokens: inputs
    seq[begin:end-1] predict seq[begin+1:end], of which seq[first_target:end] are scored.
    Targets 1..n-1 are each scored exactly once."""
    windows, scored = [], 1
    begin = 0
    while scored < n:
        end = min(begin + block + 1, n)
        windows.append((begin, end, scored))
        scored = end
        begin += stride  # stride <= block: the next window ends past `scored`, no gap
    return windows


def common_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence begins with, leaving each at least one of its own (a single
    sequence shares nothing)."""
    if len(sequences) < 2:
        return 0
    n = 0
    for column in zip(*sequences):
        if len(set(column)) > 1:
            break
        n += 1
    return min(n, min(map(len, sequences)) - 1)


def concat_stats(parts: list[TokenStats]) -> TokenStats:
    return TokenStats(
        *(torch.cat([getattr(p, name) for p in parts]) for name in TokenStats.__dataclass_fields__)
    )
