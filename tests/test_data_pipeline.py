"""`lmforge prepare` end to end on the bundled data: shards + manifest contract, mixture,
split by document, stage reuse, interruption safety, and bad input as one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.cli import main
from lmforge.cli.prepare import source_name
from lmforge.common import LmforgeError
from lmforge.config import CleanConfig, build_prepare_config
from lmforge.data import stage_docs
from lmforge.data.prepare import prepare
from lmforge.data.shards import ShardWriter, is_prepared, read_prepared, token_dtype

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "prepare_shakespeare_instructions.yaml"


def small_config(**kw):
    return build_prepare_config(RECIPE, {"prepare": {"tokenizer": "train:512", "workers": 1, **kw}})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    report = prepare(small_config(), out)
    return out, report


def _docs(arr: np.ndarray, eot: int) -> list[tuple[int, ...]]:
    cuts = np.flatnonzero(arr == eot)
    return [tuple(arr[a + 1 : b]) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


def test_prepared_folder_matches_the_contract(prepared):
    out, report = prepared
    ds = read_prepared(out)
    assert is_prepared(out)
    assert {p.name for p in out.iterdir()} >= {
        "manifest.json",
        "report.json",
        "tokenizer",
        "train_0000.bin",
        "val_0000.bin",
    }
    assert ds.manifest["dtype"] == "uint16" and ds.train[0].dtype == np.uint16
    assert ds.tokenizer.vocab_size == 512 and ds.eot_id == ds.tokenizer.eot_id
    for split in ("train", "val"):
        info = ds.manifest["splits"][split]
        arrays = getattr(ds, split)
        assert sum(len(a) for a in arrays) == info["tokens"] > 0
        assert sum(int((a == ds.eot_id).sum()) for a in arrays) == info["documents"]
        assert all(a[-1] == ds.eot_id for a in arrays)  # every document ends with the separator
    first = _docs(np.asarray(ds.train[0]), ds.eot_id)[0]
    assert ds.tokenizer.decode(list(first)).strip()  # real text
    assert report["splits"]["train"]["tokens"] == ds.num_tokens("train")


def test_mixture_realises_the_weights_and_val_is_split_by_document(prepared):
    out, report = prepared
    mix = report["mixture"]
    assert mix["shakespeare"]["share"] == pytest.approx(0.7, abs=0.02)
    assert mix["instructions"]["share"] == pytest.approx(0.3, abs=0.02)
    assert mix["instructions"]["epochs"] > 1  # the small source is repeated to reach its weight
    ds = read_prepared(out)
    train_docs = set(_docs(np.asarray(ds.train[0]), ds.eot_id))
    val_docs = set(_docs(np.asarray(ds.val[0]), ds.eot_id))
    assert val_docs and not (val_docs & train_docs)
    s = report["sources"]["shakespeare"]
    assert s["documents_in"] == s["documents_out"] + sum(s["dropped"].values())
    assert report["bytes_per_token"] > 1.5 and set(report["seconds"]) == {
        "collect_clean_dedup",
        "tokenizer",
        "tokenize",
        "mix_shards",
    }


def test_rerun_reuses_finished_stages_and_is_deterministic(prepared, tmp_path):
    out, _ = prepared
    before = (out / "manifest.json").read_text()
    again = prepare(small_config(), out)
    assert again["reused_shards"] and (out / "manifest.json").read_text() == before
    other = tmp_path / "other"
    prepare(small_config(), other)
    assert (
        json.loads((other / "manifest.json").read_text())["splits"] == json.loads(before)["splits"]
    )


def test_interrupted_shard_writing_leaves_no_complete_looking_dataset(tmp_path, monkeypatch):
    out = tmp_path / "data"
    prepare(small_config(seed=1), out)
    calls = {"n": 0}
    real_add = ShardWriter.add

    def crashing_add(self, ids):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        real_add(self, ids)

    monkeypatch.setattr(ShardWriter, "add", crashing_add)
    with pytest.raises(KeyboardInterrupt):
        prepare(small_config(seed=2), out)  # a new split: stage 4 reruns and is interrupted
    assert not is_prepared(out) and not list(out.glob("*.bin"))
    with pytest.raises(LmforgeError, match="not a prepared dataset"):
        read_prepared(out)
    monkeypatch.setattr(ShardWriter, "add", real_add)
    monkeypatch.setattr(stage_docs, "Cleaner", None)  # stage 1 must be reused, not rerun
    report = prepare(small_config(seed=2), out)
    assert is_prepared(out) and not report["reused_shards"]


def test_corrupted_or_foreign_folders_are_clear_errors(prepared, tmp_path):
    src, _ = prepared
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    with open(out / "train_0000.bin", "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xff")
    with pytest.raises(LmforgeError, match="fails its sha256"):
        read_prepared(out)
    with open(out / "train_0000.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(LmforgeError, match="bytes, the manifest says"):
        read_prepared(out)
    (out / "manifest.json").write_text("{", encoding="utf-8")
    with pytest.raises(LmforgeError, match="damaged"):
        read_prepared(out)
    with pytest.raises(LmforgeError, match="not a prepared dataset"):
        read_prepared(tmp_path)


def test_uint32_shards_for_large_vocabularies(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    w = ShardWriter(tmp_path, "train", token_dtype(100_000), eot_id=99_999, tokens_per_shard=6)
    for doc in ([70_000, 1], [2, 3], [4]):
        w.add(doc)
    shards = w.close()
    assert [s["tokens"] for s in shards] == [6, 2]  # documents never straddle shards
    assert np.fromfile(tmp_path / "train_0000.bin", dtype=np.uint32).tolist() == [
        70_000,
        1,
        99_999,
        2,
        3,
        99_999,
    ]


def _cli(capsys, *argv):
    code = main(["prepare", *map(str, argv)])
    return code, capsys.readouterr()


def test_cli_bad_input_gives_one_clear_line(tmp_path, capsys):
    code, io = _cli(capsys, tmp_path / "missing.txt", "--out", tmp_path / "o1")
    assert (
        code == 1
        and io.err.strip()
        == f"lmforge: error: input not found: {tmp_path / 'missing.txt'} (expected a file, folder, glob or URL)"
    )
    pq.write_table(pa.table({"body": ["some text"] * 3}), tmp_path / "t.parquet")
    code, io = _cli(capsys, tmp_path / "t.parquet", "--out", tmp_path / "o2", "--workers", "1")
    assert (
        code == 1
        and "no documents left after cleaning" in io.err
        and "skipped_missing_column=1" in io.err
    )
    assert len(io.err.strip().splitlines()) == 1
    (tmp_path / "empty.txt").write_bytes(b"")
    code, io = _cli(capsys, tmp_path / "empty.txt", "--out", tmp_path / "o3", "--workers", "1")
    assert code == 1 and "no documents left" in io.err
    (tmp_path / "o4").mkdir()
    (tmp_path / "o4" / "precious.txt").write_text("mine", encoding="utf-8")
    code, io = _cli(capsys, tmp_path / "t.parquet", "--out", tmp_path / "o4")
    assert (
        code == 1 and "holds other files" in io.err and (tmp_path / "o4" / "precious.txt").exists()
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("dedupe: {near: false}\n", encoding="utf-8")
    code, io = _cli(capsys, "--config", bad, "--out", tmp_path / "o5")
    assert code == 1 and "did you mean 'dedup'" in io.err


def test_cli_positional_inputs_with_binary_and_invalid_utf8(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(ROOT / "lmforge" / "assets" / "tinyshakespeare.txt", corpus / "play.txt")
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(256)))
    (corpus / "latin1.txt").write_bytes(("Caf\xe9 society. " * 80).encode("latin-1"))
    code, io = _cli(
        capsys, corpus, "--out", tmp_path / "out", "--tokenizer", "byte", "--workers", "2"
    )
    assert code == 0, io.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    collected = report["sources"]["corpus"]["collect"]
    assert collected["skipped_binary"] == 1 and collected["invalid_utf8_replaced"] == 1
    assert read_prepared(tmp_path / "out").tokenizer.vocab_size == 257


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "configs").glob("prepare_*.yaml")), ids=lambda p: p.name
)
def test_every_prepare_recipe_parses(recipe):
    cfg = build_prepare_config(recipe)
    assert cfg.sources and all(s.weight is not None for s in cfg.sources)
    assert all(isinstance(s.clean, CleanConfig) for s in cfg.sources)  # typed, global + own keys


def test_cli_derives_plain_source_names_from_any_input_name(tmp_path, capsys):
    text = (ROOT / "lmforge" / "assets" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (tmp_path / "my file.txt").write_text(text[:60_000], encoding="utf-8")
    (tmp_path / "_x.txt").write_text(text[60_000:120_000], encoding="utf-8")
    (tmp_path / "my-file.md").write_text(text[120_000:180_000], encoding="utf-8")
    inputs = [tmp_path / "my file.txt", tmp_path / "_x.txt", tmp_path / "my-file.md"]
    code, io = _cli(capsys, *inputs, "--out", tmp_path / "out", "--tokenizer", "byte",
                    "--workers", "1")  # fmt: skip
    assert code == 0, io.err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["sources"]) == ["my_file", "x", "my-file"]
    for bad, plain in [("*", "source"), ("https://h/p?q=1", "p_q_1"), ("..x.txt", "source")]:
        assert source_name(bad) == plain


def test_cli_overrides_and_shorthands_reach_the_config(tmp_path, monkeypatch):
    from lmforge.cli import prepare as prepare_cli

    seen = {}

    def fake_prepare(cfg, out, force):
        seen["cfg"] = cfg
        return {"reused_shards": False}

    monkeypatch.setattr(prepare_cli, "prepare", fake_prepare)
    monkeypatch.setattr(prepare_cli, "format_report", lambda report: "")
    argv = ["prepare", "--config", str(RECIPE), "--out", str(tmp_path / "o"),
            "--clean.min_words=3", "--prepare.val_fraction=0.2", "--seed", "7"]  # fmt: skip
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert cfg.clean.min_words == 3 and cfg.prepare.val_fraction == 0.2 and cfg.prepare.seed == 7
    by_name = {s.name: s.clean for s in cfg.sources}
    assert by_name["shakespeare"].min_words == 20  # the source's own key wins over the global
    assert by_name["shakespeare"].pii  # global keys fill in the rest
    assert by_name["instructions"].max_top_ngram_fraction == {}  # replaced, not merged


def test_cli_typo_in_a_source_clean_key_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "sources: [{name: a, paths: [a.txt], clean: {min_wrds: 3}}]\n", encoding="utf-8"
    )
    (tmp_path / "a.txt").write_text("text\n", encoding="utf-8")  # found next to the recipe
    code, io = _cli(capsys, "--config", recipe, "--out", tmp_path / "o")
    assert code == 1 and io.err.strip() == (
        "lmforge: error: unknown config key 'sources[0].clean.min_wrds'; "
        "did you mean 'sources[0].clean.min_words'?"
    )


def test_atomic_folder_publishes_a_whole_folder_or_nothing(tmp_path):
    from lmforge.fileio import atomic_folder

    target = tmp_path / "tokenizer"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1", encoding="utf-8")
        assert not target.exists()
    assert (target / "a").read_text(encoding="utf-8") == "1"
    with pytest.raises(KeyboardInterrupt), atomic_folder(target) as tmp:
        (tmp / "a").write_text("2", encoding="utf-8")
        raise KeyboardInterrupt
    assert (target / "a").read_text(encoding="utf-8") == "1"  # the old folder is untouched
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("3", encoding="utf-8")
    assert [p.name for p in target.iterdir()] == ["b"]  # replaced as a whole
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temp or old folders left
