"""What a sweep leaves behind: the trials as a table (printed, results.md, results.csv), plots
of the search (history, learning curves, parameter importances) and the best trial as a
ready-to-run `lmforge train` command."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path
from typing import Any

from lmforge.research.search_space import Param, override
from lmforge.research.sweep import is_unfinished

ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}


def table(study, params: list[Param]) -> list[dict[str, Any]]:
    """One row per trial with an outcome: completed ones by value (best first), then pruned,
    then failed, each by number. Pruned trials show the step they stopped at and no value:
    an early loss is not comparable with a final one."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    retries = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    trials = [t for t in trials if t.state.name in ORDER]
    for t in sorted(trials, key=lambda t: (ORDER[t.state.name], t.value or 0.0, t.number)):
        steps = max(t.intermediate_values, default=None)
        note = t.user_attrs.get("error", "")
        if is_unfinished(t):
            again = retries.get(t.number)
            note = "unfinished" + (f"; run again as trial {again}" if again is not None else "")
        rows.append({
            "trial": t.number, "value": t.value if t.state.name == "COMPLETE" else None, "state": t.state.name.lower(), "steps": steps,
            **{p.key: t.params.get(p.key) for p in params},
            "run": t.user_attrs.get("run", ""), "note": note,
        })  # fmt: skip
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value).replace("|", "/")


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no finished trials\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def train_command(study, config: str | None, overrides: list[str]) -> str | None:
    """`lmforge train ...` reproducing the best completed trial, or None without one."""
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return None
    best = [override(k, v) for k, v in study.best_trial.params.items()]
    words = ["lmforge", "train", *(["--config", config] if config else []), *overrides, *best]
    return " ".join(shlex.quote(w) for w in words)


def write(study, params: list[Param], out: Path, config: str | None, overrides: list[str]) -> str:
    """results.md, results.csv and the plots in `out`; returns the markdown table."""
    rows = table(study, params)
    text = markdown(rows)
    command = train_command(study, config, overrides)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    plots = plot(study, out)
    (out / "results.md").write_text(
        f"# Sweep: {study.study_name}\n\nValue: final validation loss (lower is better).\n\n"
        + text
        + (f"\nBest trial as a run:\n\n```\n{command}\n```\n" if command else "")
        + "".join(f"\n![{p.stem}]({p.name})\n" for p in plots),
        encoding="utf-8",
    )
    return text


def plot(study, out: Path) -> list[Path]:
    """history.png (each completed trial's value and the best so far), curves.png (every
    trial's validation loss by step; pruned ones dashed) and importance.png (optuna's
    importance of each parameter, once two completed trials differ). Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    if done:
        numbers, values = [t.number for t in done], [t.value for t in done]
        best = [min(values[: i + 1]) for i in range(len(values))]
        ax.scatter(numbers, values, s=18, label="trial")
        ax.step(numbers, best, where="post", color="C3", label="best so far")
        ax.legend()
    ax.set(xlabel="trial", ylabel="final val_loss", title="optimisation history")
    paths.append(_save(fig, out / "history.png"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        if t.intermediate_values and t.state.name in ("COMPLETE", "PRUNED"):
            steps = sorted(t.intermediate_values)
            values = [t.intermediate_values[s] for s in steps]
            if t.state.name == "COMPLETE":
                ax.plot(steps, values, "-", lw=1, alpha=0.8)
            else:  # dashed, with an x where it stopped (one evaluation draws no line)
                ax.plot(steps, values, "--x", lw=1, alpha=0.8, markevery=[-1])
    ax.set(
        xlabel="step", ylabel="val_loss", title="learning curves (pruned: dashed, x where stopped)"
    )
    paths.append(_save(fig, out / "curves.png"))
    importances = _importances(study) if len(done) >= 2 else {}
    if importances:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.4 * len(importances)))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (share of the value's variation)", title="parameters")
        paths.append(_save(fig, out / "importance.png"))
    return paths


def _importances(study) -> dict[str, float]:
    """optuna's parameter importances, or {} where the trials cannot tell (all alike)."""
    import optuna

    try:
        return optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return {}


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
