"""Tokenizers: char and byte (built in), and BPE through Hugging Face `tokenizers`.

Every tokenizer has `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size`,
`eot_id` (None when it has no end-of-text token) and `save(folder)`; `load_tokenizer(folder)`
reads any of them back, including a GPT-2 `encoder.json` + `vocab.bpe` pair.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.common import LmforgeError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
CHAR_FILE = "char_vocab.json"
BYTE_FILE = "byte_vocab.json"


class CharTokenizer:
    """One id per character seen in training text (nanoGPT's shakespeare_char), plus an
    optional end-of-text id after them."""

    kind = "char"

    def __init__(self, chars: list[str], with_eot: bool = False):
        self.chars = list(chars)
        self.with_eot = with_eot
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars) if with_eot else None
        self.vocab_size = len(self.chars) + int(with_eot)

    @classmethod
    def from_text(cls, text: str, with_eot: bool = False) -> CharTokenizer:
        if not text:
            raise LmforgeError("cannot build a char tokenizer from empty text")
        return cls(sorted(set(text)), with_eot)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise LmforgeError(
                f"character {e.args[0]!r} is not in this char tokenizer's vocabulary"
            ) from None

    def decode(self, ids: list[int]) -> str:
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else "" for i in ids)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"type": "char", "chars": self.chars, "with_eot": self.with_eot}
        (folder / CHAR_FILE).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")


class ByteTokenizer:
    """The 256 byte values plus an end-of-text id (256): any string, no training."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / BYTE_FILE).write_text(json.dumps({"type": "byte"}), encoding="utf-8")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE and friends)."""

    kind = "hf"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))


def _gpt2_files(folder: Path) -> tuple[Path, Path] | None:
    for vocab, merges in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")):
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return folder / vocab, folder / merges
    return None


def _gpt2_tokenizer(vocab: Path, merges: Path):
    """GPT-2's original BPE files as a `tokenizers` byte-level BPE that encodes exactly like GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOT) is not None:
        tok.add_special_tokens([EOT])
    return tok


Tokenizer = CharTokenizer | ByteTokenizer | HFTokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer folder: tokenizer.json, GPT-2's encoder.json + vocab.bpe (or
    vocab.json + merges.txt), or a char/byte tokenizer's own file. 'byte' needs no folder."""
    if str(path) == "byte":
        return ByteTokenizer()
    folder = Path(path)
    if not folder.is_dir():
        raise LmforgeError(f"tokenizer folder not found: {folder}")
    try:
        if (folder / CHAR_FILE).is_file():
            data = json.loads((folder / CHAR_FILE).read_text(encoding="utf-8"))
            return CharTokenizer(data["chars"], data.get("with_eot", False))
        if (folder / BYTE_FILE).is_file():
            return ByteTokenizer()
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTok

            return HFTokenizer(HFTok.from_file(str(folder / "tokenizer.json")))
        files = _gpt2_files(folder)
        if files:
            return HFTokenizer(_gpt2_tokenizer(*files))
    except (OSError, ValueError, KeyError, Exception) as e:
        if isinstance(e, LmforgeError):
            raise
        raise LmforgeError(f"cannot read the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    raise LmforgeError(
        f"no tokenizer in {folder} (expected tokenizer.json, encoder.json + vocab.bpe, "
        f"vocab.json + merges.txt, {CHAR_FILE} or {BYTE_FILE})"
    )
