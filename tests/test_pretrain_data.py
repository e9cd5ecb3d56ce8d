"""What `lmforge train` reads as data: bits per byte that count only text bytes, prepared
datasets with their own tokenizer and a validation split, and clear errors otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.loader import encode_documents, load_pretrain_data
from lmforge.data.shards import read_prepared
from lmforge.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]


def _prepare(out: Path, *extra: str) -> Path:
    (out.parent / "data.jsonl").write_text(
        "".join(
            json.dumps(
                {"text": f"Record {i}: the quick brown fox jumps over the lazy dog {i} times."}
            )
            + "\n"
            for i in range(400)
        ),
        encoding="utf-8",
    )
    argv = ["prepare", str(out.parent / "data.jsonl"), "--out", str(out), "--workers", "1"]
    assert main([*argv, "--tokenizer", "train:300", "--clean.min_words=3", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("prep") / "data", "--val-fraction", "0.2")


def test_bits_per_byte_counts_text_bytes_not_end_of_text_tokens(prepared):
    """Short documents make the separators matter: each <|endoftext|> is a token of the
    loss but no byte of text (it used to count as its 13 characters)."""
    data = load_pretrain_data(DataConfig(path=str(prepared)))
    ds = read_prepared(prepared)
    val = np.concatenate(ds.val)
    eot = ds.tokenizer.eot_id
    cuts = np.flatnonzero(val == eot)
    docs = [val[a + 1 : b] for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]
    text_bytes = sum(len(ds.tokenizer.decode(d.tolist()).encode("utf-8")) for d in docs)
    assert len(docs) >= 50
    assert data.bytes_per_token == pytest.approx(text_bytes / len(val), rel=1e-9)


def test_a_tokenizer_other_than_the_datasets_is_refused(prepared, tmp_path, capsys):
    argv = ["train", f"--data.path={prepared}", "--data.tokenizer=byte", f"--run.dir={tmp_path}"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not the tokenizer" in err
    same = load_pretrain_data(DataConfig(path=str(prepared), tokenizer=str(prepared / "tokenizer")))
    assert same.tokenizer.vocab_size == 300


def test_prepared_data_without_validation_is_one_clear_line(tmp_path, capsys):
    out = _prepare(tmp_path / "data", "--val-fraction", "0")
    capsys.readouterr()
    argv = ["train", f"--data.path={out}", "--model.preset=tiny", f"--run.dir={tmp_path / 'runs'}"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no validation split" in err, err
    assert not (tmp_path / "runs").exists()


def test_one_document_needs_no_separator_and_several_get_one():
    one = CharTokenizer.from_text("abcab", with_eot=False)  # no newline in its vocabulary
    assert encode_documents(one, ["abcab"]).tolist() == one.encode("abcab")
    blank_line = CharTokenizer.from_text("ab\n", with_eot=False)
    ids = encode_documents(blank_line, ["ab", "ba"]).tolist()
    assert ids == blank_line.encode("ab") + blank_line.encode("\n\n") + blank_line.encode("ba")
    eot = CharTokenizer.from_text("ab", with_eot=True)
    ids = encode_documents(eot, ["ab", "ba"]).tolist()
    assert ids == eot.encode("ab") + [eot.eot_id] + eot.encode("ba")
