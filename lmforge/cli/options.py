"""Config keys as command-line options. Every verb that takes a config tree lists its keys
the same way (`--section.key=V`, with the field's docstring and default) and turns what the
user gave back into overrides for `lmforge.config`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError


def add_run_options(parser: argparse.ArgumentParser, base: bool = False) -> None:
    """What every training verb takes besides config keys: --config and --resume; post-training
    verbs (base=True) also --base CKPT."""
    if base:
        parser.add_argument("--base", metavar="CKPT", help="checkpoint or run folder to start from")
    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML recipe (see configs/)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run exactly where it stopped"
    )
    from lmforge.config import describe_keys

    add_config_options(parser, describe_keys())


def add_config_options(parser: argparse.ArgumentParser, keys: list[tuple[str, Any, str]]) -> None:
    """One `--section.key` option per (key, default, doc) row; unknown `--x.y=v` arguments are
    passed on too, so the config can name the valid key the user meant."""
    group = parser.add_argument_group(
        "config keys (--section.key=value; YAML recipes use the same names)"
    )
    for key, default, doc in keys:
        group.add_argument(
            f"--{key}",
            dest=f"cfg:{key}",
            default=argparse.SUPPRESS,
            metavar="V",
            help=f"{doc} (default: {default})".replace("%", "%%").lstrip(),
        )
    parser.set_defaults(accepts_overrides=True)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """['--section.key=value', ...] from the options given, unknown ones included."""
    out = [f"--{k[4:]}={v}" for k, v in vars(args).items() if k.startswith("cfg:")]
    extra = list(getattr(args, "extra", []))
    while extra:  # unknown keys: let the config say which valid key was meant
        item = extra.pop(0)
        if item.startswith("--") and "=" not in item and extra and not extra[0].startswith("--"):
            item = f"{item}={extra.pop(0)}"
        out.append(item)
    return out


def resume_config(run_dir: str | Path, overrides: list[str]):
    """The saved config of a run folder to resume (with overrides), or one clear error."""
    from lmforge.config import build_config
    from lmforge.train import checkpoint as ckpt

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or ckpt.latest_checkpoint(run_dir) is None:
        raise LmforgeError(
            f"--resume={run_dir}: not an lmforge run folder with a checkpoint "
            "(expected config.yaml and checkpoints/latest)"
        )
    return build_config(run_dir / "config.yaml", overrides=overrides)


FINE_TUNING_DEFAULTS = {
    "data": {"sampling": "bucketed"},
    "train": {
        "optimizer": "adamw",
        "max_steps": 400,
        "micro_batch_size": 16,
        "lr": 3e-4,
        "min_lr": 3e-5,
        "warmup_steps": 20,
        "weight_decay": 0.0,
        "eval_interval": 100,
        "ckpt_interval": 200,
    },
}
"""Where post-training differs from pretraining's defaults: a short AdamW run (pretraining's
Muon is tuned for learning from scratch) at a lower learning rate on batches of whole
examples, bucketed by length."""


def post_training_config(args: argparse.Namespace, overrides: list[str], defaults: dict):
    """(config, run folder to resume or None) of a post-training verb: a resumed run's own
    config, else the base checkpoint's model section <- the verb's defaults <- --config <-
    overrides (--base is run.base)."""
    import dataclasses

    from lmforge.config import build_config
    from lmforge.train import checkpoint as ckpt

    if args.resume:
        return resume_config(args.resume, overrides), args.resume
    if not args.base:
        raise LmforgeError(f"lmforge {args.verb} needs --base CKPT (a checkpoint or run folder)")
    base_model = ckpt.load_checkpoint_config(ckpt.resolve_checkpoint(args.base)).model
    layers = [
        {"model": dataclasses.asdict(base_model)},
        defaults,
        *([args.config] if args.config else []),
    ]
    return build_config(*layers, overrides=[f"--run.base={args.base}", *overrides]), None


def run_post_training(
    args: argparse.Namespace,
    recipe: Callable[..., Any],
    extra: Sequence[str] = (),
    defaults: dict = FINE_TUNING_DEFAULTS,
) -> int:
    """What a post-training verb's run() does: --data and the verb's own flags (`extra`
    overrides) on top of the config keys, the config built, then `recipe(cfg, resume=...)`."""
    overrides = config_overrides(args)
    overrides += [f"--data.path={args.data}"] if args.data else []
    cfg, resume = post_training_config(args, [*overrides, *extra], defaults)
    recipe(cfg, resume=resume)
    return 0
