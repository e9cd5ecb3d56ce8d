"""Best-of-n against best-of-1: the mean reward-model score of the kept answer to held-out
instructions (the last 10% of the bundled instructions), n samples per prompt.

    python benchmarks/best_of_n.py --policy runs/sft_full --reward runs/reward [--n 8]

Best-of-1 is the first of the n samples, so both figures come from the same samples."""

from __future__ import annotations

import argparse
import statistics
import time

import lmforge
from lmforge.data.sft import split_records
from lmforge.engine import SamplingParams
from lmforge.eval.gen import INSTRUCTIONS
from lmforge.recipes.best_of_n import best_of_n, load_reward_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--policy", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompts", type=int, default=40, help="first N held-out instructions")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    model, tokenizer = lmforge.load(args.policy)
    reward_model = load_reward_model(args.reward, tokenizer)
    _, held_out = split_records(str(INSTRUCTIONS), 0.1, "")
    prompts = [
        r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        for r in held_out[: args.prompts]
    ]
    first, best = [], []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=50, seed=i
        )
        choice = best_of_n(model, tokenizer, reward_model, prompt, args.n, params)
        first.append(choice.rewards[0])
        best.append(choice.reward)
    seconds = time.perf_counter() - start
    print(
        f"{len(prompts)} held-out prompts, {args.n} samples each (temperature "
        f"{args.temperature}, top-k 50, {args.max_new_tokens} new tokens), {seconds:.1f} s"
    )
    print(f"mean reward best-of-1: {statistics.mean(first):.3f}")
    print(f"mean reward best-of-{args.n}: {statistics.mean(best):.3f}")
    print(
        f"gain: {statistics.mean(best) - statistics.mean(first):+.3f} "
        f"(reward std over best-of-1 answers {statistics.pstdev(first):.3f})"
    )


if __name__ == "__main__":
    main()
