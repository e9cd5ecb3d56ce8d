"""Quantized against float: size on disk, generation tokens/s and perplexity, per method.

    python benchmarks/quantize.py --checkpoint runs/<default job run> [--checkpoint ...] [--gpt2]

Each checkpoint goes through `lmforge quantize` as int8, int8 with int8 activations, and int4
(group 128, or the largest power of two that divides every width); perplexity is on the
bundled Shakespeare's held-out 10% (`lmforge eval --task ppl`), tokens/s is greedy generation
at batch 1 (16-token prompt, --new-tokens new ones, KV cache). --gpt2 adds a GPT-2 124M-shape
model with random weights: size and tokens/s only (its perplexity would mean nothing).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_model

import lmforge
from lmforge.common import LmforgeError
from lmforge.compress.quantize import check_quantizable, quantize_model, save_quantized
from lmforge.config import QuantizeConfig, model_config
from lmforge.engine import Engine, SamplingParams
from lmforge.eval import ppl
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import TaskOptions
from lmforge.model.gpt import GPT
from lmforge.train.checkpoint import WEIGHTS, load_plain, resolve_checkpoint, save_checkpoint

METHODS = {
    "fp32": None,
    "int8": dict(method="int8"),
    "int8 + int8 activations": dict(method="int8", activations="int8"),
    "int4": dict(method="int4"),
}


def int4_group(model: GPT) -> int:
    for group in (128, 64, 32, 16):
        try:
            check_quantizable(model, QuantizeConfig("int4", group))
            return group
        except LmforgeError:
            continue
    raise SystemExit("no int4 group size divides this model's widths")


def tokens_per_s(model: GPT, new_tokens: int) -> float:
    engine = Engine(model)
    prompt = [torch.randint(0, model.config.vocab_size, (16,)).tolist()]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    engine.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
    start = time.perf_counter()
    engine.generate(prompt, params)
    return new_tokens / (time.perf_counter() - start)


def checkpoint_rows(path: str, new_tokens: int, tmp: Path) -> list[tuple]:
    source = resolve_checkpoint(path)
    float_model, tokenizer, cfg = load_plain(source)
    group = int4_group(float_model)
    rows = []
    for name, settings in METHODS.items():
        if settings is None:
            folder, model = source, float_model
        else:
            cfg.quantize = QuantizeConfig(**settings, group_size=group)
            folder = tmp / f"{source.parent.parent.name}_{name.replace(' ', '_')}"
            float_model, _, _ = load_plain(source)
            save_checkpoint(folder, quantize_model(float_model, cfg.quantize), cfg, tokenizer)
            model, tokenizer = lmforge.load(folder)
        size = (folder / WEIGHTS).stat().st_size
        result = ppl.run(Scorer(model, tokenizer), None, TaskOptions())
        rows.append((name, size, result.metrics["perplexity"], tokens_per_s(model, new_tokens)))
    return rows


def gpt2_rows(new_tokens: int, tmp: Path) -> list[tuple]:
    rows = []
    for name, settings in METHODS.items():
        torch.manual_seed(0)
        model = GPT(model_config(preset="gpt2-124m", block_size=256)).eval()
        path = tmp / f"gpt2_{name.replace(' ', '_')}.safetensors"
        if settings is None:
            save_model(model, str(path))
        else:
            qcfg = QuantizeConfig(**settings)
            save_quantized(quantize_model(model, qcfg), qcfg, path)
        rows.append((name, path.stat().st_size, None, tokens_per_s(model, new_tokens)))
    return rows


def print_table(title: str, rows: list[tuple]) -> None:
    base_size, base_ppl, base_speed = rows[0][1], rows[0][2], rows[0][3]
    print(f"\n{title}\n")
    print("| weights | MB on disk | of fp32 | perplexity | change | tokens/s | of fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, size, perplexity, speed in rows:
        ppl_cells = (
            f"{perplexity:.3f} | {perplexity / base_ppl - 1:+.2%}" if perplexity else "- | -"
        )
        print(
            f"| {name} | {size / 1e6:.2f} | {size / base_size:.1%} | {ppl_cells} | "
            f"{speed:.1f} | {speed / base_speed:.2f}x |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", default=[])
    parser.add_argument("--gpt2", action="store_true", help="add a GPT-2 124M-shape model")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.checkpoint:
            print_table(path, checkpoint_rows(path, args.new_tokens, Path(tmp)))
        if args.gpt2:
            print_table("GPT-2 124M shape, random weights", gpt2_rows(args.new_tokens, Path(tmp)))


if __name__ == "__main__":
    main()
