"""Conversations as token ids: lmforge's chat format, and fitting a long history into the
model's context.

Format (the chat special tokens every lmforge-trained BPE has, lmforge/tokenizer.py):

    [BOS if the tokenizer adds one] <|system|>text<|end|> <|user|>text<|end|>
    <|assistant|>text<|end|> ... [<|assistant|> when a reply is to be generated]

`render_conversation` returns the ids and a loss mask that is 1 exactly on assistant text and
the end-of-turn token that closes it (so a model learns to stop), 0 on everything else.
`fit_conversation` makes a history fit a token budget the way a chat user expects: whole
earliest exchanges go first (a user message and the replies after it), the system message
never; only when the last exchange alone is too long is it cut inside, from its left.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.common import LmforgeError
from lmforge.tokenizer import ASSISTANT, END_TURN, SYSTEM, USER, Tokenizer

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    tok = getattr(tokenizer, "tok", None)  # a Hugging Face tokenizers.Tokenizer
    token_id = tok.token_to_id(token) if tok is not None else None
    if token_id is None:
        raise LmforgeError(
            f"this tokenizer has no {token} token, so it cannot render conversations; "
            "train one with lmforge's chat tokens (`lmforge tokenizer train`, `prepare`)"
        )
    return token_id


def _check(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLE_TOKENS:
            raise LmforgeError(f"message {i}: role must be one of {', '.join(ROLE_TOKENS)}")
        if not isinstance(m.get("content"), str):
            raise LmforgeError(f"message {i}: content must be a string")
        if m["role"] == "system" and i != 0:
            raise LmforgeError(f"message {i}: a system message may only come first")


def render_conversation(
    tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """OpenAI-style messages ({"role", "content"}) -> (ids, loss_mask) of the same length."""
    _check(messages)
    end = _special_id(tokenizer, END_TURN)
    ids: list[int] = [tokenizer.bos_id] if tokenizer.add_bos else []
    mask: list[int] = [0] * len(ids)
    for m in messages:
        text = tokenizer.encode(m["content"])
        if tokenizer.add_bos:
            text = text[1:]  # encode adds a BOS per call; the conversation has one
        trained = int(m["role"] == "assistant")
        ids += [_special_id(tokenizer, ROLE_TOKENS[m["role"]]), *text, end]
        mask += [0] + [trained] * (len(text) + 1)
    if add_generation_prompt:
        ids.append(_special_id(tokenizer, ASSISTANT))
        mask.append(0)
    return ids, mask


@dataclass
class FittedConversation:
    ids: list[int]
    """The rendered conversation, at most max_tokens long."""
    messages: list[dict]
    """The messages kept whole or in part."""
    dropped_messages: int
    """Earliest messages dropped whole."""
    cut_tokens: int
    """Tokens cut from the left of the earliest remaining non-system message."""


def fit_conversation(
    tokenizer: Tokenizer,
    messages: list[dict],
    max_tokens: int,
    add_generation_prompt: bool = True,
) -> FittedConversation:
    """The conversation rendered within max_tokens: drop whole earliest exchanges (never the
    system message), then, if the last exchange alone is still too long, cut tokens from its
    left, keeping the system message and the closing role tokens."""
    _check(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system) :]

    def render(msgs: list[dict]) -> list[int]:
        return render_conversation(tokenizer, system + msgs, add_generation_prompt)[0]

    dropped = 0
    while len(render(rest)) > max_tokens and len(rest) > 1:
        nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), len(rest) - 1)
        dropped += nxt
        rest = rest[nxt:]
    ids = render(rest)
    if len(ids) <= max_tokens:
        return FittedConversation(ids, system + rest, dropped, 0)
    head = render([])[: len(render([])) - int(add_generation_prompt)]  # [BOS] + system turn
    last = ids[len(head) :]  # the one message left: [role, text..., end, (assistant)]
    cut = len(ids) - max_tokens
    if not rest or cut > len(last) - 2 - int(add_generation_prompt):
        raise LmforgeError(
            f"the system message ({len(head)} tokens) leaves no room for the conversation "
            f"in {max_tokens} tokens"
        )
    return FittedConversation(head + last[:1] + last[1 + cut :], system + rest, dropped, cut)


@dataclass
class ChatPrompt:
    ids: list[int]
    """The conversation, ready for the assistant's answer."""
    stop_ids: tuple[int, ...]
    """Tokens that end the answer."""
    stop_strings: list[str]
    """Text that ends the answer (the plain transcript's next turn)."""


def chat_prompt(
    tokenizer: Tokenizer, messages: list[dict], max_tokens: int | None = None
) -> ChatPrompt:
    """What a model is given to answer `messages` as the assistant (what `lmforge serve` and
    `lmforge chat` run): the chat format when the tokenizer has its tokens, answers ending at
    end-of-turn; otherwise a plain "role: text" transcript ending with "assistant:", answers
    ending at the next turn, so a model without chat training can still be talked to.
    max_tokens fits a long history (fit_conversation; a transcript keeps its last tokens)."""
    tok = getattr(tokenizer, "tok", None)
    end = tok.token_to_id(END_TURN) if tok is not None else None
    if end is not None:
        if max_tokens is None:
            ids = render_conversation(tokenizer, messages, add_generation_prompt=True)[0]
        else:
            ids = fit_conversation(tokenizer, messages, max_tokens).ids
        return ChatPrompt(ids, (end, *tokenizer.stop_ids), [])
    _check(messages)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[-max_tokens:]
    return ChatPrompt(ids, tuple(tokenizer.stop_ids), ["\nuser:", "\nsystem:"])
