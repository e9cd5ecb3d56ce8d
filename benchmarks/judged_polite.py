"""The share of greedy answers to the held-out instructions that the reward model scores
polite (reward > 0: it was trained with the polite answers chosen), and their mean reward,
for each checkpoint: the post-training issue's measure of DPO's (and PPO's) effect on
generation.

    python benchmarks/judged_polite.py --reward runs/reward runs/sft_full runs/dpo_b05 ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lmforge.data.sft import prompt_messages, split_records
from lmforge.recipes.best_of_n import load_reward_model
from lmforge.recipes.sft import answer
from lmforge.train.checkpoint import load, resolve_checkpoint

DATA = Path(__file__).resolve().parents[1] / "lmforge" / "assets" / "preferences.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoints", nargs="+", help="policies to compare (the first is the baseline)"
    )
    parser.add_argument("--reward", required=True, help="the reward model checkpoint")
    parser.add_argument("--data", default=str(DATA), help="records whose last 10%% are held out")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    _, held_out = split_records(args.data, 0.1, "")
    conversations = [prompt_messages(r, f"record {i}") for i, r in enumerate(held_out)]
    print(
        f"{len(conversations)} held-out prompts from {args.data}; greedy, {args.max_new_tokens} new tokens"
    )
    print("| checkpoint | judged polite (reward > 0) | change | mean reward | s |")
    print("|---|---:|---:|---:|---:|")
    baseline = None
    for path in args.checkpoints:
        t0 = time.perf_counter()
        model, tokenizer = load(resolve_checkpoint(path))
        reward_model = load_reward_model(args.reward, tokenizer)
        texts = [tokenizer.decode(ids) for ids, _ in answer(model, tokenizer, conversations,
                                                            args.max_new_tokens)]  # fmt: skip
        scores = reward_model.score_conversations(
            [[*c, {"role": "assistant", "content": t}] for c, t in zip(conversations, texts)]
        )
        share = sum(s > 0 for s in scores) / len(scores)
        baseline = share if baseline is None else baseline
        print(f"| {path} | {share:.1%} | {100 * (share - baseline):+.1f} points | "
              f"{sum(scores) / len(scores):.3f} | {time.perf_counter() - t0:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
