"""Generation tasks: gen's metrics are the libraries' own (sacrebleu, rouge-score), GSM8K's
final-number extraction, the word-list flagger, gen and toxicity end to end on a tiny random
model (shapes, not quality), classifier flagging, and bad input as one line."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

import lmforge
from lmforge.common import LmforgeError
from lmforge.config import build_config, model_config
from lmforge.eval import gen, toxicity
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import TaskOptions, file_sha256
from lmforge.model.gpt import GPT
from lmforge.model.heads import SequenceClassifier
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import save_checkpoint

RECORDS = json.loads(gen.INSTRUCTIONS.read_text())
LABELS = ["polite", "rude"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe([r["instruction"] + " " + r["output"] for r in RECORDS[:300]], vocab_size=400)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory, save_base) -> Path:
    return save_base(tmp_path_factory.mktemp("base") / "ckpt", tok, block_size=256)


@pytest.fixture(scope="module")
def scorer(base) -> Scorer:
    model, tokenizer = lmforge.load(base)
    return Scorer(model, tokenizer, batch_size=3)


@pytest.fixture(scope="module")
def rude_classifier(tok, tmp_path_factory) -> Path:
    """A random classifier whose head bias makes it predict "rude" for every text."""
    fields = {"preset": "llama-tiny", "vocab_size": tok.vocab_size}
    torch.manual_seed(0)
    model = SequenceClassifier(GPT(model_config(**fields)), LABELS)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 100.0]))
    cfg = build_config({"model": fields, "classify": {"labels": LABELS}})
    return save_checkpoint(tmp_path_factory.mktemp("clf") / "ckpt", model, cfg, tok)


def one_line_error(call) -> str:
    with pytest.raises(LmforgeError) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- metrics without a model


def test_text_metrics_are_the_libraries_own():
    hyps = ["The cats are running home.", "a quick brown fox", "", "Paris is in France"]
    refs = [
        "the cat runs home",
        "The quick brown fox jumps.",
        "nothing here",
        "paris  is in France!",
    ]
    got = gen.text_metrics(hyps, refs)
    assert got["bleu"] == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert got["chrf"] == sacrebleu.corpus_chrf(hyps, [refs]).score
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [rouge.score(r, h) for h, r in zip(hyps, refs)]
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(sum(s[key].fmeasure for s in direct) / len(hyps))
    assert got["rouge1"] > 0  # stemming: cats/cat, running/runs
    assert got["exact_match"] == 1 / 4  # case, punctuation and spacing aside, only Paris


@pytest.mark.parametrize(
    "text, number",
    [
        ("so the answer is 1,234.", 1234),
        ("#### 72", 72),
        ("She pays $1,000.50 in total.", Decimal("1000.50")),
        ("It drops to -3 degrees", -3),
        ("3 apples and 5 pears", 5),
        ("1,000,000 grains", 1000000),
        ("no number at all", None),
    ],
)
def test_the_final_number_is_the_last_one_without_commas_or_dollars(text, number):
    assert gen.final_number(text) == (None if number is None else Decimal(number))


def test_gsm8k_exact_match_compares_numbers_with_the_answer_after_the_marks():
    answers = ["2 + 2 = <<2+2=4>>4\n#### 4", "It costs $18.\n#### 18", "#### 1,000"]
    generations = ["The answer is 4.0", "18 dollars, so 20", "about 1000"]
    assert gen.gsm8k_metrics(generations, answers) == {"exact_match": 2 / 3}


# ---------------------------------------------------------------- the word list


def test_the_word_list_matches_whole_words_and_phrases_case_insensitively():
    texts = [
        "You are an ASSHOLE!",
        "a classic analysis of grapes in Scunthorpe",  # ass, anal, rape, cunt inside words
        "watch 2 girls\n1  cup today",  # a phrase across any whitespace
        "s&m and 🖕",  # entries that start or end with a non-word character
        "",
    ]
    matches = toxicity.wordlist_matches(texts)
    assert [m.lower() for m in matches[0]] == ["asshole"]
    assert matches[1] == [] and matches[4] == []
    assert matches[2] == ["2 girls\n1  cup"]
    assert matches[3] == ["s&m", "🖕"]


def test_a_custom_word_list_prefers_the_longer_phrase():
    pattern = toxicity.word_pattern(["bad", "bad word", "  "])
    assert toxicity.wordlist_matches(["a Bad Word, badly", "baddie"], pattern) == [
        ["Bad Word"],
        [],
    ]
    one_line_error(lambda: toxicity.word_pattern(["", " "]))


# ---------------------------------------------------------------- end to end, tiny model


def test_gen_on_the_held_out_instructions(scorer):
    result = gen.run(scorer, None, TaskOptions(limit=4, max_new_tokens=3))
    assert set(result.metrics) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "exact_match"}
    assert 0 <= result.metrics["bleu"] <= 100 and 0 <= result.metrics["rougeL"] <= 1
    assert result.items == 4
    samples = result.details["samples"]
    assert len(samples) == 4 and result.details["format"] == "alpaca"
    held_out = RECORDS[-110:]
    assert samples[0]["reference"] == held_out[0]["output"]
    assert samples[0]["prompt"] == gen.prompt_for(held_out[0], "alpaca", chat=False)
    assert samples[0]["prompt"].endswith("### Response:\n")
    assert result.data == {str(gen.INSTRUCTIONS): file_sha256(gen.INSTRUCTIONS)}
    json.dumps(result.details)  # report.json holds it


def test_batched_generation_equals_one_prompt_at_a_time(base, scorer):
    prompts = [gen.prompt_for(r, "alpaca", chat=False) for r in RECORDS[-4:]]
    model, tokenizer = lmforge.load(base)
    alone = gen.generate(Scorer(model, tokenizer, batch_size=1), prompts, 4)
    assert gen.generate(scorer, prompts, 4) == alone


def test_gen_with_the_chat_template_and_on_gsm8k(scorer):
    chat = gen.run(scorer, None, TaskOptions(limit=2, max_new_tokens=3, chat=True))
    assert chat.items == 2 and chat.details["chat"] is True
    assert chat.details["samples"][0]["prompt"] == RECORDS[-110]["instruction"] + (
        f"\n\n{RECORDS[-110]['input']}" if RECORDS[-110]["input"] else ""
    )
    math = gen.run(scorer, gen.GSM8K, TaskOptions(limit=2, max_new_tokens=3))
    assert set(math.metrics) == {"exact_match"} and math.items == 2
    assert math.details["format"] == "gsm8k"
    assert math.details["samples"][0]["prompt"].startswith("Question: Janet")


def test_gen_reads_prompt_reference_records(scorer, tmp_path):
    path = tmp_path / "pr.jsonl"
    rows = [{"prompt": "Once upon a time", "reference": "there was a king"}] * 2
    path.write_text("\n".join(map(json.dumps, rows)))
    result = gen.run(scorer, path, TaskOptions(max_new_tokens=2))
    assert result.items == 2 and result.details["format"] == "prompt"
    assert result.data == {str(path): file_sha256(path)}


def test_toxicity_on_the_held_out_prompts(scorer):
    result = toxicity.run(scorer, None, TaskOptions(limit=3, max_new_tokens=3))
    assert set(result.metrics) == {"flagged_wordlist", "flagged_any"}
    assert result.metrics["flagged_any"] == result.metrics["flagged_wordlist"]
    assert result.items == 3 and str(toxicity.WORDLIST) in result.data


def test_toxicity_reads_plain_and_realtoxicityprompts_records(scorer, tmp_path):
    path = tmp_path / "rtp.jsonl"
    rows = [{"prompt": "You are such a"}, {"prompt": {"text": "Well, I think"}}]
    path.write_text("\n".join(map(json.dumps, rows)))
    assert toxicity.run(scorer, path, TaskOptions(max_new_tokens=2)).items == 2


def test_classifier_flags_generations_with_the_flag_label(scorer, rude_classifier):
    options = TaskOptions(limit=2, max_new_tokens=2, classifier=str(rude_classifier))
    result = toxicity.run(scorer, None, options)
    spoken = 1 - result.details["empty_generations"] / result.items  # empty: not classified
    assert result.metrics["flagged_classifier"] == spoken == result.metrics["flagged_any"]
    assert all(e["label"] == "rude" for e in result.details["examples"])
    json.dumps(result.details)  # report.json holds it
    assert len(result.data) == 3  # prompts, word list, classifier weights
    options.flag_label = "polite"
    polite = toxicity.run(scorer, None, options)
    assert polite.metrics["flagged_classifier"] == 0


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line(scorer, tmp_path, base, rude_classifier):
    missing = tmp_path / "missing.jsonl"
    rows = [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "2 + 2?"}]
    missing.write_text("\n".join(map(json.dumps, rows)))
    error = one_line_error(lambda: gen.run(scorer, missing, TaskOptions()))
    assert "record 1" in error and "'answer'" in error
    no_marks = tmp_path / "marks.json"
    no_marks.write_text(json.dumps([{"question": "1 + 1?", "answer": "two"}]))
    assert "####" in one_line_error(lambda: gen.run(scorer, no_marks, TaskOptions()))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"text": "hello"}]))
    assert "record 0" in one_line_error(lambda: gen.run(scorer, unknown, TaskOptions()))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no records" in one_line_error(lambda: gen.run(scorer, empty, TaskOptions()))
    assert "no records" in one_line_error(lambda: toxicity.run(scorer, empty, TaskOptions()))
    wrong_label = TaskOptions(classifier=str(rude_classifier), flag_label="toxic")
    error = one_line_error(lambda: toxicity.run(scorer, None, wrong_label))
    assert "'toxic'" in error and "polite" in error
    not_classifier = TaskOptions(classifier=str(base))
    assert "not a classifier" in one_line_error(lambda: toxicity.run(scorer, None, not_classifier))
