"""The generation engine (checked against the uncached reference path), sampling, and `lmforge generate`."""

from __future__ import annotations

import pytest
import torch

from lmforge import cli
from lmforge.common import LmforgeError
from lmforge.config import build_config, model_config
from lmforge.engine import (
    Engine,
    SamplingParams,
    apply_repetition_penalty,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lmforge.model.gpt import GPT
from lmforge.tokenizer import CharTokenizer
from lmforge.train.checkpoint import save_checkpoint

V = 65
# An untied head and a larger init: random models whose greedy output depends on context.
BASE = dict(preset="tiny", vocab_size=V, tie_embeddings=False, init_std=0.1)
VARIANTS = {
    "learned": {},
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "rope_gqa": dict(pos_encoding="rope", n_head=4, n_kv_head=2),
    "mqa_sliding_window": dict(pos_encoding="rope", n_head=4, n_kv_head=1, sliding_window=6),
    "nope": dict(pos_encoding="none"),
}
PROMPTS = [[5, 17, 3, 44, 9, 12, 30], [8, 1], [60, 2, 33, 4]]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0)


def make_engine(**overrides) -> Engine:
    torch.manual_seed(0)
    return Engine(GPT(model_config(**{**BASE, **overrides})).eval())


def without_cache(params: SamplingParams) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, "use_cache": False})


# ---------------------------------------------------------------- engine vs reference


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_same_with_and_without_cache(variant):
    engine = make_engine(**VARIANTS[variant])
    cached = engine.generate(PROMPTS, GREEDY)
    assert cached == engine.generate(PROMPTS, without_cache(GREEDY))
    assert all(len(row) == 16 for row in cached)
    assert len({tuple(row) for row in cached}) > 1  # the rows are not all the same sequence


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_generates_as_each_prompt_alone(variant, use_cache):
    engine = make_engine(**VARIANTS[variant])
    params = SamplingParams(max_new_tokens=16, temperature=0, use_cache=use_cache)
    alone = [engine.generate([p], params)[0] for p in PROMPTS]
    assert engine.generate(PROMPTS, params) == alone


@pytest.mark.parametrize("use_cache", [True, False])
def test_engine_computes_logits_only_for_the_last_position(use_cache):
    """Prefill, decode and the uncached reference all run the head on one position per row."""
    engine = make_engine(**VARIANTS["rope_gqa"])
    shapes = []
    engine.model.lm_head.register_forward_hook(
        lambda mod, args, out: shapes.append(tuple(out.shape))
    )
    params = SamplingParams(max_new_tokens=5, temperature=0, use_cache=use_cache)
    engine.generate(PROMPTS, params)
    assert shapes == [(len(PROMPTS), 1, V)] * 5


def test_seeded_sampling_is_reproducible_and_matches_reference():
    engine = make_engine(pos_encoding="rope")
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=20, top_p=0.9, seed=123)
    first = engine.generate(PROMPTS, params)
    torch.manual_seed(999)  # global RNG does not matter: the engine has its own generator
    assert engine.generate(PROMPTS, params) == first
    assert engine.generate(PROMPTS, without_cache(params)) == first
    other = SamplingParams(**{**params.__dict__, "seed": 124})
    assert engine.generate(PROMPTS, other) != first


def test_stream_yields_the_same_tokens_step_by_step():
    engine = make_engine()
    params = SamplingParams(max_new_tokens=10, temperature=0.7, seed=5)
    steps = list(engine.stream(PROMPTS, params))
    assert len(steps) == 10 and all(len(step) == len(PROMPTS) for step in steps)
    assert [list(col) for col in zip(*steps)] == engine.generate(PROMPTS, params)


def test_stop_id_ends_only_its_row():
    engine = make_engine()
    free = engine.generate(PROMPTS, GREEDY)
    stop = free[0][3]  # row 0 emits this at step 3 (maybe earlier too)
    first = free[0].index(stop)
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_ids=(stop,))
    stopped = engine.generate(PROMPTS, params)
    assert stopped[0] == free[0][:first]  # the stop id itself is not returned
    for row in (1, 2):  # other rows continue as they would alone, up to their own stop
        expected = free[row][: free[row].index(stop)] if stop in free[row] else free[row]
        assert stopped[row] == expected
    steps = list(engine.stream(PROMPTS, params))
    assert all(step[0] is None for step in steps[first:])


