"""An OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn: the
maintained ASGI stack the `openai` client and OpenAI-style UIs are tested against, with SSE
streaming and disconnect detection built in).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, and
the chat page at /. Request fields the API knows are checked (a wrong type or value is a 400
in OpenAI's error shape); fields it does not know are ignored and logged, never rejected.
Every non-streamed response carries usage; a stream carries it in a last chunk when
`stream_options.include_usage` is true. A chat request goes through the checkpoint's chat
template, or, for a tokenizer without chat tokens, a plain "role: text" transcript.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.chat import chat_prompt
from lmforge.engine import SamplingParams
from lmforge.serve.batching import BatchEngine, QueueFull, deliver_here
from lmforge.serve.batching import Request as EngineRequest
from lmforge.textstream import Detokenizer, StopStrings
from lmforge.tokenizer import Tokenizer

log = logging.getLogger("lmforge.serve")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers=None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code,
        )  # fmt: skip
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_tokens: int | None = None
    """Cap on a request's max_tokens (None: the model's context)."""
    max_n: int = 8


# ---------------------------------------------------------------- request fields

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
                 "stream_options", "stop", "seed", "user", "ignore_eos"}  # fmt: skip
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def _get(body: dict, name: str, types: type | tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{name}' must be {_type_names(types)}, not a boolean", param=name)
    if not isinstance(value, types):
        raise APIError(400, f"'{name}' must be {_type_names(types)}", param=name)
    return value


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list", dict: "an object"}[t] for t in types)  # fmt: skip


@dataclass
class Settings:
    """What one request asks for, checked."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int | None
    n: int
    stream: bool
    include_usage: bool
    stop: list[str]
    seed: int | None
    logprobs: int | None
    ignore_eos: bool = False
    """vLLM's extra field: generate max_tokens tokens whatever the model's stop tokens say."""
    ignored: list[str] = field(default_factory=list)


def read_settings(body: dict, known: set[str], limits: Limits, chat: bool) -> Settings:
    max_tokens = _get(body, "max_tokens", int)
    if chat:
        max_tokens = _get(body, "max_completion_tokens", int, max_tokens)
    elif max_tokens is None:
        max_tokens = 16  # OpenAI's default for completions
    temperature = float(_get(body, "temperature", (int, float), 1.0))
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    top_k = _get(body, "top_k", int)
    n = _get(body, "n", int, 1)
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    if max_tokens is not None and not 1 <= max_tokens:
        raise APIError(400, "'max_tokens' must be >= 1", param="max_tokens")
    if limits.max_tokens is not None and max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"'max_tokens' must be <= {limits.max_tokens}", param="max_tokens")
    if not 0 <= temperature <= 2:
        raise APIError(400, "'temperature' must be between 0 and 2", param="temperature")
    if not 0 < top_p <= 1:
        raise APIError(400, "'top_p' must be in (0, 1]", param="top_p")
    if top_k is not None and top_k < 1 and top_k != -1:
        raise APIError(400, "'top_k' must be >= 1 (or -1 for no limit)", param="top_k")
    if not 1 <= n <= limits.max_n:
        raise APIError(400, f"'n' must be between 1 and {limits.max_n}", param="n")
    options = _get(body, "stream_options", dict, {})
    if chat:
        logprobs = None
        if _get(body, "logprobs", bool, False):
            logprobs = _get(body, "top_logprobs", int, 0)
    else:
        logprobs = _get(body, "logprobs", int)
    if logprobs is not None and not 0 <= logprobs <= 20:
        raise APIError(400, "log-probabilities: at most 20 top tokens", param="logprobs")
    return Settings(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=None if top_k in (None, -1) else top_k,
        n=n,
        stream=bool(_get(body, "stream", bool, False)),
        include_usage=bool(options.get("include_usage", False)),
        stop=stop,
        seed=_get(body, "seed", int),
        logprobs=logprobs,
        ignore_eos=bool(_get(body, "ignore_eos", bool, False)),
        ignored=sorted(set(body) - known),
    )


def message_text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts (text parts joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    raise APIError(400, f"{where}: 'content' must be a string or a list of parts", param="messages")


# ---------------------------------------------------------------- generation


@dataclass
class Choice:
    index: int
    detokenizer: Detokenizer
    stops: StopStrings
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)


