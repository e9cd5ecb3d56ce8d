"""lmforge.model.linear: fp32 Linears on oneDNN agree with F.linear, and fall back where they
must. The oneDNN path is forced on (whatever this CPU's measurement chose), so CI tests it on
every machine."""

import pytest
import torch
import torch.nn.functional as F

from lmforge import hardware
from lmforge.common import LmforgeError
from lmforge.hardware import FP32_LINEAR_ENV, fp32_linear_uses_onednn
from lmforge.model import linear as linear_module
from lmforge.model.linear import Linear, linear, takes_onednn

# (x shape, weight shape): 3-D and 2-D inputs, weights wider and taller than they are long
# (the two weight-gradient products), and a head-like narrow output
SHAPES = [((12, 64, 128), (512, 128)), ((768, 512), (128, 512)), ((4, 9, 128), (65, 128))]


@pytest.fixture
def onednn(monkeypatch):
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        pytest.skip("this PyTorch build has no oneDNN Linear")
    monkeypatch.setattr(linear_module, "fp32_linear_uses_onednn", lambda: True)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape, w_shape", SHAPES)
def test_forward_and_gradients_match_float64(onednn, x_shape, w_shape, bias):
    """oneDNN's fp32 results are as close to float64 as F.linear's (same precision, other
    rounding), for the output and the input, weight and bias gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*x_shape, generator=gen, requires_grad=True)
    w = torch.randn(*w_shape, generator=gen, requires_grad=True)
    b = torch.randn(w_shape[0], generator=gen, requires_grad=True) if bias else None
    params = [x, w] + ([b] if bias else [])
    y = linear(x, w, b)
    grad_y = torch.randn(y.shape, generator=gen)
    assert takes_onednn(x, w, b)
    got = [y, *torch.autograd.grad(y, params, grad_y)]

    def reference(cast):
        y = F.linear(cast(x), cast(w), None if b is None else cast(b))
        return [y, *torch.autograd.grad(y, params, cast(grad_y))]

    exact, blas = reference(torch.Tensor.double), reference(lambda t: t)
    for ours, theirs, truth in zip(got, blas, exact):
        assert ours.shape == truth.shape and ours.dtype == torch.float32
        scale = truth.abs().max().item()
        err, blas_err = (ours - truth).abs().max().item(), (theirs - truth).abs().max().item()
        assert err <= max(4 * blas_err, 1e-6 * scale), (err, blas_err)


def test_frozen_weight_and_input_need_no_gradient(onednn):
    """LoRA freezes base weights: only the gradients autograd asks for are computed."""
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16)
    (gx,) = torch.autograd.grad(linear(x, w).sum(), [x])
    torch.testing.assert_close(gx, w.sum(0).expand(8, 16))
    w.requires_grad_(True)
    (gw,) = torch.autograd.grad(linear(x.detach(), w).sum(), [w])
    torch.testing.assert_close(gw, x.detach().sum(0).expand(4, 16))


def test_linear_module_trains_like_nn_linear(onednn):
    """Linear keeps nn.Linear's parameters and names; one AdamW step lands within rounding."""
    torch.manual_seed(0)
    ours, theirs = Linear(32, 8), torch.nn.Linear(32, 8)
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours, torch.nn.Linear) and ours.state_dict().keys() == {"weight", "bias"}
    x = torch.randn(5, 32)
    for m in (ours, theirs):
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        F.mse_loss(m(x), torch.ones(5, 8)).backward()
        opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_falls_back_to_f_linear_where_onednn_does_not_apply(onednn):
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert takes_onednn(x, w, None)
    assert not takes_onednn(x.double(), w.double(), None)  # fp32 only
    assert not takes_onednn(x[:0], w, None)  # no rows
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast already uses oneDNN in bf16
        assert not takes_onednn(x, w, None)
        assert linear(x, w).dtype == torch.bfloat16

    class Wrapped(torch.Tensor):  # any tensor subclass: DTensor, torchao's quantized weights
        pass

    assert not takes_onednn(x, w.as_subclass(Wrapped), None)


@pytest.fixture
def backend_env(monkeypatch):
    """Set LMFORGE_FP32_LINEAR for a fresh choice, and forget that choice afterwards."""
    fp32_linear_uses_onednn.cache_clear()
    yield lambda value: monkeypatch.setenv(FP32_LINEAR_ENV, value)
    fp32_linear_uses_onednn.cache_clear()


def test_a_bad_backend_choice_is_one_clear_error(backend_env):
    backend_env("fast")
    with pytest.raises(LmforgeError, match="LMFORGE_FP32_LINEAR='fast': expected auto, onednn"):
        fp32_linear_uses_onednn()


def test_blas_choice_gives_f_linear_bitwise(backend_env):
    backend_env("blas")
    x, w = torch.randn(64, 128), torch.randn(256, 128, requires_grad=True)
    assert not takes_onednn(x, w, None)
    assert torch.equal(linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("vendor, expected", [("GenuineIntel", False), ("AuthenticAMD", True)])
def test_auto_reads_the_cpu_not_a_timing(backend_env, monkeypatch, vendor, expected):
    """Every process on a machine must choose alike (a resumed run computes as the first did):
    auto takes oneDNN where the BLAS is MKL, which runs its fast kernels on Intel CPUs only."""
    if not (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()):
        pytest.skip("this PyTorch build has no MKL or no oneDNN")
    backend_env("auto")
    monkeypatch.setattr(hardware, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(hardware, "_matmul_seconds", None)  # no timing may be involved
    assert fp32_linear_uses_onednn() is expected
