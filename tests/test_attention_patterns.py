"""Attention patterns (lmforge/model/masks.py): the one predicate against a brute-force loop,
FlexAttention against the dense mask, Longformer's local + global pattern in the model and in
KV-cache generation, the options off bitwise as before, and bad settings."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmforge.cli import main
from lmforge.common import LmforgeError
from lmforge.config import model_config
from lmforge.data.packing import document_fields
from lmforge.engine import Engine, SamplingParams
from lmforge.model.gpt import GPT, KVCache, attend
from lmforge.model.masks import AttentionPattern

V = 50
BASE = dict(preset="tiny", vocab_size=V, tie_embeddings=False, init_std=0.1, pos_encoding="rope")
GQA = dict(n_head=4, n_kv_head=2)


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Each test compiles flex afresh: past dynamo's recompile limit flex would run eagerly,
    and these tests are about the compiled kernel users get."""
    torch._dynamo.reset()


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config(**{**BASE, **overrides})).eval()


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the predicate


def brute_force(pattern: AttentionPattern, B: int, T: int, S: int) -> torch.Tensor:
    """The rule in masks.py's docstring, one (row, query, key) at a time."""
    P, G, w = pattern.prefix, pattern.global_tokens, pattern.window
    out = torch.zeros(B, 1, T, P + S, dtype=torch.bool)
    for b in range(B):
        real = [True] * S if pattern.real is None else pattern.real[b].tolist()
        docs = [0] * S if pattern.documents is None else pattern.documents[b].tolist()
        doc = [d if r else -1 for d, r in zip(docs, real)]  # padding is no document
        pos = [sum(doc[k] == doc[j] for k in range(j)) for j in range(S)]  # within its document
        offset = pattern.offset if isinstance(pattern.offset, int) else int(pattern.offset[b])
        for t, col in itertools.product(range(T), range(P + S)):
            i, j = offset + t, col - P
            if col < P or i == j:  # the prefix; every token sees itself
                out[b, 0, t, col] = True
                continue
            ok = j <= i or not pattern.causal
            if w is not None and abs(i - j) >= w:  # out of the window: only global tokens
                ok = ok and (pos[i] < G or pos[j] < G)
            same = pattern.documents is None or doc[i] == doc[j]
            out[b, 0, t, col] = ok and doc[j] >= 0 and same
    return out


def left_padding(B: int, S: int, pads: list[int]) -> torch.Tensor:
    real = torch.ones(B, S, dtype=torch.bool)
    for b, n in enumerate(pads):
        real[b, :n] = False
    return real


DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, -1, -1, -1]])
PATTERNS = {
    "causal_window": dict(window=3),
    "bidirectional_window": dict(causal=False, window=3),
    "local_global": dict(window=3, global_tokens=2),
    "local_global_bidirectional": dict(causal=False, window=2, global_tokens=2),
    "padding_window_global": dict(window=3, global_tokens=1, real=left_padding(2, 12, [0, 4])),
    "documents": dict(documents=DOCS),
    "documents_window_global": dict(documents=DOCS, window=2, global_tokens=1),
    "prefix_window": dict(window=3, prefix=2),
    "cache_offset": dict(window=4, global_tokens=1, offset=8, real=left_padding(2, 12, [1, 3])),
    "per_row_offset": dict(window=3, global_tokens=1, offset=torch.tensor([11, 6])),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_the_predicate_is_the_rule_written_out(name):
    settings = PATTERNS[name]
    pattern = AttentionPattern(**settings)
    T = 12 - settings["offset"] if isinstance(settings.get("offset"), int) else 12
    T = 1 if isinstance(settings.get("offset"), torch.Tensor) else T
    dense = pattern.dense(T, 12, "cpu")
    assert torch.equal(dense.expand(2, -1, -1, -1), brute_force(pattern, 2, T, 12))


def test_global_tokens_count_from_each_document_and_skip_padding():
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    mask = AttentionPattern(window=1, global_tokens=1, documents=docs).dense(10, 10, "cpu")[0, 0]
    assert mask[9].nonzero().flatten().tolist() == [5, 9]  # its document's first token, itself
    real = left_padding(1, 10, [3])
    mask = AttentionPattern(window=1, global_tokens=1, real=real).dense(10, 10, "cpu")[0, 0]
    assert mask[9].nonzero().flatten().tolist() == [3, 9]  # the first real token is global


# ---------------------------------------------------------------- FlexAttention = dense masks


FLEX_CASES = [
    "causal_window",
    "local_global_bidirectional",
    "padding_window_global",
    "documents_window_global",
    "prefix_window",
    "cache_offset",
]  # each compiles its own kernel (seconds); together they cover every part of the rule


@pytest.mark.parametrize("name", FLEX_CASES)
def test_flex_attention_equals_sdpa_with_the_dense_mask(name):
    """q (2, 4, T, 8) against GQA keys (2, 2, P + 12, 8), fp32: within 1e-5."""
    settings = PATTERNS[name]
    pattern = AttentionPattern(**settings)
    T = 12 - settings.get("offset", 0)
    S = pattern.prefix + 12
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, 2, 2, S, 8, generator=g)
    dense = attend(q, k, v, pattern.dense(T, 12, "cpu"))
    flex = attend(q, k, v, pattern.block_mask(T, 12, "cpu"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("keys, head_dim", [(8, 8), (24, 16)])
def test_flex_attention_never_reads_past_the_keys_on_cpu(keys, head_dim):
    """torch 2.13's CPU flex kernel, on AVX2 CPUs, read 8 rows past a last tile of 8 keys and
    wrote their scores over the softmax maximum (masks.CPU_FLEX_KEY_MULTIPLE). The keys here
    are followed in memory by NaN, so any such read shows; in a model it read whatever lay
    there, and outputs changed from run to run."""
    pattern = AttentionPattern(window=3, real=left_padding(2, keys, [0, 3]))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, keys, head_dim, generator=g)
    k, v = torch.randn(2, 2, 2, keys, head_dim, generator=g)
    k = torch.cat([k, torch.full((2, 2, 16, head_dim), float("nan"))], dim=2)[:, :, :keys]
    dense = attend(q, k, v, pattern.dense(keys, keys, "cpu"))
    flex = attend(q, k, v, pattern.block_mask(keys, keys, "cpu"))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["local_global", "documents_window_global", "prefix_window"])
def test_flex_attention_gradients_equal_the_dense_masks_on_cuda(name):
    """torch 2.13 has no FlexAttention backward on CPU; where it has one, gradients agree."""
    pattern = AttentionPattern(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in PATTERNS[name].items()})  # fmt: skip
    S = pattern.prefix + 12
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, h, n, 8, generator=g) for h, n in ((4, 12), (2, S), (2, S))]
    grads = []
    for mask in (pattern.dense(12, 12, "cuda"), pattern.block_mask(12, 12, "cuda")):
        q, k, v = (t.cuda().requires_grad_() for t in inputs)
        attend(q, k, v, mask).square().sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for dense, flex in zip(*grads):
        torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_flex_through_the_model_equals_sdpa_with_padding_and_documents():
    settings = dict(GQA, sliding_window=4, global_tokens=2)
    sdpa, flex = (make_model(**settings, attention_backend=b) for b in ("sdpa", "flex"))
    x = random_ids(2, 20)
    real = left_padding(2, 20, [0, 5]).long()
    docs = document_fields(x % 9, 0)  # position_ids and document_ids
    with torch.no_grad():
        for kwargs in ({"attention_mask": real}, docs):
            torch.testing.assert_close(flex(x, **kwargs), sdpa(x, **kwargs), atol=1e-5, rtol=0)


def test_flex_cannot_train_on_cpu_and_says_so():
    model = make_model(sliding_window=4, attention_backend="flex").train()
    with pytest.raises(LmforgeError, match="cannot train on cpu") as err:
        model(random_ids(1, 12))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- local + global in the model


