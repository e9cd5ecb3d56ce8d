"""A student distilled from a teacher against the same student trained from scratch: same
config (the teacher's data and tokenizer, the student preset and overrides), seed, data
order and schedule; only the loss differs. Prints each run's held-out val_loss (the
student's plain cross-entropy) and wall time side by side.

    python benchmarks/distill_vs_scratch.py --teacher runs/<default job run> --steps 300
    python benchmarks/distill_vs_scratch.py --teacher T --student-preset llama-tiny \\
        --steps 300 --alpha 0.5 0.9 --temperature 1 2 --model.n_layer=3

The scratch run is `lmforge train`'s recipe (pretrain.train); each distilled run is
`lmforge distill`'s at one (alpha, temperature; the config's defaults unless given). The
default student, llama-tiny, is a 2-layer, d_model 64 Llama-style model (0.11M parameters).
Runs go to a temporary folder unless --out.
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from pathlib import Path

from lmforge.config import DistillConfig
from lmforge.recipes.distill import distill, distill_config
from lmforge.recipes.pretrain import train


def run(name: str, recipe, args: argparse.Namespace, out: Path, overrides: list[str]) -> dict:
    common = [
        f"--train.max_steps={args.steps}", f"--train.eval_interval={args.steps}",
        f"--train.ckpt_interval={args.steps}", f"--train.seed={args.seed}",
        f"--run.dir={out}", f"--run.name={name}", "--run.tensorboard=false",
        "--run.sample_tokens=0",
    ]  # fmt: skip
    cfg = distill_config(args.teacher, args.student_preset, overrides=[*common, *overrides])
    start = time.perf_counter()
    result = recipe(cfg)
    return {
        "name": name,
        "val_loss": result["eval"]["val_loss"],
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", required=True, help="teacher checkpoint or run folder")
    parser.add_argument("--student-preset", default="llama-tiny", help="the student's preset")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    parser.add_argument("--seed", type=int, default=1337)
    defaults = DistillConfig()
    parser.add_argument("--alpha", type=float, nargs="+", default=[defaults.alpha])
    parser.add_argument("--temperature", type=float, nargs="+", default=[defaults.temperature])
    parser.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args, overrides = parser.parse_known_args()  # the rest: --model.n_layer=2, --train.lr=...

    with tempfile.TemporaryDirectory(prefix="distill_vs_scratch_") as tmp:
        out = Path(args.out or tmp)
        no_teacher = "--distill.teacher="  # the scratch run's saved config names none
        rows = [run("scratch", train, args, out, [*overrides, no_teacher])]
        for alpha, temp in itertools.product(args.alpha, args.temperature):
            extra = [f"--distill.alpha={alpha}", f"--distill.temperature={temp}"]
            rows.append(run(f"distill_a{alpha}_T{temp}", distill, args, out, [*overrides, *extra]))

    scratch = rows[0]
    print(
        f"\nstudent {' '.join([args.student_preset, *overrides])}, {args.steps} steps, seed "
        f"{args.seed}; teacher {args.teacher}"
    )
    print(f"{'run':<24} {'val_loss':>9} {'val_ppl':>8} {'vs scratch':>10} {'wall_s':>7}")
    for r in rows:
        print(
            f"{r['name']:<24} {r['val_loss']:>9.4f} {math.exp(r['val_loss']):>8.2f} "
            f"{r['val_loss'] - scratch['val_loss']:>+10.4f} {r['wall_s']:>7.1f}"
        )


if __name__ == "__main__":
    main()
