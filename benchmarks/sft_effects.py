"""Post-training effects on held-out data: full SFT, LoRA, prefix tuning and P-tuning from the
chat base (`make chat-base`), each beside the base's own numbers (the step-0 evaluation).

    python benchmarks/sft_effects.py --base runs/chat_base
    python benchmarks/sft_effects.py --base runs/chat_base --methods none,lora --steps 200

Data: the bundled instructions; the last 10% of records is held out (never seen by the base
either). val_loss is the loss on held-out response tokens; val_end_rate the share of held-out
prompts whose greedy answer ends with end-of-turn within train.eval_max_new_tokens. Each run
is a subprocess; its peak RSS is its own (ru_maxrss) and step time the median between log rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.data.loader import bundled_text_path

LR = {"none": 3e-4, "lora": 2e-3, "prefix": 1e-2, "ptuning": 1e-2}
"""Learning rates per method (PEFT methods train few parameters and take larger steps)."""

_RUN = (
    "import resource, sys\n"
    "from lmforge.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    "sys.exit(rc)\n"
)


def run_sft(method: str, args: argparse.Namespace, run_dir: Path) -> dict:
    data = bundled_text_path().with_name("instructions.json")
    cmd = [
        sys.executable, "-c", _RUN, "sft", "--base", args.base, "--data", str(data),
        f"--peft.method={method}", f"--train.lr={LR[method]}", f"--train.min_lr={LR[method] / 10}",
        f"--train.max_steps={args.steps}", f"--train.eval_interval={args.steps}",
        f"--run.dir={run_dir}", f"--run.name={method}", "--run.tensorboard=false",
        *args.extra.split(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
    rows = [
        json.loads(line) for line in (run_dir / method / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r]
    gaps = [
        (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
        for a, b in zip(train, train[1:])
    ]
    share = next(line for line in proc.stdout.splitlines() if f"peft {method}:" in line)
    ckpt = max((run_dir / method / "checkpoints").glob("step_*"))
    weights = ckpt / ("adapter.safetensors" if method != "none" else "model.safetensors")
    return {
        "base_loss": evals[0]["val_loss"],
        "base_end": evals[0]["val_end_rate"],
        "loss": evals[-1]["val_loss"],
        "end": evals[-1]["val_end_rate"],
        "share": share.split("(")[-1].rstrip(")"),
        "file_mb": weights.stat().st_size / 2**20,
        "peak_mb": float(proc.stdout.split("PEAK_RSS_MB")[-1].split()[0]),
        "step_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the chat base checkpoint or run folder")
    p.add_argument("--methods", default="none,lora,prefix,ptuning")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--extra", default="", help="more overrides for every run, space-separated")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            results[method] = run_sft(method, args, Path(tmp))
            print(f"done: {method} {results[method]}", flush=True)
    base = results.get("none") or next(iter(results.values()))  # full SFT's step 0 is the base
    print(
        f"\nbase (step 0): held-out response loss {base['base_loss']:.4f}, end-of-turn rate {base['base_end']:.0%}"
    )
    print("(prefix and P-tuning start from a random prefix: their own step-0 loss is in brackets)")
    print(
        "| method | trainable | val_loss (step 0) | reduction vs base | end rate | weights MB | peak RSS MB | ms/step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    full_drop = None
    for method, r in results.items():
        drop = (base["base_loss"] - r["loss"]) / base["base_loss"]
        full_drop = drop if method == "none" else full_drop
        vs_full = f" ({drop / full_drop:.0%} of full)" if full_drop and method != "none" else ""
        print(
            f"| {'full SFT' if method == 'none' else method} | {r['share']} | {r['loss']:.4f} "
            f"({r['base_loss']:.4f}) | "
            f"{drop:.1%}{vs_full} | {r['end']:.0%} | {r['file_mb']:.2f} | {r['peak_mb']:.0f} | {r['step_ms']:.0f} |"
        )


if __name__ == "__main__":
    main()