def test_a_global_token_is_seen_past_the_window_and_sees_everything():
    """One layer, window 2, 1 global token: the last position depends on token 0 (global) but
    not on token 1 (out of its window); bidirectional, token 0 depends on the last token."""
    x = random_ids(1, 10)

    def changes(model, at: int, read: int) -> bool:
        y = x.clone()
        y[0, at] = (y[0, at] % (V - 1)) + 1
        with torch.no_grad():
            return not torch.allclose(model(x)[0, read], model(y)[0, read], atol=1e-6)

    causal = make_model(n_layer=1, sliding_window=2, global_tokens=1)
    assert changes(causal, at=0, read=9) and not changes(causal, at=1, read=9)
    bidirectional = make_model(n_layer=1, sliding_window=2, global_tokens=1, causal=False)
    assert changes(bidirectional, at=9, read=0) and not changes(bidirectional, at=9, read=5)
    assert changes(bidirectional, at=0, read=5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_cached_equals_uncached_with_window_and_global_tokens(backend):
    """Left-padded prompts, prefill then one token at a time: logits within 1e-5 of the full
    forward, and greedy generation gives the same tokens with and without the cache."""
    model = make_model(**GQA, sliding_window=4, global_tokens=2, attention_backend=backend)
    x = random_ids(2, 16)
    real = left_padding(2, 16, [0, 3]).long()
    cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
    with torch.no_grad():
        full = model(x, attention_mask=real)
        steps = [model(x[:, :9], attention_mask=real[:, :9], kv_cache=cache)]
        for t in range(9, 16):
            steps.append(model(x[:, t : t + 1], attention_mask=real[:, : t + 1], kv_cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    prompts = [[5, 17, 3, 44, 9, 12, 30], [8, 1, 4]]
    cached, uncached = (
        Engine(model).generate(prompts, SamplingParams(12, temperature=0, use_cache=c))
        for c in (True, False)
    )
    assert cached == uncached


# ---------------------------------------------------------------- options off, bad values


def test_settings_that_change_nothing_keep_the_logits_bitwise():
    """Global tokens with a window as long as the sequence, the backend choice where SDPA's
    fast path applies, and document ids against the dense (B, 1, T, T) mask the loaders
    built before (causal within each document) give bitwise the same logits."""
    x = random_ids(2, 16)
    plain = make_model()
    with torch.no_grad():
        want = plain(x)
        for settings in (
            dict(sliding_window=16, global_tokens=3),
            dict(attention_backend="flex"),
            dict(attention_backend="sdpa"),
        ):
            assert torch.equal(make_model(**settings)(x), want)
        masks = document_fields(x % 7, 0)
        docs = masks["document_ids"]
        dense = (docs[:, :, None] == docs[:, None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
        old = plain(x, attention_mask=dense[:, None], position_ids=masks["position_ids"])
        assert torch.equal(plain(x, **masks), old)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(sliding_window=4, global_tokens=-1), "model.global_tokens=-1 must be >= 0"),
        (dict(attention_backend="xformers"), "model.attention_backend='xformers' is not one of"),
        (dict(global_tokens=2), "model.global_tokens=2 needs model.sliding_window"),
    ],
)
def test_bad_attention_settings_are_one_clear_line(settings, message):
    with pytest.raises(LmforgeError, match=message) as err:
        model_config(**BASE, **settings)
    assert "\n" not in str(err.value)


def test_a_flex_training_run_on_cpu_stops_before_its_first_evaluation(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 50)
    runs = tmp_path / "runs"
    argv = [
        "train", f"--data.path={text}", "--model.preset=tiny", "--model.sliding_window=8",
        "--model.attention_backend=flex", f"--run.dir={runs}", "--train.max_steps=2",
    ]  # fmt: skip
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "cannot train on cpu" in err[0], err
    assert "val_loss" not in captured.out and not runs.exists()
