"""The decoder: causality, KV-cache parity, padding masks, sizes, training sanity, bad configs,
init and checkpoints of the layout with fused qkv and gate_up."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.common import LmforgeError
from lmforge.config import build_config, model_config
from lmforge.model.gpt import GPT, KVCache, additive_mask
from lmforge.model.heads import RewardModel
from lmforge.train.checkpoint import save_checkpoint

V = 65  # shakespeare-char's vocabulary

# Random tied models at the default init mostly repeat their input token; an untied head and a
# larger init give logits that depend on context, so the comparisons below mean something.
BASE = dict(preset="tiny", vocab_size=V, tie_embeddings=False, init_std=0.1)

VARIANTS = {
    "learned": {},
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "rope": dict(pos_encoding="rope"),
    "nope": dict(pos_encoding="none"),
    "sliding_window": dict(pos_encoding="rope", sliding_window=5),
    "post_norm": dict(norm_position="post"),
    "llama_style": dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False),
    "gqa": dict(pos_encoding="rope", n_head=4, n_kv_head=2),
    "mqa": dict(pos_encoding="learned", n_head=4, n_kv_head=1),
}
POS_SCHEMES = ["learned", "sinusoidal", "rope", "nope"]


def make_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_config(**{**BASE, **overrides})).eval()


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant):
    """Changing tokens after position t leaves logits at <= t unchanged (and does change later ones)."""
    model = make_model(**VARIANTS[variant])
    x = random_ids(2, 24)
    t = 10
    y = x.clone()
    y[:, t + 1 :] = (x[:, t + 1 :] + 1 + random_ids(2, 24 - t - 1, seed=2) % (V - 1)) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-3


def test_sliding_window_limits_what_one_layer_sees():
    """With one layer and window w, position t sees t-w+1..t: token t-w cannot matter, t-w+1 does."""
    model = make_model(n_layer=1, pos_encoding="rope", sliding_window=4)
    x = random_ids(1, 16)
    t = 12
    with torch.no_grad():
        base = model(x)[0, t]
        for pos, matters in ((t - 4, False), (t - 3, True)):
            y = x.clone()
            y[0, pos] = (x[0, pos] + 1) % V
            diff = (model(y)[0, t] - base).abs().max().item()
            assert (diff > 1e-4) == matters, (pos, diff)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_prefill_and_decode_match_full_forward(variant):
    """Prefill 8 tokens, a 3-token chunk, then one token at a time: the logits equal one
    uncached forward over the whole sequence."""
    model = make_model(**VARIANTS[variant])
    x = random_ids(2, 20)
    cache = KVCache(model.config, batch_size=2, max_len=20, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        pieces = [model(x[:, :8], kv_cache=cache), model(x[:, 8:11], kv_cache=cache)]
        pieces += [model(x[:, i : i + 1], kv_cache=cache) for i in range(11, 20)]
    assert cache.length == 20
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("variant", ["learned", "rope", "sliding_window", "gqa"])
def test_cached_decode_with_left_padding_matches_full_forward(variant):
    """The cache also agrees with the full forward when an attention mask hides left padding."""
    model = make_model(**VARIANTS[variant])
    x = random_ids(2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    cache = KVCache(model.config, batch_size=2, max_len=16, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        full = model(x, attention_mask=mask)
        pieces = [model(x[:, :9], attention_mask=mask[:, :9], kv_cache=cache)]
        pieces += [
            model(x[:, i : i + 1], attention_mask=mask[:, : i + 1], kv_cache=cache)
            for i in range(9, 16)
        ]
    real = mask.bool()
    assert (torch.cat(pieces, dim=1) - full)[real].abs().max().item() <= 1e-5


def _pad_two(a: torch.Tensor, b: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1-D sequences -> ids (2, T) and mask (2, T), the shorter padded on `side` with id 0."""
    T = max(len(a), len(b))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for row, seq in enumerate((a, b)):
        span = slice(0, len(seq)) if side == "right" else slice(T - len(seq), T)
        ids[row, span], mask[row, span] = seq, 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("variant", POS_SCHEMES + ["sliding_window"])