def test_generation_stops_when_every_row_has_stopped():
    engine = make_engine()
    free = engine.generate([PROMPTS[0]], GREEDY)[0]
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_ids=(free[0],))
    assert list(engine.stream([PROMPTS[0]], params)) == [[None]]


def crop_and_recompute(model: GPT, prompt: list[int], n: int) -> list[int]:
    """nanoGPT's generate: every next token from a full forward over the last block_size
    tokens (positions restarting at 0), no cache."""
    block, ids = model.config.block_size, list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-block:]]))[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("variant", ["learned", "rope_gqa"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_past_the_window_greedy_equals_crop_and_recompute(variant, use_cache):
    engine = make_engine(**VARIANTS[variant])  # block_size 32
    params = SamplingParams(max_new_tokens=400, temperature=0, window=31, use_cache=use_cache)
    out = engine.generate([PROMPTS[0]], params)[0]
    assert len(out) == 400
    assert out == crop_and_recompute(engine.model, PROMPTS[0], 400)


@pytest.mark.parametrize("window", [None, 8, 31])
def test_past_the_window_batch_rows_equal_their_solo_runs(window):
    engine = make_engine(**VARIANTS["rope_gqa"])
    params = SamplingParams(max_new_tokens=90, temperature=0, window=window)
    prompts = [
        *PROMPTS,
        list(range(1, 31)),
    ]  # lengths 7, 2, 4 and 30: windows fill at different steps
    batched = engine.generate(prompts, params)
    assert batched == [engine.generate([p], params)[0] for p in prompts]
    assert batched == engine.generate(prompts, without_cache(params))


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_with_a_notice():
    notices = []
    engine = make_engine()
    engine.notice = notices.append
    long_prompt = [(7 * i) % V for i in range(50)]
    out = engine.generate([long_prompt], GREEDY)[0]
    assert notices == [
        "the prompt has 50 tokens, more than the model's context of 32: "
        "its first 18 tokens were dropped"
    ]
    assert out == engine.generate([long_prompt[-32:]], GREEDY)[0]
    assert len(notices) == 1  # the cut prompt itself fits


@pytest.mark.parametrize("window", [0, -3])
def test_a_window_below_1_is_a_user_error(window):
    with pytest.raises(LmforgeError, match="window"):
        SamplingParams(window=window)


@pytest.mark.parametrize("window", [32, 33])
def test_a_window_not_below_block_size_is_a_user_error(window):
    with pytest.raises(LmforgeError, match=r"between 1 and the model's block_size - 1 \(31\)"):
        make_engine().generate(PROMPTS, SamplingParams(window=window))


def test_generate_restores_train_mode():
    engine = make_engine(dropout=0.5)
    engine.model.train()
    out = engine.generate(PROMPTS, GREEDY)
    assert engine.model.training
    engine.model.eval()
    assert engine.generate(PROMPTS, GREEDY) == out  # dropout was off during generation


# ---------------------------------------------------------------- sampling functions


def test_greedy_is_argmax():
    logits = torch.randn(4, V)
    assert torch.equal(sample_next(logits, SamplingParams(temperature=0)), logits.argmax(-1))


def test_sampling_draws_each_token_at_its_probability():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]])
    draws = sample_next(
        probs.log().expand(100_000, 5), SamplingParams(), generator=torch.Generator().manual_seed(0)
    )
    share = torch.bincount(draws, minlength=5) / draws.numel()
    assert share[1] == share[4] == 0  # probability 0, last token included: never drawn
    # 4 standard errors of a share of 100,000 draws: sqrt(p(1-p)/n) <= 0.0016
    assert torch.allclose(share, probs[0], atol=0.0064)


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = top_k_filter(logits, 2)
    assert torch.isfinite(kept).tolist() == [[False, True, False, True, False]]
    draws = sample_next(
        logits.expand(2000, 5), SamplingParams(top_k=2), generator=torch.Generator().manual_seed(0)
    )
    assert set(draws.tolist()) == {1, 3}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the two most likely tokens survive
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()
    draws = sample_next(
        logits.expand(2000, 4),
        SamplingParams(top_p=0.7),
        generator=torch.Generator().manual_seed(0),
    )
    assert set(draws.tolist()) == {1, 3}


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -1.0, 1.5, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 1.5, 0.5]]  # positive / 2, negative * 2, unseen as is
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_next(logits, greedy, seen).item() == 2  # token 0 was the argmax before


