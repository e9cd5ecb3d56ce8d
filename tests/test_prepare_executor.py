"""`lmforge prepare --executor=dask`: the same shard, tokenizer and manifest bytes as the local
executor on a multi-file corpus with duplicates (exact and near) from the bundled data, on a
2-worker cluster started here or by prepare itself; bad clusters and a missing package as one
clear line, never a hang."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import time
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "lmforge" / "assets"
SETTINGS = ["--tokenizer", "train:512", "--prepare.tokens_per_shard=40000",
            "--clean.min_words=20", "--clean.max_dup_line_fraction=0.5",
            "--clean.max_top_ngram_fraction={}", "--clean.max_dup_ngram_fraction={}"]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six files of Shakespeare, one exact copy and one lightly edited copy (near duplicate)
    of the first, and the instructions as a jsonl file."""
    folder = tmp_path_factory.mktemp("corpus")
    plays = folder / "plays"
    plays.mkdir()
    text = (ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")
    parts = [text[i * 30_000 : (i + 1) * 30_000] for i in range(6)]
    for i, part in enumerate(parts):
        (plays / f"part{i}.txt").write_text(part, encoding="utf-8")
    (plays / "part0_copy.txt").write_text(parts[0], encoding="utf-8")
    (plays / "part0_edit.txt").write_text(parts[0].replace("Citizen", "Townsman", 3), "utf-8")
    records = json.loads((ASSETS / "instructions.json").read_text(encoding="utf-8"))[:300]
    with open(folder / "instructions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": f"{r['instruction']}\n\n{r['output']}"}) + "\n")
    return folder


def _prepare(capsys, corpus: Path, out: Path, *flags: str) -> tuple[int, str]:
    argv = ["prepare", str(corpus / "plays"), str(corpus / "instructions.jsonl")]
    code = main([*argv, "--out", str(out), *SETTINGS, *flags])
    return code, capsys.readouterr().err


def _hashes(out: Path) -> dict[str, str]:
    """sha256 of every output file but report.json (which holds wall times)."""
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "report.json" and ".work" not in p.parts
    }


@pytest.fixture(scope="module")
def local(corpus, tmp_path_factory) -> dict[str, str]:
    """The local executor's output (2 forked processes), made before any cluster exists."""
    out = tmp_path_factory.mktemp("local") / "data"
    assert main(["prepare", str(corpus / "plays"), str(corpus / "instructions.jsonl"),
                 "--out", str(out), *SETTINGS, "--workers", "2"]) == 0  # fmt: skip
    dedup = json.loads((out / "report.json").read_text())["dedup"]
    assert dedup["exact_duplicates"] >= 1 and dedup["near_duplicates"] >= 1, dedup
    return _hashes(out)


@pytest.fixture(scope="module")
def cluster(local):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
    ) as c:
        yield c


def test_dask_cluster_writes_the_same_bytes_as_local(cluster, local, corpus, tmp_path, capsys):
    code, err = _prepare(
        capsys, corpus, tmp_path / "d", "--executor", "dask",
        f"--prepare.cluster_address={cluster.scheduler_address}",
    )  # fmt: skip
    assert code == 0, err
    assert _hashes(tmp_path / "d") == local
    assert {"manifest.json", "tokenizer/tokenizer.json", "train_0000.bin"} <= set(local)
    assert len([k for k in local if k.startswith("train_")]) > 1  # several shards compared


def test_dask_without_address_runs_its_own_cluster_and_stops_it(
    cluster, local, corpus, tmp_path, capsys
):
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code, err = _prepare(capsys, corpus, tmp_path / "d", "--executor=dask", "--workers=2")
    assert code == 0, err
    assert _hashes(tmp_path / "d") == local
    time.sleep(0.5)  # the workers' processes may take a moment to be reaped
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def _one_line(err: str, *parts: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("lmforge: error: ") and all(p in err for p in parts), err


def test_unreachable_cluster_is_one_line_and_no_hang(corpus, tmp_path, capsys):
    pytest.importorskip("distributed")
    mute = socket.socket()  # accepts connections and never speaks: a hang without a deadline
    mute.bind(("127.0.0.1", 0))
    mute.listen()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: refused
    try:
        for sock in (mute, closed):
            address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
            t = time.perf_counter()
            code, err = _prepare(
                capsys, corpus, tmp_path / "d", "--executor=dask",
                f"--prepare.cluster_address={address}", "--prepare.cluster_timeout_s=1",
            )  # fmt: skip
            assert code == 1 and time.perf_counter() - t < 10
            _one_line(err, address, "prepare.cluster_address")
        code, err = _prepare(
            capsys, corpus, tmp_path / "d", "--executor=dask", "--prepare.cluster_address=nohost"
        )
        assert code == 1
        _one_line(err, "nohost", "missing port")
    finally:
        mute.close()
        closed.close()
    assert not list((tmp_path / "d").glob("*.bin"))


def test_scheduler_without_workers_is_one_line(corpus, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=0, processes=False, dashboard_address="127.0.0.1:0"
    ) as c:
        code, err = _prepare(
            capsys, corpus, tmp_path / "d", "--executor=dask",
            f"--prepare.cluster_address={c.scheduler_address}", "--prepare.cluster_timeout_s=1",
        )  # fmt: skip
    assert code == 1
    _one_line(err, c.scheduler_address)


def test_missing_package_and_unknown_executor_are_one_line(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    monkeypatch.delitem(sys.modules, "lmforge.data.executor_dask", raising=False)
    code, err = _prepare(capsys, corpus, tmp_path / "d", "--executor=dask")
    assert code == 1
    _one_line(err, "pip install 'lmforge[cluster]'")
    code, err = _prepare(capsys, corpus, tmp_path / "d", "--executor=spark")
    assert code == 1
    _one_line(err, "prepare.executor='spark' is not one of local, dask")
