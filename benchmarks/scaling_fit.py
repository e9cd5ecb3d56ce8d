"""The scaling-law fit on points generated from the published constants: recovered constants,
bootstrap intervals and time, for Chinchilla's grid of 4,500 starts and the 108-start coarse
grid, side by side (the points are those of tests/test_scaling.py: N 1e7-1e10, D 1e9-1e12,
6 x 6 log-spaced, 0.5% log-normal noise, seed 0).

    python benchmarks/scaling_fit.py [--bootstrap 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lmforge.research.scaling import COARSE_GRID, GRID, PUBLISHED, bootstrap, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", type=int, default=50)
    args = parser.parse_args()
    N, D = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
    N, D = N.ravel(), D.ravel()
    print("| constants | grid | starts | s | E | A | B | alpha | beta | objective |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, truth in PUBLISHED.items():
        L = truth.loss(N, D) * np.exp(np.random.default_rng(0).normal(0, 0.005, N.shape))
        print(f"| {name} (truth) | | | | {truth.E} | {truth.A} | {truth.B} | {truth.alpha} | "
              f"{truth.beta} | |")  # fmt: skip
        for grid_name, grid in (("chinchilla", GRID), ("coarse", COARSE_GRID)):
            t0 = time.perf_counter()
            result = fit(N, D, L, grid=grid)
            law = result.law
            print(f"| {name} | {grid_name} | {result.starts} | {time.perf_counter() - t0:.1f} | "
                  f"{law.E:.4f} | {law.A:.1f} | {law.B:.1f} | {law.alpha:.4f} | {law.beta:.4f} | "
                  f"{result.objective:.3g}{'' if result.converged else ' (not converged)'} |",
                  flush=True)  # fmt: skip
        t0 = time.perf_counter()
        ci = bootstrap(N, D, L, law, samples=args.bootstrap)
        spans = ", ".join(f"{k} {lo:.4g}-{hi:.4g}" for k, (lo, hi) in ci.items())
        print(f"\n{name}: bootstrap 95% intervals ({args.bootstrap} resamples, "
              f"{time.perf_counter() - t0:.1f} s): {spans}\n")  # fmt: skip


if __name__ == "__main__":
    main()