def test_padded_batch_logits_match_each_sequence_alone(variant, side):
    model = make_model(**VARIANTS[variant])
    a, b = random_ids(1, 12)[0], random_ids(1, 7, seed=3)[0]
    ids, mask = _pad_two(a, b, side)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)  # (2, 12, V)
        for row, seq in enumerate((a, b)):
            alone = model(seq[None])[0]  # (len, V)
            got = batched[row][mask[row].bool()]
            assert (got - alone).abs().max().item() <= 1e-5


def test_gpt2_124m_parameter_count():
    """Same count as transformers' default GPT2LMHeadModel (tied head, learned positions)."""
    with torch.device("meta"):  # shapes only: no 500 MB allocation, no init time
        model = GPT(model_config(preset="gpt2-124m"))
    assert model.num_params() == 124_439_808


def test_tiny_model_overfits_one_batch():
    model = make_model(init_std=0.02).train()
    x = random_ids(4, 33)
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _step in range(300):
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        if loss.item() < 0.1:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after 300 steps"


@pytest.mark.parametrize("regulariser", ["dropout", "drop_path"])
def test_regularisers_only_active_in_train_mode(regulariser):
    model = make_model(**{regulariser: 0.5})
    plain = make_model()  # same seed -> same weights, no dropout / drop-path
    plain.load_state_dict(model.state_dict())
    x = random_ids(4, 16)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x), plain(x), atol=0, rtol=0)
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(d_model=30, n_head=4), "not divisible by model.n_head"),
        (dict(n_head=4, n_kv_head=3), "not divisible by model.n_kv_head"),
        (dict(preset="gpt2-125m"), "unknown model preset 'gpt2-125m'; did you mean 'gpt2-124m'"),
    ],
)
def test_bad_config_is_a_clear_user_error(overrides, message):
    with pytest.raises(LmforgeError, match=message):
        model_config(**{**BASE, **overrides})


def test_forward_longer_than_block_size_raises():
    model = make_model()
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        model(random_ids(1, 33))


def test_sinusoidal_positions_with_odd_model_width():
    """d_model=33 (one head): the encoding is cut to 33 columns instead of failing to add."""
    model = make_model(pos_encoding="sinusoidal", d_model=33, n_head=1)
    assert model(random_ids(1, 5)).shape == (1, 5, V)


# ---------------------------------------------------------------- logits_to_keep, GQA, meta


def _head_inputs(model: GPT) -> list[tuple[int, ...]]:
    """Record the input shape of every lm_head call (where logits_to_keep saves work)."""
    shapes: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("variant", ["learned", "rope", "gqa", "post_norm"])
