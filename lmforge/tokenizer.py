"""Tokenizers: char and byte (built in), and BPE through Hugging Face `tokenizers`.

Every tokenizer has `encode(str) -> list[int]`, `encode_batch(list[str])`, `decode(list[int])
-> str`, `vocab_size`, `eot_id` (the end-of-sequence id, None when there is none), `bos_id`
(None when there is none), `pad_id` (None when there is none), `add_bos` (encode prepends
bos_id), `stop_ids` (eot_id plus any other ids that end generation) and `save(folder)`; `load_tokenizer(folder)` reads any of them
back, including a GPT-2 `encoder.json` + `vocab.bpe` pair. `train_bpe` trains a byte-level BPE
(GPT-2's pre-tokenisation, no normaliser, so every Unicode string round-trips exactly) with
lmforge's special tokens.

lmforge's own tokenizers end documents with `<|endoftext|>` and have no BOS. A Hugging Face
folder (e.g. an imported Llama) says its own: tokenizer_config.json's `bos_token`,
`eos_token` and `add_bos_token`, and generation_config.json's (else config.json's)
`eos_token_id`, one id or a list, all of which stop generation. `save` records the resolved
ids in SPECIAL_IDS_FILE, so a checkpoint's tokenizer/ folder keeps them exactly.
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
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""lmforge's chat format (lmforge/chat.py renders it) as the Jinja template that
transformers' apply_chat_template reads from tokenizer_config.json."""
CHAR_FILE = "char_vocab.json"
BYTE_FILE = "byte_vocab.json"
SPECIAL_IDS_FILE = "lmforge_special_ids.json"
"""bos_id, eot_id, stop_ids and add_bos of a saved HF tokenizer, as lmforge resolved them."""


