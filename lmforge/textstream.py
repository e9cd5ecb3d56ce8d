"""Generated tokens as text, piece by piece: what streaming output (`lmforge generate
--stream`, `lmforge chat`, the server's SSE chunks) shows as tokens arrive."""

from __future__ import annotations

from lmforge.tokenizer import Tokenizer


class Detokenizer:
    """push(token) -> the new text. Decodes the whole completion each time and returns what
    is new, holding back a trailing incomplete UTF-8 sequence (BPE tokens can split a
    character)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown :], len(text)
        return piece


class StopStrings:
    """Text arriving piece by piece, cut before the first stop string. Text that could still
    be the start of a stop string is held back until it is known not to be."""

    def __init__(self, stops: list[str]):
        self.stops = [x for x in stops if x]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that is safe to show now."""
        self.pending += piece
        hits = [i for i in (self.pending.find(x) for x in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((len(x) - 1 for x in self.stops), default=0)
        keep = next(
            (k for k in range(min(hold, len(self.pending)), 0, -1)
             if any(x.startswith(self.pending[-k:]) for x in self.stops)),
            0,
        )  # fmt: skip
        out, self.pending = (
            self.pending[: len(self.pending) - keep],
            self.pending[len(self.pending) - keep :],
        )
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
