"""Multiple-choice scoring against lm-evaluation-harness, on the same items in one run:

  1. `lm_eval --model hf` on the checkpoint exported to a transformers folder (fp32, CPU);
  2. `lm_eval --model lmforge` (lmforge/eval/harness.py) on the checkpoint itself;
  3. `lmforge eval --task mc=FILE`;
  4. with --bf16, also `lmforge eval --dtype bf16` (bf16 weights and matmuls: faster on a CPU
     with native bf16, but every product rounds, so its log-likelihoods are not fp32's; its
     acc and acc_norm are compared with the fp32 runs' on their own line).

    python benchmarks/eval_vs_lm_eval.py [--checkpoint runs/chat_base] [--limit 200] [--bf16]
        [--rounds 3]

Each runs as its own subprocess at the same batch size, and is timed twice:
  - wall: the whole subprocess (Python start-up, imports, model load, lm-eval's task index,
    scoring);
  - scoring: the evaluation with the model already loaded. For lm-eval, its `evaluate()`
    (requests built, model run, metrics), timed by wrapping it in the child process, which
    otherwise runs lm-eval's own CLI entry point; for `lmforge eval`, the task's time from
    its report.json (items read, scored, metrics).
items/s = items / scoring seconds. The table also says whether acc and acc_norm are identical
and how far apart the hf and lmforge models' per-choice log-likelihoods are. With --rounds N
the three run N times in turn (timings on these machines drift by 10-30% within minutes), a
table per round, then each one's median ratio to lm-eval's hf backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "lmforge_bench_mc"
SCORING_MARK = "scoring_seconds="
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def timed_lm_eval_cli(argv: list[str]) -> None:
    """Child process: lm-eval's CLI on argv with its evaluate() timed, the seconds printed as
    a SCORING_MARK line. The lmforge model is registered only when it is the one asked for,
    so the hf run does not pay for importing lmforge."""
    import lm_eval.evaluator as evaluator
    from lm_eval.__main__ import cli_evaluate

    if argv[argv.index("--model") + 1] == "lmforge":
        import lmforge.eval.harness  # noqa: F401

    evaluate = evaluator.evaluate

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = evaluate(*args, **kwargs)
        print(f"{SCORING_MARK}{time.perf_counter() - start}", flush=True)
        return out

    evaluator.evaluate = timed  # simple_evaluate looks the name up at call time
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def run(*cmd) -> tuple[float, str]:
    """(wall seconds, stdout) of `python CMD...`; its output is shown when it fails."""
    cmd = [sys.executable, *map(str, cmd)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def write_task(folder: Path, data: Path) -> None:
    """A local lm-eval task over the JSONL: context, then ' ' + each choice."""
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data.resolve()}}}, cache_dir: {folder / 'hf'}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
    )


def lm_eval_run(model: str, model_args: str, work: Path, args: argparse.Namespace) -> dict:
    out = work / model
    wall, stdout = run(
        __file__, "--timed-lm-eval", "--model", model, "--model_args", model_args,
        "--device", "cpu", "--batch_size", args.batch_size, "--tasks", TASK,
        "--include_path", work, "--limit", args.limit, "--output_path", out, "--log_samples",
    )  # fmt: skip
    scoring = next(float(x[len(SCORING_MARK) :]) for x in stdout.split() if SCORING_MARK in x)
    (results,) = out.rglob("results_*.json")
    result = json.loads(results.read_text())
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    lls = {}
    for line in samples.read_text().splitlines():
        record = json.loads(line)
        lls[record["doc_id"]] = [float(r[0]) for r in record["filtered_resps"]]
    metrics = result["results"][TASK]
    return {
        "items": result["n-samples"][TASK]["effective"],
        "wall": wall,
        "scoring": scoring,
        "acc": metrics["acc,none"],
        "acc_norm": metrics["acc_norm,none"],
        "lls": lls,
    }


def lmforge_eval_run(
    checkpoint: str, data: Path, work: Path, args: argparse.Namespace, dtype: str = "fp32"
) -> dict:
    out = work / f"lmforge_eval_{dtype}"
    wall, _ = run(
        "-m", "lmforge", "eval", "--checkpoint", checkpoint, "--task", f"mc={data}",
        "--limit", args.limit, "--batch-size", args.batch_size, "--device", "cpu",
        "--dtype", dtype, "--out", out,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    timing = report["timings"]["mc"]
    metrics = report["tasks"]["mc"]
    return {
        "items": timing["items"],
        "wall": wall,
        "scoring": timing["seconds"],
        "acc": metrics["acc"],
        "acc_norm": metrics["acc_norm"],
    }


def max_ll_gap(a: dict, b: dict) -> float:
    return max(abs(x - y) for doc in a for x, y in zip(a[doc], b[doc], strict=True))


def main() -> None:
    if sys.argv[1:2] == ["--timed-lm-eval"]:
        timed_lm_eval_cli(sys.argv[2:])
        return
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_ckpt = "runs/chat_base" if Path("runs/chat_base").exists() else None
    p.add_argument(
        "--checkpoint",
        default=default_ckpt,
        required=default_ckpt is None,
        help="checkpoint or run folder (default runs/chat_base when it exists)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("lmforge/assets/eval/piqa_valid.jsonl"),
        help="multiple-choice JSONL: {context, choices, label} per line",
    )
    p.add_argument("--limit", type=int, default=200, help="the first N items")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bf16", action="store_true", help="also run `lmforge eval --dtype bf16`")
    p.add_argument("--rounds", type=int, default=1, help="run everything this many times")
    args = p.parse_args()

    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hf_dir = work / "hf_model"
        run("-m", "lmforge", "export", "--checkpoint", args.checkpoint, "--out", hf_dir)
        write_task(work, args.data)
        for round_ in range(1, args.rounds + 1):
            rows = one_round(args, hf_dir, work / f"round{round_}")
            print(f"round {round_} of {args.rounds}")
            peer_rate = rows["lm_eval --model hf"]["items"] / rows["lm_eval --model hf"]["scoring"]
            for name, r in rows.items():
                ratios.setdefault(name, []).append(r["items"] / r["scoring"] / peer_rate)
            print_round(args, rows)
    for name, values in list(ratios.items())[1:]:
        listed = ", ".join(f"{v:.2f}x" for v in values)
        print(f"{name} / lm_eval --model hf items/s, median of {len(values)}: "
              f"{statistics.median(values):.2f}x ({listed})")  # fmt: skip


def one_round(args: argparse.Namespace, hf_dir: Path, work: Path) -> dict[str, dict]:
    """Every run once, on the same items, in folders of their own under `work`."""
    work.mkdir()
    task = f"{TASK}.yaml"  # the parent's task file, with its dataset cache
    (work / task).write_text((work.parent / task).read_text())
    rows = {
        "lm_eval --model hf": lm_eval_run("hf", f"pretrained={hf_dir},dtype=float32", work, args),
        "lm_eval --model lmforge": lm_eval_run(
            "lmforge", f"checkpoint={args.checkpoint}", work, args
        ),
        "lmforge eval": lmforge_eval_run(args.checkpoint, args.data, work, args),
    }
    if args.bf16:
        rows["lmforge eval --dtype bf16"] = lmforge_eval_run(
            args.checkpoint, args.data, work, args, "bf16"
        )
    return rows


def print_round(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    """The round's table, whether the fp32 runs' scores agree, and the hf/lmforge gap."""
    peer = rows["lm_eval --model hf"]
    print(
        f"checkpoint {args.checkpoint}, {args.data} (first {args.limit} items), "
        f"batch size {args.batch_size}, CPU fp32"
    )
    print("| run | items | wall s | scoring s | items/s (scoring) | vs hf | acc | acc_norm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        rate = r["items"] / r["scoring"]
        speedup = rate / (peer["items"] / peer["scoring"])
        print(
            f"| {name} | {r['items']} | {r['wall']:.1f} | {r['scoring']:.2f} | {rate:.1f} | "
            f"{speedup:.2f}x | {r['acc']:.4f} | {r['acc_norm']:.4f} |"
        )
    fp32 = [r for name, r in rows.items() if "bf16" not in name]
    for metric in ("acc", "acc_norm"):
        same = len({r[metric] for r in fp32}) == 1
        print(f"{metric} identical in all three: {'yes' if same else 'no'}")
        if args.bf16:
            same = rows["lmforge eval --dtype bf16"][metric] == peer[metric]
            print(f"{metric} of lmforge bf16 equal to the fp32 runs': {'yes' if same else 'no'}")
    gap = max_ll_gap(peer["lls"], rows["lm_eval --model lmforge"]["lls"])
    print(f"max |log-likelihood difference| per choice, hf vs lmforge model: {gap:.2e}")


if __name__ == "__main__":
    main()
