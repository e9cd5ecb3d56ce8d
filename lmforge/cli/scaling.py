"""`lmforge scaling fit --csv POINTS.csv [--out DIR]` and `lmforge scaling optimal --flops C`:
Chinchilla approach-3 fits of L(N, D) = E + A/N^alpha + B/D^beta and the compute-optimal split
of a FLOP budget (lmforge/research/scaling.py)."""

from __future__ import annotations

import argparse

from lmforge.research.scaling import SWEEP_SHAPES, SWEEP_STEPS


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    fit = sub.add_parser("fit", help="fit L(N, D) to points (a CSV with columns N, D, loss)")
    fit.add_argument("--csv", required=True, help="points: a header N,D,loss then one row each")
    fit.add_argument("--out", help="a new folder for fit.json and iso_loss.png")
    fit.add_argument(
        "--bootstrap", type=int, default=100, help="resamples for 95%% intervals (0 = none)"
    )
    fit.add_argument("--grid", choices=("chinchilla", "coarse"), default="chinchilla",
                     help="starts: Chinchilla's 4,500 (about a minute) or 108 (seconds)")  # fmt: skip
    fit.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log loss")
    sweep = sub.add_parser(
        "sweep", help="train a grid of model sizes x token budgets (normal runs) -> points.csv"
    )
    sweep.add_argument("--out", required=True, help="folder of the sweep's runs (resumable)")
    sweep.add_argument("--config", help="a YAML recipe the runs start from (default: Shakespeare)")
    sweep.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SWEEP_SHAPES),
                       help="n_layer x d_model of each model")  # fmt: skip
    sweep.add_argument("--steps", default=",".join(map(str, SWEEP_STEPS)),
                       help="optimizer steps of each run")  # fmt: skip
    sweep.set_defaults(accepts_overrides=True)  # --section.key=value for every run
    optimal = sub.add_parser("optimal", help="compute-optimal N and D for a FLOP budget")
    optimal.add_argument("--flops", type=float, required=True, help="training FLOPs, C = 6 N D")
    optimal.add_argument(
        "--law", default="all",
        help="hoffmann2022, besiroglu2024, a fit.json from `scaling fit`, or all published",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    return {"fit": run_fit, "optimal": run_optimal, "sweep": run_sweep}[args.action](args)


def run_sweep(args: argparse.Namespace) -> int:
    from lmforge.cli.options import config_overrides
    from lmforge.common import LmforgeError
    from lmforge.research.scaling import sweep_points

    try:
        shapes = [tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
        steps = [int(x) for x in args.steps.split(",")]
    except ValueError:
        raise LmforgeError("--shapes is LxD,LxD,... and --steps N,N,... (integers)") from None
    if any(len(s) != 2 or min(s) < 1 for s in shapes) or min(steps) < 1:
        raise LmforgeError("every shape needs n_layer x d_model >= 1 and every step count >= 1")
    layers = (args.config,) if args.config else ()
    path = sweep_points(args.out, shapes, steps, layers, config_overrides(args))
    print(f"points: {path} (fit them with `lmforge scaling fit --csv {path}`)")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from lmforge.common import LmforgeError
    from lmforge.research import scaling

    N, D, L = scaling.read_csv(args.csv)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise LmforgeError(f"--out {out} exists and is not empty; choose a new folder")
    if args.bootstrap < 0:
        raise LmforgeError(f"--bootstrap={args.bootstrap} must be >= 0")
    grid = scaling.GRID if args.grid == "chinchilla" else scaling.COARSE_GRID
    result = scaling.fit(N, D, L, args.delta, grid)
    law = result.law
    intervals = (
        scaling.bootstrap(N, D, L, law, args.bootstrap, delta=args.delta) if args.bootstrap else {}
    )
    print(f"{result.points} points, {result.starts} starts, Huber objective {result.objective:.4g}, "
          f"{'converged' if result.converged else 'NOT converged (iteration cap)'}")  # fmt: skip
    for name, value in asdict(law).items():
        ci = intervals.get(name)
        print(f"  {name:5s} {value:.4g}" + (f"  (95% CI {ci[0]:.4g} to {ci[1]:.4g})" if ci else ""))
    for flops in (1e15, 1e18, 1e21):
        n, d = law.optimal(flops)
        print(f"  C = {flops:.0e}: N = {n:.3g}, D = {d:.3g}, {d / n:.1f} tokens per parameter")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        record = {"law": asdict(law), "intervals": intervals, "objective": result.objective,
                  "converged": result.converged, "starts": result.starts, "points": result.points,
                  "csv": str(args.csv), "delta": args.delta}  # fmt: skip
        (out / "fit.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        scaling.plot(out / "iso_loss.png", law, N, D, "fitted L(N, D)")
        print(f"wrote {out / 'fit.json'} and {out / 'iso_loss.png'}")
    return 0


def run_optimal(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from lmforge.common import LmforgeError
    from lmforge.research.scaling import PUBLISHED, ScalingLaw

    if not args.flops > 0:
        raise LmforgeError(f"--flops={args.flops} must be > 0")
    if args.law == "all":
        laws = dict(PUBLISHED)
    elif args.law in PUBLISHED:
        laws = {args.law: PUBLISHED[args.law]}
    elif Path(args.law).is_file():
        try:
            laws = {args.law: ScalingLaw(**json.loads(Path(args.law).read_text())["law"])}
        except (ValueError, KeyError, TypeError):
            raise LmforgeError(f"{args.law} is not a fit.json from `lmforge scaling fit`") from None
    else:
        raise LmforgeError(f"--law {args.law}: not {', '.join(PUBLISHED)}, all, or a fit.json file")
    for name, law in laws.items():
        n, d = law.optimal(args.flops)
        print(f"{name}: N = {n:.4g} parameters, D = {d:.4g} tokens ({d / n:.1f} tokens per "
              f"parameter), predicted loss {law.loss(n, d):.4f}")  # fmt: skip
    return 0
