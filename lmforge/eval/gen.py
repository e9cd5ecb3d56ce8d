"""Generation against references (`--task gen[=FILE]`): greedy answers scored by exact match
and, for free-text answers, BLEU, chrF and ROUGE.

A file's format is set by its first record and every record must have its fields:
- GSM8K, `{"question", "answer"}` with the answer ending in `#### <number>`: `exact_match` is
  the share of generations whose last number equals that number (commas, `$` dropped,
  compared as decimals, so 18 == 18.00). The bundled GSM8K test set is `GSM8K` below.
- instructions, `{"instruction", "input" (optional), "output"}` (alpaca) or
  `{"prompt", "reference"}`: `bleu` and `chrf` are sacrebleu's corpus scores (0-100), `rouge1`,
  `rouge2`, `rougeL` the mean F-measures of rouge-score with stemming (0-1), `exact_match` the
  share of generations equal to their reference after `normalise`.
The default data is the held-out last 10% of the bundled instructions (the project's split).

Prompts (plain, i.e. without `chat`):
- GSM8K, zero-shot as lm-evaluation-harness writes it: `Question: {question}\\nAnswer:`
- alpaca, the Stanford Alpaca template (`ALPACA`, or `ALPACA_INPUT` when `input` is non-empty)
- prompt/reference: the prompt as it is.
Generation is greedy (the Engine, KV cache) for `max_new_tokens`, ends at the tokenizer's stop
ids, and the text is then cut where the template would go on (`STOPS`: "Question:" for GSM8K,
as the harness does, and "\\n###" for alpaca); greedy tokens before that point do not depend
on what follows, so cutting afterwards equals stopping there. With `chat` the prompt is the
user message (GSM8K: the question; alpaca: instruction, a blank line, input, as SFT renders
it), rendered with the chat template, and generation ends at end-of-turn.
"""

from __future__ import annotations

import re
import string
from decimal import Decimal
from pathlib import Path

import sacrebleu
from rouge_score import rouge_scorer
from tqdm import tqdm

from lmforge.common import LmforgeError
from lmforge.data.sft import read_records, split_records
from lmforge.engine import Engine, SamplingParams
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import ASSETS, EVAL_ASSETS, TaskOptions, TaskResult, file_sha256
from lmforge.recipes.sft import answer
from lmforge.tokenizer import END_TURN

INSTRUCTIONS = ASSETS / "instructions.json"
HELD_OUT = 0.1
"""The default data is the last 10% of INSTRUCTIONS, the split no lmforge recipe trains on."""
GSM8K = EVAL_ASSETS / "gsm8k_test.jsonl"
SAMPLES = 5
"""(prompt, reference, generation) triples kept in the result's details."""

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
GSM8K_PROMPT = "Question: {question}\nAnswer:"

FIELDS = {
    "gsm8k": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "prompt": ("prompt", "reference"),
}
"""Format -> (prompt field, reference field); the first record's prompt field sets the format."""
STOPS = {"gsm8k": "Question:", "alpaca": "\n###", "prompt": None}
"""Plain prompts: where a generation is cut (the template's next section)."""

NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
"""A number as GSM8K writes them: optional sign and $, thousands commas, decimals."""


# ---------------------------------------------------------------- records and prompts


def load_records(path: Path | None, limit: int | None) -> tuple[list[dict], Path]:
    """(the first `limit` records, the file they came from): the file's records, or with no
    path the held-out split of the bundled instructions."""
    if path is None:
        return split_records(str(INSTRUCTIONS), HELD_OUT, "")[1][:limit], INSTRUCTIONS
    return read_records(path)[:limit], path


def record_format(records: list[dict], path: Path, formats: tuple[str, ...] = tuple(FIELDS)) -> str:
    """The format (a FIELDS key among `formats`) of the first record."""
    first = records[0]
    if isinstance(first, dict):
        for fmt in formats:
            if FIELDS[fmt][0] in first:
                return fmt
    wanted = " or ".join(repr(FIELDS[f][0]) for f in formats)
    found = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise LmforgeError(f"{path}: record 0 has no {wanted} field (found {found})")


def check_fields(record, where: str, fields: tuple[str, ...]) -> None:
    if not isinstance(record, dict):
        raise LmforgeError(f"{where} is not a JSON object")
    for name in fields:
        if name not in record:
            raise LmforgeError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], str):
            raise LmforgeError(f"{where}: field {name!r} must be a string")


def alpaca_prompt(record: dict, chat: bool) -> str:
    """With chat the user message SFT trains on (lmforge/data/sft.py to_messages), else the
    Alpaca template."""
    instruction, extra = record["instruction"], record.get("input")
    if chat:
        return f"{instruction}\n\n{extra}" if extra else instruction
    if extra:
        return ALPACA_INPUT.format(instruction=instruction, input=extra)
    return ALPACA.format(instruction=instruction)


def prompt_for(record: dict, fmt: str, chat: bool) -> str:
    """The text the model is given: a plain prompt, or with chat the user message."""
    if fmt == "gsm8k":
        return record["question"] if chat else GSM8K_PROMPT.format(question=record["question"])
    if fmt == "alpaca":
        return alpaca_prompt(record, chat)
    return record["prompt"]