class Server:
    """The app's state: model, tokenizer, engine and limits."""

    def __init__(self, engine: BatchEngine, tokenizer: Tokenizer, model_name: str,
                 limits: Limits, api_key: str | None = None):  # fmt: skip
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.limits, self.api_key = limits, api_key
        self.block_size = engine.config.block_size
        self.created = int(time.time())

    # -------------------------------------------------------------- prompts
    def chat_prompt(self, messages: Any) -> tuple[list[int], tuple[int, ...], list[str]]:
        """(ids, stop ids, stop strings) of a chat request."""
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise APIError(
                    400, f"messages[{i}]: 'role' must be system, user or assistant",
                    param="messages",
                )  # fmt: skip
            turns.append(
                {"role": m["role"], "content": message_text(m.get("content"), f"messages[{i}]")}
            )
        prompt = chat_prompt(self.tokenizer, turns)
        return prompt.ids, prompt.stop_ids, prompt.stop_strings

    def completion_prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            if max(ids) >= self.engine.config.vocab_size or min(ids) < 0:
                raise APIError(
                    400, "'prompt' holds a token id outside the vocabulary", param="prompt"
                )
            return ids
        if not isinstance(prompt, str):
            raise APIError(
                400, "'prompt' must be a string (or one list of token ids)", param="prompt"
            )
        ids = self.tokenizer.encode(prompt)
        if not ids and self.tokenizer.eot_id is not None:
            ids = [self.tokenizer.eot_id]
        if not ids:
            raise APIError(400, "'prompt' is empty", param="prompt")
        return ids

    def check_length(self, prompt: list[int], settings: Settings) -> int:
        """The max_tokens to use; 400 when the prompt and answer cannot fit the context."""
        room = self.block_size - len(prompt)
        if room < 1:
            raise APIError(
                400, f"This model's maximum context length is {self.block_size} tokens, but "
                f"the prompt has {len(prompt)} tokens.", param="messages",
                code="context_length_exceeded",
            )  # fmt: skip
        if settings.max_tokens is None:
            return room
        if settings.max_tokens > room:
            raise APIError(
                400, f"This model's maximum context length is {self.block_size} tokens; the "
                f"prompt has {len(prompt)}, so max_tokens can be at most {room} (asked: "
                f"{settings.max_tokens}).", param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        return settings.max_tokens

    # -------------------------------------------------------------- running
    async def generate(
        self,
        prompt: list[int],
        settings: Settings,
        max_tokens: int,
        stop_ids: tuple[int, ...],
        stops: list[str],
    ) -> AsyncIterator[tuple[Choice, str, dict | None]]:
        """Yield (choice, new text, logprob entry or None) as tokens arrive, for n choices
        running at once (max_tokens from check_length); each choice's finish_reason is set
        when it ends. Cancels what is still running if the consumer stops early (a client
        that went away)."""
        stop_ids = () if settings.ignore_eos else stop_ids
        queue: asyncio.Queue = asyncio.Queue()
        choices, requests = [], []
        try:
            for i in range(settings.n):
                params = SamplingParams(
                    max_new_tokens=max_tokens, temperature=settings.temperature,
                    top_k=settings.top_k, top_p=settings.top_p, stop_ids=stop_ids,
                    seed=None if settings.seed is None else settings.seed + i,
                )  # fmt: skip
                choices.append(
                    Choice(i, Detokenizer(self.tokenizer), StopStrings(settings.stop + stops))
                )
                events = partial(_put, queue, i)
                requests.append(self.engine.submit(
                    EngineRequest(prompt, params, events, logprobs=settings.logprobs)
                ))  # fmt: skip
            running = settings.n
            while running:
                i, event = await queue.get()
                choice = choices[i]
                if choice.finish_reason is not None:
                    continue  # stopped by a stop string; the engine's last events are moot
                if event[0] == "done":
                    choice.finish_reason = event[1]
                    running -= 1
                    yield choice, choice.stops.flush(), None
                    continue
                _, token, logprob = event
                choice.tokens += 1
                piece = choice.stops.feed(choice.detokenizer.push(token))
                entry = self.logprob_entry(token, logprob) if logprob is not None else None
                if choice.stops.stopped:
                    choice.finish_reason = "stop"
                    self.engine.cancel(requests[i])
                    running -= 1
                yield choice, piece, entry
        except QueueFull as e:
            raise APIError(503, f"The server is overloaded: {e}; retry shortly.", "server_error",
                           code="overloaded", headers={"Retry-After": "1"}) from None  # fmt: skip
        except ValueError as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        finally:
            for request in requests:
                self.engine.cancel(request)

    def logprob_entry(self, token: int, logprob: dict) -> dict:
        decode = self.tokenizer.decode
        return {
            "token": decode([token]),
            "logprob": logprob["logprob"],
            "top": [(decode([t]), lp) for t, lp in logprob["top"]],
        }


def _hand_over(loop: asyncio.AbstractEventLoop, events: list) -> None:
    """A decode step's events, from the engine thread to the server's event loop at once."""
    loop.call_soon_threadsafe(deliver_here, events)


def _put(queue: asyncio.Queue, index: int, event: tuple) -> None:
    queue.put_nowait((index, event))


# ---------------------------------------------------------------- response shapes


def usage(prompt: list[int], choices: list[Choice]) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion,
            "total_tokens": len(prompt) + completion}  # fmt: skip


def chat_logprobs(entries: list[dict]) -> dict:
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [
        {**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
        for e in entries
    ]}  # fmt: skip


