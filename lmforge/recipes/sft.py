"""Supervised fine-tuning (instruction tuning): chat conversations + next-token loss on the
assistant's tokens only, on the one Trainer, from a base checkpoint, with any PEFT method.

`sft(cfg)` loads `run.base` (model + tokenizer with chat tokens), renders `data.path`'s records
as conversations (lmforge/data/sft.py), holds out the last `data.val_fraction` of them (or
reads `data.val_path`), and trains with bucketed or packed batches. Evaluation (step 0, every
`train.eval_interval` steps and the end) reports `val_loss` on response tokens and
`val_end_rate`: the share of held-out prompts whose greedy answer ends with the end-of-turn
token within `train.eval_max_new_tokens`. A few answers are printed at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.chat import render_conversation
from lmforge.common import print0, seed_everything
from lmforge.config import Config
from lmforge.data.example_loader import ExampleLoader
from lmforge.data.sft import load_examples
from lmforge.engine import Engine, SamplingParams
from lmforge.model.peft import apply_peft, trainable_share
from lmforge.recipes.run import load_base, run_folder
from lmforge.tokenizer import END_TURN, Tokenizer
from lmforge.train.distributed import destroy_distributed, init_distributed
from lmforge.train.losses import CausalLMLoss
from lmforge.train.trainer import Trainer


def answer(
    model,
    tokenizer: Tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[tuple[list[int], bool]]:
    """Greedy assistant answers to each conversation (chat messages up to the assistant's
    turn) -> [(answer ids, ended with end-of-turn)]."""
    end = tokenizer.tok.token_to_id(END_TURN)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop_ids=(end,))
    engine = Engine(model, pad_id=tokenizer.pad_id or 0)
    prompts = [
        render_conversation(tokenizer, c, add_generation_prompt=True)[0] for c in conversations
    ]
    out: list[tuple[list[int], bool]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids: list[list[int]] = [[] for _ in chunk]
        ended = [False] * len(chunk)
        for step in engine.stream(chunk, params):
            for row, token in enumerate(step):
                if token is None:
                    ended[row] = True
                elif not ended[row]:
                    ids[row].append(token)
        out += list(zip(ids, ended))
    return out


def sft(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune `cfg.run.base` on `cfg.data.path` (or continue the run folder `resume`)."""
    info = init_distributed(cfg.run.device, cfg.train.parallel, "lmforge sft")
    try:
        seed_everything(cfg.train.seed)
        base, base_model, tokenizer = load_base(cfg, "be instruction-tuned (lmforge sft)")
        model = apply_peft(base_model, cfg.peft)
        trainable, total = trainable_share(model)
        block = model.config.block_size  # P-tuning's virtual tokens take some of it
        train_ex, val_ex, dropped = load_examples(
            tokenizer, cfg.data.path, cfg.data.val_fraction, cfg.data.val_path, block
        )
        t = cfg.train
        pad_id = tokenizer.pad_id or 0
        packed = cfg.data.sampling == "packed"
        train_loader = ExampleLoader(
            train_ex, t.micro_batch_size, block, pad_id, t.seed, info.dp_rank, info.dp_size, packed
        )
        val_loader = ExampleLoader(
            val_ex, t.micro_batch_size, block, pad_id, t.seed, info.dp_rank, info.dp_size
        )
        probe = [e.messages[:-1] for e in val_ex[: t.eval_generations]]  # up to the answer

        def end_rate() -> dict[str, float]:
            answers = answer(model, tokenizer, probe, t.eval_max_new_tokens)
            return {"val_end_rate": sum(ended for _, ended in answers) / max(1, len(answers))}

        run_dir = run_folder(cfg, resume, info)
        trainer = Trainer(
            cfg,
            model,
            train_loader,
            val_loader.each_batch_once,
            run_dir,
            info,
            loss_fn=CausalLMLoss(),
            tokenizer=tokenizer,
            extra_eval=end_rate,
        )
        trainer.resume(resume)
        print0(
            f"sft {run_dir}: base {base}, {len(train_ex)} train / {len(val_ex)} held-out "
            f"conversations ({dropped} longer than block_size {block} dropped), "
            f"{'packed' if packed else 'bucketed'} batches, precision {trainer.precision}; "
            f"peft {cfg.peft.method}: {trainable:,} of {total:,} parameters train "
            f"({trainable / total:.2%})"
        )
        result = trainer.fit()
        if info.is_main:
            for e, (ids, ended) in zip(
                val_ex[:3],
                answer(
                    model, tokenizer, [e.messages[:-1] for e in val_ex[:3]], t.eval_max_new_tokens
                ),
            ):
                print0(
                    f"\n--- {e.messages[-2]['content'][:200]}\n>>> {tokenizer.decode(ids)}{'' if ended else ' [...]'}"
                )
        return result
    finally:
        destroy_distributed()