# ---------------------------------------------------------------- generation


def check_chat_tokens(tokenizer) -> None:
    tok = getattr(tokenizer, "tok", None)  # a Hugging Face tokenizers.Tokenizer
    if tok is None or tok.token_to_id(END_TURN) is None:
        raise LmforgeError(
            "chat prompts need a tokenizer with lmforge's chat tokens; this one has none "
            "(leave out chat for a base model)"
        )


def generate(
    scorer: Scorer,
    prompts: list[str],
    max_new_tokens: int,
    chat: bool = False,
    stop: str | None = None,
) -> list[str]:
    """Greedy generations, scorer.batch_size prompts at a time, decoded, cut at `stop` and
    stripped. Plain prompts are encoded as they are and end at the tokenizer's stop ids; with
    chat each prompt is one user message, answered as SFT's `answer` does (chat template,
    end-of-turn ends it)."""
    tokenizer, size = scorer.tokenizer, scorer.batch_size
    if chat:
        check_chat_tokens(tokenizer)
    produce = chat_answers if chat else plain_answers
    ids: list[list[int]] = []
    for i in tqdm(
        range(0, len(prompts), size), disable=not scorer.progress, desc="generate", leave=False
    ):
        ids += produce(scorer, prompts[i : i + size], max_new_tokens)
    texts = [tokenizer.decode(x) for x in ids]
    return [(t.split(stop)[0] if stop else t).strip() for t in texts]


def plain_answers(scorer: Scorer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    tokenizer = scorer.tokenizer
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0, stop_ids=tuple(tokenizer.stop_ids)
    )
    engine = Engine(scorer.model, pad_id=tokenizer.pad_id or 0)
    return engine.generate([tokenizer.encode(p) for p in prompts], params)


def chat_answers(scorer: Scorer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    answers = answer(scorer.model, scorer.tokenizer, conversations, max_new_tokens, len(prompts))
    return [ids for ids, _ in answers]


# ---------------------------------------------------------------- metrics


def final_number(text: str) -> Decimal | None:
    """The last number in a text, commas and $ dropped (GSM8K's answers and lm-evaluation-
    harness's flexible extraction): "so the answer is 1,234." -> 1234; None when there is none."""
    found = NUMBER.findall(text)
    return Decimal(found[-1].replace(",", "").replace("$", "")) if found else None


def normalise(text: str) -> str:
    """Exact match's view of a text: case-folded, ASCII punctuation removed, whitespace runs
    collapsed to one space."""
    text = text.casefold().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def text_metrics(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """BLEU and chrF (sacrebleu corpus scores, 0-100), ROUGE-1/2/L mean F-measures (rouge-score,
    stemmed, 0-1) and normalised exact match (0-1) of generations against one reference each."""
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [rouge.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    n = len(hypotheses)
    exact = sum(normalise(h) == normalise(r) for h, r in zip(hypotheses, references))
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        **{key: sum(s[key].fmeasure for s in scores) / n for key in ("rouge1", "rouge2", "rougeL")},
        "exact_match": exact / n,
    }


def gsm8k_reference(answer_text: str, where: str = "a GSM8K record") -> Decimal:
    """The number after a GSM8K answer's `####`."""
    _, mark, tail = answer_text.rpartition("####")
    number = final_number(tail) if mark else None
    if number is None:
        raise LmforgeError(f"{where}: the answer does not end with '#### <number>'")
    return number


def gsm8k_metrics(generations: list[str], answers: list[str]) -> dict[str, float]:
    """exact_match: the share of generations whose last number is the answer's."""
    correct = [final_number(g) == gsm8k_reference(a) for g, a in zip(generations, answers)]
    return {"exact_match": sum(correct) / len(correct)}


# ---------------------------------------------------------------- the task


def check_records(records: list[dict], source: Path, fmt: str) -> None:
    """Every record has its format's fields (and a GSM8K answer its final number)."""
    for i, r in enumerate(records):
        where = f"{source}: record {i}"
        check_fields(r, where, FIELDS[fmt])
        if fmt == "gsm8k":
            gsm8k_reference(r["answer"], where)


def run(scorer: Scorer, path: Path | None, options: TaskOptions) -> TaskResult:
    records, source = load_records(path, options.limit)
    fmt = record_format(records, source)
    check_records(records, source, fmt)
    references = [r[FIELDS[fmt][1]] for r in records]
    prompts = [prompt_for(r, fmt, options.chat) for r in records]
    stop = None if options.chat else STOPS[fmt]
    generations = generate(scorer, prompts, options.max_new_tokens, options.chat, stop)
    if fmt == "gsm8k":
        metrics = gsm8k_metrics(generations, references)
    else:
        metrics = text_metrics(generations, references)
    samples = [
        {"prompt": p, "reference": r, "generation": g}
        for p, r, g in zip(prompts[:SAMPLES], references, generations)
    ]
    details = {"format": fmt, "chat": options.chat, "samples": samples}
    return TaskResult(metrics, len(records), details, {str(source): file_sha256(source)})
