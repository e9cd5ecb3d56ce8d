"""Scaling laws: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "approach 3"),
fitted to (parameters N, training tokens D, loss L) points, and the compute-optimal split of
a FLOP budget C = 6 N D.

The fit follows the Chinchilla paper as Besiroglu et al. 2024 replicated it: minimise the
Huber loss (delta 1e-3) of log L against LSE(a - alpha log N, b - beta log D, e), with A = e^a,
B = e^b, E = e^e, by L-BFGS from every start of a grid, and keep the best. Besiroglu et al.
found the original fit stopped before converging; here each start runs until L-BFGS's
gradient and step tolerances say it has (or its iteration cap, reported). Bootstrap
resampling of the points gives confidence intervals.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from lmforge.common import LmforgeError

PARAMETERS = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        """Predicted loss at N parameters and D tokens (numbers or arrays)."""
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the loss at C = 6 N D: N = G (C/6)^(beta/(alpha+beta)),
        D = (C/6)^(alpha/(alpha+beta)) / G, G = (alpha A / (beta B))^(1/(alpha+beta))."""
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        return G * (flops / 6) ** (self.beta / s), (flops / 6) ** (self.alpha / s) / G


PUBLISHED = {
    "hoffmann2022": ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28),
    "besiroglu2024": ScalingLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658),
}
"""Chinchilla's constants (Hoffmann et al. 2022) and Epoch AI's refit of its data
(Besiroglu et al. 2024), for nats per token of their text; reference points, not our data."""

# Chinchilla's grid of starts (the replication's too): alpha, beta, e, a, b
GRID = (
    np.arange(0, 2.01, 0.5),
    np.arange(0, 2.01, 0.5),
    np.arange(-1, 1.01, 0.5),
    np.arange(0, 25.1, 5),
    np.arange(0, 25.1, 5),
)

COARSE_GRID = ([0, 1], [0, 1], [-1, 0, 1], [0, 10, 20], [0, 10, 20])


@dataclass
class Fit:
    law: ScalingLaw
    objective: float
    """Summed Huber loss at the best start."""
    converged: bool
    starts: int
    points: int


