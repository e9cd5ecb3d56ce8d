"""Continuous batching: one forward per step over every running request, on its own thread.

A request joins at the next step: each step's forward takes the next token of every running
request and the whole prompts of those that arrived since the last step, packed into one
sequence (chunked prefill, as vLLM and SGLang do it: a step with joiners costs one forward,
not a prefill forward and a decode forward). Joiners' first tokens are sampled in that same
step, so time to first token does not wait for the running batch to finish. A request that
finishes (stop token, max_tokens, full context, or cancelled by its client) leaves at once
and its slot goes to the next waiting one.

The cache keeps one slot per request, each at its own length (`SlotCache`), rather than
paged blocks: with block_size-long contexts of a small model a slot per request costs little
memory, needs no block tables, and decode reads a contiguous (n, nkv, S, hd) view. Running
requests are kept in slots 0..n-1 (a finished one's slot is filled by moving the last), so
that view needs no gather. S is the longest running context + 1; shorter rows are masked.

Each request's results are ("token", id, logprobs or None) events, then ("done",
finish_reason) with finish_reason "stop" or "length". A step's events go out together, in
one call of `deliver(events)` with [(request, event), ...]: by default each request's
`events` callback is called on the loop thread; the HTTP server hands the whole list to its
event loop at once (one wake-up per step, not one per token).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge.engine import SamplingParams, sample_next
from lmforge.model.gpt import attend
from lmforge.model.masks import AttentionPattern, Mask


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should answer 503 and retry later."""


