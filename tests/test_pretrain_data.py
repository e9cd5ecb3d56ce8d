"""What `lmforge train` reads as data: bits per byte that count only text bytes, prepared
datasets with their own tokenizer and a validation split, and clear errors otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line

from lmforge.cli import main
from lmforge.config import DataConfig
from lmforge.data.loader import encode_documents, load_pretrain_data, whole_split_batches
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


def test_the_last_tenth_of_the_characters_is_validation_cut_inside_a_document():
    from lmforge.data.loader import split_documents

    text = "abcdefghij" * 10  # one text: nanoGPT's split, the first int(0.9 n) characters
    assert split_documents([text], 0.1) == ([text[:90]], [text[90:]])
    train, val = split_documents(["a" * 50, "b" * 30, "c" * 20], 0.25)  # 75 characters train
    assert train == ["a" * 50, "b" * 25] and val == ["b" * 5, "c" * 20]
    train, val = split_documents(["a" * 60, "b" * 40], 0.4)  # the cut falls between documents
    assert train == ["a" * 60] and val == ["b" * 40]


def test_one_text_with_the_char_tokenizer_splits_as_nanogpt(tmp_path):
    text = "".join(f"line {i}: to be or not to be.\n" for i in range(300))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    data = load_pretrain_data(DataConfig(path=str(tmp_path / "t.txt")))
    ids = np.array(data.tokenizer.encode(text))
    split = int(len(text) * 0.9)
    assert np.array_equal(data.train[0], ids[:split]) and np.array_equal(data.val[0], ids[split:])


def test_a_trained_tokenizer_never_sees_the_validation_text(tmp_path):
    """'zq' is frequent in the last tenth only: a BPE trained on all the text would merge it."""
    train_text = "".join(f"the cat sat on mat number {i}. " for i in range(400))
    text = train_text + "zq " * (len(train_text) // 27)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    data = load_pretrain_data(DataConfig(path=str(tmp_path / "t.txt"), tokenizer="train:300"))
    tok = data.tokenizer
    assert tok.vocab_size == 300
    assert len(tok.encode(" the cat")) <= 2  # merged: seen in training
    assert len(tok.encode("zq")) == 2  # never merged
    assert tok.decode(np.concatenate([data.train[0], data.val[0]]).tolist()) == text
    assert tok.decode(data.val[0].tolist()) == text[int(len(text) * 0.9) :]
    again = load_pretrain_data(DataConfig(path=str(tmp_path / "t.txt"), tokenizer="train:300"))
    assert np.array_equal(again.train[0], data.train[0])  # the same tokenizer every time


@pytest.mark.parametrize("spec", ["train:big", "train:0", "train:-5"])
def test_a_trained_tokenizer_needs_a_vocabulary_size(spec, tmp_path, capsys):
    err = error_line(capsys, ["train", f"--data.tokenizer={spec}", f"--run.dir={tmp_path}"])
    assert (
        err == f"lmforge: error: data.tokenizer={spec}: expected train:VOCAB_SIZE, e.g. train:512"
    )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("world", [1, 2, 3])
def test_whole_split_batches_score_every_target_once_in_step_on_every_rank(world):
    block, batch = 8, 3
    arrays = [np.arange(n, dtype=np.uint16) + 1000 * a for a, n in enumerate((5, 8, 9, 17, 41))]
    scored = []
    per_rank = []
    for rank in range(world):
        batches = whole_split_batches(arrays, block, batch, rank, world)
        per_rank.append(len(batches))
        for b in batches:
            assert b["input_ids"].shape == b["labels"].shape == (batch, block)
            for x, y in zip(b["input_ids"].tolist(), b["labels"].tolist()):
                for j, target in enumerate(y):
                    if target == -100:
                        continue
                    a, pos = divmod(target, 1000)
                    # its context: the tokens just before it, as far back as the window goes
                    assert x[: j + 1] == list(range(target - j - 1, target))
                    scored.append((a, pos))
    assert len(set(per_rank)) == 1  # every rank runs as many forwards
    expected = [(a, pos) for a, arr in enumerate(arrays) for pos in range(1, len(arr))]
    assert sorted(scored) == expected  # each target exactly once, each array's first never
    # the last window of an array reaches back a full block when the array is long enough
    last = whole_split_batches([np.arange(20)], block, 1)[-1]
    assert last["input_ids"][0].tolist() == list(range(11, 19))
    assert last["labels"][0].tolist() == [-100] * 5 + [17, 18, 19]