def test_repetition_penalty_in_the_engine_breaks_loops():
    engine = make_engine(init_std=0.02, tie_embeddings=True)  # this model mostly repeats its input
    assert engine.generate([[7, 8]], GREEDY)[0][:8] == [8] * 8
    penalised = engine.generate(
        [[7, 8]], SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1e3)
    )
    assert len(set(penalised[0])) == 16 and not {7, 8} & set(penalised[0])


def test_low_temperature_approaches_greedy():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    cold = sample_next(
        logits, SamplingParams(temperature=1e-4), generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(cold, logits.argmax(-1))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("temperature", -1.0),
        ("top_k", 0),
        ("top_p", 0.0),
        ("repetition_penalty", 0.0),
    ],
)
def test_bad_sampling_params_are_user_errors(field, value):
    with pytest.raises(LmforgeError, match=field):
        SamplingParams(**{field: value})


# ---------------------------------------------------------------- `lmforge generate`

TEXT = "hello world, to be or not to be\n"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["generate", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def save_tiny_checkpoint(folder, weights_overrides: dict | None = None) -> None:
    """A checkpoint of a random tiny model; weights_overrides builds the saved weights from
    a different config than the saved config.yaml (a checkpoint that does not fit)."""
    tokenizer = CharTokenizer.from_text(TEXT)  # no end-of-text id: nothing stops generation early
    cfg = build_config({"model": dict(preset="tiny", vocab_size=tokenizer.vocab_size)})
    torch.manual_seed(0)
    model = GPT(
        model_config(
            **{"preset": "tiny", "vocab_size": tokenizer.vocab_size, **(weights_overrides or {})}
        )
    )
    save_checkpoint(folder, model, cfg, tokenizer)


def make_foreign_folder(folder) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("not a checkpoint")


def test_cli_generates_and_streams_the_same_text(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000010")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_0000010")
    args = ["--prompt", "to be", "--max-new-tokens", "20", "--seed", "7", "--device", "cpu"]
    rc, out, err = run_cli(capsys, "--checkpoint", str(tmp_path / "run"), *args)
    assert rc == 0, err
    # the prompt, 20 characters (one per token) and a newline
    assert out.startswith("to be") and len(out) == len("to be") + 20 + 1
    rc, streamed, err = run_cli(capsys, "--checkpoint", str(tmp_path / "run"), "--stream", *args)
    assert rc == 0, err
    assert streamed == out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "checkpoint folder not found"),
        (make_foreign_folder, "neither a checkpoint nor a run folder"),
        (lambda p: save_tiny_checkpoint(p, dict(d_model=64)), "do not fit the model config"),
    ],
    ids=["missing", "foreign", "shape_mismatch"],
)
def test_cli_bad_checkpoint_is_one_line_and_nonzero(tmp_path, capsys, make, message):
    folder = tmp_path / "ckpt"
    make(folder)
    rc, out, err = run_cli(capsys, "--checkpoint", str(folder), "--prompt", "to be")
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert out == ""


def test_cli_generates_past_the_context_and_notes_a_cut_prompt(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "ckpt")
    prompt = "to be or not to be, hello world, to be or not to b"  # 50 chars, block 32
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", prompt, "--device", "cpu"]
    rc, out, err = run_cli(capsys, *args, "--max-new-tokens", "100", "--seed", "1")
    assert rc == 0, err
    assert len(out) == len(prompt) + 100 + 1
    assert err.strip() == (
        "lmforge: notice: the prompt has 50 tokens, more than the model's context of 32: "
        "its first 18 tokens were dropped"
    )
    rc, out, err = run_cli(capsys, *args, "--window", "40")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "window=40" in err