class SlotCache:
    """Keys/values for up to `slots` requests, each at its own length: a packed KV cache (see
    gpt.KVCache). Before each forward the engine calls `plan`: slots 0..decoding-1 (the running
    requests) take one new token each, the next len(prompts) slots start afresh with a whole
    prompt, and the forward's tokens come packed in that order."""

    packed = True

    def __init__(self, cfg, slots: int, device, dtype):
        shape = (cfg.n_layer, slots, cfg.kv_heads, cfg.block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, slots, nkv, block, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,)
        self.config = cfg  # its attention pattern: causal, sliding window, global tokens
        self.decoding, self.prompts = 0, []
        self.columns, self.visible = 0, False

    def plan(self, decoding: int, prompts: list[int]) -> torch.Tensor:
        """Set the next forward's rows (`prompts`: the joiners' prompt lengths); return the
        packed tokens' positions (1, decoding + sum(prompts))."""
        device = self.lengths.device
        self.decoding, self.prompts = decoding, prompts
        positions = [self.lengths[:decoding], *(torch.arange(P, device=device) for P in prompts)]
        if decoding:  # the decode tokens' keys: `columns` per row, those past its own masked
            lengths = self.lengths[:decoding]  # (n,): each row's new position
            self.columns = int(lengths.max()) + 1
            pattern = AttentionPattern.of(self.config, self.columns, offset=lengths)
            visible = pattern.dense(1, self.columns, device)  # (n, 1, 1, S)
            self.visible = False if bool(visible.all()) else visible
        return torch.cat(positions)[None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q (1, nh, T, hd), k and v (1, nkv, T, hd) of the packed tokens -> (1, nh, T, hd):
        each decode token against its own row's cache, each prompt causally within itself."""
        n = self.decoding
        out = []
        if n:
            out.append(self._attend_decoding(layer, q[0, :, :n], k[0, :, :n], v[0, :, :n]))
        start = n
        for slot, P in enumerate(self.prompts, start=n):
            part = slice(start, start + P)
            self.k[layer, slot, :, :P], self.v[layer, slot, :, :P] = k[0, :, part], v[0, :, part]
            out.append(attend(q[:, :, part], k[:, :, part], v[:, :, part], self._causal(P)))
            start += P
        return torch.cat(out, dim=2)

    def _attend_decoding(self, layer: int, q, k, v) -> torch.Tensor:
        """q (nh, n, hd), k and v (nkv, n, hd): one new token per running row, written at the
        row's own length -> (1, nh, n, hd)."""
        n = self.decoding
        rows = torch.arange(n, device=k.device)
        keys, values = self.k[layer, :n], self.v[layer, :n]  # (n, nkv, block, hd) views
        keys[rows, :, self.lengths[:n]] = k.transpose(0, 1)  # (n, nkv, hd)
        values[rows, :, self.lengths[:n]] = v.transpose(0, 1)
        S = self.columns
        y = attend(q.transpose(0, 1)[:, :, None], keys[:, :, :S], values[:, :, :S], self.visible)
        return y[:, :, 0].transpose(0, 1)[None]  # (n, nh, 1, hd) -> (1, nh, n, hd)

    def _causal(self, P: int) -> Mask:
        """A prompt of P tokens, causally within itself: True, or (1, 1, P, P) with a window."""
        pattern = AttentionPattern.of(self.config, P)
        return pattern.mask(P, P, "sdpa", self.lengths.device)

    def advance(self, _: int) -> None:
        """After the forward: running rows one longer, the new ones as long as their prompts."""
        n = self.decoding
        self.lengths[:n] += 1
        for slot, P in enumerate(self.prompts, start=n):
            self.lengths[slot] = P

    def move(self, src: int, dst: int) -> None:
        self.k[:, dst], self.v[:, dst] = self.k[:, src], self.v[:, src]
        self.lengths[dst] = self.lengths[src]


Events = Callable[[tuple], None]


@dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    """max_new_tokens, temperature, top_k, top_p, stop_ids and seed are used."""
    events: Events
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the sampled token's and the k most likely."""
    id: int = field(default_factory=itertools.count().__next__)
    generated: int = 0
    cancelled: bool = False
    generator: torch.Generator | None = None


def deliver_here(events: list[tuple[Request, tuple]]) -> None:
    for request, event in events:
        request.events(event)


class BatchEngine:
    """Runs requests through one model, up to `slots` at a time, `max_queue` waiting.

    The loop thread runs the model's ops on `threads` CPU threads (default: torch's count
    when the engine is made). Other threads of the process should run theirs on one
    (`torch.set_num_threads(1)` before their first op, as `lmforge serve` does): once a second
    thread has had its own team of OpenMP threads, every step of the loop took 1.5x as long
    (11.3 against 7.0 ms on 2 cores)."""

    def __init__(
        self,
        model,
        slots: int = 16,
        max_queue: int = 64,
        start: bool = True,
        threads: int | None = None,
    ):
        self.model = model.eval()
        self.threads = threads or torch.get_num_threads()
        self.config = model.config
        self.slots, self.max_queue = slots, max_queue
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.cache = SlotCache(self.config, slots, self.device, dtype)
        self.running: list[Request] = []  # running[i] holds slot i
        self.waiting: deque[Request] = deque()
        self.next_token = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.cv = threading.Condition()
        self.stopping = False
        self.outbox: list[tuple[Request, tuple]] = []  # this step's events
        self.deliver: Callable[[list[tuple[Request, tuple]]], None] = deliver_here
        self.thread = threading.Thread(target=self._loop, name="lmforge-batching", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the decode loop (once; requests submitted before it wait in the queue)."""
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()

    # ---------------------------------------------------------------- the caller's side
    def submit(self, request: Request) -> Request:
        """Queue a request (raises QueueFull at the bound, ValueError if it cannot fit)."""
        if not request.prompt or len(request.prompt) >= self.config.block_size:
            raise ValueError(
                f"the prompt has {len(request.prompt)} tokens; this model's context is "
                f"{self.config.block_size} tokens, so at most {self.config.block_size - 1}"
            )
        if request.params.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(request.params.seed)
        with self.cv:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)
            self.cv.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): it leaves at the next step, no more events."""
        request.cancelled = True
        with self.cv:
            self.cv.notify()

    def stats(self) -> dict[str, int]:
        with self.cv:
            return {"running": len(self.running), "waiting": len(self.waiting)}

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish those already in, then stop the loop."""
        with self.cv:
            self.stopping = True
            if not drain:
                for r in [*self.running, *self.waiting]:
                    r.cancelled = True
            self.cv.notify()
        if self.thread.ident is not None:
            self.thread.join(timeout)

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not (self.waiting or self.running or self.stopping):
                        self.cv.wait()
                    if self.stopping and not self.waiting and not self.running:
                        return
                    joining = []
                    while self.waiting and len(self.running) + len(joining) < self.slots:
                        joining.append(self.waiting.popleft())
                joining = [r for r in joining if not r.cancelled]
                self._drop_finished()
                if joining or self.running:
                    self._step(joining)
                    self._drop_finished()
                if self.outbox:
                    self.deliver(self.outbox)
                    self.outbox = []

    def _step(self, joining: list[Request]) -> None:
        """One forward over the next token of every running request and the prompts of the
        joining ones (who take the next free slots); sample and send each one's next token."""
        n = len(self.running)
        self.running.extend(joining)
        prompts = [len(r.prompt) for r in joining]
        positions = self.cache.plan(n, prompts)  # (1, T)
        tokens = torch.cat(
            [self.next_token[:n], *(torch.tensor(r.prompt, device=self.device) for r in joining)]
        )[None]  # (1, T)
        last = torch.tensor(prompts, dtype=torch.long, device=self.device).cumsum(0) + n - 1
        wanted = torch.cat([torch.arange(n, device=self.device), last])  # (n + k,)
        logits = self.model(
            tokens, position_ids=positions, kv_cache=self.cache, logits_to_keep=wanted
        )[0]  # (n + k, V)
        self._emit(range(n + len(joining)), logits)

    def _sample(self, slots: range, logits: torch.Tensor) -> list[int]:
        """Each slot's next token from its logits row (len(slots), V): one sampling call for
        every group of rows with the same settings and no seed; a seeded row alone, with its
        own generator, so its draws do not depend on the rest of the batch."""
        requests = [self.running[s] for s in slots]
        tokens = logits.argmax(-1)  # (k,): the greedy rows' answer
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            if r.params.temperature > 0:
                key = (r.params.temperature, r.params.top_k, r.params.top_p)
                groups.setdefault(key if r.generator is None else (id(r), *key), []).append(i)
        for rows in groups.values():
            params, generator = requests[rows[0]].params, requests[rows[0]].generator
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = sample_next(logits[index], params, None, generator)
        return tokens.tolist()

    def _emit(self, slots: range, logits: torch.Tensor) -> None:
        """Sample the next token of each slot's request (logits (len(slots), V)), send it,
        and decide whether the request is done."""
        for slot, token, row in zip(slots, self._sample(slots, logits), logits):
            request = self.running[slot]
            if request.cancelled:
                continue
            params = request.params
            finish = None
            if token in params.stop_ids:
                finish = "stop"
            else:
                request.generated += 1
                logprobs = self._logprobs(row, token, request.logprobs)
                self.outbox.append((request, ("token", token, logprobs)))
                context = int(self.cache.lengths[slot]) + 1  # with this token
                if request.generated >= params.max_new_tokens or context >= self.config.block_size:
                    finish = "length"
            if finish:
                self.outbox.append((request, ("done", finish)))
                request.cancelled = True  # leaves at the next _drop_finished
            else:
                self.next_token[slot] = token

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: int, top: int | None) -> dict | None:
        """The model's log-probabilities (before temperature and filtering, as OpenAI's are):
        the token's and, with top > 0, the top most likely (id, logprob) pairs."""
        if top is None:
            return None
        logp = torch.log_softmax(logits.float(), dim=-1)
        out: dict = {"logprob": float(logp[token]), "top": []}
        if top:
            values, ids = logp.topk(top)
            out["top"] = list(zip(ids.tolist(), values.tolist()))
        return out

    def _drop_finished(self) -> None:
        """Free the slots of finished or cancelled requests, keeping running ones in 0..n-1."""
        with self.cv:
            slot = 0
            while slot < len(self.running):
                if self.running[slot].cancelled:
                    last = len(self.running) - 1
                    if slot != last:
                        self.cache.move(last, slot)
                        self.next_token[slot] = self.next_token[last]
                        self.running[slot] = self.running[last]
                    self.running.pop()
                else:
                    slot += 1
