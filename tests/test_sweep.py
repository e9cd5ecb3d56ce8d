"""`lmforge sweep`: a tiny search finishes, writes its table and plots, and resumes to exactly
the trials asked for; the Trainer's on_eval hook stops a run, which is how trials are pruned;
a bad search space is one line."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import optuna
import pytest

from lmforge.cli import main
from lmforge.config import build_config
from lmforge.data.loader import bundled_text_path
from lmforge.recipes.pretrain import train
from lmforge.research.search_space import check_space, read_space
from lmforge.research.sweep import Sweep, run_sweep
from lmforge.train.checkpoint import latest_checkpoint

REPO = Path(__file__).resolve().parents[1]

SPACE = """\
train.lr: {type: float, low: 1e-3, high: 3.0e-2, log: true}
train.warmup_steps: {type: int, low: 0, high: 10, step: 5}
model.d_model: {type: categorical, choices: [16, 32]}
"""


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "shakespeare_40k.txt"
    path.write_text(bundled_text_path().read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


def tiny(text_file: Path) -> list[str]:
    """Overrides of a run of a few seconds: 20 steps, evaluated at 10 and 20."""
    return [
        "--model.preset=tiny", f"--data.path={text_file}", "--data.tokenizer=char",
        "--train.max_steps=20", "--train.eval_interval=10", "--train.eval_steps=2",
        "--train.micro_batch_size=4", "--train.precision=fp32", "--train.log_interval=10",
        "--run.tensorboard=false",
    ]  # fmt: skip


def results(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_search_finishes_writes_its_results_and_resumes_to_the_trials_asked(
    tmp_path, text_file, capfd
):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    argv = ["sweep", "--space", str(space), "--out", str(out), *tiny(text_file)]
    assert main([*argv, "--trials", "3"]) == 0
    printed = capfd.readouterr().out
    rows = results(out)
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2]
    assert all(r["state"] == "complete" and r["steps"] == "20" for r in rows)
    values = [float(r["value"]) for r in rows]
    assert values == sorted(values)  # best first
    for name in ("history.png", "curves.png", "importance.png"):
        assert (out / name).stat().st_size > 5000, name
    report = (out / "results.md").read_text()
    assert "| trial | value |" in report and "lmforge train" in report
    assert "![importance](importance.png)" in report
    for r in rows:  # each trial is a normal run with its own values
        cfg = build_config(out / r["run"] / "config.yaml")
        assert cfg.train.lr == pytest.approx(float(r["train.lr"]))
        assert cfg.model.d_model == int(r["model.d_model"])
    # the printed command trains the best trial's config
    command = next(line.strip() for line in printed.splitlines() if "lmforge train" in line)
    best = build_config(out / rows[0]["run"] / "config.yaml")
    again = build_config(overrides=shlex.split(command)[2:])
    assert (again.train, again.model.d_model) == (best.train, best.model.d_model)

    first = (out / "trial_0000" / "metrics.jsonl").read_text()
    assert main([*argv, "--trials", "4", "--jobs", "2"]) == 0  # two workers, one trial left
    rows4 = results(out)
    assert sorted(int(r["trial"]) for r in rows4) == [0, 1, 2, 3]
    assert {r["trial"]: r["value"] for r in rows4 if r["trial"] != "3"} == {
        r["trial"]: r["value"] for r in rows
    }
    assert (out / "trial_0000" / "metrics.jsonl").read_text() == first
    assert "trial 3:" in capfd.readouterr().out  # from a worker process
    assert main([*argv, "--trials", "4"]) == 0  # finished: nothing trains
    assert "trial " not in capfd.readouterr().out.split("| trial")[0]
    for other in (["--train.max_steps=30"], ["--study-name", "other"]):  # not this study
        assert main([*argv, "--trials", "5", *other]) == 1
        assert "choose a new --out" in capfd.readouterr().err
    assert len(results(out)) == 4


def test_on_eval_sees_each_evaluation_and_can_stop_the_run(tmp_path, text_file):
    def run(name: str, stop_at: int | None) -> tuple[list[int], dict]:
        seen = []

        def on_eval(row):
            seen.append(row["step"])
            return row["step"] == stop_at

        where = [f"--run.dir={tmp_path}", f"--run.name={name}", "--run.sample_tokens=0"]
        cfg = build_config(overrides=[*tiny(text_file), "--train.max_steps=30", *where])
        return seen, train(cfg, on_eval=on_eval)

    seen, result = run("all", None)
    assert seen == [10, 20, 30] and result["stop_reason"] is None  # not the step-0 baseline
    seen, result = run("stopped", 10)
    assert seen == [10] and result["stop_reason"] == "on_eval"
    assert result["eval"]["step"] == 10
    rows = [json.loads(line) for line in (tmp_path / "stopped" / "metrics.jsonl").open()]
    assert max(r["step"] for r in rows) == 10
    assert latest_checkpoint(tmp_path / "stopped").name == "step_0000010"  # stopped cleanly


def test_a_pruned_trial_stops_at_the_evaluation_that_pruned_it(tmp_path, text_file):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    sweep = Sweep(
        out=tmp_path / "sweep",
        params=read_space(space),
        trials=2,
        overrides=tiny(text_file),
        pruner=optuna.pruners.ThresholdPruner(upper=0.0),  # every loss is above 0: prune
    )
    study = run_sweep(sweep)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for t in study.trials:
        assert list(t.intermediate_values) == [10]
        assert latest_checkpoint(sweep.out / t.user_attrs["run"]).name == "step_0000010"


@pytest.mark.parametrize(
    "space, message",
    [
        ("train.lrr: {type: float, low: 0.001, high: 0.01}", "'train.lrr' is not a config key; did you mean 'train.lr'?"),
        ("train: {type: float, low: 0.001, high: 0.01}", "'train' is not a config key"),
        ("", "names no parameters"),
        ("train.lr: {type: float, low: 0.1, high: 0.01}", "train.lr: low=0.1 must be below high=0.01"),
        ("train.warmup_steps: {type: int, low: 5, high: 5}", "low=5 must be below high=5"),
        ("train.lr: {type: float, low: -1, high: 0.01}", "train.lr cannot take -1.0"),
        ("model.d_model: {type: categorical, choices: [33, 32]}", "model.d_model cannot take 33"),
        ("train.lr: {type: uniform, low: 0.1, high: 1}", "type 'uniform' is not one of"),
        ("train.lr: {type: float, lo: 0.1, high: 1}", "a float takes no 'lo'; did you mean 'low'?"),
    ],
)  # fmt: skip
def test_a_bad_space_is_one_line(tmp_path, text_file, capsys, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(space + "\n")
    out = tmp_path / "sweep"
    argv = ["sweep", "--space", str(path), "--trials", "1", "--out", str(out), *tiny(text_file)]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()  # nothing trained, nothing written


def test_every_shipped_space_fits_the_default_job():
    spaces = sorted((REPO / "configs").glob("sweep_space_*.yaml"))
    assert spaces
    for path in spaces:
        check_space(read_space(path), (), [], str(path))
