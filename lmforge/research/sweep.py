"""Hyperparameter search (`lmforge sweep`): Optuna's TPE sampler proposes config overrides, each
trial is a normal pretraining run under the sweep's folder, and a median pruner stops trials
whose validation loss trails the others' at the same step (through the Trainer's `on_eval`).

The study lives in OUT/study.db (SQLite), so the sweep is resumable: rerunning the command
continues until `trials` trials have finished (completed, pruned, or failed with an error of
their own, such as a diverging learning rate). A trial stopped before it finished (Ctrl-C, a
killed process) is marked failed and queued again with the same parameters; its run resumes
from its last checkpoint. Parallel workers are processes sharing that storage; a file lock
around "count, then ask for a trial" keeps them from starting more trials than asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError
from lmforge.research.search_space import Param, check_space, override

STUDY_DB = "study.db"
SWEEP_DEFAULTS = {"run": {"sample_tokens": 0}}
"""Under the user's config: trials print no sample text."""


class SetupError(LmforgeError):
    """A trial failed before its first step (data, run folder): a problem of the base config
    or the machine rather than of the trial's values, so the sweep stops."""


@dataclass
class Sweep:
    """Everything a worker process needs to run trials (picklable)."""

    out: Path
    params: list[Param]
    trials: int
    """Finished trials to reach (the study's total, across reruns)."""
    config: str | None = None
    """The YAML recipe trials start from (None: the config tree's defaults)."""
    overrides: list[str] = field(default_factory=list)
    """--section.key=value for every trial, under the trial's own values."""
    study_name: str = "sweep"
    seed: int = 0
    pruner: Any = None
    """An optuna pruner; None: MedianPruner (tests pass one that always prunes)."""

    @property
    def layers(self) -> tuple:
        return (SWEEP_DEFAULTS, *([self.config] if self.config else []))

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{(self.out / STUDY_DB).resolve()}"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise LmforgeError(
            "lmforge sweep needs optuna: pip install 'lmforge[sweep]' (or pip install optuna)"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for the block; without `wait`, a lock
    held elsewhere is an error (another sweep runs on the folder)."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LmforgeError(
                f"another `lmforge sweep` is running on {path.parent}; wait for it or stop it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _settings(sweep: Sweep) -> str:
    """What makes two runs of the command the same study: its space and the resolved base
    config (run folder keys aside)."""
    from lmforge.config import build_config, to_dict

    base = to_dict(build_config(*sweep.layers, overrides=sweep.overrides))
    del base["run"]["dir"], base["run"]["name"]
    return json.dumps({"space": [p.describe() | {"key": p.key} for p in sweep.params],
                       "base": base}, sort_keys=True)  # fmt: skip


def _open_study(sweep: Sweep, sampler=None):
    optuna = _optuna()
    storage = optuna.storages.RDBStorage(
        sweep.storage_url, engine_kwargs={"connect_args": {"timeout": 60}}
    )
    return optuna.create_study(
        study_name=sweep.study_name,
        storage=storage,
        sampler=sampler,
        pruner=sweep.pruner or optuna.pruners.MedianPruner(n_startup_trials=5),
        direction="minimize",
        load_if_exists=True,
    )


def is_unfinished(trial) -> bool:
    """A failed trial that stopped before an outcome (rather than failing with an error)."""
    return trial.state.name == "FAIL" and "error" not in trial.user_attrs


def _finished(study) -> int:
    """Trials that count towards the total: those with an outcome, and those running now."""
    return sum(
        t.state.name in ("COMPLETE", "PRUNED", "RUNNING")
        or (t.state.name == "FAIL" and not is_unfinished(t))
        for t in study.get_trials(deepcopy=False)
    )


def _recover(study) -> None:
    """With no worker running: trials left running by a killed sweep are failed, and every
    unfinished trial not yet queued again is queued with its parameters."""
    State = _optuna().trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(State.RUNNING,)):
        study.tell(t.number, state=State.FAIL)
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if is_unfinished(t) and t.number not in queued:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def run_sweep(sweep: Sweep, jobs: int = 1):
    """Run the sweep until `sweep.trials` trials have finished, with `jobs` worker processes
    (1: in this process). Returns the study."""
    if sweep.trials < 1 or jobs < 1:
        raise LmforgeError(f"--trials={sweep.trials} and --jobs={jobs} must be >= 1")
    out = sweep.out
    if out.is_dir() and any(out.iterdir()) and not (out / STUDY_DB).is_file():
        raise LmforgeError(f"--out {out} is not empty and holds no {STUDY_DB}; choose a new folder")
    check_space(sweep.params, sweep.layers, sweep.overrides, "search space")
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out / "sweep.lock", wait=False):
        others = set(_optuna().get_all_study_names(sweep.storage_url)) - {sweep.study_name}
        if others:  # one study per folder: its run folders and results are the study's
            raise LmforgeError(
                f"{out} holds study '{sorted(others)[0]}'; resume it with --study-name "
                f"{sorted(others)[0]}, or choose a new --out"
            )
        study = _open_study(sweep)
        settings = _settings(sweep)
        saved = study.user_attrs.get("settings")
        if saved is None:
            study.set_user_attr("settings", settings)
        elif saved != settings:
            raise LmforgeError(
                f"{out / STUDY_DB} holds study '{sweep.study_name}' with another search space "
                "or base config; resume with the same ones, or choose a new --out or --study-name"
            )
        _recover(study)
        try:
            if jobs == 1:
                _optimize(sweep, worker=0, say=print)
            else:
                _run_workers(sweep, jobs)
        except KeyboardInterrupt:
            print(f"sweep interrupted: rerun the same command to continue ({out / STUDY_DB})")
            raise
    return study


