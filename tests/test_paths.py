"""Names read from files or configs never lead outside their folder: lmforge.fileio's helpers,
source names, Hugging Face index shard names and the checkpoints/latest pointer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lmforge.common import LmforgeError
from lmforge.config import SourceConfig
from lmforge.model.hf import read_hf_weights
from lmforge.train.checkpoint import latest_checkpoint, resolve_checkpoint, set_pointer


def test_contained_keeps_names_inside_their_folder(tmp_path):
    from lmforge.fileio import contained

    assert contained(tmp_path, "a.bin", "shard") == tmp_path / "a.bin"
    assert contained(tmp_path, "sub/a.bin", "shard") == tmp_path / "sub" / "a.bin"
    for bad in ["../x", "a/../../x", "/etc/passwd", "", ".", "a\x00b"]:
        with pytest.raises(LmforgeError, match="shard .* points outside") as e:
            contained(tmp_path, bad, "shard")
        assert "\n" not in str(e.value)
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "link").symlink_to(tmp_path.parent)  # a folder symlink leading out
    with pytest.raises(LmforgeError, match="points outside"):
        contained(tmp_path / "inner", "link/x", "shard")


def test_atomic_writes_and_utf8_reading(tmp_path):
    from lmforge.fileio import atomic_write_bytes, atomic_write_text, read_utf8_text, write_json

    atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    atomic_write_text(tmp_path / "t", "café\n")
    write_json(tmp_path / "j.json", {"k": "é"})
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert read_utf8_text(tmp_path / "t") == "café\n"
    assert json.loads((tmp_path / "j.json").read_text(encoding="utf-8")) == {"k": "é"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "j.json", "t"]  # no temp files
    with pytest.raises(LmforgeError, match="looks binary"):
        read_utf8_text(tmp_path / "b")
    (tmp_path / "l").write_bytes("ok café".encode("latin-1"))
    with pytest.raises(LmforgeError, match="bad byte 0xe9 at offset 6"):
        read_utf8_text(tmp_path / "l")


def test_common_and_fileio_import_without_torch():
    code = (
        "import sys; import lmforge.common, lmforge.fileio; "
        "from lmforge.common import LmforgeError; assert 'torch' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x y", "/abs"])
def test_source_names_must_be_plain(name):
    with pytest.raises(LmforgeError, match="source name .* is not a plain name"):
        SourceConfig(name=name)


def test_plain_source_names_are_accepted():
    for name in ["web", "books_2", "code-v1.2", "A"]:
        assert SourceConfig(name=name).name == name


def _hf_folder(tmp_path, shard_name):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "outside.safetensors"))
    index = {"metadata": {}, "weight_map": {"w": shard_name}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABS"])
def test_hf_index_shard_names_cannot_leave_the_folder(tmp_path, shard):
    shard = str(tmp_path / "outside.safetensors") if shard == "ABS" else shard
    folder = _hf_folder(tmp_path, shard)
    with pytest.raises(LmforgeError, match="points outside"):
        read_hf_weights(folder)


def test_hf_index_shards_may_be_symlinks_like_the_hub_cache(tmp_path):
    folder = _hf_folder(tmp_path, "model-00001-of-00001.safetensors")
    (folder / "model-00001-of-00001.safetensors").symlink_to("../outside.safetensors")
    assert torch.equal(read_hf_weights(folder)["w"], torch.ones(2))


def _fake_checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.yaml").write_text("", encoding="utf-8")
    return folder


@pytest.mark.parametrize("target", ["../elsewhere", "ABS"])
def test_latest_pointer_cannot_leave_the_checkpoints_folder(tmp_path, target):
    elsewhere = _fake_checkpoint(tmp_path / "run" / "elsewhere")
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir()
    (ckpts / "latest").write_text(
        (str(elsewhere) if target == "ABS" else target) + "\n", encoding="utf-8"
    )
    with pytest.raises(LmforgeError, match="points outside"):
        latest_checkpoint(tmp_path / "run")


def test_set_pointer_round_trips_atomically_and_pointer_files_resolve(tmp_path):
    step = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000010")
    other = _fake_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000020")
    set_pointer(step, "best")
    set_pointer(other)
    assert latest_checkpoint(tmp_path / "run") == other == resolve_checkpoint(tmp_path / "run")
    assert resolve_checkpoint(step.parent / "best") == step
    assert resolve_checkpoint(step.parent / "latest") == other
    assert sorted(os.listdir(step.parent)) == ["best", "latest", "step_0000010", "step_0000020"]
    shutil.rmtree(step)
    with pytest.raises(LmforgeError, match="names no complete checkpoint"):
        resolve_checkpoint(step.parent / "best")
