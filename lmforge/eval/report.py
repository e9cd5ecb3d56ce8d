"""Reports as files a person reads: `write_eval_report` (what `lmforge eval` measured, as
report.json + report.md + plots) and `write_run_report` (a training run's metrics.jsonl as
report.md + plots, `lmforge report`).

Plots are PNGs with fixed names beside report.md, linked by relative paths, so a report folder
can be moved or archived whole. Figures are built with matplotlib's object API (`Figure`, whose
PNGs the Agg renderer draws) rather than pyplot: no global backend switch in the importing
process (a notebook keeps its own), and no figure registry, so nothing stays open after a save.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from lmforge.common import LmforgeError
from lmforge.fileio import atomic_open, atomic_write_text, read_utf8_text, write_json

RUN_REPORT_MARK = "<!-- lmforge run report -->"
"""First line of a run report's report.md: how `write_run_report` knows a folder is its own."""

CELL_CHARS = 200
"""Longest text shown in one markdown table cell (samples, settings); the rest is cut."""

RUN_CONFIG_KEYS = (
    "model.preset", "model.n_layer", "model.n_head", "model.d_model", "model.block_size",
    "model.vocab_size", "data.path", "data.tokenizer", "train.max_steps",
    "train.micro_batch_size", "train.grad_accum_steps", "train.lr", "train.schedule",
    "train.precision", "train.seed",
)  # fmt: skip
"""Config keys the run report's summary table shows (the whole config.yaml follows it)."""


# ---------------------------------------------------------------- markdown pieces


def fmt(value: Any) -> str:
    """A number as a short, readable string (4 significant digits); anything else as text."""
    if not isinstance(value, float) or not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def cell(value: Any) -> str:
    """`value` as one markdown table cell: `|` escaped, line breaks as <br>, HTML made inert
    (model output can hold `<script>` or `<br>` of its own), cut to CELL_CHARS."""
    text = fmt(value)
    if len(text) > CELL_CHARS:
        text = text[:CELL_CHARS] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def table(header: list[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def code_block(text: str, lang: str = "") -> list[str]:
    """A fenced block whose fence is longer than any backtick run inside `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text.rstrip("\n"), fence, ""]


def image(name: str, alt: str) -> list[str]:
    return [f"![{alt}]({name})", ""]


def slug(name: str) -> str:
    """`name` made safe as part of a file name (task and metric names come from files)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name)).strip("_") or "x"


