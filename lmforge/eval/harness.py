"""lm-evaluation-harness backend `lmforge`: any lm-eval task on an lmforge checkpoint.

    lmforge-lm-eval --model lmforge --model_args checkpoint=runs/x,batch_size=16 --tasks piqa
    python -m lmforge.eval.harness --model lmforge --model_args checkpoint=runs/x ...

Both are lm-eval's own CLI (`lm_eval ARGS`) with this module imported first, which registers
the model name. lm-eval 0.4.13 discovers no plugins (no entry-point group): its model registry
holds only what lm_eval/models/__init__.py lists and what imported code registers. From
Python, import this module and pass `model="lmforge"` to `lm_eval.simple_evaluate`.

The numbers come from the same code as `lmforge eval`: log-likelihoods from
`Scorer.loglikelihood`, perplexity from `Scorer.rolling`, generation from the `Engine`
(greedy). Only this module imports lm_eval; importing lmforge does not.
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from contextlib import closing

import lm_eval.models  # noqa: F401  (lm-eval's own models first: see LmforgeLM)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string

import lmforge
from lmforge.allocator import keep_freed_memory
from lmforge.common import LmforgeError
from lmforge.engine import Engine, SamplingParams
from lmforge.eval.scoring import Scorer
from lmforge.hardware import pick_device

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
"""Rows per forward pass when neither model_args nor lm-eval give a number (or give 'auto')."""
DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's default for generate_until requests that do not set max_gen_toks."""


# lm_eval.models (imported above) fills the registry with lm-eval's own models. It must come
# first: get_model() imports it only while the registry is empty, so registering `lmforge`
# into an empty registry would hide `hf` and the rest from the same process.
@register_model("lmforge")
class LmforgeLM(LM):
    """An lmforge checkpoint (a checkpoint folder or a run folder) as an lm-eval model.

    model_args: checkpoint=PATH (required), batch_size=N (int, or 'auto' = max_batch_size or
    16), device=cpu|cuda|... (a CUDA device on a machine without one falls back to the best
    device there, because lm-eval's CLI passes --device cuda:0 unless told otherwise)."""

    def __init__(
        self,
        checkpoint: str,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,
        device: str | None = None,
    ):
        super().__init__()
        self._device = _pick_device(device)
        model, tokenizer = lmforge.load(checkpoint, self._device)
        if tokenizer is None:
            raise LmforgeError(f"{checkpoint} has no tokenizer/ folder, so text cannot be scored")
        self.checkpoint = str(checkpoint)
        self.scorer = Scorer(model, tokenizer, _batch_size(batch_size, max_batch_size))
        self.engine = Engine(model, notice=logger.warning)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """model_args win over the CLI's --batch_size / --device. lm-eval always passes those
        (defaults included) next to model_args, and its own version of this method fails on a
        key given twice."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def get_model_info(self) -> dict:
        """Goes into lm-eval's results["config"]."""
        return {"checkpoint": self.checkpoint, "batch_size": self.scorer.batch_size}

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per (context, continuation)."""
        args = [r.args for r in requests]
        out = [(s.logprob, s.is_greedy) for s in self.scorer.loglikelihood(args)]
        for arg, result in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", arg, result)
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log p(text), every token scored once after the prefix token (BOS, else EOT)."""
        out = []
        for (text,) in (r.args for r in requests):
            ids = self.scorer.encode_texts([text])[0]  # rolling() puts the prefix token first
            out.append(self.scorer.rolling(ids).logprob.sum().item() if ids else 0.0)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut before the first `until` string and ended by the
        tokenizer's stop ids or after `max_gen_toks` tokens. Requests with the same settings
        are generated together, batch_size prompts at a time."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, kwargs) in enumerate(r.args for r in requests):
            groups[_generation_settings(kwargs)].append(i)
        out: list[str] = [""] * len(requests)
        size = self.scorer.batch_size
        for (until, max_gen_toks), members in groups.items():
            for b in range(0, len(members), size):
                batch = members[b : b + size]
                texts = self._generate([requests[i].args[0] for i in batch], until, max_gen_toks)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    # ------------------------------------------------------------------ generation

    def _generate(self, contexts: list[str], until: tuple[str, ...], max_gen_toks: int):
        """Generate for every context at once; stop early once every row has hit a stop."""
        tok = self.scorer.tokenizer
        prompts = [self._prompt(c) for c in contexts]
        params = SamplingParams(max_new_tokens=max_gen_toks, temperature=0, stop_ids=tok.stop_ids)
        ids: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        with closing(self.engine.stream(prompts, params)) as steps:
            for step in steps:
                for row, token in enumerate(step):
                    if token is None:
                        done[row] = True
                    elif not done[row]:
                        ids[row].append(token)
                        text = tok.decode(ids[row])
                        done[row] = len(_cut(text, until)) < len(text)
                if all(done):
                    break
        return [_cut(tok.decode(row), until) for row in ids]

    def _prompt(self, context: str) -> list[int]:
        """An empty context starts from the prefix token, as in loglikelihood."""
        ids = self.scorer.tokenizer.encode(context)
        if not ids and self.scorer.prefix_id is not None:
            ids = [self.scorer.prefix_id]
        return ids


def _generation_settings(kwargs: dict) -> tuple[tuple[str, ...], int]:
    """(until strings, max_gen_toks) of a request's generation kwargs, read by lm-eval's own
    normaliser (the aliases of max_gen_toks, until as a string). Sampling is refused: the
    backend is greedy only."""
    settings = normalize_gen_kwargs(kwargs, DEFAULT_MAX_GEN_TOKS)
    if settings["do_sample"]:
        raise LmforgeError("the lmforge lm-eval backend generates greedily: do_sample=False only")
    return tuple(settings["until"]), settings["max_gen_toks"]


def _cut(text: str, until: tuple[str, ...]) -> str:
    """text up to its first stop string (all of it when it holds none)."""
    hits = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[: min(hits, default=len(text))]


def _pick_device(requested: str | None) -> torch.device:
    if requested is None or (requested.startswith("cuda") and not torch.cuda.is_available()):
        return pick_device("auto")
    return pick_device(requested)


def _batch_size(value: int | str, max_batch_size: int | None) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return max_batch_size or DEFAULT_BATCH_SIZE
    return int(value)


def main() -> None:
    """`lm_eval ARGS` with the `lmforge` model registered (the `lmforge-lm-eval` script)."""
    from lm_eval.__main__ import cli_evaluate

    keep_freed_memory()  # as in every lmforge verb: activations' memory stays for reuse
    gc.freeze()  # the ~350k objects of the imports: full collections skip them (cli/eval.py)
    cli_evaluate()


if __name__ == "__main__":
    main()