def test_logits_to_keep_is_the_last_positions_of_the_full_forward(variant):
    model = make_model(**VARIANTS[variant])
    x = random_ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    shapes = _head_inputs(model)
    with torch.no_grad():
        for attention_mask in (None, mask):
            full = model(x, attention_mask=attention_mask)  # (B, T, V)
            assert torch.equal(model(x, attention_mask=attention_mask, logits_to_keep=0), full)
            for k in (1, 3, 12):
                kept = model(x, attention_mask=attention_mask, logits_to_keep=k)
                assert kept.shape == (2, k, V)
                torch.testing.assert_close(kept, full[:, -k:], atol=1e-6, rtol=0)
    assert shapes[-1] == (2, 12, model.config.d_model) and shapes[-2][1] == 3  # head on k only
    cache = KVCache(model.config, batch_size=2, max_len=12, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        prefill = model(x[:, :8], kv_cache=cache, logits_to_keep=1)
        step = model(x[:, 8:9], kv_cache=cache, logits_to_keep=1)
        full = model(x)
    torch.testing.assert_close(torch.cat([prefill, step], 1), full[:, [7, 8]], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, logits_to_keep=-1)


@pytest.mark.parametrize(
    "variant", ["learned", "llama_style", "gqa", "post_norm", "sliding_window"]
)
def test_kept_positions_of_each_row_equal_the_full_forward(variant):
    """logits_to_keep as (B, k) positions, each row its own (repeats and padding allowed): the
    last block computes only those queries, and gives the full forward's logits there."""
    model = make_model(**VARIANTS[variant])
    x = random_ids(3, 12)
    keep = torch.tensor([[0, 5, 11, 11], [3, 3, 7, 0], [1, 2, 10, 6]])  # (B, k)
    padding = torch.ones(3, 12, dtype=torch.long)
    padding[1, :2] = 0
    documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12, [0] * 3 + [1] * 3 + [2] * 6])
    blocks = torch.ones(12, 12, dtype=torch.bool).tril()  # (T, T)
    blocks[6:, :6] = False  # two halves that cannot see each other
    runs = [{}, {"attention_mask": padding}, {"document_ids": documents}]
    runs.append({"attention_mask": blocks.expand(3, 1, 12, 12)})
    seen = {}  # block -> its MLP's last input shape
    for i in (0, -1):
        hook = lambda mod, args, i=i: seen.__setitem__(i, tuple(args[0].shape))  # noqa: E731
        model.blocks[i].mlp.register_forward_pre_hook(hook)
    with torch.no_grad():
        for kwargs in runs:
            full = model(x, **kwargs)  # (B, T, V)
            kept = model(x, logits_to_keep=keep, **kwargs)  # (B, k, V)
            expected = full.gather(1, keep[..., None].expand(-1, -1, V))
            torch.testing.assert_close(kept, expected, atol=1e-6, rtol=0)
            every_row = model(x, logits_to_keep=torch.tensor([4, 9]), **kwargs)  # (B, 2, V)
            torch.testing.assert_close(every_row, full[:, [4, 9]], atol=1e-6, rtol=0)
    assert seen == {0: (3, 12, model.config.d_model), -1: (3, 2, model.config.d_model)}


