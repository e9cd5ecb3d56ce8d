"""The default job (`lmforge train` with no arguments) at each precision, one after the other in
one run: validation loss over time, when it first reaches --target, tokens/s, and the loss
gap between the precisions at the evaluation steps both reached.

    python benchmarks/default_job.py                      # fp32 and auto, 5 minutes each
    python benchmarks/default_job.py --precisions auto --minutes 1

Each run is the default job's config with only train.precision (and the time limit) set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.cli.train import default_job_overrides
from lmforge.hardware import cpu_bf16_speedup, cpu_has_native_bf16, pick_precision


def run(precision: str, minutes: float, run_dir: Path) -> list[dict]:
    cmd = [
        sys.executable, "-m", "lmforge", "train", *default_job_overrides(),
        f"--train.precision={precision}", f"--train.max_minutes={minutes}",
        f"--run.dir={run_dir}", f"--run.name={precision}", "--run.sample_tokens=0",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    lines = (run_dir / precision / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--precisions", default="fp32,auto")
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--target", type=float, default=1.60)
    args = p.parse_args()
    import torch

    auto = pick_precision("auto", torch.device("cpu"))
    print(
        f"CPU native bf16: {cpu_has_native_bf16()}, bf16/fp32 matmul speed-up "
        f"{cpu_bf16_speedup():.2f}x -> precision=auto picks {auto}"
    )
    print(f"{'precision':10} {'steps':>6} {'tokens/s':>9} {'first val<=' + str(args.target):>18} "
          f"{'final val':>10} {'at s':>7}")  # fmt: skip
    val_at: dict[str, dict[int, float]] = {}  # precision -> step -> val loss
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            rows = run(precision, args.minutes, Path(tmp))
            train = [r for r in rows if "loss" in r]
            evals = [r for r in rows if "val_loss" in r]
            val_at[precision] = {r["step"]: r["val_loss"] for r in evals}
            hit = next((r for r in evals if r["val_loss"] <= args.target), None)
            reached = f"{hit['elapsed_s']:.0f} s (step {hit['step']})" if hit else "not reached"
            tps = statistics.median(r["tokens_per_s"] for r in train)
            last = evals[-1]
            print(
                f"{precision:10} {train[-1]['step']:6d} {tps:9.0f} {reached:>18} "
                f"{last['val_loss']:10.4f} {last['elapsed_s']:7.0f}"
            )
    print_equal_steps(val_at)


def print_equal_steps(val_at: dict[str, dict[int, float]]) -> None:
    """Validation loss of every precision at the evaluation steps all of them reached, and
    each one's gap to the first (fp32 by default) there: precision's cost in loss, apart
    from its speed."""
    names = list(val_at)
    steps = sorted(set.intersection(*(set(v) for v in val_at.values())) - {0})
    if len(names) < 2 or not steps:
        return
    print(f"\nval loss at equal steps (gap to {names[0]}):")
    print(f"{'step':>6} " + " ".join(f"{n:>16}" for n in names))
    for step in steps:
        base = val_at[names[0]][step]
        cells = [f"{val_at[n][step]:.4f} ({val_at[n][step] - base:+.4f})" for n in names]
        print(f"{step:6d} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
