"""Training speed against nanoGPT on the identical configuration, in one run on this machine.

nanoGPT is not part of lmforge: fetch it yourself (e.g. `git clone
https://github.com/karpathy/nanoGPT .peers/nanoGPT`) and pass its folder. Both programs run
in turn as subprocesses on the bundled Shakespeare with nanoGPT's CPU recipe; every output
line is timestamped on arrival, so both are timed the same way from process start:
  - tokens/s: tokens per iteration / median wall time between consecutive iteration lines
    (eval pauses excluded);
  - time to target: wall time until the first validation loss <= --target (both evaluate
    every --eval-interval steps on --eval-iters batches).

    python benchmarks/train_vs_nanogpt.py --nanogpt .peers/nanoGPT [--iters 2000]

lmforge runs once per precision in --precisions (default: fp32, as nanoGPT on a CPU, and auto,
which picks bf16 autocast on CPUs whose native bf16 matmuls measure faster).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.data.loader import bundled_text_path

RECIPE = dict(
    block_size=64, batch_size=12, n_layer=4, n_head=4, n_embd=128, lr=1e-3, min_lr=1e-4, warmup=100
)


def prepare_nanogpt_data(nanogpt: Path) -> None:
    """Write nanoGPT's shakespeare_char files (train.bin, val.bin, meta.pkl) from the bundled
    text, exactly as its prepare.py does (sorted characters, 90/10 split, uint16)."""
    folder = nanogpt / "data" / "shakespeare_char"
    text = bundled_text_path().read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9) :])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(folder / f"{name}.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)


def timed_lines(cmd: list[str], cwd: Path) -> list[tuple[float, str]]:
    """Run cmd, returning (seconds since start, line) for every line of its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stdout]
    if proc.wait() != 0:
        sys.exit("command failed:\n" + "\n".join(line for _, line in lines[-20:]))
    return lines


def summarise(lines, iter_re: str, val_re: str, tokens_per_iter: int, target: float) -> dict:
    iters, evals = [], []
    for t, line in lines:
        if m := re.search(val_re, line):
            evals.append((t, int(m.group(1)), float(m.group(2))))
            iters.append(None)  # an eval separates iteration timings
        elif m := re.search(iter_re, line):
            iters.append((t, int(m.group(1))))
    gaps = [b[0] - a[0] for a, b in zip(iters, iters[1:]) if a and b and b[1] == a[1] + 1]
    hit = next(((t, step) for t, step, loss in evals if loss <= target), None)
    return {
        "tokens_per_s": tokens_per_iter / statistics.median(gaps),
        "time_to_target_s": hit[0] if hit else None,
        "step_at_target": hit[1] if hit else None,
        "final_val": evals[-1][2] if evals else None,
        "total_s": lines[-1][0],
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--eval-interval", type=int, default=250)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--target", type=float, default=1.886)
    p.add_argument("--lmforge-args", default="", help="extra lmforge overrides, space-separated")
    p.add_argument(
        "--precisions", default="fp32,auto", help="lmforge's train.precision values to run"
    )
    args = p.parse_args()
    r = RECIPE
    prepare_nanogpt_data(args.nanogpt)
    py = sys.executable
    nano_cmd = [
        py,
        "train.py",
        "config/train_shakespeare_char.py",
        "--device=cpu",
        "--compile=False",
        f"--block_size={r['block_size']}",
        f"--batch_size={r['batch_size']}",
        f"--n_layer={r['n_layer']}",
        f"--n_head={r['n_head']}",
        f"--n_embd={r['n_embd']}",
        "--dropout=0.0",
        f"--max_iters={args.iters}",
        f"--lr_decay_iters={args.iters}",
        f"--eval_iters={args.eval_iters}",
        "--log_interval=1",
        f"--eval_interval={args.eval_interval}",
        f"--out_dir={tempfile.mkdtemp()}",
    ]
    ours_cmd = [
        py,
        "-m",
        "lmforge",
        "train",
        "--model.preset=shakespeare-char",
        "--train.optimizer=adamw",
        f"--train.max_steps={args.iters}",
        f"--train.micro_batch_size={r['batch_size']}",
        f"--train.lr={r['lr']}",
        f"--train.min_lr={r['min_lr']}",
        f"--train.warmup_steps={r['warmup']}",
        f"--train.eval_interval={args.eval_interval}",
        f"--train.eval_steps={args.eval_iters}",
        "--train.log_interval=1",
        f"--train.ckpt_interval={args.eval_interval}",
        "--run.sample_tokens=0",
        "--run.tensorboard=false",
        f"--run.dir={tempfile.mkdtemp()}",
        *args.lmforge_args.split(),
    ]
    tokens_per_iter = r["batch_size"] * r["block_size"]
    results = {}
    nano_re = (r"^iter (\d+): loss", r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")
    ours_re = (r"^step (\d+) \| loss", r"^step (\d+) \| val_loss ([\d.]+)")
    runs = [("nanoGPT", nano_cmd, args.nanogpt, nano_re)]
    for precision in args.precisions.split(","):
        cmd = [*ours_cmd, f"--train.precision={precision}"]
        runs.append((f"lmforge {precision}", cmd, Path.cwd(), ours_re))
    for name, cmd, cwd, (iter_re, val_re) in runs:
        print(f"running {name} ...", flush=True)
        results[name] = summarise(
            timed_lines(cmd, cwd), iter_re, val_re, tokens_per_iter, args.target
        )
    print(
        f"\nnanoGPT CPU recipe, {args.iters} iters, eval every {args.eval_interval} on {args.eval_iters} batches"
    )
    print(
        f"{'':14} {'tokens/s':>10} {'time to ' + str(args.target):>16} {'at step':>8} {'final val':>10} {'total s':>8}"
    )
    for name, s in results.items():
        hit = f"{s['time_to_target_s']:.1f} s" if s["time_to_target_s"] else "not reached"
        print(
            f"{name:14} {s['tokens_per_s']:10.0f} {hit:>16} {s['step_at_target'] or '-':>8} "
            f"{s['final_val'] or float('nan'):10.4f} {s['total_s']:8.1f}"
        )
    base = results["nanoGPT"]
    for name, ours in list(results.items())[1:]:
        print(f"\n{name} / nanoGPT tokens/s: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x")
        if ours["time_to_target_s"] and base["time_to_target_s"]:
            fraction = ours["time_to_target_s"] / base["time_to_target_s"]
            print(f"{name} time to {args.target} as a fraction of nanoGPT's: {fraction:.0%}")


if __name__ == "__main__":
    main()
