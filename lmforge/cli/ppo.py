"""`lmforge ppo --policy CKPT --reward RM_CKPT --prompts FILE [--algo ppo|grpo]`: RL from a
reward model (PPO with a value head and GAE, or GRPO), on a KL leash to the policy it starts
from."""

from __future__ import annotations

import argparse

from lmforge.cli.options import add_run_options, run_post_training
from lmforge.common import LmforgeError

PPO_DEFAULTS = {
    "model": {"dropout": 0.0, "drop_path": 0.0},
    "train": {
        "optimizer": "adamw",
        "max_steps": 200,
        "micro_batch_size": 16,
        "lr": 2e-5,
        "min_lr": 2e-5,
        "schedule": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "eval_interval": 40,
        "ckpt_interval": 100,
        "log_interval": 8,
    },
}
"""RL's differences from pretraining: a short run at a small constant learning rate, no
dropout (rollout log-probabilities are taken without it)."""


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--policy", dest="base", metavar="CKPT", help="the policy to improve (an SFT checkpoint)"
    )
    parser.add_argument(
        "--reward", metavar="RM_CKPT", help="reward model checkpoint (`lmforge reward`)"
    )
    parser.add_argument(
        "--prompts",
        dest="data",
        metavar="FILE",
        help="json/jsonl records whose prompts are answered: messages, instruction (+ input) "
        "or prompt; the last 10%% are held out for evaluation",
    )
    parser.add_argument("--algo", choices=("ppo", "grpo"), help="ppo (default) or grpo")
    add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    from lmforge.recipes.ppo import ppo

    if not args.resume and not args.base:
        raise LmforgeError("lmforge ppo needs --policy CKPT (a checkpoint or run folder)")
    if not args.resume and not args.data:
        raise LmforgeError("lmforge ppo needs --prompts FILE (json/jsonl records)")
    extra = [f"--ppo.reward={args.reward}"] if args.reward else []
    extra += [f"--ppo.algo={args.algo}"] if args.algo else []
    return run_post_training(args, ppo, extra, PPO_DEFAULTS)
