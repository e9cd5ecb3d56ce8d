"""The `lmforge` lm-evaluation-harness backend (lmforge/eval/harness.py) gives lm-eval the same
numbers as lmforge's own scoring: per-request log-likelihoods, multiple-choice accuracy,
rolling log-likelihoods and greedy generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.common import LmforgeError
from lmforge.engine import Engine, SamplingParams
from lmforge.eval import mc
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import TaskOptions
from lmforge.tokenizer import train_bpe

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task data is a local file
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.eval.harness import LmforgeLM  # noqa: E402

TASK = "lmforge_mc_test"
ITEMS = [
    {"context": "Question: How do I boil water?\nAnswer:", "choices": ["Heat it in a pot.", "Put it in the freezer."], "label": 0},
    {"context": "The café was", "choices": ["closed", "open all night", "full of naïve tourists"], "label": 2},
    {"context": "Question: What keeps a tent up?\nAnswer:", "choices": ["Poles and pegs.", "A bowl of soup."], "label": 0},
    {"context": "To dry wet shoes,", "choices": ["stuff them with newspaper", "fill them with water"], "label": 0},
    {"context": "She opened the umbrella because ", "choices": ["it was raining", "it was sunny", "the cat sneezed"], "label": 0},
    {"context": "", "choices": ["An answer with no question.", "Another one."], "label": 1},
    {"context": "Question: Where do fish live?\nAnswer:", "choices": ["In water.", "In trees.", "On the moon.", "In books."], "label": 0},
    {"context": "2 + 2 =", "choices": ["4", "22"], "label": 0},
]  # fmt: skip
"""Hand-made items: 2-4 choices, non-ASCII text, a context with a trailing space, an empty one."""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A folder holding the items as JSONL and a local lm-eval task YAML over them."""
    folder = tmp_path_factory.mktemp("lm_eval_task")
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {folder / 'cache'}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
    )
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_base) -> Path:
    texts = [item["context"] + " " + " ".join(item["choices"]) for item in ITEMS]
    tok = train_bpe(texts * 4, vocab_size=320)
    return save_base(tmp_path_factory.mktemp("ckpt") / "base", tok)


@pytest.fixture(scope="module")
def scorer(checkpoint) -> Scorer:
    return Scorer(*lmforge.load(checkpoint))


@pytest.fixture(scope="module")
def evaluated(checkpoint, task_dir) -> dict:
    """lm-eval's simple_evaluate of the task with the `lmforge` model (batch size 3, so the
    batches differ from the Scorer's)."""
    return lm_eval.simple_evaluate(
        model="lmforge",
        model_args=f"checkpoint={checkpoint},batch_size=3,device=cpu",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )


def test_lm_eval_log_likelihoods_are_the_scorers(evaluated, scorer):
    samples = sorted(evaluated["samples"][TASK], key=lambda s: s["doc_id"])
    requests = [(item["context"], " " + c) for item in ITEMS for c in item["choices"]]
    assert [tuple(a) for s in samples for a in s["arguments"]] == requests
    got = [ll for s in samples for ll, _ in s["filtered_resps"]]
    want = [s.logprob for s in scorer.loglikelihood(requests)]
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)


def test_lm_eval_accuracy_is_lmforge_mc_accuracy(evaluated, scorer, task_dir):
    results = evaluated["results"][TASK]
    ours = mc.run(scorer, task_dir / "items.jsonl", TaskOptions())
    assert ours.items == len(ITEMS)
    assert results["acc,none"] == pytest.approx(ours.metrics["acc"], abs=0)


def test_lm_eval_acc_norm_divides_by_the_choices_characters(evaluated, scorer):
    """lm-eval's acc_norm: each choice's log-likelihood over len(choice), the delimiter left
    out, recomputed here from the Scorer's numbers."""
    correct = 0
    for item in ITEMS:
        scores = scorer.loglikelihood([(item["context"], " " + c) for c in item["choices"]])
        per_char = [s.logprob / len(c) for s, c in zip(scores, item["choices"])]
        correct += max(range(len(per_char)), key=per_char.__getitem__) == item["label"]
    assert evaluated["results"][TASK]["acc_norm,none"] == pytest.approx(correct / len(ITEMS))


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lm(checkpoint) -> LmforgeLM:
    return LmforgeLM(checkpoint=str(checkpoint), batch_size=2, device="cpu")


def test_loglikelihood_rolling_sums_the_scorers_rolling_log_probs(lm, scorer):
    long = " ".join(item["context"] + " " + item["choices"][0] for item in ITEMS) * 3
    texts = ["2 + 2 = 4", long]
    assert len(scorer.tokenizer.encode(long)) > 2 * scorer.block  # several windows
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    want = [scorer.rolling(scorer.tokenizer.encode(t)).logprob.sum().item() for t in texts]
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_is_greedy_and_stops_before_an_until_string(lm, scorer):
    tok = scorer.tokenizer
    prompts = ["The café was", "Question: Where do fish live?\nAnswer:"]
    params = SamplingParams(max_new_tokens=12, temperature=0, stop_ids=tok.stop_ids)
    greedy = [
        tok.decode(ids)
        for ids in Engine(scorer.model).generate([tok.encode(p) for p in prompts], params)
    ]
    assert all(len(text) > 6 for text in greedy)
    stop = greedy[0][3:6]
    requests = [
        (prompts[0], {"until": [stop], "max_gen_toks": 12}),
        (prompts[1], {"until": ["never in the output"], "max_gen_toks": 12}),
        (prompts[0], {"until": "never", "max_gen_toks": 12, "do_sample": False}),
    ]
    got = lm.generate_until(_instances("generate_until", requests))
    assert got == [greedy[0][: greedy[0].find(stop)], greedy[1], greedy[0]]


def test_sampling_is_refused(lm):
    with pytest.raises(LmforgeError, match="greedily"):
        lm.generate_until(_instances("generate_until", [("a", {"do_sample": True})]))


def test_importing_lmforge_does_not_import_lm_eval():
    code = (
        "import sys, lmforge, lmforge.eval.mc, lmforge.eval.scoring, lmforge.cli; "
        "assert 'lm_eval' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_lm_eval_cli_runs_the_lmforge_model(checkpoint, task_dir, scorer, tmp_path):
    """`python -m lmforge.eval.harness` (= the lmforge-lm-eval script) is lm-eval's CLI with
    the model registered; --batch_size next to model_args' batch_size is no conflict."""
    args = ["--model", "lmforge", "--model_args", f"checkpoint={checkpoint},batch_size=4"]
    args += ["--device", "cpu", "--batch_size", "2", "--tasks", TASK]
    args += ["--include_path", str(task_dir), "--output_path", str(tmp_path)]
    subprocess.run([sys.executable, "-m", "lmforge.eval.harness", *args], check=True)
    (results,) = tmp_path.rglob("results_*.json")
    acc = json.loads(results.read_text())["results"][TASK]["acc,none"]
    assert acc == mc.run(scorer, task_dir / "items.jsonl", TaskOptions()).metrics["acc"]