def _run_workers(sweep: Sweep, jobs: int) -> None:
    """`jobs` spawned processes, each with cores/jobs torch threads and its output in
    OUT/logs/worker_I.log. Ctrl-C reaches them too: each stops its trial cleanly, then this
    waits for them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // jobs)
    (sweep.out / "logs").mkdir(exist_ok=True)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    procs = [ctx.Process(target=_worker_main, args=(sweep, i, threads)) for i in range(jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join()
        raise
    codes = [p.exitcode for p in procs]
    if 130 in codes:
        raise KeyboardInterrupt
    for i, code in enumerate(codes):
        if code:
            raise LmforgeError(f"sweep worker {i} stopped (exit {code}); its log: {_log(sweep, i)}")


def _log(sweep: Sweep, worker: int) -> Path:
    return sweep.out / "logs" / f"worker_{worker}.log"


def _worker_main(sweep: Sweep, worker: int, threads: int) -> None:
    """A worker process: its share of the cores, its output to a log, one line per trial on
    the terminal."""
    import torch

    torch.set_num_threads(threads)
    terminal, errors = sys.stdout, sys.stderr

    def say(message: str) -> None:
        print(message, file=terminal, flush=True)

    with open(_log(sweep, worker), "a", encoding="utf-8") as log:
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                _optimize(sweep, worker, say)
        except LmforgeError as e:  # one line, as the CLI would print it
            print(f"lmforge: error: worker {worker}: {e}", file=errors, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)


def _optimize(sweep: Sweep, worker: int, say: Callable[[str], None]) -> None:
    """Ask for trials and run them until the study has `sweep.trials` finished ones."""
    optuna = _optuna()
    State = optuna.trial.TrialState
    # a seed of its own for each worker and each rerun (a rerun must not replay the draws)
    started = len(_open_study(sweep).get_trials(deepcopy=False))
    sampler = optuna.samplers.TPESampler(seed=sweep.seed + 1000 * started + worker)
    study = _open_study(sweep, sampler)
    while True:
        with _locked(sweep.out / "ask.lock"):
            if _finished(study) >= sweep.trials:
                return
            trial = study.ask()
        try:
            value = run_trial(sweep, trial)
        except optuna.TrialPruned:
            study.tell(trial, state=State.PRUNED)
        except SetupError:  # every trial would fail: unfinished, run again once fixed
            study.tell(trial, state=State.FAIL)
            raise
        except LmforgeError as e:  # these settings failed (e.g. diverged): the search goes on
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=State.FAIL)
        except BaseException:  # Ctrl-C, a bug: unfinished, run again by the next sweep
            study.tell(trial, state=State.FAIL)
            raise
        else:
            study.tell(trial, value)
        say(describe(study.get_trials(deepcopy=False)[trial.number]))


def describe(trial) -> str:
    """One line for a trial's outcome."""
    params = " ".join(override(k, v) for k, v in trial.params.items())
    if trial.state.name == "COMPLETE":
        outcome = f"val_loss {trial.value:.4f}"
    elif trial.state.name == "PRUNED":
        step = max(trial.intermediate_values, default=0)
        outcome = f"pruned at step {step}"
    else:
        outcome = f"failed: {trial.user_attrs.get('error', 'unfinished')}"
    return f"trial {trial.number}: {outcome}  {params}"


def run_trial(sweep: Sweep, trial) -> float:
    """Train one trial as a normal run (base config <- the trial's values) and return its final
    validation loss; reports each evaluation to the pruner, which may stop the run there."""
    optuna = _optuna()
    from lmforge.config import build_config
    from lmforge.recipes.pretrain import train
    from lmforge.train.checkpoint import latest_checkpoint

    values = [override(p.key, p.suggest(trial)) for p in sweep.params]
    run_dir, resume = sweep.out / f"trial_{trial.number:04d}", None
    retry_of = trial.user_attrs.get("retry_of")
    if retry_of is not None:  # continue the unfinished trial's run where it stopped
        earlier = trial.study.get_trials(deepcopy=False)[retry_of].user_attrs.get("run")
        if earlier and latest_checkpoint(sweep.out / earlier) is not None:
            run_dir = resume = sweep.out / earlier
    trial.set_user_attr("run", run_dir.name)
    trial.set_user_attr("overrides", values)
    where = [f"--run.dir={sweep.out}", f"--run.name={run_dir.name}"]
    cfg = build_config(*sweep.layers, overrides=[*sweep.overrides, *values, *where])
    max_steps = cfg.train.max_steps

    def on_eval(row: dict[str, Any]) -> bool:
        if row["step"] == 0 or "val_loss" not in row:  # the baseline: no setting acted yet
            return False
        trial.report(row["val_loss"], row["step"])
        return row["step"] < max_steps and trial.should_prune()

    try:
        result = train(cfg, resume=resume, on_eval=on_eval)
    except LmforgeError as e:
        if not (run_dir / "metrics.jsonl").is_file():
            raise SetupError(str(e)) from None
        raise
    if result["stop_reason"] == "signal":
        raise KeyboardInterrupt
    if result["stop_reason"] == "on_eval":
        raise optuna.TrialPruned
    return _final_val_loss(run_dir)


def _final_val_loss(run_dir: Path) -> float:
    """The run's last evaluated validation loss (a resumed run that had already finished
    evaluates nothing new, so it is read from metrics.jsonl)."""
    rows = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    return losses[-1] if losses else math.inf
