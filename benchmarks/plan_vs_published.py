"""`lmforge plan` beside published memory figures: GPT-2 124M, Llama 3.2 1B-like and Llama 3.1
8B-like on 8 x 80 GB GPUs, FSDP over the 8, AdamW, bf16, checkpointing off and on; then the
published measurements and rules the planner can be held against (sources in BENCHMARKS.md,
"lmforge plan beside published memory figures"). Nothing runs on a GPU: every figure here is
the planner's, next to the published one.

    python benchmarks/plan_vs_published.py
"""

from __future__ import annotations

from lmforge.config import build_config
from lmforge.hardware import gpu_peak_flops
from lmforge.research import activations as act
from lmforge.research.memory_plan import parse_bytes, plan
from lmforge.research.plan_report import size

DEVICE = parse_bytes("80GB")
WORLD = 8
FSDP8 = ["--train.optimizer=adamw", "--train.precision=bf16", "--train.parallel.dp_shard=8"]
MODELS = {  # name -> overrides: each model's usual run shape
    "GPT-2 124M (configs/train_gpt2_124m.yaml: 16 x 1,024)": [
        "--model.preset=gpt2-124m",
        "--model.vocab_size=50304",
        "--model.block_size=1024",
        "--train.micro_batch_size=16",
    ],
    "Llama 1B-like (llama-1b: 2 x 8,192)": [
        "--model.preset=llama-1b",
        "--model.block_size=8192",
        "--train.micro_batch_size=2",
    ],
    "Llama 8B-like (llama-8b: 2 x 8,192)": [
        "--model.preset=llama-8b",
        "--model.block_size=8192",
        "--train.micro_batch_size=2",
    ],
}
GPT2_1_5B = [  # GPT-2 XL's shapes, the ZeRO paper's example
    "--model.preset=gpt2-124m",
    "--model.n_layer=48",
    "--model.d_model=1600",
    "--model.n_head=25",
    "--model.block_size=1024",
]


def _plan(overrides: list[str], world: int = WORLD):
    return plan(build_config(overrides=overrides), world)


def per_rank_table() -> None:
    print(f"Per rank, {WORLD} GPUs, FSDP over {WORLD}, AdamW, bf16 autocast (fp32 master weights)")
    print(
        "| model | parameters | states per rank | ZeRO-3: 16 B/param / 8 | activations, "
        "checkpointing off | on | device total, off | on | fits 80 GB, off / on | "
        "tokens/s at MFU 0.4 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    peak = gpu_peak_flops("H100", "bf16")
    for name, overrides in MODELS.items():
        p = _plan([*overrides, *FSDP8])
        off, on = p.worst(False), p.worst(True)
        zero3 = 16 * p.n_params / WORLD
        fits = " / ".join("yes" if s.device <= DEVICE else "no" for s in (off, on))
        print(
            f"| {name} | {p.n_params / 1e9:.3f}B | {size(off.states)} | {size(zero3)} | "
            f"{size(sum(off.activations.values()))} | {size(sum(on.activations.values()))} | "
            f"{size(off.device)} | {size(on.device)} | {fits} | "
            f"{p.tokens_per_s(0.4, peak):,.0f} |"
        )
    print()


def published_table() -> None:
    print("| published | its figure | lmforge plan, same shapes | off | on |")
    print("|---|---:|---|---:|---:|")
    t1 = _plan([*MODELS["Llama 8B-like (llama-8b: 2 x 8,192)"], *FSDP8])
    print(
        "| torchtitan Table 1: Llama 3.1 8B, 8 H100, FSDP 8, local batch 2 x 8,192, "
        "selective (op) AC, eager / compiled | 82.4 / 77.0 GiB (max reserved) | "
        f"device total | {size(t1.worst(False).device)} | {size(t1.worst(True).device)} |"
    )
    t2 = _plan(
        [
            "--model.preset=llama-8b",
            "--model.block_size=32768",
            "--train.micro_batch_size=1",
            *FSDP8,
        ]
    )
    print(
        "| torchtitan Table 2: Llama 3.1 8B, 8 H100, FSDP 8, 1 x 32,768, full AC, compiled, "
        f"Float8 | 83.9 GiB (max reserved) | device total | {size(t2.worst(False).device)} | "
        f"{size(t2.worst(True).device)} |"
    )
    zero = _plan(
        [*GPT2_1_5B, "--model.vocab_size=50257", "--train.micro_batch_size=32"]
        + ["--train.precision=fp16", "--train.optimizer=adamw"],
        world=1,
    )
    print(
        "| ZeRO paper section 3.2: GPT-2 1.5B, 1K sequence, batch 32 | about 60 GB of "
        f"activations | activations | {size(sum(zero.worst(False).activations.values()))} | "
        f"{size(sum(zero.worst(True).activations.values()))} |"
    )
    cfg = build_config(overrides=[*GPT2_1_5B, "--model.vocab_size=50257"])
    per_layer = sum(act.block_saved(act.Shapes(cfg.model, "bf16", 1, 1)).values())
    print(
        "| Korthikanti et al. 2022, eq. 6 (selective recomputation: no attention scores), "
        "16-bit, dropout masks included | 34 s b h bytes per layer | GPT-2 1.5B: one block's "
        f"bytes per token / d_model (bf16, no dropout, SDPA) | {per_layer / 1600:.1f} | |"
    )
    print()


def main() -> None:
    per_rank_table()
    published_table()


if __name__ == "__main__":
    main()