def test_a_boolean_mask_becomes_the_additive_mask_sdpa_would_make():
    """The model turns a boolean mask into SDPA's additive form once per forward: the
    attention is bitwise what SDPA computes from the boolean itself."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen) for _ in range(3))
    mask = torch.rand(2, 1, 9, 9, generator=gen) > 0.5
    mask |= torch.eye(9, dtype=torch.bool)  # no query without a key
    additive = additive_mask(mask, torch.float32)
    assert additive.dtype == torch.float32 and set(additive.unique().tolist()) == {0.0, -math.inf}
    assert torch.equal(
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
    )


def test_grouped_query_attention_uses_sdpa_enable_gqa(monkeypatch):
    """Where SDPA takes enable_gqa, keys/values reach it with nkv heads (no repeat_interleave
    copy); the repeat_interleave fallback for older torch computes the same logits."""
    from lmforge.model import gpt

    assert gpt.SDPA_HAS_GQA == (torch.__version__ >= "2.5")
    model = make_model(**VARIANTS["gqa"])  # 4 query heads, 2 kv heads
    x = random_ids(2, 16)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.size(1), k.size(1), kwargs.get("enable_gqa", False)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(gpt.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        fast = model(x)
        if gpt.SDPA_HAS_GQA:
            assert set(seen) == {(4, 2, True)}
        monkeypatch.setattr(gpt, "SDPA_HAS_GQA", False)
        seen.clear()
        fallback = model(x)
    assert set(seen) == {(4, 4, False)}
    torch.testing.assert_close(fast, fallback, atol=1e-6, rtol=0)


def test_enable_gqa_only_where_sdpa_keeps_a_fast_kernel():
    from types import SimpleNamespace

    from lmforge.model.gpt import SDPA_HAS_GQA, sdpa_gqa

    def q(device: str, dtype: torch.dtype):
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    assert sdpa_gqa(q("cpu", torch.float32), mask) == SDPA_HAS_GQA
    assert sdpa_gqa(q("cuda", torch.bfloat16), True) == SDPA_HAS_GQA  # flash: causal, no mask
    assert not sdpa_gqa(q("cuda", torch.bfloat16), mask)  # a mask: math kernel with enable_gqa
    assert not sdpa_gqa(q("cuda", torch.float32), True)  # fp32: no flash kernel


@pytest.mark.parametrize("tie", [True, False])
def test_model_built_on_meta_takes_weights_without_init(monkeypatch, tie):
    """GPT on the meta device + assign_weights: no random init, the same function as a model
    that copied the weights in, a tied head still tied, RoPE frequencies real."""
    ref = make_model(**VARIANTS["llama_style"], tie_embeddings=tie)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    if tie:
        state["wte.weight"] = state["lm_head.weight"]  # shared, as the file would hold it
        del state["lm_head.weight"]  # safetensors keeps one name of shared tensors
    monkeypatch.setattr(GPT, "init_weights", lambda self: pytest.fail("init_weights called"))
    with torch.device("meta"):
        model = GPT(ref.config)
    missing, unexpected = model.assign_weights(state)
    assert not missing and not unexpected
    model.eval()
    assert (model.lm_head.weight is model.wte.weight) == tie
    assert model.num_params() == ref.num_params()
    assert model.rope_inv_freq.device.type == "cpu"
    assert torch.equal(model.rope_inv_freq, ref.rope_inv_freq)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    x = random_ids(2, 16)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_init_draws_q_k_v_as_one_matrix():
    """q, k and v (and gate, up) come from one draw of their stacked rows, so a seed gives the
    weights it gave when they were one Linear, at widths where separate draws would not."""
    cfg = model_config(
        preset="llama-tiny", vocab_size=V, n_layer=1, d_model=30, n_head=3, n_kv_head=1
    )
    model = GPT(cfg)
    torch.manual_seed(0)  # from here on only init_weights draws (modules draw when built)
    model.init_weights()
    torch.manual_seed(0)
    torch.empty(V, 30).normal_(std=cfg.init_std)  # wte, drawn first
    qkv = torch.empty(30 + 2 * 10, 30).normal_(std=cfg.init_std)  # attention comes next
    attn = model.blocks[0].attn
    assert torch.equal(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]), qkv)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_checkpoints_of_the_fused_layout_load(tmp_path, fused_layout, preset):
    """A checkpoint written while q, k, v were one Linear attn.qkv (and SwiGLU's gate, up one
    mlp.gate_up) loads, the fused rows split into the separate Linears: the same logits. A
    head's checkpoint (copied into a built model, not assigned) too."""
    torch.manual_seed(0)
    fields = {"preset": preset, "vocab_size": V}
    model = GPT(model_config(**fields)).eval()
    reward = RewardModel(GPT(model_config(**fields))).eval()
    for name, module, run in (("lm", model, {}), ("reward", reward, {"head": "reward"})):
        folder = save_checkpoint(
            tmp_path / name, module, build_config({"model": fields, "run": run}), None
        )
        weights = folder / "model.safetensors"
        old = fused_layout(load_file(weights))
        assert any(".attn.qkv." in key for key in old)
        assert (".mlp.gate_up." in " ".join(old)) == (preset == "llama-tiny")
        save_file(old, weights)
        loaded, _ = lmforge.load(folder)
        ids = random_ids(2, 12)
        with torch.no_grad():
            assert torch.equal(loaded(ids), module(ids))