def compact(value: Any) -> str:
    """One-line JSON, cut to CELL_CHARS: how unknown details are printed."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= CELL_CHARS else text[:CELL_CHARS] + "…"


# ---------------------------------------------------------------- plots


def save_figure(fig: Figure, path: Path) -> None:
    """PNG, written atomically (a reader never sees half an image)."""
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)


def bin_bars(bins: list[dict]) -> tuple[list[float], list[float]]:
    """(left edges, widths) of histogram bins given as {"lower", "upper", ...} dicts."""
    lefts = [b.get("lower", 0.0) for b in bins]
    return lefts, [b.get("upper", 0.0) - left for b, left in zip(bins, lefts)]


def plot_reliability(path: Path, bins: list[dict], title: str) -> None:
    """Reliability diagram: per-bin accuracy bars against the diagonal (perfect calibration),
    the bins' mean confidence as points, and the bin counts in a small panel below."""
    fig = Figure(figsize=(5, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    used = [b for b in bins if b.get("count", 0) > 0]  # an empty bin's 0 accuracy means nothing
    lefts, widths = bin_bars(used)
    accuracy = [b.get("accuracy", 0.0) for b in used]
    top.bar(lefts, accuracy, width=widths, align="edge", edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    centers = [left + width / 2 for left, width in zip(lefts, widths)]
    confidence = [b.get("confidence", 0.0) for b in used]
    top.plot(centers, confidence, "o", color="tab:red", markersize=4, label="mean confidence")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    top.legend(loc="upper left", fontsize="small")
    lefts, widths = bin_bars(bins)
    bottom.bar(lefts, [b.get("count", 0) for b in bins], width=widths, align="edge", color="gray")
    bottom.set(xlabel="confidence", ylabel="count")
    save_figure(fig, path)


def plot_stereo(path: Path, per_type: dict[str, dict], title: str) -> None:
    """Horizontal bars of the % of pairs where the stereotyped sentence is preferred, per bias
    type, with the unbiased 50% marked."""
    names = list(per_type)
    values = [per_type[n].get("stereo_pct", 0.0) for n in names]
    fig = Figure(figsize=(6, 1.2 + 0.35 * len(names)))
    ax = fig.subplots()
    bars = ax.barh(names, values, color="tab:purple")
    pairs = [per_type[n].get("pairs", "?") for n in names]
    ax.bar_label(bars, [f" {v:.1f}% ({p} pairs)" for v, p in zip(values, pairs)], fontsize=8)
    ax.axvline(50, color="black", linestyle="--", linewidth=1)
    ax.invert_yaxis()  # first type on top, as in the table
    ax.set(xlim=(0, max(100, *values) * 1.25), xlabel="stereotype preferred (%)", title=title)
    ax.set_xticks(range(0, 101, 10))  # the headroom on the right is for the labels only
    save_figure(fig, path)


def plot_lines(path: Path, series: dict[str, tuple[list, list]], ylabel: str, title: str) -> None:
    """One line per named (steps, values) series against the training step."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for label, (steps, values) in series.items():
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    save_figure(fig, path)


# ---------------------------------------------------------------- eval report


def write_eval_report(out_dir: Path, report: dict) -> None:
    """report.json (the dict as given), report.md and its plots, into `out_dir` (created).

    Tasks and details the renderer does not know are listed compactly, never an error, so a new
    task shows up in reports before anyone writes a plot for it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", "\n".join(eval_markdown(out_dir, report)))


def eval_markdown(out_dir: Path, report: dict) -> list[str]:
    """report.md's lines; draws the plots into `out_dir` on the way."""
    tasks, details = as_dict(report.get("tasks")), as_dict(report.get("details"))
    lines = ["# Evaluation report", ""]
    lines += checkpoint_lines(as_dict(report.get("checkpoint")), report.get("created"))
    lines += settings_lines(as_dict(report.get("settings")))
    lines += ["## Results", ""]
    lines += table(
        ["task", "metric", "value"],
        ([name, key, value] for name in tasks for key, value in as_dict(tasks[name]).items()),
    )
    for name in [*tasks, *(n for n in details if n not in tasks)]:
        lines += task_section(out_dir, name, as_dict(tasks.get(name)), as_dict(details.get(name)))
    return lines


def as_dict(value: Any) -> dict:
    """`value` if it is a dict, else {}: a report section that is missing or malformed
    renders as empty instead of failing the whole report."""
    return value if isinstance(value, dict) else {}


def checkpoint_lines(checkpoint: dict, created: str | None) -> list[str]:
    lines = [
        f"- checkpoint: `{checkpoint.get('path', '?')}`",
        f"- sha256: `{checkpoint.get('sha256', '?')}`",
    ]
    if created:
        lines.append(f"- created: {created}")
    model = as_dict(checkpoint.get("config"))
    if model:
        lines.append("- model: " + ", ".join(f"{k}={fmt(v)}" for k, v in model.items()))
    return lines + [""]


def settings_lines(settings: dict) -> list[str]:
    """The settings table, then the data files each task read with their hashes."""
    files = as_dict(settings.get("task_files"))
    rows = [
        [key, compact(value) if isinstance(value, (dict, list)) else value]
        for key, value in settings.items()
        if key != "task_files"
    ]
    lines = ["## Settings", "", *table(["setting", "value"], rows)]
    if files:
        lines += table(["data file", "sha256"], files.items())
    return lines


def task_section(out_dir: Path, name: str, metrics: dict, details: dict) -> list[str]:
    """`## name`: a list of its metrics and one-line details (known ones in words, others as
    compact JSON), then its tables and plots."""
    bullets = ["- metrics: " + ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items())]
    blocks = []
    for key, value in details.items():
        if key == "reliability" and isinstance(value, dict):
            blocks += reliability_lines(out_dir, name, metrics, value)
        elif key == "per_type" and isinstance(value, dict):
            blocks += per_type_lines(out_dir, name, value)
        elif key == "samples" and isinstance(value, list):
            blocks += samples_lines(value)
        elif key == "truncated" and isinstance(value, dict):
            bullets.append(truncated_line(value))
        else:
            bullets.append(f"- {key}: `{compact(value)}`")
    return [f"## {name}", "", *(bullets if metrics else bullets[1:]), "", *blocks]


def reliability_lines(out_dir: Path, task: str, metrics: dict, reliability: dict) -> list[str]:
    """One reliability diagram per confidence source (`mc`, `next_token`, ...); the title
    carries its ECE from the task's metrics (`<source>_ece`) when there is one."""
    lines = []
    for source, bins in reliability.items():
        if not isinstance(bins, list) or not bins:
            continue
        bins = [b for b in bins if isinstance(b, dict)]
        ece = metrics.get(f"{source}_ece")
        title = f"{task}: {source}" + (f" (ECE {fmt(ece)})" if ece is not None else "")
        file = f"{slug(task)}_reliability_{slug(source)}.png"
        plot_reliability(out_dir / file, bins, title)
        lines += [f"### Reliability: {source}", "", *image(file, f"{source} reliability diagram")]
    return lines


def per_type_lines(out_dir: Path, task: str, per_type: dict) -> list[str]:
    per_type = {k: v for k, v in per_type.items() if isinstance(v, dict)}
    if not per_type:
        return []
    file = f"{slug(task)}_per_type.png"
    plot_stereo(out_dir / file, per_type, f"{task}: stereotype preference per type")
    rows = (
        [kind, v.get("stereo_pct", ""), v.get("mean_diff", ""), v.get("pairs", "")]
        for kind, v in per_type.items()
    )
    return [
        "### Per type",
        "",
        *image(file, f"{task} per type"),
        *table(["type", "stereo %", "mean diff", "pairs"], rows),
    ]


def truncated_line(truncated: dict) -> str:
    requests, tokens = truncated.get("requests", 0), truncated.get("tokens", 0)
    if not requests and not tokens:
        return "- truncated: none"
    return (
        f"- truncated: {requests} requests were longer than the context window; "
        f"{tokens} tokens were cut from their left"
    )


def samples_lines(samples: list) -> list[str]:
    rows = [s for s in samples if isinstance(s, dict)]
    columns = list(dict.fromkeys(key for s in rows for key in s))
    if not columns:
        return []
    return ["### Samples", "", *table(columns, ([s.get(c, "") for c in columns] for s in rows))]


# ---------------------------------------------------------------- run report


def write_run_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """report.md and plots for a training run (from its metrics.jsonl and config.yaml) into
    `out_dir` (default RUN_DIR/report); returns the report.md path.

    `out_dir` must be new, empty, or a previous run report's folder: only the report's own
    files are ever written, so pointing --out at the wrong folder is an error, not a loss."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    train = by_step(r for r in rows if "loss" in r)
    evals = by_step(r for r in rows if any(k.startswith("val_") for k in r))
    lines = [RUN_REPORT_MARK, f"# Run report: {run_dir.name}", "", f"Run folder: `{run_dir}`", ""]
    lines += run_summary_lines(train, evals)
    lines += run_config_lines(run_dir / "config.yaml")
    lines += run_plot_lines(out, train, evals)
    if evals:
        columns = ["step", "tokens", *val_keys(evals)]
        lines += ["## Evaluations", ""]
        lines += table(columns, ([r.get(c, "") for c in columns] for r in evals))
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's rows; a one-line LmforgeError for a missing folder or file, an empty
    file, or a line that is not a JSON object with a step."""
    if not run_dir.is_dir():
        raise LmforgeError(f"run folder {run_dir} does not exist")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LmforgeError(f"{path} not found: is {run_dir} a run folder (`lmforge train` output)?")
    rows = []
    for number, line in enumerate(read_utf8_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path} line {number} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise LmforgeError(f"{path} line {number} is not a metrics row (an object with a step)")
        rows.append(row)
    if not rows:
        raise LmforgeError(f"{path} is empty: the run has logged nothing yet")
    return rows


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    md = out / "report.md"
    if not md.is_file() or not read_utf8_text(md).startswith(RUN_REPORT_MARK):
        raise LmforgeError(
            f"--out {out} holds other files and no earlier run report; give a new or empty folder"
        )


def by_step(rows: Iterable[dict]) -> list[dict]:
    """Rows sorted by step, the last one kept for a repeated step: a resumed run logs again
    the steps after its checkpoint, and the later rows are the run that went on."""
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def val_keys(evals: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in evals for k in r if k.startswith("val_")))


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of the rows that have a number under `key`."""
    picked = [r for r in rows if isinstance(r.get(key), (int, float))]
    return [r["step"] for r in picked], [r[key] for r in picked]


def run_summary_lines(train: list[dict], evals: list[dict]) -> list[str]:
    rows = [["last step", max(r["step"] for r in train + evals)]]
    tokens = [r["tokens"] for r in train + evals if isinstance(r.get("tokens"), int)]
    if tokens:
        rows.append(["tokens seen", max(tokens)])
    if train:
        rows.append(["last train loss", train[-1]["loss"]])
    speeds = series(train, "tokens_per_s")[1]
    if speeds:
        rows.append(["median tokens/s", statistics.median(speeds)])
    vals = [r for r in evals if isinstance(r.get("val_loss"), (int, float))]
    if vals:
        best = min(vals, key=lambda r: r["val_loss"])
        rows.append(["last val_loss", vals[-1]["val_loss"]])
        rows.append(["best val_loss", f"{fmt(best['val_loss'])} (step {best['step']})"])
    return ["## Summary", "", *table(["quantity", "value"], rows)]


def run_config_lines(path: Path) -> list[str]:
    """The canonical keys as a table, then the whole config.yaml folded away."""
    if not path.is_file():
        return ["## Config", "", f"(no {path.name} in the run folder)", ""]
    text = read_utf8_text(path)
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        config = None
    rows = []
    for key in RUN_CONFIG_KEYS:
        section, _, field = key.partition(".")
        values = as_dict(as_dict(config).get(section))
        if field in values:
            rows.append([key, values[field]])
    lines = ["## Config", "", *(table(["key", "value"], rows) if rows else [])]
    lines += ["<details><summary>config.yaml</summary>", "", *code_block(text, "yaml")]
    return lines + ["</details>", ""]


# train-row columns that are bookkeeping, not curves of their own
_NOT_PLOTTED = {"step", "tokens", "elapsed_s", "mfu", "accum", "loss_scale"}


def run_plot_lines(out: Path, train: list[dict], evals: list[dict]) -> list[str]:
    """Draws loss, lr, grad norm, tokens/s, then every other metric the steps log (e.g. a
    classifier's accuracy, PPO's reward, KL, entropy and clip fraction) with its held-out
    val_* twin on the same axes, then the val_* metrics left; a plot with no data is left
    out rather than drawn empty."""
    plots = {
        "loss": (
            "Loss",
            "loss",
            {"train": series(train, "loss"), "val": series(evals, "val_loss")},
        ),
        "lr": ("Learning rate", "lr", {"lr": series(train, "lr")}),
        "grad_norm": ("Gradient norm", "grad norm", {"grad_norm": series(train, "grad_norm")}),
        "tokens_per_s": ("Throughput", "tokens/s", {"tokens/s": series(train, "tokens_per_s")}),
    }
    for key in dict.fromkeys(k for r in train for k in r):
        if slug(key) not in plots and key not in _NOT_PLOTTED and series(train, key)[0]:
            curves = {"train": series(train, key), "val": series(evals, f"val_{key}")}
            plots[slug(key)] = (key, key, curves)
    for key in val_keys(evals):
        if key != "val_loss" and slug(key[4:]) not in plots:
            plots[slug(key)] = (key, key, {key: series(evals, key)})
    lines = ["## Plots", ""]
    for name, (title, ylabel, lines_data) in plots.items():
        drawn = {label: s for label, s in lines_data.items() if s[0]}
        if drawn:
            plot_lines(out / f"{name}.png", drawn, ylabel, title)
            lines += [f"### {title}", "", *image(f"{name}.png", title)]
    return lines
