"""`lmforge plan --config X --world-size N [--device-memory 80GB] [--section.key=value ...]`:
per-rank memory (parameters, gradients, optimizer states, activations with and without
checkpointing, temporary buffers), whether it fits a device and what to change if not, and
FLOPs and tokens/s at a given MFU (lmforge/research/memory_plan.py). Nothing is trained: the
model is built on the meta device."""

from __future__ import annotations

import argparse
import json

from lmforge.common import LmforgeError


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from lmforge.cli.options import add_config_options
    from lmforge.config import describe_keys

    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML recipe (see configs/)")
    parser.add_argument(
        "--world-size", type=int, required=True, help="processes (GPUs) of the torchrun job"
    )
    parser.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="memory of one device, e.g. 80GB (x 10^9 bytes), 80GiB or 80G (x 2^30), or "
        "bytes: says whether the run fits and, if not, which settings do",
    )
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="peak dense TFLOP/s of one device; unset = the H100 of lmforge/hardware.py's "
        "table at the run's precision",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_options(parser, describe_keys())


def run(args: argparse.Namespace) -> int:
    from lmforge.cli.options import config_overrides
    from lmforge.config import build_config
    from lmforge.hardware import gpu_peak_flops
    from lmforge.research.memory_plan import parse_bytes, plan, suggest
    from lmforge.research.plan_report import format_text, summary

    budget = parse_bytes(args.device_memory) if args.device_memory is not None else None
    if not 0 < args.mfu <= 1:
        raise LmforgeError(f"--mfu={args.mfu} must be in (0, 1]")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise LmforgeError(f"--peak-tflops={args.peak_tflops} must be > 0")
    cfg = build_config(*([args.config] if args.config else []), overrides=config_overrides(args))
    result = plan(cfg, args.world_size)
    fits = budget is None or result.device_bytes <= budget
    suggestions = [] if fits else suggest(cfg, args.world_size, budget)
    if args.peak_tflops is not None:
        peak, source = args.peak_tflops * 1e12, "--peak-tflops"
    else:
        peak = gpu_peak_flops("H100", result.precision)
        source = f"H100, {result.precision}, lmforge/hardware.py; --peak-tflops to change"
    report = summary(result, budget, suggestions, args.mfu, peak, source)
    print(json.dumps(report, indent=2) if args.json else format_text(report))
    return 0
