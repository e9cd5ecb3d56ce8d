"""Masked-language modelling (BERT): bidirectional attention (model.causal=false), the masking
of lmforge/data/mlm.py and its statistics, the loss against cross-entropy by hand, next-sentence
pairs, tiny MLM runs that learn, classification from an MLM checkpoint, and the errors."""

from __future__ import annotations

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.config import model_config
from lmforge.model.gpt import GPT, KVCache

V = 65


def make_model(causal: bool, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = {"preset": "tiny", "vocab_size": V, **overrides}
    return GPT(model_config(causal=causal, **fields)).eval()


# ---------------------------------------------------------------- bidirectional attention


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_a_bidirectional_model_sees_later_tokens_and_a_causal_one_does_not(preset):
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % V  # a later token
    for causal in (True, False):
        model = make_model(causal, preset=preset)
        with torch.no_grad():
            diff = (model(ids)[:, :9] - model(changed)[:, :9]).abs().max()
        assert (diff == 0) if causal else (diff > 1e-4), (causal, diff)


def test_a_bidirectional_model_still_hides_padding():
    model = make_model(False)
    ids = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(2))
    pad = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        alone = model(ids)
        right = model(torch.cat([ids, pad], 1), torch.tensor([[1] * 8 + [0] * 4]))[:, :8]
        other_pad = model(torch.cat([ids, pad + 7], 1), torch.tensor([[1] * 8 + [0] * 4]))[:, :8]
    assert (right - alone).abs().max() < 1e-5 and torch.equal(right, other_pad)


def test_kv_cache_generation_refuses_a_bidirectional_model():
    model = make_model(False)
    cache = KVCache(model.config, 1, 8, device="cpu", dtype=torch.float32)
    with pytest.raises(LmforgeError, match="bidirectional") as err:
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    assert "\n" not in str(err.value)
