"""Generation tokens/s with and without the KV cache (random weights, greedy, fp32).

    python -m benchmarks.generation                                   # the full table
    python -m benchmarks.generation --presets gpt2-124m --batch-sizes 8 --nocache-max-seconds 300

Prints a markdown table: per preset and batch size, tokens/s of the uncached reference path
(full forward every step) and of the cached path (prefill + one-token decode), and the ratio.
A preset whose block_size is shorter than prompt + new tokens (shakespeare-char: 64) is run
with block_size raised to fit; the cache and the compute per token do not depend on it.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lmforge.config import model_config
from lmforge.engine import Engine, SamplingParams
from lmforge.model.gpt import GPT

VOCAB = {"shakespeare-char": 65}  # presets without their own vocabulary size


def build_engine(preset: str, block_size: int, device: str) -> Engine:
    overrides: dict = {"preset": preset}
    cfg = model_config(**overrides)
    if cfg.vocab_size is None:
        overrides["vocab_size"] = VOCAB.get(preset, 65)
    if cfg.block_size < block_size:
        overrides["block_size"] = block_size
    torch.manual_seed(0)
    return Engine(GPT(model_config(**overrides)).to(device).eval())


def time_generate(
    engine: Engine, prompts: list[list[int]], params: SamplingParams, max_seconds: float
) -> tuple[float, list[list[int | None]]]:
    """Tokens/s of one generation (after a short warm-up) and its steps. Stops early after
    max_seconds; the rate is then over the steps done, with shorter contexts than the full
    run, so it overstates the speed of a path whose cost grows with context."""
    engine.generate(prompts, SamplingParams(**{**params.__dict__, "max_new_tokens": 2}))
    steps = []
    t0 = time.perf_counter()
    for step in engine.stream(prompts, params):
        steps.append(step)
        if time.perf_counter() - t0 > max_seconds:
            break
    return len(prompts) * len(steps) / (time.perf_counter() - t0), steps


def bench(preset: str, batch: int, args: argparse.Namespace) -> dict:
    engine = build_engine(preset, args.prompt_len + args.new_tokens, args.device)
    V = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, V, (batch, args.prompt_len), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, use_cache=False)
    nocache, ref = time_generate(engine, prompts, params, args.nocache_max_seconds)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
    cache, steps = time_generate(engine, prompts, params, float("inf"))
    return {
        "nocache": nocache,
        "nocache_steps": len(ref),
        "cache": cache,
        "same": steps[: len(ref)] == ref,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["shakespeare-char", "gpt2-124m"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--nocache-max-seconds",
        type=float,
        default=float("inf"),
        help="cut the uncached run short; its rate then covers fewer steps (marked *)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}; prompt {args.prompt_len} "
        f"tokens, {args.new_tokens} new tokens, greedy, fp32, random weights"
    )
    print("| preset | batch | no cache tok/s | KV cache tok/s | speed-up | same tokens |")
    print("|---|---:|---:|---:|---:|---|")
    for preset in args.presets:
        for batch in args.batch_sizes:
            r = bench(preset, batch, args)
            cut = "" if r["nocache_steps"] == args.new_tokens else f" (*{r['nocache_steps']} steps)"
            print(
                f"| {preset} | {batch} | {r['nocache']:.1f}{cut} | {r['cache']:.1f} | "
                f"{r['cache'] / r['nocache']:.1f}x | {'yes' if r['same'] else 'no'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
