"""Training speed against nanoGPT on the identical configuration, in one run on this machine.

nanoGPT is not part of lmforge: fetch it yourself (e.g. `git clone
https://github.com/karpathy/nanoGPT .peers/nanoGPT`) and pass its folder. Both programs run
in turn as subprocesses on the bundled Shakespeare with nanoGPT's CPU recipe; every output
line is timestamped on arrival, so both are timed the same way from process start:
  - tokens/s: tokens per iteration / median wall time between consecutive iteration lines
    (eval pauses excluded);
  - time to target: wall time until the first validation loss <= --target (both evaluate
    every --eval-interval steps on --eval-iters batches).

    python benchmarks/train_vs_nanogpt.py --nanogpt .peers/nanoGPT [--iters 2000] [--rounds 3]

lmforge runs once per precision in --precisions (default: fp32, as nanoGPT on a CPU, and auto,
which picks bf16 autocast on CPUs whose native bf16 matmuls measure faster). `fp32-blas` is fp32
with lmforge's Linears on PyTorch's BLAS (LMFORGE_FP32_LINEAR=blas, nanoGPT's kernels) rather
than on oneDNN, which they use where the BLAS is MKL on a CPU not Intel's
(lmforge/model/linear.py).
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


def timed_lines(cmd: list[str], cwd: Path, env: dict | None = None) -> list[tuple[float, str]]:
    """Run cmd with env added, returning (seconds since start, line) for every output line."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
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
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every program this many times in turn; ratios are per round (this machine's "
        "speed drifts by 10-30%% over minutes), and their median is printed",
    )
    p.add_argument("--lmforge-args", default="", help="extra lmforge overrides, space-separated")
    p.add_argument(
        "--precisions",
        default="fp32,auto",
        help="lmforge's train.precision values to run (and fp32-blas, see above)",
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
    nano_re = (r"^iter (\d+): loss", r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)")
    ours_re = (r"^step (\d+) \| loss", r"^step (\d+) \| val_loss ([\d.]+)")
    runs = [("nanoGPT", nano_cmd, args.nanogpt, nano_re, {})]
    for precision in args.precisions.split(","):
        blas = precision == "fp32-blas"
        cmd = [*ours_cmd, f"--train.precision={'fp32' if blas else precision}"]
        env = {"LMFORGE_FP32_LINEAR": "blas"} if blas else {}
        runs.append((f"lmforge {precision}", cmd, Path.cwd(), ours_re, env))
    results: dict[str, list[dict]] = {name: [] for name, *_ in runs}
    for round_ in range(1, args.rounds + 1):
        for name, cmd, cwd, (iter_re, val_re), env in runs:
            print(f"round {round_}: running {name} ...", flush=True)
            results[name].append(
                summarise(timed_lines(cmd, cwd, env), iter_re, val_re, tokens_per_iter, args.target)
            )
    print(
        f"\nnanoGPT CPU recipe, {args.iters} iters, eval every {args.eval_interval} on "
        f"{args.eval_iters} batches, {args.rounds} round(s); per round, tokens/s and its ratio "
        "to that round's nanoGPT"
    )
    print(
        f"{'':18} {'round':>5} {'tokens/s':>10} {'ratio':>6} {'time to ' + str(args.target):>16} "
        f"{'at step':>8} {'final val':>10} {'total s':>8}"
    )
    base = results["nanoGPT"]
    for name, rounds in results.items():
        for i, s in enumerate(rounds):
            ratio = s["tokens_per_s"] / base[i]["tokens_per_s"]
            hit = f"{s['time_to_target_s']:.1f} s" if s["time_to_target_s"] else "not reached"
            print(
                f"{name:18} {i + 1:>5} {s['tokens_per_s']:10.0f} {ratio:5.2f}x {hit:>16} "
                f"{s['step_at_target'] or '-':>8} {s['final_val'] or float('nan'):10.4f} "
                f"{s['total_s']:8.1f}"
            )
    for name, rounds in list(results.items())[1:]:
        ratios = [s["tokens_per_s"] / b["tokens_per_s"] for s, b in zip(rounds, base)]
        print(
            f"\n{name} / nanoGPT tokens/s, median of {len(ratios)}: {statistics.median(ratios):.2f}x"
        )
        times = [(s["time_to_target_s"], b["time_to_target_s"]) for s, b in zip(rounds, base)]
        if all(ours and theirs for ours, theirs in times):
            fraction = statistics.median(ours / theirs for ours, theirs in times)
            print(
                f"{name} time to {args.target} as a fraction of nanoGPT's (median): {fraction:.0%}"
            )


if __name__ == "__main__":
    main()
