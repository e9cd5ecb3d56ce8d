"""Scaling-law fits: the fit recovers known constants from noisy points, the gradient is the
objective's, the compute-optimal split minimises the loss on its budget, the CLI writes its
fit and plot, and bad points are one clear line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.research.scaling import (
    COARSE_GRID,
    PUBLISHED,
    bootstrap,
    fit,
    huber_objective,
)


def noisy_points(law, noise: float = 0.005, seed: int = 0):
    N, D = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
    N, D = N.ravel(), D.ravel()
    L = law.loss(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, N.shape))
    return N, D, L


@pytest.mark.parametrize("name", ["hoffmann2022", "besiroglu2024"])
def test_the_fit_recovers_known_constants_from_noisy_points(name):
    truth = PUBLISHED[name]
    N, D, L = noisy_points(truth)
    result = fit(N, D, L, grid=COARSE_GRID)
    assert result.converged and result.starts == 108
    assert abs(result.law.alpha - truth.alpha) <= 0.02
    assert abs(result.law.beta - truth.beta) <= 0.02
    assert abs(result.law.E - truth.E) <= 0.05
    intervals = bootstrap(N, D, L, result.law, samples=20)
    for key, (low, high) in intervals.items():
        assert low <= getattr(result.law, key) <= high, key


def test_the_gradient_is_the_objectives():
    N, D, L = noisy_points(PUBLISHED["hoffmann2022"], noise=0.02)
    logs = (np.log(N), np.log(D), np.log(L))
    x = np.array([6.0, 6.0, 0.5, 0.3, 0.3])
    value, grad = huber_objective(x, *logs, 1e-3)
    for i in range(5):
        step = np.zeros(5)
        step[i] = 1e-6
        numeric = (
            huber_objective(x + step, *logs, 1e-3)[0] - huber_objective(x - step, *logs, 1e-3)[0]
        ) / 2e-6
        assert grad[i] == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_the_compute_optimal_split_minimises_the_loss_on_its_budget():
    law = PUBLISHED["besiroglu2024"]
    flops = 5.76e23  # Chinchilla's budget
    n, d = law.optimal(flops)
    assert 6 * n * d == pytest.approx(flops)
    sizes = np.logspace(np.log10(n) - 1, np.log10(n) + 1, 2001)
    brute = sizes[np.argmin(law.loss(sizes, flops / (6 * sizes)))]
    assert brute == pytest.approx(n, rel=0.01)
    assert 15 < d / n < 25  # the ~20 tokens per parameter of the replication


def test_the_cli_fits_a_csv_and_sizes_a_budget_with_the_fit(tmp_path, capsys):
    N, D, L = noisy_points(PUBLISHED["hoffmann2022"])
    points = tmp_path / "points.csv"
    points.write_text("N,D,loss\n" + "".join(f"{n},{d},{loss}\n" for n, d, loss in zip(N, D, L)))
    out = tmp_path / "fit"
    argv = ["scaling", "fit", "--csv", str(points), "--out", str(out), "--grid", "coarse",
            "--bootstrap", "10"]  # fmt: skip
    assert main(argv) == 0
    record = json.loads((out / "fit.json").read_text())
    assert abs(record["law"]["alpha"] - 0.34) <= 0.02 and record["converged"]
    assert (out / "iso_loss.png").stat().st_size > 10_000
    assert main(["scaling", "optimal", "--flops", "1e21", "--law", str(out / "fit.json")]) == 0
    assert "tokens per parameter" in capsys.readouterr().out
    assert main(argv) == 1  # never writes over an earlier fit
    assert "not empty" in capsys.readouterr().err


def test_bad_points_are_one_line(tmp_path, capsys):
    few = tmp_path / "few.csv"
    few.write_text("N,D,loss\n1e7,1e9,3.0\n1e8,1e9,2.8\n1e9,1e10,2.5\n1e7,1e10,2.9\n1e8,1e11,2.6\n")
    header = tmp_path / "header.csv"
    header.write_text("params,tokens,loss\n1,2,3\n")
    for path, message in [(few, "cannot fit the 5 parameters"), (header, "columns N, D and loss"),
                          (tmp_path / "none.csv", "not found")]:  # fmt: skip
        assert main(["scaling", "fit", "--csv", str(path), "--grid", "coarse"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert main(["scaling", "optimal", "--flops", "-1"]) == 1
    assert "must be > 0" in capsys.readouterr().err


def test_a_sweep_trains_its_grid_once_and_writes_points(tmp_path, capsys):
    argv = ["scaling", "sweep", "--out", str(tmp_path / "sweep"), "--shapes", "1x32,2x32",
            "--steps", "2,4", "--model.block_size=32", "--train.micro_batch_size=4",
            "--train.eval_steps=2", "--train.precision=fp32"]  # fmt: skip
    assert main(argv) == 0
    points = (tmp_path / "sweep" / "points.csv").read_text().splitlines()
    assert points[0] == "N,D,loss,run" and len(points) == 5
    rows = [line.split(",") for line in points[1:]]
    assert [r[3] for r in rows] == ["L1_d32_s2", "L1_d32_s4", "L2_d32_s2", "L2_d32_s4"]
    assert int(rows[2][0]) > int(rows[0][0]) and int(rows[1][1]) == 2 * int(rows[0][1])
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: read again, nothing retrained
    assert "run " not in capsys.readouterr().out
    assert (tmp_path / "sweep" / "points.csv").read_text().splitlines() == points
