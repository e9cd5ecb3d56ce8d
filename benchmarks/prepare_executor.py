"""`lmforge prepare`'s executors side by side: Dask (the one lmforge ships) against Ray.

1. install: each package into a fresh virtual environment through pip's own configuration:
   wheels downloaded (MB, dependencies included), installed size (MB, beyond an empty
   environment) and install time (s);
2. start: a 2-worker local cluster up to its first task's result, and its stop (median);
3. prepare: the bundled data (configs/prepare_shakespeare_instructions.yaml, each source's
   files listed `--copies` times: more cleaning and MinHash work, the copies then dropped as
   exact duplicates) with the local executor (2 processes), Dask (2 workers, a local cluster
   started for the run) and Ray (2 actors, through the adapter below: the same interface);
   the wall time of `prepare()` (cluster start included; median of `--repeats`) and its
   clean+dedup stage, and whether shards, tokenizer and manifest are the same bytes.

Each start and prepare runs in a new process, one after another.

    python benchmarks/prepare_executor.py [--repeats 3] [--copies 1] [--no-install]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "prepare_shakespeare_instructions.yaml"
PACKAGES = {"dask": "dask[distributed]", "ray": "ray"}
EXECUTORS = ("local", "dask", "ray")
QUIET: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


def _tree_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def measure_install(spec: str) -> dict[str, float]:
    """Wheels MB, installed MB and pip install seconds of `spec` in a new environment."""
    with tempfile.TemporaryDirectory() as tmp:
        env = Path(tmp) / "venv"
        venv.create(env, with_pip=True)
        pip = [str(env / "bin" / "python"), "-m", "pip", "-q", "--no-cache-dir"]
        site = next((env / "lib").glob("python*/site-packages"))
        empty = _tree_mb(site)
        subprocess.run([*pip, "download", "-d", f"{tmp}/wheels", spec], check=True, **QUIET)
        t = time.perf_counter()
        subprocess.run([*pip, "install", spec], check=True, **QUIET)
        seconds = time.perf_counter() - t
        return {
            "wheels_mb": _tree_mb(Path(tmp) / "wheels"),
            "installed_mb": _tree_mb(site) - empty,
            "install_s": seconds,
        }


class RayExecutor:
    """lmforge's executor interface on Ray, for this comparison: one actor per worker holds
    the state `init(*initargs)` sets up; tasks go to the actors in turn."""

    def __init__(self, workers: int, init: Callable[..., None], initargs: tuple):
        import ray

        from lmforge.data.executors import ordered_bounded

        self._ray, self._ordered = ray, ordered_bounded
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)

        @ray.remote(num_cpus=1)
        class Worker:
            def __init__(self) -> None:
                init(*initargs)

            def run(self, fn: Callable, task: Any) -> Any:
                return fn(task)

        self._actors = [Worker.remote() for _ in range(workers)]

    def map(self, fn: Callable, tasks: Iterable) -> Iterator:
        turn = itertools.cycle(self._actors)
        return self._ordered(
            lambda t: next(turn).run.remote(fn, t), self._ray.get, tasks, 2 * len(self._actors)
        )

    def close(self) -> None:
        self._ray.shutdown()


@contextmanager
def _ray_executor(p: Any, init: Callable[..., None], initargs: tuple) -> Iterator[RayExecutor]:
    ex = RayExecutor(p.workers, init, initargs)
    try:
        yield ex
    finally:
        ex.close()


def _cluster(kind: str, workers: int, init: Callable[..., None] = dict, initargs: tuple = ()):
    """A started cluster of `kind` through its executor (`dict()` is a no-op set-up)."""
    if kind == "ray":
        return RayExecutor(workers, init, initargs)
    from lmforge.data.executor_dask import DaskExecutor

    return DaskExecutor("", workers, 60.0, init, initargs)


def child_start(kind: str) -> dict[str, float]:
    t0 = time.perf_counter()
    ex = _cluster(kind, 2)
    assert list(ex.map(abs, [-1])) == [1]
    t1 = time.perf_counter()
    ex.close()
    return {"start_s": t1 - t0, "stop_s": time.perf_counter() - t1}


def child_prepare(kind: str, out: Path, copies: int) -> dict[str, float]:
    from lmforge.config import build_prepare_config
    from lmforge.data import stage_docs
    from lmforge.data.prepare import prepare

    cfg = build_prepare_config(
        RECIPE,
        {"prepare": {"workers": 2, "executor": "local" if kind == "ray" else kind}},
    )
    cfg = dataclasses.replace(
        cfg, sources=[dataclasses.replace(s, paths=s.paths * copies) for s in cfg.sources]
    )
    if kind == "ray":
        stage_docs.open_executor = _ray_executor
    t = time.perf_counter()
    report = prepare(cfg, out)
    return {"wall_s": time.perf_counter() - t, "clean_s": report["seconds"]["collect_clean_dedup"]}


def _child(*args: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hashes(out: Path) -> str:
    files = sorted(p for p in out.rglob("*") if p.is_file() and ".work" not in p.parts)
    h = hashlib.sha256()
    for p in files:
        if p.name != "report.json":  # it holds wall times
            h.update(str(p.relative_to(out)).encode() + p.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--no-install", action="store_true", help="skip the install measurement")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, kind, *rest = args.child
        result = (
            child_start(kind)
            if what == "start"
            else child_prepare(kind, Path(rest[0]), int(rest[1]))
        )
        print(json.dumps(result))
        return

    if not args.no_install:
        print("| package | wheels MB | installed MB | install s |\n|---|---:|---:|---:|")
        for spec in PACKAGES.values():
            r = measure_install(spec)
            print(
                f"| {spec} | {r['wheels_mb']:.1f} | {r['installed_mb']:.1f} | {r['install_s']:.1f} |"
            )

    starts: dict[str, list[dict[str, float]]] = {k: [] for k in PACKAGES}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in EXECUTORS}
    digests: dict[str, set[str]] = {k: set() for k in EXECUTORS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so drift on the machine hits all alike
            for kind in PACKAGES:
                starts[kind].append(_child("start", kind))
            for kind in EXECUTORS:
                out = Path(tmp) / kind
                shutil.rmtree(out, ignore_errors=True)
                runs[kind].append(_child("prepare", kind, str(out), str(args.copies)))
                digests[kind].add(_hashes(out))

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print("\n| 2-worker local cluster | start s | stop s |\n|---|---:|---:|")
    for kind, rows in starts.items():
        print(f"| {kind} | {med(rows, 'start_s'):.2f} | {med(rows, 'stop_s'):.2f} |")
    base = med(runs["local"], "wall_s")
    print(
        f"\n| prepare x{args.copies}, 2 workers | wall s | vs local | clean+dedup s | output |"
        "\n|---|---:|---:|---:|---|"
    )
    for kind, rows in runs.items():
        same = "same bytes" if digests[kind] == digests["local"] else f"DIFFERS {digests[kind]}"
        wall = med(rows, "wall_s")
        print(f"| {kind} | {wall:.2f} | {wall / base:.2f}x | {med(rows, 'clean_s'):.2f} | {same} |")


if __name__ == "__main__":
    main()
