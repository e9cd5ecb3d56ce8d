"""Time to quality on this CPU: nanoGPT's CPU recipe stretched to 5,600 iterations, then
lmforge's default job (`lmforge train` with no arguments), in turn, in one run.

nanoGPT is not part of lmforge: fetch it yourself (e.g. `git clone
https://github.com/karpathy/nanoGPT .peers/nanoGPT`) and pass its folder.

    python benchmarks/speedrun_cpu.py --nanogpt .peers/nanoGPT [--lmforge-args "..."]
    python benchmarks/speedrun_cpu.py --nanogpt-result 1.6889,132.9 --lmforge-args "..."

The second form (for a recipe search) skips nanoGPT and times lmforge against a target and a
training time that an earlier full run printed; only a full run's ratio is a result.

Both evaluate every --eval-interval (50) steps, so that the crossing is timed rather than
rounded up to the next evaluation. The target is nanoGPT's final validation loss in this run;
for each program the script prints the first evaluation at or below it: its step, its wall
time from process start, and its training time (wall time less the evaluation pauses, which
eval every 50 steps would otherwise count against nanoGPT most: it evaluates both splits).
The ratio is lmforge's training time to the target over nanoGPT's. Losses are in nats per
character, whatever the tokenizer (lmforge's from its bits per byte).
"""

from __future__ import annotations

import argparse
import bisect
import math
import re
import statistics
import sys
import tempfile
from pathlib import Path

from train_vs_nanogpt import RECIPE, prepare_nanogpt_data, timed_lines

from lmforge.cli.train import default_job_overrides

NANO = (r"^iter (\d+): loss", r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", 1.0)
OURS = (r"^step (\d+) \| loss", r"^step (\d+) \| val_loss [\d.]+ \| val_bpb ([\d.]+)", math.log(2))
"""(iteration line, evaluation line, factor to nats per character): nanoGPT's loss is per
character already; lmforge's bits per byte are read instead of its per-token loss, so that a
tokenizer other than characters compares (Shakespeare is ASCII: a byte is a character)."""


def evaluations(lines, iter_re: str, val_re: str, to_nats_per_char: float) -> list[dict]:
    """Each evaluation's step, val loss (nats per character), wall time and training time
    (wall time less the evaluation pauses before it: the gap around each eval beyond one
    typical iteration)."""
    iter_times, evals = [], []
    for t, line in lines:
        if m := re.search(val_re, line):
            val = float(m.group(2)) * to_nats_per_char
            evals.append({"step": int(m.group(1)), "val": val, "wall_s": t})
        elif re.search(iter_re, line):
            iter_times.append(t)
    gaps = [b - a for a, b in zip(iter_times, iter_times[1:])]
    typical = statistics.median(gaps) if gaps else 0.0
    paused = 0.0  # evaluation pauses so far
    for e in evals:
        after = bisect.bisect_left(iter_times, e["wall_s"])  # first iteration after it
        last_before = iter_times[after - 1] if after else 0.0
        e["train_s"] = last_before - paused
        first_after = iter_times[after] if after < len(iter_times) else e["wall_s"]
        paused += max(0.0, first_after - last_before - typical)
    return evals


def crossing(evals: list[dict], target: float) -> dict | None:
    return next((e for e in evals if e["val"] <= target), None)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT")
    p.add_argument(
        "--nanogpt-result", default=None, help="VAL,TRAIN_S of an earlier run: skip nanoGPT"
    )
    p.add_argument("--iters", type=int, default=5600, help="nanoGPT's stretched recipe")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--lmforge-args", default="", help="overrides of the default job")
    args = p.parse_args()
    if (args.nanogpt is None) == (args.nanogpt_result is None):
        p.error("give --nanogpt (run it) or --nanogpt-result (an earlier run's), not both")
    r = RECIPE
    nano_cmd = [
        sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu",
        "--compile=False", f"--block_size={r['block_size']}", f"--batch_size={r['batch_size']}",
        f"--n_layer={r['n_layer']}", f"--n_head={r['n_head']}", f"--n_embd={r['n_embd']}",
        "--dropout=0.0", f"--max_iters={args.iters}", f"--lr_decay_iters={args.iters}",
        f"--eval_iters={args.eval_iters}", "--log_interval=1",
        f"--eval_interval={args.eval_interval}", f"--out_dir={tempfile.mkdtemp()}",
    ]  # fmt: skip
    # the default job is `lmforge train` with no arguments (5 minutes, late dropout): its
    # settings, then the ones that make it report every step and evaluate as often as nanoGPT
    ours_cmd = [
        sys.executable, "-m", "lmforge", "train", *default_job_overrides(),
        f"--train.eval_interval={args.eval_interval}", "--train.log_interval=1",
        "--run.sample_tokens=0", "--run.tensorboard=false", f"--run.dir={tempfile.mkdtemp()}",
        *args.lmforge_args.split(),
    ]  # fmt: skip
    if args.nanogpt:
        print(f"running nanoGPT ({args.iters} iterations) ...", flush=True)
        prepare_nanogpt_data(args.nanogpt)
        nano = evaluations(timed_lines(nano_cmd, args.nanogpt), *NANO)
    else:  # an earlier run's crossing stands in for nanoGPT's evaluations
        val, train_s = map(float, args.nanogpt_result.split(","))
        nano = [{"step": args.iters, "val": val, "wall_s": float("nan"), "train_s": train_s}]
    print("running lmforge's default job ...", flush=True)
    ours = evaluations(timed_lines(ours_cmd, Path.cwd()), *OURS)
    target = nano[-1]["val"]
    print(f"\ntarget: nanoGPT's final val loss {target:.4f} (eval every {args.eval_interval})")
    print("| program | step at target | wall s | training s | final val | final wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    hits = {}
    for name, evals in (("nanoGPT stretched", nano), ("lmforge default job", ours)):
        hit = hits[name] = crossing(evals, target)
        last = evals[-1]
        at = f"{hit['step']} | {hit['wall_s']:.1f} | {hit['train_s']:.1f}" if hit else "- | - | -"
        print(f"| {name} | {at} | {last['val']:.4f} | {last['wall_s']:.1f} |")
    nano_hit, ours_hit = hits.values()
    if ours_hit:
        ratio = ours_hit["train_s"] / nano_hit["train_s"]
        print(f"\nlmforge / nanoGPT training time to {target:.4f}: {ratio:.2f} (goal <= 0.50)")
    else:
        print(f"\nlmforge did not reach {target:.4f}")


if __name__ == "__main__":
    main()
