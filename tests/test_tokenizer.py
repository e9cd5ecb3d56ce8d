"""Tokenizers: BPE training, exact round trips, special tokens, HF compatibility, GPT-2 files."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.tokenizer import (
    EOT,
    PAD,
    SPECIAL_TOKENS,
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    bytes_per_token,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
)

ASSETS = Path(__file__).resolve().parents[1] / "lmforge" / "assets"


@lru_cache(maxsize=1)
def shakespeare_bpe() -> HFTokenizer:
    text = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]
    return train_bpe(text.split("\n\n"), vocab_size=600)


# Every Unicode scalar value: all code points except lone surrogates, which no UTF-8 text holds.
UNICODE = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(UNICODE)
def test_byte_level_bpe_round_trips_any_unicode(s):
    tok = shakespeare_bpe()
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=100, deadline=None)
@given(UNICODE)
def test_byte_tokenizer_round_trips_any_unicode(s):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(s)) == s


def test_special_tokens_have_fixed_ids_and_stay_single_tokens():
    tok = shakespeare_bpe()
    assert tok.vocab_size == 600
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.eot_id == 0 and tok.pad_id == 1
    ids = tok.encode(f"<|user|>hi{EOT}")
    assert ids[0] == tok.tok.token_to_id("<|user|>") and ids[-1] == tok.eot_id


def test_bpe_compresses_and_reports_bytes_per_token():
    tok = shakespeare_bpe()
    text = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")[300_000:400_000]
    stats = bytes_per_token(tok, text.split("\n\n"))
    assert stats["bytes"] == len(text.replace("\n\n", "").encode())
    assert 2.0 < stats["bytes_per_token"] < 5.0  # a 600-token vocab on held-out English verse
    assert bytes_per_token(ByteTokenizer(), ["abc", "é"])["bytes_per_token"] == 1.0


def test_saved_bpe_loads_in_lmforge_and_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = shakespeare_bpe()
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "ROMEO: What light through yonder window breaks? ünïcödé 😀"
    assert fast.encode(text) == auto.encode(text) == tok.encode(text)
    assert auto.eos_token == EOT and auto.pad_token == PAD
    assert auto.decode(tok.encode(text)) == text


def test_vocab_size_below_bytes_and_specials_is_an_error():
    with pytest.raises(LmforgeError, match="below"):
        train_bpe(["hello"], vocab_size=100)


def test_char_tokenizer_and_hash_distinguish_tokenizers():
    a = CharTokenizer.from_text("hello", with_eot=True)
    b = CharTokenizer.from_text("help", with_eot=True)
    assert a.decode(a.encode("hole")) == "hole"
    assert a.encode_batch(["he", "lo"]) == [a.encode("he"), a.encode("lo")]
    assert tokenizer_hash(a) != tokenizer_hash(b) != tokenizer_hash(ByteTokenizer())


# ---------------------------------------------------------------- GPT-2 files


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's gpt-2/src/encoder.py mapping of bytes to printable characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ReferenceGPT2Encoder:
    """OpenAI's original GPT-2 encoder (gpt-2/src/encoder.py), trimmed: the oracle."""

    pat = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.ranks = dict(zip(merges, range(len(merges))))
        self.byte_encoder = _bytes_to_unicode()

    def bpe(self, token: str) -> list[str]:
        word = list(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token)]
        return ids


def test_gpt2_encoder_json_and_vocab_bpe_encode_exactly_like_gpt2(tmp_path):
    """Export a trained BPE in GPT-2's file format (encoder.json + vocab.bpe), load it through
    load_tokenizer, and compare with OpenAI's reference algorithm on tricky text."""
    model = json.loads(shakespeare_bpe().tok.to_str())["model"]
    vocab = {t: i for t, i in model["vocab"].items() if t not in SPECIAL_TOKENS}
    remap = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    remap[EOT] = len(remap)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    (tmp_path / "encoder.json").write_text(json.dumps(remap), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    tok = load_tokenizer(tmp_path)
    ref = ReferenceGPT2Encoder(remap, merges)
    text = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")[500_000:520_000]
    samples = [
        text,
        "  leading spaces,\ttabs\n\n\nand   gaps ",
        "it's they'll I'd we've",
        "数字 123 4567 ünï 😀!!",
        " \n ",
    ]
    for s in samples:
        assert tok.encode(s) == ref.encode(s)
        assert tok.decode(tok.encode(s)) == s
    assert tok.eot_id == remap[EOT]


def test_tokenizer_cli_trains_a_loadable_bpe(tmp_path, capsys):
    src = tmp_path / "corpus.jsonl"
    lines = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")[:100_000].split("\n\n")
    src.write_text("\n".join(json.dumps({"body": t}) for t in lines), encoding="utf-8")
    out = tmp_path / "tok"
    argv = [
        "tokenizer",
        "train",
        "--input",
        str(src),
        "--vocab-size",
        "400",
        "--out",
        str(out),
        "--text-field",
        "body",
    ]
    assert main(argv) == 0
    assert "bytes/token" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.vocab_size == 400 and tok.eot_id == 0
    assert main(argv) == 1  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            ["tokenizer", "train", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "t2")]
        )
        == 1
    )
    assert "input not found" in capsys.readouterr().err


