"""Log-likelihoods from a causal LM: the scoring code under every evaluation task and the
lm-evaluation-harness adapter.

Two kinds of request, as in the harness:
- `loglikelihood(context, continuation)`: the log-probability of the continuation after the
  context (multiple choice, CrowS-Pairs). Requests that share a context (the choices of one
  question) form a tree: the context and the tokens all their continuations begin with run
  once, each continuation's own tokens branch off it, and trees are packed into rows of the
  block size with a mask that keeps every tree and branch to itself. Only the positions
  that predict a continuation token go through the output layer. A context too long for
  the block loses its oldest tokens (each score says how many); a continuation longer than
  the block is scored in rolling windows after its context.
- `rolling`: every token of a long text scored exactly once, in windows of the model's
  block size that move by `stride` tokens and keep the rest of the window as context
  (perplexity, next-token calibration).

Scores do not depend on the batch size: how requests are packed into rows is fixed before
rows are batched, masking makes each request's numbers those of a forward pass of it alone,
and every log-probability is computed in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmforge.common import LmforgeError


@dataclass
class PairScore:
    logprob: float
    """Sum of the continuation tokens' log-probabilities (nats)."""
    is_greedy: bool
    """Every continuation token is the model's argmax (the harness's second output)."""
    tokens: int
    """Continuation tokens scored."""
    context_cut: int = 0
    """Tokens cut from the left of its context to fit the block."""


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
class _Tree:
    """Requests that share a context, laid out as one stretch of a packed row: the trunk (the
    context, cut to fit the block, then the tokens every continuation begins with; PIQA's two
    solutions often share half their words), then each request's own suffix but its last
    token. A suffix attends to the trunk and to itself, never to another suffix, and its
    positions continue the trunk's, so each request is computed exactly as if alone while
    the trunk runs once."""

    trunk: list[int]
    context_cut: int
    """Tokens cut from the left of the context to fit the block."""
    shared: int
    """How many trunk tokens are continuation tokens (its last `shared`)."""
    members: list[int] = field(default_factory=list)
    """The requests' indices."""
    suffixes: list[list[int]] = field(default_factory=list)
    """Each request's continuation after the shared tokens (at least one token)."""
    length: int = field(init=False)
    """Input tokens: the trunk and every suffix but its last token."""

    def __post_init__(self):
        self.length = len(self.trunk) + sum(len(x) - 1 for x in self.suffixes)

    def add(self, member: int, suffix: list[int]) -> None:
        self.members.append(member)
        self.suffixes.append(suffix)
        self.length += len(suffix) - 1


class _RowLayout:
    """One packed row: its input ids and positions, which tree (-1: none) and which branch
    (0: trunk, k: the k-th suffix) each token belongs to, the positions whose next-token
    prediction is scored with their targets, and each request's share of those."""

    def __init__(self, trees: list[_Tree]):
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.tree: list[int] = []
        self.branch: list[int] = []
        self.predict_at: list[int] = []
        self.targets: list[int] = []
        self.requests: list[tuple[int, list[int]]] = []
        self.context_cut: list[int] = []  # per request, as in self.requests
        for t, tree in enumerate(trees):
            self._add(t, tree)

    def _add(self, t: int, tree: _Tree) -> None:
        start, m = len(self.ids), len(tree.trunk)
        self.ids += tree.trunk
        self.positions += range(m)
        self.tree += [t] * m
        self.branch += [0] * m
        # trunk position j predicts trunk token j + 1: the shared tokens are its last `shared`
        shared_at = [start + j for j in range(m - tree.shared - 1, m - 1)]
        shared_slots = list(range(len(self.predict_at), len(self.predict_at) + tree.shared))
        self.predict_at += shared_at
        self.targets += tree.trunk[m - tree.shared :]
        for k, (i, suffix) in enumerate(zip(tree.members, tree.suffixes), start=1):
            inputs = suffix[:-1]
            own_start = len(self.ids)
            self.ids += inputs
            self.positions += range(m, m + len(inputs))
            self.tree += [t] * len(inputs)
            self.branch += [k] * len(inputs)
            # the trunk's last token predicts the suffix's first; each input, the next
            slots = list(range(len(self.predict_at), len(self.predict_at) + len(suffix)))
            self.predict_at += [start + m - 1] + [own_start + j for j in range(len(inputs))]
            self.targets += suffix
            self.requests.append((i, shared_slots + slots))
        self.context_cut += [tree.context_cut] * len(tree.members)

    def mask(self, T: int) -> torch.Tensor:
        """(T, T) True where a query may attend: an earlier (or the same) token of its own
        tree, in the trunk or its own branch. Padding attends only to itself."""
        n = len(self.ids)
        tree = torch.full((T,), -1)
        tree[:n] = torch.tensor(self.tree)
        branch = torch.zeros(T, dtype=torch.long)
        branch[:n] = torch.tensor(self.branch)
        idx = torch.arange(T)
        causal = idx[None, :] <= idx[:, None]  # (T, T) key <= query
        same_tree = (tree[:, None] == tree[None, :]) & (tree[:, None] >= 0)
        visible = (branch[None, :] == 0) | (branch[None, :] == branch[:, None])
        return (causal & same_tree & visible) | torch.eye(T, dtype=torch.bool)


