"""Config keys as command-line options. Every verb that takes a config tree lists its keys
the same way (`--section.key=V`, with the field's docstring and default) and turns what the
user gave back into overrides for `lmforge.config`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmforge.common import LmforgeError


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
