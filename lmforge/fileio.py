"""Files: names that stay in their folder, atomic writes (files and folders), text sniffing.

Names read from files we did not write (a Hugging Face index's shard names, a run's `latest`
pointer, a config's source names) are checked with `contained` / `plain_name` before use, so
a crafted name like `../../etc/x` or `/abs/path` is a one-line error instead of a read or a
write somewhere else. Imports only the standard library and the error class, never torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from lmforge.common import LmforgeError

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SNIFF_BYTES = 8192
"""How much of a file's start `looks_binary` inspects."""


def plain_name(name: str, what: str) -> str:
    """`name` if it is one plain file-name component (letters, digits, `.`, `_`, `-`; not
    starting with a dot or dash), else LmforgeError naming `what`."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise LmforgeError(
            f"{what} {name!r} is not a plain name (letters, digits, '.', '_', '-'; "
            "starting with a letter or digit)"
        )
    return name


def contained(folder: str | Path, name: str, what: str) -> Path:
    """folder/name, or LmforgeError (naming `what` and `name`) when the name is empty,
    absolute, has a `..` part, or its folder resolves (through symlinks) outside `folder`.

    The last component is deliberately not resolved: the Hugging Face cache stores every
    file of a snapshot as a symlink into `../../blobs/`, and such folders must keep loading.
    """
    folder = Path(folder)
    bad = (
        not isinstance(name, str)
        or "\x00" in name
        or not Path(name).parts
        or Path(name).is_absolute()
        or ".." in Path(name).parts
    )
    if not bad:
        path = folder / name
        root = folder.resolve()
        parent = path.parent.resolve()
        bad = parent != root and root not in parent.parents
    if bad:
        raise LmforgeError(f"{what} {name!r} points outside {folder}")
    return path


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Write a file so that readers see the old content or the new, never a part: the body
    writes to a temp file beside `path` (same file system, so the rename is atomic), which is
    fsynced and renamed to `path` on success and removed on any error."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty-printed UTF-8 JSON, written atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8"))


def looks_binary(head: bytes) -> bool:
    """Whether data is binary rather than text: a NUL byte in its first SNIFF_BYTES (no text
    encoding we read produces one; nearly every binary format has one early)."""
    return b"\x00" in head[:SNIFF_BYTES]


def read_utf8_text(path: str | Path) -> str:
    """A whole file as text; LmforgeError for a binary file (NUL bytes in the first 8 KiB) or
    invalid UTF-8 (naming the bad byte and its offset)."""
    path = Path(path)
    raw = path.read_bytes()
    if looks_binary(raw):
        raise LmforgeError(f"{path} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(
            f"{path} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, itself included, so that publishing it by a
    rename is never followed, after a crash, by empty or partial files inside."""
    for p in [*folder.rglob("*"), folder]:
        if not p.is_symlink():
            _fsync(p)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Create or replace the folder `path` all at once: the body fills the empty temp folder
    this yields (`.tmp-<name>` beside `path`, so on the same file system); on success it is
    fsynced and renamed to `path`, on any error removed, leaving `path` as it was.

    An existing `path` is first renamed to `.old-<name>` and removed after the new folder is in
    place; only a crash between those two renames leaves no `path` (the old one is then at
    `.old-<name>`). A `.tmp-<name>` left by a crash is removed on the next use."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    _fsync(path.parent)  # the rename itself
    shutil.rmtree(old, ignore_errors=True)