class Scorer:
    """Scores text with `model` (a GPT or a PEFT module around one, in eval mode) and its
    tokenizer, `batch_size` rows per forward pass. Each request's score is kept, so a task
    that scores what another already did (calibration after mc, or after ppl) costs nothing."""

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
        self._pair_scores: dict[tuple[tuple[int, ...], tuple[int, ...]], PairScore] = {}
        self._rolled: dict[tuple[tuple[int, ...], int], TokenStats] = {}
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
        return self.encode_pairs([(context, continuation)])[0]

    def encode_pairs(self, requests: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """encode_pair of every request, with the tokenizer run once over all the texts (its
        batch encoder uses every core) and once over each distinct context."""
        pairs = []
        for context, continuation in requests:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            pairs.append((context, continuation))
        if any(not c for c, _ in pairs) and self.prefix_id is None:
            raise LmforgeError(
                "an empty context needs a BOS or end-of-text token, and this tokenizer has neither"
            )
        contexts = list(dict.fromkeys(c for c, _ in pairs if c))
        context_ids = dict(zip(contexts, self.tokenizer.encode_batch(contexts)))
        alone = iter(self.encode_texts([x for c, x in pairs if not c]))
        wholes = iter(self.tokenizer.encode_batch([c + x for c, x in pairs if c]))
        out = []
        for context, _ in pairs:
            if not context:
                out.append(([self.prefix_id], next(alone)))
            else:
                ctx = context_ids[context]
                out.append((ctx, next(wholes)[len(ctx) :]))
        return out

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of whole texts without the BOS a tokenizer may add: the prefix token
        (BOS itself, when there is one) is what stands before a text here."""
        ids = self.tokenizer.encode_batch(texts)
        return [x[1:] for x in ids] if self.tokenizer.add_bos else ids

    # ------------------------------------------------------------------ log-likelihood

    @torch.no_grad()
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[PairScore]:
        """Score each (context, continuation) pair; results in request order."""
        return self.loglikelihood_ids(self.encode_pairs(requests))

    @torch.no_grad()
    def loglikelihood_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[PairScore]:
        keys = [(tuple(ctx), tuple(cont)) for ctx, cont in pairs]
        results: list[PairScore | None] = [self._pair_scores.get(k) for k in keys]
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise LmforgeError(f"request {i}: the continuation is empty")
            if results[i] is None and len(cont) > self.block:  # rare: in rolling windows
                stats = self._rolling_seq(ctx + cont, self.block)
                results[i] = PairScore(
                    stats.logprob[len(ctx) - 1 :].sum().item(),
                    bool(stats.correct[len(ctx) - 1 :].all()),
                    len(cont),
                )
        rows = self._rows(self._trees([p if r is None else None for p, r in zip(pairs, results)]))
        total = sum(len(tree.members) for row in rows for tree in row)
        bar = tqdm(total=total, disable=not self.progress, desc="loglikelihood", leave=False)
        for b in range(0, len(rows), self.batch_size):
            scores = list(self._score_rows(rows[b : b + self.batch_size]))
            for i, score in scores:
                results[i] = score
            bar.update(len(scores))
        bar.close()
        self._pair_scores.update(zip(keys, results))
        return results  # type: ignore[return-value]

    def _trees(self, pairs: list[tuple[list[int], list[int]] | None]) -> list[_Tree]:
        """Requests grouped by context, each context cut from the left so that it and its
        longest continuation fit the block; a group too long
        for one row is split into several trees. Longest first, so that a batch too large
        for memory fails at once."""
        members: dict[tuple[int, ...], list[int]] = {}
        for i, pair in enumerate(pairs):
            if pair is not None:  # None: already scored
                members.setdefault(tuple(pair[0]), []).append(i)
        trees = []
        for ctx, idx in members.items():
            conts = [pairs[i][1] for i in idx]
            shared = common_prefix_length(conts)
            room = self.block - max(map(len, conts)) + 1  # the last token is never an input
            cut = max(0, len(ctx) - room)
            trunk = list(ctx[cut:]) + conts[0][:shared]
            tree = _Tree(trunk, cut, shared)
            for i, cont in zip(idx, conts):
                if tree.members and tree.length + len(cont) - shared - 1 > self.block:
                    trees.append(tree)
                    tree = _Tree(trunk, cut, shared)
                tree.add(i, cont[shared:])
            trees.append(tree)
        return sorted(trees, key=lambda t: -t.length)

    def _rows(self, trees: list[_Tree]) -> list[list[_Tree]]:
        """Trees packed first-fit into rows of at most block_size input tokens."""
        rows: list[list[_Tree]] = []
        room: list[int] = []
        for tree in trees:
            for r, free in enumerate(room):
                if tree.length <= free:
                    rows[r].append(tree)
                    room[r] -= tree.length
                    break
            else:
                rows.append([tree])
                room.append(self.block - tree.length)
        return rows

    def _score_rows(self, rows: list[list[_Tree]]) -> Iterable[tuple[int, PairScore]]:
        """One forward over packed rows (right-padded; a 4-D mask keeps every tree and every
        suffix to itself) that carries to the last block and the output layer only the
        positions predicting a continuation token."""
        layouts = [_RowLayout(row) for row in rows]
        T = max(len(x.ids) for x in layouts)
        k = max(len(x.predict_at) for x in layouts)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        positions = torch.zeros_like(ids)
        mask = torch.zeros(len(rows), 1, T, T, dtype=torch.bool)
        predict_at = torch.zeros(len(rows), k, dtype=torch.long)  # padded with position 0
        for r, layout in enumerate(layouts):
            n = len(layout.ids)
            ids[r, :n] = torch.tensor(layout.ids)
            positions[r, :n] = torch.tensor(layout.positions)
            mask[r, 0] = layout.mask(T)
            predict_at[r, : len(layout.predict_at)] = torch.tensor(layout.predict_at)
        hidden = self.model(
            ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=predict_at.to(self.device),
            return_hidden=True,
        )  # (R, k, d)
        picked, greedy = [], []  # per predicted position, rows in turn
        for r, layout in enumerate(layouts):  # a row's logits at a time stay in cache
            targets = torch.tensor(layout.targets, device=self.device)  # (n,)
            logprobs = F.log_softmax(self._head(hidden[r, : len(targets)]).float(), dim=-1)
            picked.append(logprobs.gather(-1, targets[:, None])[:, 0])  # (n,)
            greedy.append(logprobs.argmax(-1) == targets)  # (n,)
        picked, greedy = torch.cat(picked), torch.cat(greedy)  # (N,)
        # each request's positions in `picked`: its row's first + its indices into predict_at
        owner, slots, requests, start = [], [], [], 0
        for layout in layouts:
            for (i, tokens), cut in zip(layout.requests, layout.context_cut):
                owner += [len(requests)] * len(tokens)
                slots += [start + t for t in tokens]
                requests.append((i, len(tokens), cut))
            start += len(layout.predict_at)
        owner = torch.tensor(owner, device=self.device)
        slots = torch.tensor(slots, device=self.device)
        per_request = torch.zeros(2, len(requests), dtype=torch.float64, device=self.device)
        per_request[0].index_add_(0, owner, picked[slots].double())  # summed in fp64
        per_request[1].index_add_(0, owner, (~greedy[slots]).double())  # non-greedy tokens
        for (i, n, cut), (score, misses) in zip(requests, per_request.T.tolist()):
            yield i, PairScore(score, misses == 0, n, cut)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's output layer on final hidden states (n, d) -> logits (n, V)."""
        decoder = getattr(self.model, "model", self.model)  # a prefix/P-tuned wrapper's GPT
        return decoder.logits(hidden)  # lm_head (+ logit_softcap)

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
        key = (tuple(seq), stride)
        if key not in self._rolled:
            self._rolled[key] = self._rolling_seq(seq, stride)
        return self._rolled[key]

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
        logits = self.model(inputs.to(self.device)).float()  # (W, T, V)
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
