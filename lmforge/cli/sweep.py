"""`lmforge sweep --space SPACE.yaml --trials N [--config X] [--out DIR] [--jobs J]`: a
hyperparameter search over config keys, each trial a normal run, resumable by rerunning the
command (lmforge/research/sweep.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--space", required=True, metavar="SPACE.yaml",
                        help="config keys and their distributions (configs/sweep_space_*.yaml)")  # fmt: skip
    parser.add_argument("--trials", type=int, required=True,
                        help="finished trials the study should reach (a rerun continues to it)")  # fmt: skip
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="a YAML recipe every trial starts from (default: the Shakespeare job)")  # fmt: skip
    parser.add_argument("--out", default="runs/sweep",
                        help="the sweep's folder: study.db, one run folder per trial, results")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1,
                        help="trials trained at once, in processes sharing the cores")  # fmt: skip
    parser.add_argument("--study-name", default="sweep", help="the study's name in study.db")
    parser.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    from lmforge.cli.options import add_config_options
    from lmforge.config import describe_keys

    add_config_options(parser, describe_keys())  # --section.key=value for every trial


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lmforge.cli.options import config_overrides
    from lmforge.research import sweep_report
    from lmforge.research.search_space import read_space
    from lmforge.research.sweep import Sweep, run_sweep

    sweep = Sweep(
        out=Path(args.out),
        params=read_space(args.space),
        trials=args.trials,
        config=args.config,
        overrides=config_overrides(args),
        study_name=args.study_name,
        seed=args.seed,
    )
    study = run_sweep(sweep, args.jobs)
    print(sweep_report.write(study, sweep.params, sweep.out, sweep.config, sweep.overrides))
    print(f"results: {sweep.out / 'results.md'} (and results.csv, plots)")
    command = sweep_report.train_command(study, sweep.config, sweep.overrides)
    if command:
        print(
            f"best trial {study.best_trial.number} (val_loss {study.best_value:.4f}):\n  {command}"
        )
    return 0