# ---------------------------------------------------------------- BOS / EOS / stop ids

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<|eot_id|>"]  # ids 0..3


def llama_style_folder(
    folder: Path,
    tokens_as_dicts: bool = True,
    eos_token_id: int | list[int] | None = None,
    eos_in: str = "generation_config.json",
    add_bos: bool = True,
    post_processor: bool | None = None,
) -> Path:
    """A tiny Llama-2-style tokenizer folder: a Metaspace BPE with <s> and </s>, the
    post-processor that prepends <s> (by default when add_bos), and a tokenizer_config.json
    naming them (strings, or AddedToken dicts as transformers writes them)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTok(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    text = "the quick brown fox jumps over the lazy dog\nand then the dog sleeps.\n"
    trainer = trainers.BpeTrainer(
        vocab_size=120, min_frequency=1, special_tokens=LLAMA_SPECIALS, show_progress=False
    )
    tok.train_from_iterator(text.splitlines() * 5, trainer=trainer)
    if add_bos if post_processor is None else post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))

    def token(content: str):
        if not tokens_as_dicts:
            return content
        return {"__type": "AddedToken", "content": content, "lstrip": False,
                "normalized": False, "rstrip": False, "single_word": False, "special": True}  # fmt: skip

    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos,
              "add_eos_token": False, "bos_token": token("<s>"), "eos_token": token("</s>"),
              "unk_token": token("<unk>")}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if eos_token_id is not None:
        (folder / eos_in).write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": eos_token_id}), encoding="utf-8"
        )
    return folder


SAMPLES = ["the lazy fox jumps  over", "", " and then the dog"]  # all in the vocabulary


@pytest.mark.parametrize(
    ("tokens_as_dicts", "eos_token_id", "eos_in", "stop_ids"),
    [
        (True, [2, 3], "generation_config.json", (2, 3)),
        (False, 2, "generation_config.json", (2,)),
        (True, [3, 2], "config.json", (2, 3)),
        (False, None, "config.json", (2,)),
    ],
)
def test_llama_style_folder_gives_bos_eos_and_stop_ids(
    tmp_path, tokens_as_dicts, eos_token_id, eos_in, stop_ids
):
    transformers = pytest.importorskip("transformers")
    folder = llama_style_folder(tmp_path / "hf", tokens_as_dicts, eos_token_id, eos_in)
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eot_id, tok.stop_ids, tok.add_bos) == (1, 2, stop_ids, True)
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    for text in SAMPLES:
        assert tok.encode(text) == auto(text)["input_ids"], text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]

    tok.save(tmp_path / "saved")  # a checkpoint's tokenizer/ folder: no config.json beside it
    again = load_tokenizer(tmp_path / "saved")
    assert (again.bos_id, again.eot_id, again.stop_ids, again.add_bos) == (1, 2, stop_ids, True)
    assert tokenizer_hash(again) == tokenizer_hash(tok)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert [auto(t)["input_ids"] for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]


def test_add_bos_token_false_means_no_bos(tmp_path):
    tok = load_tokenizer(llama_style_folder(tmp_path, add_bos=False))
    assert (tok.bos_id, tok.eot_id, tok.stop_ids, tok.add_bos) == (1, 2, (2,), False)
    assert tok.encode("the dog")[0] != 1


def test_lmforge_and_builtin_tokenizers_keep_endoftext_and_no_bos(tmp_path):
    bpe = shakespeare_bpe()
    char = CharTokenizer.from_text("hello", with_eot=True)
    for tok in (bpe, char, CharTokenizer.from_text("hello"), ByteTokenizer()):
        stop = () if tok.eot_id is None else (tok.eot_id,)
        assert (tok.bos_id, tok.stop_ids, tok.add_bos) == (None, stop, False)
        tok.save(tmp_path / tok.kind)
        again = load_tokenizer(tmp_path / tok.kind)
        assert (again.bos_id, again.eot_id, again.stop_ids, again.add_bos) == (
            None, tok.eot_id, stop, False,
        )  # fmt: skip
    assert bpe.eot_id == 0 and bpe.encode("hello") == bpe.tok.encode("hello").ids


@pytest.mark.parametrize("add_bos", [True, False])
def test_hf_export_adds_bos_as_encode_does_when_tokenizer_json_disagrees(tmp_path, add_bos):
    """add_bos_token decides for lmforge (as in transformers 4); transformers 5 follows the
    tokenizer.json post-processor, so the export rewrites it to match."""
    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import save_hf_tokenizer

    src = llama_style_folder(tmp_path / "src", add_bos=add_bos, post_processor=not add_bos)
    tok = load_tokenizer(src)
    assert tok.add_bos == add_bos and (tok.encode("the dog")[0] == 1) == add_bos
    (tmp_path / "out").mkdir()
    save_hf_tokenizer(tok, tmp_path / "out", max_length=64)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert [auto(t)["input_ids"] for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
    assert load_tokenizer(tmp_path / "out").encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