def huber_objective(x: np.ndarray, logN, logD, logL, delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log L against the law's log prediction, and its gradient. x = (a, b, e,
    alpha, beta)."""
    a, b, e, alpha, beta = x
    terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, n)
    r = logsumexp(terms, axis=0) - logL  # (n,)
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))  # d huber / d r
    w = softmax(terms, axis=0)  # d LSE / d term
    grad = np.array([
        (dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
        -(dr * w[0] * logN).sum(), -(dr * w[1] * logD).sum(),
    ])  # fmt: skip
    return float(value), grad


def check_points(N, D, L) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N, D, L = (np.asarray(v, dtype=np.float64).ravel() for v in (N, D, L))
    if not len(N) == len(D) == len(L):
        raise LmforgeError(f"N, D and loss have different lengths ({len(N)}, {len(D)}, {len(L)})")
    if len(N) <= len(PARAMETERS):
        raise LmforgeError(
            f"{len(N)} points cannot fit the {len(PARAMETERS)} parameters of L(N, D); "
            f"give at least {len(PARAMETERS) + 1}"
        )
    if not (np.all(N > 0) and np.all(D > 0) and np.all(L > 0)) or not np.all(np.isfinite(L)):
        raise LmforgeError("N, D and loss must all be positive finite numbers")
    return N, D, L


def _fit_from(x0: np.ndarray, logN, logD, logL, delta: float, max_iter: int):
    return minimize(
        huber_objective, x0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "ftol": 1e-15, "gtol": 1e-12},
    )  # fmt: skip


def fit(N, D, L, delta: float = 1e-3, grid=GRID, max_iter: int = 10_000) -> Fit:
    """The best fit over the grid of starts (see the module docstring). Chinchilla's grid
    has 4,500 starts, about a minute on one core; a coarser grid (`grid=COARSE_GRID`) finds
    the same optimum on well-spread points in seconds."""
    N, D, L = check_points(N, D, L)
    logs = (np.log(N), np.log(D), np.log(L))
    starts = [np.array([a, b, e, alpha, beta]) for alpha, beta, e, a, b in itertools.product(*grid)]
    results = [_fit_from(x0, *logs, delta, max_iter) for x0 in starts]
    best = min(results, key=lambda r: r.fun)
    a, b, e, alpha, beta = best.x
    law = ScalingLaw(
        E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha), beta=float(beta)
    )
    return Fit(law, float(best.fun), bool(best.success), len(starts), len(N))


def bootstrap(
    N, D, L, law: ScalingLaw, samples: int = 100, seed: int = 0, delta: float = 1e-3
) -> dict[str, tuple[float, float]]:
    """95% intervals of each constant over fits to resampled points (drawn with replacement),
    each started from the full fit rather than the whole grid."""
    N, D, L = check_points(N, D, L)
    rng = np.random.default_rng(seed)
    grid = ([law.alpha], [law.beta], [math.log(law.E)], [math.log(law.A)], [math.log(law.B)])
    draws = []
    for _ in range(samples):
        pick = rng.integers(0, len(N), len(N))
        if len(np.unique(pick)) <= len(PARAMETERS):
            continue
        draws.append(asdict(fit(N[pick], D[pick], L[pick], delta, grid).law))
    return {
        k: (float(np.percentile([d[k] for d in draws], 2.5)),
            float(np.percentile([d[k] for d in draws], 97.5)))
        for k in PARAMETERS
    }  # fmt: skip


def read_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points from a CSV with columns N, D, loss (a header row naming them)."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"scaling points file not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"N", "D", "loss"} <= set(rows[0]):
        raise LmforgeError(f"{path} needs a header with the columns N, D and loss")
    try:
        return tuple(np.array([float(r[k]) for r in rows]) for k in ("N", "D", "loss"))
    except (TypeError, ValueError):
        raise LmforgeError(f"{path}: every N, D and loss must be a number") from None


def plot(path: Path, law: ScalingLaw, N=None, D=None, title: str = "") -> None:
    """Iso-loss contours of the law over (N, D), the points it was fitted to, and the
    efficient frontier (the compute-optimal N and D as the FLOP budget grows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo_n, hi_n = (np.log10(N).min() - 0.5, np.log10(N).max() + 0.5) if N is not None else (6, 11)
    lo_d, hi_d = (np.log10(D).min() - 0.5, np.log10(D).max() + 0.5) if D is not None else (8, 13)
    gn, gd = np.meshgrid(np.logspace(lo_n, hi_n, 200), np.logspace(lo_d, hi_d, 200))
    fig, ax = plt.subplots(figsize=(7, 5))
    contours = ax.contour(gn, gd, law.loss(gn, gd), levels=12, cmap="viridis")
    ax.clabel(contours, fontsize=7, fmt="%.2f")
    budgets = np.logspace(np.log10(6 * gn.min() * gd.min()), np.log10(6 * gn.max() * gd.max()), 50)
    frontier = np.array([law.optimal(c) for c in budgets])
    ax.plot(frontier[:, 0], frontier[:, 1], "r-", label="efficient frontier (6ND = C)")
    if N is not None:
        ax.scatter(N, D, c="k", s=12, label="fitted points")
    ax.set(xscale="log", yscale="log", xlim=(gn.min(), gn.max()), ylim=(gd.min(), gd.max()),
           xlabel="parameters N", ylabel="training tokens D", title=title or "L(N, D)")  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- sweeps

SWEEP_SHAPES = ((2, 64), (3, 96), (4, 128), (4, 192))
"""(n_layer, d_model) of the default sweep's models (head size 32), ~0.1M to 1.8M parameters."""
SWEEP_STEPS = (100, 200, 400)
"""Optimizer steps of the default sweep's runs (x micro_batch_size x block_size tokens)."""


def sweep_points(
    out: str | Path,
    shapes=SWEEP_SHAPES,
    steps=SWEEP_STEPS,
    layers: tuple = (),
    overrides: list[str] = (),
) -> Path:
    """Train every (shape, steps) of the grid as a normal run under `out` (config `layers` +
    `overrides` first, e.g. a recipe; by default the bundled Shakespeare), each to its final
    evaluation, and write out/points.csv (N = non-embedding parameters, D = tokens seen, loss =
    the final validation loss). A finished run is read, not rerun; one stopped midway is
    resumed from its last checkpoint, so an interrupted sweep continues where it stopped."""
    import torch

    from lmforge.config import build_config
    from lmforge.model.gpt import GPT
    from lmforge.recipes.pretrain import train
    from lmforge.train.checkpoint import latest_checkpoint

    out = Path(out)
    rows = []
    for (n_layer, d_model), max_steps in itertools.product(shapes, steps):
        name = f"L{n_layer}_d{d_model}_s{max_steps}"
        run = out / name
        heads = max(1, d_model // 32)
        cfg = build_config(*layers, {
            "model": {"n_layer": n_layer, "d_model": d_model, "n_head": heads, "n_kv_head": heads},
            "train": {"max_steps": max_steps, "warmup_steps": max(1, max_steps // 10),
                      "eval_interval": max_steps, "ckpt_interval": max(1, max_steps // 4)},
            "run": {"dir": str(out), "name": name, "tensorboard": False, "sample_tokens": 0},
        }, overrides=list(overrides))  # fmt: skip
        final = _final_eval(run, max_steps)
        if final is None:
            if run.exists() and any(run.iterdir()):
                if latest_checkpoint(run) is None:
                    raise LmforgeError(
                        f"{run} holds an unfinished run without a checkpoint; delete it to rerun"
                    )
                train(cfg, resume=run)
            else:
                train(cfg)
            final = _final_eval(run, max_steps)
        with torch.device("meta"):  # the saved config has the tokenizer's vocabulary size
            n = GPT(build_config(run / "config.yaml").model).num_params(non_embedding=True)
        rows.append((n, final["tokens"], final["val_loss"], name))
    path = out / "points.csv"
    path.write_text(
        "N,D,loss,run\n" + "".join(f"{n},{d},{loss},{name}\n" for n, d, loss, name in rows),
        encoding="utf-8",
    )
    return path


def _final_eval(run: Path, max_steps: int) -> dict | None:
    """The run's evaluation row at max_steps, if it got there."""
    import json

    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    done = [r for r in rows if r.get("step") == max_steps and "val_loss" in r]
    return done[-1] if done else None
