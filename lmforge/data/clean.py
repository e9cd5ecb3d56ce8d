"""Cleaning: pure text -> text | None functions.

HTML main-text extraction (trafilatura), Unicode/whitespace normalisation, Gopher-style
quality rules (Rae et al. 2021, "Scaling Language Models", appendix A), an optional language
filter (py3langid), optional PII scrubbing and a user blocklist. `Cleaner.clean` returns the
cleaned text or the name of the rule that dropped the document, so every drop is counted.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from lmforge.config import CleanConfig

# ---------------------------------------------------------------- normalisation

_SPACES = dict.fromkeys(
    [0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000, 0x0B, 0x0C, 0x85], " "
)
_ZERO_WIDTH = dict.fromkeys([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0xAD], None)
_CONTROLS = dict.fromkeys(
    [c for c in range(32) if c not in (9, 10)] + list(range(0x7F, 0xA0)), None
)
_TABLE = str.maketrans({**_CONTROLS, **_SPACES, **_ZERO_WIDTH})
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC; CRLF -> LF; control and zero-width characters removed; Unicode spaces -> ' ';
    trailing spaces and runs of blank lines trimmed. Indentation is kept (code)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.translate(_TABLE)
    text = _TRAILING_SPACE.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def html_to_text(html: str) -> str | None:
    """The main text of an HTML page (navigation, boilerplate and scripts removed)."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True, deduplicate=False)


# ---------------------------------------------------------------- PII

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
_PHONE = re.compile(
    r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w.])"
)


def scrub_pii(text: str) -> tuple[str, int]:
    """Replace e-mail addresses, IP addresses and phone numbers with placeholders -> (text, n)."""
    n_total = 0
    for pattern, placeholder in ((_EMAIL, "<EMAIL>"), (_IPV4, "<IP>"), (_IPV6, "<IP>")):
        text, n = pattern.subn(placeholder, text)
        n_total += n

    def phone(m: re.Match) -> str:
        digits = sum(ch.isdigit() for ch in m.group())
        return "<PHONE>" if 7 <= digits <= 15 else m.group()

    new = _PHONE.sub(phone, text)
    n_total += new.count("<PHONE>") - text.count("<PHONE>")
    return new, n_total


# ---------------------------------------------------------------- quality rules

_PUNCT_END = tuple(".!?\"')]}:;,…»”’")


def _ngram_ids(words: list[str], n: int) -> np.ndarray:
    index: dict[tuple[str, ...], int] = {}
    grams = zip(*(words[i:] for i in range(n)))
    return np.fromiter((index.setdefault(g, len(index)) for g in grams), dtype=np.int64)


def _top_ngram_fraction(words: list[str], lengths: np.ndarray, n: int) -> float:
    """Characters in all occurrences of the most frequent n-gram / characters in all words."""
    ids = _ngram_ids(words, n)
    if len(ids) == 0:
        return 0.0
    counts = np.bincount(ids)
    top = int(counts.argmax())
    if counts[top] < 2:
        return 0.0
    first = int(np.flatnonzero(ids == top)[0])
    return float(counts[top] * lengths[first : first + n].sum() / lengths.sum())


def _dup_ngram_fraction(words: list[str], lengths: np.ndarray, n: int) -> float:
    """Characters of words covered by any n-gram occurring more than once / all characters."""
    ids = _ngram_ids(words, n)
    if len(ids) == 0:
        return 0.0
    dup = (np.bincount(ids)[ids] > 1).astype(np.int32)
    covered = np.convolve(dup, np.ones(n, dtype=np.int32)) > 0  # len(words)
    return float(lengths[covered].sum() / lengths.sum())


def quality_reason(text: str, cfg: CleanConfig) -> str | None:
    """The first Gopher-style rule the text fails, or None when it passes them all."""
    words = text.split()
    n = len(words)
    if n < cfg.min_words:
        return "too_few_words"
    if cfg.max_words and n > cfg.max_words:
        return "too_many_words"
    if n == 0:
        return None
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n)
    mean_len = lengths.mean()
    if mean_len < cfg.min_mean_word_length or (
        cfg.max_mean_word_length and mean_len > cfg.max_mean_word_length
    ):
        return "mean_word_length"
    if cfg.max_symbol_word_ratio:
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / n > cfg.max_symbol_word_ratio:
            return "symbol_word_ratio"
    if cfg.min_alpha_word_fraction:
        alpha = sum(1 for w in words if any(ch.isalpha() for ch in w))
        if alpha / n < cfg.min_alpha_word_fraction:
            return "alpha_fraction"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if cfg.min_punct_line_fraction and lines:
        ends = sum(ln.endswith(_PUNCT_END) for ln in lines)
        if ends / len(lines) < cfg.min_punct_line_fraction:
            return "punct_lines"
    if (
        cfg.max_dup_line_fraction < 1
        and lines
        and (len(lines) - len(set(lines))) / len(lines) > cfg.max_dup_line_fraction
    ):
        return "dup_lines"
    for k, limit in sorted(cfg.max_top_ngram_fraction.items()):
        if n >= k and _top_ngram_fraction(words, lengths, int(k)) > limit:
            return f"top_{k}gram"
    for k, limit in sorted(cfg.max_dup_ngram_fraction.items()):
        if n >= k and _dup_ngram_fraction(words, lengths, int(k)) > limit:
            return f"dup_{k}gram"
    return None


# ---------------------------------------------------------------- the stage


@dataclass
class Cleaned:
    text: str | None
    reason: str | None = None
    """Rule that dropped the document (None when kept)."""
    pii: int = 0


class Cleaner:
    """All cleaning steps in order: HTML extraction, normalisation, blocklist, language,
    quality rules, PII scrubbing (last, so placeholders don't skew the quality statistics)."""

    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        terms = [t.strip() for t in cfg.blocklist if t.strip()]
        if cfg.blocklist_file:
            lines = Path(cfg.blocklist_file).read_text(encoding="utf-8").splitlines()
            terms += [t.strip() for t in lines if t.strip() and not t.startswith("#")]
        self._blocked = (
            re.compile(r"\b(?:" + "|".join(map(re.escape, terms)) + r")\b", re.IGNORECASE)
            if terms
            else None
        )

    @cached_property
    def _langid(self):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)

    def clean(self, text: str, kind: str = "text") -> Cleaned:
        if kind == "html":
            text = html_to_text(text) or ""
            if not text.strip():
                return Cleaned(None, "html_no_text")
        text = normalize(text)
        if not text:
            return Cleaned(None, "empty")
        if self._blocked is not None and self._blocked.search(text):
            return Cleaned(None, "blocklist")
        if self.cfg.languages:
            lang, score = self._langid.classify(text[:5000])
            if lang not in self.cfg.languages or score < self.cfg.min_language_score:
                return Cleaned(None, "language")
        reason = quality_reason(text, self.cfg)
        if reason:
            return Cleaned(None, reason)
        n_pii = 0
        if self.cfg.pii:
            text, n_pii = scrub_pii(text)
        return Cleaned(text, None, n_pii)
