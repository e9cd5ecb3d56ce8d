"""`lmforge dpo --base CKPT --data FILE`: direct preference optimisation (same options as
`lmforge reward`, plus the dpo.* keys)."""

from lmforge.cli.reward import add_arguments, run

__all__ = ["add_arguments", "run"]
