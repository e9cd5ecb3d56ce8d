"""Tokens/s and peak memory per rank of each train.parallel layout on 2 CPU processes (gloo),
in one run, beside one process: DDP, FSDP (ZeRO-3 and ZeRO-2-like), tensor parallel and a
2-stage pipeline (GPipe, 1F1B). Same model, same global batch, fp32.

    python benchmarks/parallel_cpu.py [--steps 30] [--preset shakespeare-llama] [--model.d_model=512 ...]

Tokens/s is the median of the logged steps after the first 5 (all ranks' tokens over the
step's wall time); peak memory is each rank's peak resident set size (ru_maxrss), which
includes the Python interpreter and torch (~300-400 MB) besides the model's tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAYOUTS = {
    "1 process": (1, []),
    "DDP x2": (2, []),
    "FSDP x2": (2, ["--train.parallel.dp_shard=2"]),
    "FSDP x2, no reshard": (
        2,
        ["--train.parallel.dp_shard=2", "--train.parallel.reshard_after_forward=false"],
    ),
    "TP x2": (2, ["--train.parallel.tp=2"]),
    "PP x2 GPipe": (2, ["--train.parallel.pp=2", "--train.parallel.pp_schedule=gpipe"]),
    "PP x2 1F1B": (2, ["--train.parallel.pp=2", "--train.parallel.pp_schedule=1f1b"]),
}


def worker(argv: list[str]) -> None:
    """One rank: train, then print this process's peak memory as a JSON line."""
    from lmforge.cli import main

    code = main(["train", *argv])
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "peak_mb": peak_mb}), flush=True)
    sys.exit(code)


def run_layout(name: str, nproc: int, extra: list[str], args, out: Path) -> dict:
    global_batch = 16
    model_parallel = any("pp=" in a or "tp=" in a for a in extra)  # ranks share the data
    data_parallel = 1 if model_parallel or nproc == 1 else nproc
    micro = global_batch // args.accum // data_parallel
    run_name = name.replace(" ", "_").replace(",", "")
    train_args = [
        f"--model.preset={args.preset}",
        "--model.tie_embeddings=false",
        f"--train.max_steps={args.steps}",
        f"--train.micro_batch_size={micro}",
        f"--train.grad_accum_steps={args.accum}",
        "--train.precision=fp32",
        "--train.log_interval=1",
        f"--train.eval_interval={args.steps}",
        "--train.eval_steps=1",
        f"--train.ckpt_interval={args.steps}",
        "--run.tensorboard=false",
        "--run.sample_tokens=0",
        f"--run.dir={out}",
        f"--run.name={run_name}",
        *args.overrides,
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.cores // nproc)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(nproc), __file__, "--worker", *train_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    # the ranks' lines may interleave on one line of the shared stdout
    found = re.findall(r'\{"rank": (\d+), "peak_mb": ([\d.]+)\}', proc.stdout)
    peaks = [float(mb) for _, mb in sorted(found, key=lambda f: int(f[0]))]
    rows = [
        json.loads(line) for line in (out / run_name / "metrics.jsonl").read_text().splitlines()
    ]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 5]
    return {"tokens_per_s": statistics.median(speeds), "peak_mb": peaks}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--preset", default="shakespeare-llama")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args, args.overrides = parser.parse_known_args()  # the rest: config overrides
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: run_layout(name, n, extra, args, Path(tmp))
            for name, (n, extra) in LAYOUTS.items()
        }
    base = results["1 process"]["tokens_per_s"]
    shape = " ".join([args.preset, *args.overrides])
    print(f"{shape}, fp32, global batch 16 x block, {args.accum} micro-batches, {args.cores} cores")
    print(f"{'layout':<22}{'tokens/s':>10}{'vs 1 proc':>11}   peak MB per rank")
    for name, r in results.items():
        peaks = " / ".join(f"{p:.0f}" for p in r["peak_mb"])
        print(f"{name:<22}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base:>10.2f}x   {peaks}")


if __name__ == "__main__":
    main()
