"""`lmforge <verb>`: each verb is a module exposing `add_arguments(parser)` and `run(args)`.

User errors (LmforgeError, missing files) print one line and exit 1; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge.allocator import keep_freed_memory
from lmforge.common import LmforgeError

# verb -> (module providing add_arguments/run, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("lmforge.cli.train", "pretrain a model (no arguments: the default Shakespeare job)"),
    "sft": ("lmforge.cli.sft", "instruction-tune a checkpoint on conversations (any PEFT method)"),
    "classify": ("lmforge.cli.classify", "train a sequence classifier head on a checkpoint"),
    "eval": ("lmforge.cli.eval", "score a checkpoint on evaluation tasks; report.json/md + plots"),
    "reward": ("lmforge.cli.reward", "train a reward model on preference pairs (Bradley-Terry)"),
    "dpo": ("lmforge.cli.dpo", "direct preference optimisation against a frozen reference"),
    "ppo": ("lmforge.cli.ppo", "RL from a reward model: PPO or GRPO on a KL leash"),
    "distill": ("lmforge.cli.distill", "train a new, smaller student on a teacher's soft targets"),
    "generate": ("lmforge.cli.generate", "generate text from a checkpoint"),
    "chat": ("lmforge.cli.chat", "talk to a checkpoint in the terminal (streaming, history)"),
    "serve": ("lmforge.cli.serve", "an OpenAI-compatible HTTP API with streaming and a chat page"),
    "export": ("lmforge.cli.export", "export a checkpoint to Hugging Face format"),
    "import": ("lmforge.cli.import_hf", "import a Hugging Face model folder as a checkpoint"),
    "prepare": ("lmforge.cli.prepare", "raw sources -> cleaned, deduplicated token shards"),
    "tokenizer": ("lmforge.cli.tokenizer", "train a BPE tokenizer (`lmforge tokenizer train`)"),
    "quantize": ("lmforge.cli.quantize", "store and run a checkpoint's weights in int8 or int4"),
    "prune": ("lmforge.cli.prune", "prune (magnitude, heads/channels) or low-rank a checkpoint"),
    "scaling": ("lmforge.cli.scaling", "fit scaling laws L(N, D) and size compute-optimal runs"),
    "sweep": ("lmforge.cli.sweep", "hyperparameter search (Optuna): trials are runs; resumable"),
    "plan": ("lmforge.cli.plan", "per-GPU memory and FLOPs of a run before it runs; what fits"),
    "report": (
        "lmforge.cli.report",
        "render a run's metrics (loss, lr, tokens/s, evals) as report.md with plots",
    ),
}


def build_parser(verb_to_load: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only `verb_to_load`'s module is imported (verbs pull in heavy libraries)."""
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: raw text in, a trained, evaluated, servable language model out.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        p = sub.add_parser(
            verb,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        p.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
        if verb == verb_to_load:
            module = importlib.import_module(module_name)
            module.add_arguments(p, verb)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        verb = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(verb)
        args, unknown = parser.parse_known_args(argv)
        if args.verb is None:
            parser.print_help()
            return 0
        args.extra = unknown
        if unknown and not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        keep_freed_memory()  # before the verb makes its first tensors
        return int(args._run(args) or 0)
    except LmforgeError as e:
        if debug:
            raise
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