def completion_logprobs(entries: list[dict]) -> dict:
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [dict(e["top"]) for e in entries],
        "text_offset": offsets,
    }


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# ---------------------------------------------------------------- the app


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # the engine thread hands each step's events to this event loop, in one call
        server.engine.deliver = partial(_hand_over, asyncio.get_running_loop())
        yield

    app = FastAPI(
        title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404, 405, ...
        return APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).response()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        authorization = request.headers.get("authorization", "")
        if (
            request.url.path.startswith("/v1/")
            and server.api_key
            and authorization != f"Bearer {server.api_key}"
        ):
            return APIError(401, "Incorrect API key provided.", code="invalid_api_key").response()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > server.limits.max_body_bytes:
            return APIError(413, f"The request body is larger than {server.limits.max_body_bytes} bytes.",
                            code="request_too_large").response()  # fmt: skip
        return await call_next(request)

    async def read_body(request: Request, known: set[str], chat: bool) -> tuple[dict, Settings]:
        raw = await request.body()
        if len(raw) > server.limits.max_body_bytes:
            raise APIError(413, f"The request body is larger than {server.limits.max_body_bytes} bytes.",
                           code="request_too_large")  # fmt: skip
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        settings = read_settings(body, known, server.limits, chat)
        if settings.ignored:
            log.info("ignored unknown request fields: %s", ", ".join(settings.ignored))
        return body, settings

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.stats()}

    @app.get("/v1/models")
    async def models():
        card = {"id": server.model_name, "object": "model", "created": server.created,
                "owned_by": "lmforge", "max_model_len": server.block_size}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("lmforge.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, settings = await read_body(request, COMPLETION_FIELDS, chat=False)
        prompt = server.completion_prompt(body.get("prompt"))
        stop_ids = tuple(server.tokenizer.stop_ids)
        return await respond(prompt, settings, stop_ids, [], chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, settings = await read_body(request, CHAT_FIELDS, chat=True)
        prompt, stop_ids, stops = server.chat_prompt(body.get("messages"))
        return await respond(prompt, settings, stop_ids, stops, chat=True)

    async def respond(prompt, settings: Settings, stop_ids, stops, chat: bool):
        max_tokens = server.check_length(prompt, settings)  # a 400 before any stream starts
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        head = {"id": ident, "created": created, "model": server.model_name}
        stream = server.generate(prompt, settings, max_tokens, stop_ids, stops)
        if not settings.stream:
            choices: list[Choice] = []
            async for choice, piece, entry in stream:
                if choice not in choices:
                    choices.append(choice)
                choice.text += piece
                if entry is not None:
                    choice.logprobs.append(entry)
            choices.sort(key=lambda c: c.index)
            return {**head, "object": "chat.completion" if chat else "text_completion",
                    "choices": [shape_choice(c, chat, settings) for c in choices],
                    "usage": usage(prompt, choices)}  # fmt: skip
        first = await anext_or_none(stream)  # a full queue is a 503 now, not a broken stream
        return StreamingResponse(
            events(head, prompt, settings, chat, first, stream), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    def shape_choice(c: Choice, chat: bool, settings: Settings) -> dict:
        out: dict[str, Any] = {"index": c.index, "finish_reason": c.finish_reason}
        if chat:
            out["message"] = {"role": "assistant", "content": c.text}
            out["logprobs"] = chat_logprobs(c.logprobs) if settings.logprobs is not None else None
        else:
            out["text"] = c.text
            out["logprobs"] = (
                completion_logprobs(c.logprobs) if settings.logprobs is not None else None
            )
        return out

    async def events(head, prompt, settings: Settings, chat: bool, first, stream):
        kind = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        seen: list[Choice] = []

        def chunk(choice: Choice, piece: str, entry: dict | None) -> dict:
            c: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason}
            if chat:
                delta: dict[str, Any] = (
                    {"content": piece} if piece or choice.finish_reason is None else {}
                )
                if choice.index not in started:
                    delta = {"role": "assistant", **delta}
                    started.add(choice.index)
                c["delta"] = delta
                if settings.logprobs is not None:
                    c["logprobs"] = chat_logprobs([entry]) if entry else None
            else:
                c["text"] = piece
                if settings.logprobs is not None:
                    c["logprobs"] = completion_logprobs([entry]) if entry else None
            out = {**head, "object": kind, "choices": [c]}
            if settings.include_usage:
                out["usage"] = None
            return out

        try:
            item = first
            while item is not None:
                choice, piece, entry = item
                if choice not in seen:
                    seen.append(choice)
                yield sse(chunk(choice, piece, entry))
                item = await anext_or_none(stream)
            if settings.include_usage:
                yield sse({**head, "object": kind, "choices": [], "usage": usage(prompt, seen)})
            yield sse("[DONE]")
        finally:
            await stream.aclose()  # a client that went away frees its slots here

    return app


async def anext_or_none(stream):
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