def test_return_hidden_gives_what_the_head_reads():
    model = GPT(model_config(preset="llama-tiny", vocab_size=65)).eval()
    ids = torch.randint(0, 65, (2, 9))
    hidden = model(ids, return_hidden=True)  # (B, T, d): for classification/reward/value heads
    assert hidden.shape == (2, 9, model.config.d_model)
    torch.testing.assert_close(model.lm_head(hidden), model(ids))


def test_explicit_causal_attention_matches_sdpa_in_bf16():
    """CPU bf16 training spells short causal attention out (gpt.causal_attention) because
    SDPA's CPU flash backward is slow there: outputs and gradients agree with SDPA's math
    kernel in fp32 to bf16's precision, with grouped kv heads repeated."""
    from lmforge.model.gpt import attend, causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, generator=g) for _ in range(3))
    grad_out = torch.randn(2, 4, 24, 16, generator=g)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad_out.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    reference = run(lambda *t: attend(*t, mask=True), torch.float32)  # SDPA
    explicit = run(causal_attention, torch.bfloat16)
    for got, want in zip(explicit, reference):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    torch.manual_seed(0)
    dropped = causal_attention(qb, kb, vb, dropout_p=0.5)  # attention dropout, seeded
    torch.manual_seed(0)
    assert torch.equal(dropped, causal_attention(qb, kb, vb, dropout_p=0.5))
    assert not torch.equal(dropped, causal_attention(qb, kb, vb))
    # k, v with 2 heads serve 4 query heads through `attend` as with SDPA's enable_gqa
    kv2 = [t[:, :2].to(torch.bfloat16) for t in (k, v)]
    qb = q.to(torch.bfloat16).requires_grad_()
    torch.testing.assert_close(
        attend(qb, *kv2, mask=True).float(),
        attend(q, *(t.float() for t in kv2), mask=True),
        atol=0.05,
        rtol=0.05,
    )


def test_explicit_attention_only_for_short_causal_low_precision_on_cpu():
    from lmforge.model.gpt import EXPLICIT_ATTENTION_MAX_T, explicit_attention_pays

    def qk(dtype=torch.bfloat16, T=64, S=None):
        return torch.zeros(1, 1, T, 8, dtype=dtype), torch.zeros(1, 1, S or T, 8, dtype=dtype)

    assert explicit_attention_pays(*qk(), True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 activations, bf16 matmuls
        assert explicit_attention_pays(*qk(torch.float32), True)
    assert not explicit_attention_pays(*qk(torch.float32), True)  # fp32: SDPA, as before
    assert not explicit_attention_pays(*qk(), torch.ones(1, 1, 64, 64, dtype=torch.bool))
    assert not explicit_attention_pays(*qk(T=1, S=64), False)  # decoding against a cache
    assert not explicit_attention_pays(*qk(T=EXPLICIT_ATTENTION_MAX_T + 1), True)


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_mlp_in_row_chunks_outside_training_matches_the_whole_batch(monkeypatch, mlp):
    """Outside training a CPU MLP runs over MLP_CHUNK_ROWS tokens at a time (cache-sized
    hidden activations): the logits are those of one pass over the whole batch."""
    from lmforge.model import gpt

    torch.manual_seed(0)
    model = GPT(model_config(preset="llama-tiny", vocab_size=97, mlp=mlp)).eval()
    ids = torch.randint(0, 97, (9, 128))  # 1,152 tokens
    rows_per_call = []
    whole_mlp = gpt.MLP._forward

    def counting(self, x):
        rows_per_call.append(x.numel() // x.size(-1))
        return whole_mlp(self, x)

    monkeypatch.setattr(gpt.MLP, "_forward", counting)
    monkeypatch.setattr(gpt, "MLP_CHUNK_ROWS", 256)
    with torch.no_grad():
        chunked = model(ids)
        assert rows_per_call == [256, 256, 256, 256, 128] * len(model.blocks)
        monkeypatch.setattr(gpt, "MLP_CHUNK_ROWS", 10**6)
        whole = model(ids)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