class CharTokenizer:
    """One id per character seen in training text (nanoGPT's shakespeare_char), plus an
    optional end-of-text id after them."""

    kind = "char"
    bos_id = None
    pad_id = None
    add_bos = False

    def __init__(self, chars: list[str], with_eot: bool = False):
        self.chars = list(chars)
        self.with_eot = with_eot
        self._ids = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = len(self.chars) if with_eot else None
        self.stop_ids = () if self.eot_id is None else (self.eot_id,)
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
    stop_ids = (256,)
    bos_id = None
    pad_id = None
    add_bos = False

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
    """A Hugging Face `tokenizers.Tokenizer` (byte-level BPE and friends).

    eot_id defaults to `<|endoftext|>`'s id. The tokenizer's own post-processor is never run:
    encode adds BOS itself when add_bos is set, so what it returns does not depend on how
    tokenizer.json and tokenizer_config.json agree (transformers 4 and 5 differ there)."""

    kind = "hf"

    def __init__(
        self,
        tok,
        bos_id: int | None = None,
        eot_id: int | None = None,
        extra_stop_ids: Iterable[int] = (),
        add_bos: bool = False,
    ):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_id = tok.token_to_id(EOT) if eot_id is None else eot_id
        self.pad_id = tok.token_to_id(PAD)
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None
        first = [] if self.eot_id is None else [self.eot_id]
        self.stop_ids = tuple(dict.fromkeys([*first, *extra_stop_ids]))  # in order, no repeats

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on all cores (the Rust side parallelises the batch)."""
        fast = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        bos = [self.bos_id] if self.add_bos else []
        return [bos + e.ids for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(
            json.dumps(self.hf_tokenizer_config(1 << 30), indent=2), encoding="utf-8"
        )
        special = {
            "bos_id": self.bos_id,
            "eot_id": self.eot_id,
            "stop_ids": list(self.stop_ids),
            "add_bos": self.add_bos,
        }
        (folder / SPECIAL_IDS_FILE).write_text(json.dumps(special), encoding="utf-8")

    def hf_tokenizer_config(self, max_length: int) -> dict:
        """A tokenizer_config.json that lets `transformers.AutoTokenizer.from_pretrained`
        load the folder as a fast tokenizer with our BOS/EOS (without a BOS, `<|endoftext|>`
        is named as GPT-2 does) and pad token."""
        config: dict = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
        }
        bos = self.tok.id_to_token(self.bos_id) if self.bos_id is not None else None
        for key, token in (
            ("eos_token", self.tok.id_to_token(self.eot_id) if self.eot_id is not None else None),
            ("bos_token", bos or (EOT if self.tok.token_to_id(EOT) is not None else None)),
            ("pad_token", PAD if self.pad_id is not None else None),
        ):
            if token is not None:
                config[key] = token
        if self.bos_id is not None:
            config["add_bos_token"] = self.add_bos
        if all(self.tok.token_to_id(t) is not None for t in (SYSTEM, USER, ASSISTANT, END_TURN)):
            bos = "{{ bos_token }}" if self.add_bos else ""
            config["chat_template"] = bos + CHAT_TEMPLATE
        return config


def _read_json(path: Path) -> dict:
    """A JSON object file -> dict; {} when the file is absent or holds something else."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _special_ids(folder: Path, tok) -> dict:
    """HFTokenizer's keyword arguments for a folder: SPECIAL_IDS_FILE when lmforge wrote it,
    else what transformers reads (see the module docstring). Without an add_bos_token the
    tokenizer.json post-processor decides, as it does in transformers."""
    own = _read_json(folder / SPECIAL_IDS_FILE)
    if own:
        return {
            "bos_id": own["bos_id"],
            "eot_id": own["eot_id"],
            "extra_stop_ids": own["stop_ids"],
            "add_bos": own["add_bos"],
        }
    tok_config = _read_json(folder / "tokenizer_config.json")
    generation = _read_json(folder / "generation_config.json")
    model_config = _read_json(folder / "config.json")

    def token_id(token) -> int | None:  # a string, or an AddedToken dict {"content": ...}
        if isinstance(token, dict):
            token = token.get("content")
        return tok.token_to_id(token) if isinstance(token, str) else None

    def config_ids(key: str) -> list[int]:  # an int or a list of ints
        for config in (generation, model_config):
            value = config.get(key)
            if value is not None:
                values = value if isinstance(value, list) else [value]
                return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
        return []

    eos_ids = config_ids("eos_token_id")
    eot = token_id(tok_config.get("eos_token"))
    if eot is None:
        eot = eos_ids[0] if eos_ids else tok.token_to_id(EOT)
    bos = token_id(tok_config.get("bos_token"))
    if bos is None:
        bos = next(iter(config_ids("bos_token_id")), None)
    if "add_bos_token" in tok_config:
        add_bos = bool(tok_config["add_bos_token"])
    else:
        add_bos = bos is not None and post_processor_adds_bos(tok, bos)
    return {"bos_id": bos, "eot_id": eot, "extra_stop_ids": eos_ids, "add_bos": add_bos}


def post_processor_adds_bos(tok, bos_id: int) -> bool:
    """Whether the `tokenizers.Tokenizer`'s post-processor prepends bos_id to a sequence."""
    with_special = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos_id] and plain[:1] != [bos_id]


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

            tok = HFTok.from_file(str(folder / "tokenizer.json"))
            return HFTokenizer(tok, **_special_ids(folder, tok))
        files = _gpt2_files(folder)
        if files:
            tok = _gpt2_tokenizer(*files)
            return HFTokenizer(tok, **_special_ids(folder, tok))
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
        if tok.add_bos:  # the ids change; tokenizers without a BOS keep their old hash
            payload += json.dumps({"bos_id": tok.bos_id})
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


def trained_bpe_size(spec: str, option: str) -> int | None:
    """The N of a `train:N` tokenizer spec (a byte-level BPE of N tokens to train on the
    training text), None for any other spec; a bad N is an error naming `option`."""
    if not spec.startswith("train:"):
        return None
    size = spec.removeprefix("train:")
    if not (size.isdigit() and int(size) > 0):
        raise LmforgeError(f"{option}={spec}: expected train:VOCAB_SIZE, e.g. train:512")
    return int(size)


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
