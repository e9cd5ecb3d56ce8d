"""Tokenizers: char and byte (built in), and BPE through Hugging Face `tokenizers`.

Every tokenizer has `encode(str) -> list[int]`, `encode_batch(list[str])`, `decode(list[int])
-> str`, `vocab_size`, `eot_id` (None when it has no end-of-text token) and `save(folder)`;
`load_tokenizer(folder)` reads any of them back, including a GPT-2 `encoder.json` +
`vocab.bpe` pair. `train_bpe` trains a byte-level BPE (GPT-2's pre-tokenisation, no
normaliser, so every Unicode string round-trips exactly) with lmforge's special tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.common import LmforgeError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END_TURN = "<|end|>"
SPECIAL_TOKENS = [EOT, PAD, SYSTEM, USER, ASSISTANT, END_TURN]
"""Added to every trained BPE in this order, so `<|endoftext|>` is id 0 and `<|pad|>` id 1."""
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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

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
        self.pad_id = tok.token_to_id(PAD)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on all cores (the Rust side parallelises the batch)."""
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        # Lets `transformers.AutoTokenizer.from_pretrained(folder)` load it as a fast tokenizer.
        hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
        for key, token in (("eos_token", EOT), ("bos_token", EOT), ("pad_token", PAD)):
            if self.tok.token_to_id(token) is not None:
                hf_config[key] = token
        (folder / "tokenizer_config.json").write_text(
            json.dumps(hf_config, indent=2), encoding="utf-8"
        )


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
        raise LmforgeError(
            f"cannot read the tokenizer in {folder}: {str(e).splitlines()[0]}"
        ) from None
    raise LmforgeError(
        f"no tokenizer in {folder} (expected tokenizer.json, encoder.json + vocab.bpe, "
        f"vocab.json + merges.txt, {CHAR_FILE} or {BYTE_FILE})"
    )


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of what defines the tokenizer's ids; shard manifests record it so that shards are
    never read with a different tokenizer than the one that wrote them."""
    if isinstance(tok, HFTokenizer):
        payload = tok.tok.to_str()
    elif isinstance(tok, CharTokenizer):
        payload = json.dumps({"chars": tok.chars, "with_eot": tok.with_eot}, ensure_ascii=False)
    else:
        payload = "byte"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on an iterator of texts.

    The 256 byte symbols are always in the alphabet, so nothing is ever unknown, and with no
    normaliser decode(encode(s)) == s for any string."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise LmforgeError(f"vocab size {vocab_size} is below the {floor} byte and special tokens")
    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return HFTokenizer(tok)


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def bytes_per_token(tok: Tokenizer, texts: Iterable[str]) -> dict[str, float]:
    """UTF-8 bytes per token over `texts` (higher = better compression; GPT-2 gets ~4.3 on
    English web text, a byte tokenizer exactly 1)."""
    n_bytes = n_tokens = 0
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == 256:
            n_bytes += sum(len(x.encode("utf-8")) for x in batch)
            n_tokens += sum(map(len, tok.encode_batch(batch)))
            batch = []
    if batch:
        n_bytes += sum(len(x.encode("utf-8")) for x in batch)
        n_tokens += sum(map(len, tok.encode_batch(batch)))
    return {"bytes": n_bytes, "tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1)}
