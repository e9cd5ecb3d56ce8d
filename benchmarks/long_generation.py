"""Long generation past the context window: tokens/s of the cached engine, which recomputes
its cache when a row's context fills (every block_size - window tokens), against nanoGPT's
crop-and-recompute (a full forward over the last block_size tokens for every token, no cache).

    python -m benchmarks.long_generation                       # 2,000 tokens, default job model
    python -m benchmarks.long_generation --preset shakespeare-char --new-tokens 1000

Random weights (the speed does not depend on them), greedy, fp32. window = block_size - 1 is
the same computation as crop-and-recompute (the tokens must agree); smaller windows trade a
shorter context after each recompute for fewer recomputes.
"""

from __future__ import annotations

import argparse
import platform

import torch

from benchmarks.generation import build_engine, time_generate
from lmforge.engine import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare-llama")
    parser.add_argument("--new-tokens", type=int, default=2000)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--windows", default="", help="comma-separated; default: 3/4, 1/2 and block-1"
    )
    args = parser.parse_args()
    engine = build_engine(args.preset, 0, "cpu")  # the preset's own block size
    block, vocab = engine.model.config.block_size, engine.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=g).tolist()
    windows = [int(w) for w in args.windows.split(",")] if args.windows else [
        3 * block // 4, block // 2, block - 1,
    ]  # fmt: skip
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.preset} (block {block}), batch {args.batch}, "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, fp32"
    )
    crop = SamplingParams(
        max_new_tokens=args.new_tokens, temperature=0, use_cache=False, window=block - 1
    )
    ref_rate, ref_steps = time_generate(engine, prompts, crop, float("inf"))
    print("| path | window | tok/s | vs crop-and-recompute | same tokens as crop |")
    print("|---|---:|---:|---:|---|")
    print(f"| crop-and-recompute, no cache | {block - 1} | {ref_rate:.1f} | 1.00x | - |")
    for window in windows:
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, window=window)
        rate, steps = time_generate(engine, prompts, params, float("inf"))
        same = "yes" if steps == ref_steps else "no (a different context)"
        print(
            f"| KV cache + recompute when full | {window} | {rate:.1f} | {rate / ref_rate:.2f}x | {same} |"
        )


if __name__ == "__main__":
    main()
