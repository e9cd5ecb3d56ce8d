"""`lmforge eval`: score a checkpoint on evaluation tasks (lmforge/eval/) and write report.json,
report.md and plots. Each report records what produced it: the checkpoint's hash, each task
file's hash and every setting that changes a score."""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import time
from pathlib import Path

from lmforge.common import LmforgeError, print0, seed_everything
from lmforge.eval.tasks import TASKS, TaskOptions, parse_spec, run_task

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, or a run folder (its latest)"
    )
    parser.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME[=FILE]",
        help=f"a task, repeatable: {', '.join(TASKS)}; FILE replaces its bundled data",
    )
    parser.add_argument(
        "--out", default=None, help="report folder (default runs/eval/<checkpoint>-<time>)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    defaults = TaskOptions()
    parser.add_argument("--limit", type=int, default=None, help="first N items of each task")
    parser.add_argument("--stride", type=int, default=None, help="ppl window stride (tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--classifier", default=None, help="toxicity: a classifier checkpoint")
    parser.add_argument("--flag-label", default=defaults.flag_label, help="toxicity: its label")
    parser.add_argument("--chat", action="store_true", help="gen/toxicity: use the chat template")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import torch

    import lmforge
    from lmforge.eval.report import write_eval_report
    from lmforge.eval.scoring import Scorer
    from lmforge.hardware import pick_device
    from lmforge.train.checkpoint import resolve_checkpoint

    specs = [parse_spec(s) for s in args.task]  # every spec checked before any work
    for _, path in specs:
        if path is not None and not path.exists():
            raise LmforgeError(f"task file not found: {path}")
    folder = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else default_out(folder)
    if out.exists() and any(out.iterdir()):
        raise LmforgeError(f"{out} already exists and is not empty; choose another --out")
    options = TaskOptions(
        limit=args.limit,
        stride=args.stride,
        max_new_tokens=args.max_new_tokens,
        classifier=args.classifier,
        flag_label=args.flag_label,
        chat=args.chat,
        seed=args.seed,
    )
    seed_everything(args.seed)
    device = pick_device(args.device)
    model, tokenizer = lmforge.load(folder, device)
    if tokenizer is None:
        raise LmforgeError(f"{folder} has no tokenizer/, so text cannot be scored")
    model = model.to(getattr(torch, DTYPES[args.dtype]))
    # Start-up leaves ~350k objects (torch, the model) that live to the end; frozen, Python's
    # full garbage collections skip them (one took 0.18 s of a 1.7 s PIQA scoring pass).
    gc.freeze()
    scorer = Scorer(model, tokenizer, args.batch_size, progress=True)
    tasks, details, files, timings = {}, {}, {}, {}
    for name, path in specs:
        start = time.perf_counter()
        result = run_task(name, scorer, path, options)
        timings[name] = {"seconds": time.perf_counter() - start, "items": result.items}
        tasks[name] = result.metrics
        details[name] = result.details
        files.update(result.data)
        print0(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    report = {
        "checkpoint": checkpoint_identity(folder),
        "tasks": tasks,
        "details": details,
        "settings": {
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "device": str(device),
            "seed": args.seed,
            **{k: v for k, v in vars(options).items() if k != "seed"},
            "task_files": files,
            "lmforge_version": lmforge.__version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        },
        "timings": timings,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    write_eval_report(out, report)
    print0(f"report: {out / 'report.md'}")
    return 0


def default_out(checkpoint: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else ""
    return Path("runs") / "eval" / f"{run_name or checkpoint.name}-{stamp}"


def checkpoint_identity(folder: Path) -> dict:
    """The checkpoint's path and weights hash; an adapter adds its base's."""
    from lmforge.eval.tasks import file_sha256
    from lmforge.model.peft import ADAPTER_WEIGHTS
    from lmforge.train.checkpoint import load_checkpoint_config, resolve_checkpoint, weights_sha256

    cfg = load_checkpoint_config(folder)
    identity = {"path": str(folder.resolve()), "model": vars(cfg.model)}
    if (folder / ADAPTER_WEIGHTS).is_file():
        base = resolve_checkpoint(cfg.run.base)
        identity |= {
            "sha256": file_sha256(folder / ADAPTER_WEIGHTS),
            "peft": cfg.peft.method,
            "base": str(base),
            "base_sha256": weights_sha256(base),
        }
    else:
        identity["sha256"] = weights_sha256(folder)
    return identity
