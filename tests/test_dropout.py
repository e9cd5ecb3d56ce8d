"""lmforge.model.dropout: cheap CPU masks with F.dropout's contract, and model.attention_dropout."""

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.model.dropout import LANES, Dropout, dropout, keep_mask
from lmforge.model.gpt import GPT, Attention, explicit_attention_pays

N = 1 << 20


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drop_rate_and_mean_are_those_asked_for(p):
    torch.manual_seed(0)
    kept = keep_mask(torch.Size((N,)), p).float().mean().item()
    sigma = (p * (1 - p) / N) ** 0.5
    assert abs((1 - kept) - p) < 5 * sigma  # the rate, to within sampling noise
    out = dropout(torch.ones(N, dtype=torch.float64), p)
    assert set(out.unique().tolist()) == {0.0, LANES / (LANES - round(p * LANES))}
    assert out.mean().item() == pytest.approx(1.0, abs=5 * sigma / (1 - p))  # unbiased


def test_lanes_are_independent_of_their_position_in_the_64_bit_word():
    """Each int64 draw feeds four lanes: all four must drop at the same rate."""
    torch.manual_seed(1)
    kept = keep_mask(torch.Size((N,)), 0.25).view(-1, 4).float().mean(0)  # (4,) per lane
    torch.testing.assert_close(kept, torch.full((4,), 0.75), atol=0.005, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_the_same_mask_and_scale(dtype):
    x = torch.randn(8, 16, 32, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(8, 16, 32, dtype=dtype)
    torch.manual_seed(2)
    y = dropout(x, 0.3)
    y.backward(grad_out)
    kept = y != 0
    scale = LANES / (LANES - round(0.3 * LANES))
    assert y.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(y, (x * kept * scale).to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(x.grad, (grad_out * kept * scale).to(dtype), atol=0, rtol=0)


def test_seeded_and_off_outside_training():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    first = dropout(x, 0.2)
    torch.manual_seed(3)
    assert torch.equal(first, dropout(x, 0.2))
    assert dropout(x, 0.2, training=False) is x and dropout(x, 0.0) is x
    module = Dropout(0.2)
    assert isinstance(module, torch.nn.Dropout)  # set_regularisation finds it by this type
    assert torch.equal(module.eval()(x), x)


def test_attention_dropout_defaults_to_dropout_and_can_be_set_apart():
    cfg = dict(vocab_size=32, block_size=16, n_layer=1, n_head=2, d_model=16)
    both = GPT(ModelConfig(**cfg, dropout=0.2))
    apart = GPT(ModelConfig(**cfg, dropout=0.2, attention_dropout=0.0))
    attention = [m for m in apart.modules() if isinstance(m, Attention)][0]
    assert [m for m in both.modules() if isinstance(m, Attention)][0].dropout == 0.2
    assert attention.dropout == 0.0 and apart.drop.p == 0.2
    apart.set_regularisation(0.1, 0.0, attention_dropout=0.3)
    assert attention.dropout == 0.3 and apart.drop.p == 0.1
    with pytest.raises(Exception, match="model.attention_dropout=1.5 must be in"):
        ModelConfig(**cfg, attention_dropout=1.5)


def test_cpu_attention_dropout_takes_the_written_out_path_at_any_precision():
    q = torch.zeros(1, 2, 600, 8)  # fp32, longer than the bf16 path's limit
    assert not explicit_attention_pays(q, q, True)
    assert explicit_attention_pays(q, q, True, dropout_p=0.1)
    assert not explicit_attention_pays(q, q, torch.ones(1, 1, 600, 600, dtype=torch.bool), 0.1)


@pytest.mark.parametrize(("dropout_rate", "attention"), [(0.1, None), (0.1, 0.0), (0.0, 0.2)])
def test_gpt2_dropout_rates_round_trip_through_the_hf_config(dropout_rate, attention):
    from lmforge.model.hf import hf_config, model_config_from_hf

    cfg = ModelConfig(
        vocab_size=32, block_size=16, n_layer=1, n_head=2, d_model=16, dropout=dropout_rate,
        attention_dropout=attention,
    )  # fmt: skip
    exported = hf_config(cfg)
    assert exported["attn_pdrop"] == cfg.attention_dropout_rate
    assert exported["resid_pdrop"] == exported["embd_pdrop"] == dropout_rate
    back = model_config_from_hf(exported).model
    assert (back.dropout, back.attention_dropout_rate) == (dropout_rate, cfg.attention_dropout_rate)


def test_changing_the_model_rates_leaves_an_adapter_dropout_alone():
    """Late dropout (train.dropout_start) switches the model's rates during a LoRA run; LoRA's
    own dropout (peft.dropout) is another setting and keeps its rate."""
    from lmforge.config import PeftConfig
    from lmforge.model.gpt import set_dropout
    from lmforge.model.peft import LoRALinear, apply_peft

    base = GPT(ModelConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, d_model=16))
    model = apply_peft(base, PeftConfig(method="lora", dropout=0.3))
    set_dropout(model, 0.1, 0.2)
    lora = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert lora and all(m.dropout.p == 0.3 for m in lora)
    block = base.blocks[0]
    assert (base.drop.p, block.mlp.drop.p, block.attn.resid_drop.p) == (0.1, 0.1, 0.1)
    assert block.attn.dropout == 0.2
