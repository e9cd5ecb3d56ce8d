"""The prepare stages' cache and plumbing.

Each stage writes one folder, `OUT/.work/<stage>-<key>/`, whose key is a digest of everything
the stage reads (settings, input files' sizes and mtimes, the previous stage's folder name).
The folder is built atomically, so a stage whose inputs are unchanged is reused and an
interrupted one leaves nothing that looks finished: a rerun resumes after the last complete
stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.config import SourceConfig
from lmforge.data.collect import resolve_paths
from lmforge.fileio import atomic_folder

WORK = ".work"


def digest(obj: Any) -> str:
    """A short stable hash of JSON-able settings: a stage's cache key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(src: SourceConfig) -> list[Any]:
    """What identifies a source's inputs without reading them: each file's absolute path, size
    and mtime (URLs by themselves)."""
    out = []
    for p in resolve_paths(src.paths):
        if "://" in p:
            out.append(p)
        else:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


class Stage:
    """The cached folder `OUT/.work/<stage>-<key>`: `done` once built, `build()` to build it."""

    def __init__(self, out: Path, stage: str, key: str):
        self.final = out / WORK / f"{stage}-{key}"
        self.stage = stage

    @property
    def done(self) -> bool:
        return self.final.is_dir()

    @contextmanager
    def build(self) -> Iterator[Path]:
        """Yields an empty folder that becomes `final` when the body succeeds; older versions
        of this stage (other keys) are removed then."""
        with atomic_folder(self.final) as tmp:
            yield tmp
        for old in self.final.parent.glob(f"{self.stage}-*"):
            if old != self.final:
                shutil.rmtree(old, ignore_errors=True)


def progress(desc: str, unit: str):
    """A tqdm bar for a stage (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, mininterval=1.0, disable=None, dynamic_ncols=True)
