"""Continuous batching: one decode loop over every running request, on its own thread.

A request joins at the next step: the prompts that arrived since the last step are prefilled
together (one left-padded forward; each first token is sampled at once, so time to first
token does not wait for the running batch to finish) and each one's keys/values are copied
into a free slot of the shared cache. Each step then decodes one token for every
running request in a single forward; a request that finishes (stop token, max_tokens, full
context, or cancelled by its client) leaves at once and its slot goes to the next waiting one.

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

from lmforge.engine import SamplingParams, left_pad, sample_next
from lmforge.model.gpt import KVCache


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller should answer 503 and retry later."""


class SlotCache:
    """Keys/values for up to `slots` requests, each at its own length. `rows` (the running
    requests, slots 0..rows-1) and `columns` (positions a decode step attends to) are set by
    the engine before each decode forward."""

    def __init__(self, cfg, slots: int, device, dtype):
        shape = (cfg.n_layer, slots, cfg.kv_heads, cfg.block_size, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, slots, nkv, block, hd)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,)
        self.rows, self.columns = 0, 0

    @property
    def length(self) -> int:
        """Positions before the new token of the longest running row (GPT's context check)."""
        return self.columns - 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write each running row's new (n, nkv, 1, hd) key/value at its own length; return
        the (n, nkv, columns, hd) views a decode step attends to."""
        n = self.rows
        rows = torch.arange(n, device=k.device)
        keys, values = self.k[layer, :n], self.v[layer, :n]  # views
        keys[rows, :, self.lengths[:n]] = k[:, :, 0]
        values[rows, :, self.lengths[:n]] = v[:, :, 0]
        return keys[:, :, : self.columns], values[:, :, : self.columns]

    def advance(self, n: int) -> None:
        self.lengths[: self.rows] += n

    def put(self, slot: int, prefilled: KVCache, row: int, pad: int) -> None:
        """Row `row` of a left-padded prefilled cache (its first `pad` positions padding)
        into `slot`, from position 0."""
        P = prefilled.length - pad
        self.k[:, slot, :, :P] = prefilled.k[:, row, :, pad : pad + P]
        self.v[:, slot, :, :P] = prefilled.v[:, row, :, pad : pad + P]
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
    """Runs requests through one model, up to `slots` at a time, `max_queue` waiting."""

    def __init__(self, model, slots: int = 16, max_queue: int = 64, start: bool = True):
        self.model = model.eval()
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
                if joining:
                    self._prefill(joining)
                if self.running:
                    self._drop_finished()
                if self.running:
                    self._decode()
                    self._drop_finished()
                if self.outbox:
                    self.deliver(self.outbox)
                    self.outbox = []

    def _prefill(self, joining: list[Request]) -> None:
        """Run the joining requests' prompts in one left-padded forward into a fresh cache,
        move each row's real positions into the next free slot, emit their first tokens."""
        ids, mask = left_pad([r.prompt for r in joining], 0, self.device)  # (k, P) each
        P = ids.size(1)
        prefilled = KVCache(self.config, len(joining), P, self.device, self.cache.k.dtype)
        mask = None if bool(mask.all()) else mask
        logits = self.model(ids, attention_mask=mask, kv_cache=prefilled, logits_to_keep=1)
        first = len(self.running)
        for row, request in enumerate(joining):
            self.cache.put(first + row, prefilled, row, P - len(request.prompt))
            self.running.append(request)
        self._emit(range(first, first + len(joining)), logits[:, -1])  # (k, V)

    def _decode(self) -> None:
        """One token for every running request, in one forward."""
        n = len(self.running)
        cache = self.cache
        lengths = cache.lengths[:n]
        cache.rows, cache.columns = n, int(lengths.max()) + 1
        tokens = self.next_token[:n, None]  # (n, 1)
        if bool((lengths == lengths[0]).all()):  # equal lengths: no mask, default positions
            logits = self.model(tokens, kv_cache=cache, logits_to_keep=1)[:, -1]  # (n, V)
        else:
            positions = lengths[:, None]  # (n, 1): each row's next position
            columns = torch.arange(cache.columns, device=self.device)  # (S,)
            visible = columns <= positions  # (n, S)
            if self.config.sliding_window is not None:
                visible &= positions - columns < self.config.sliding_window
            logits = self.model(
                tokens, attention_mask=visible[:, None, None], position_ids=positions,
                kv_cache=cache, logits_to_keep=1,
            )[:, -1]  # fmt: skip
        self._emit(range(n), logits)

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
