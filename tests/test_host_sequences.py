"""Two compiled host paths for the layers of sequence and image models on CPU tensors (``stn_kernels._host``):

* HyperLinear over a sequence with λ per example along one dim (csrc/host/hyper_linear_seq.cpp): the public
  ``hyper_linear`` on [B, T, K] inputs (also inside a converted attention), a converted layer on a time-major
  [T, B, K] input in an hparams block;
* HyperConv2d with groups 1 on contiguous inputs (csrc/host/conv.cpp): the packed convolution and one elementwise
  pass each way.

Not the reference's op order, so bounded, not equal: the output and every gradient (input, λ, each weight, bias and λ
map) against the naive formulas in float64 (float32 to its tolerance), double backward by gradgradcheck; used where
it can run and not elsewhere (channels_last, groups, STN_KERNELS_HOST=0)."""

import pytest
import torch
from torch import nn

import stn_kernels
import stn_kernels.functional as functional
import stn_kernels.modules as modules

from _naive import assert_close_rel, naive_hyper_conv2d, naive_hyper_linear

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("host_built")


def _counting(monkeypatch, module, name):
    """Counts the calls of the host module's ``name`` made through ``module.host_ops``."""
    made = []
    real = module.host_ops

    class Counting:
        def __init__(self, found):
            self.found = found

        def __getattr__(self, attr):
            if attr == name:
                made.append(1)
            return getattr(self.found, attr)

    monkeypatch.setattr(module, "host_ops", lambda *a: None if real(*a) is None else Counting(real(*a)))
    return made


def _grads(out, leaves, g):
    return torch.autograd.grad(out, leaves, g, allow_unused=True)


def _check(got_out, want_out, got_grads, want_grads, dtype, names):
    assert_close_rel(got_out, want_out, dtype, "out")
    for name, a, b in zip(names, got_grads, want_grads):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert_close_rel(a, b.to(a.dtype), dtype, f"d{name}")


def _linear_leaves(K, N, H, B, bias, dtype):
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=D64) * scale).to(dtype).requires_grad_()

    return {"hparams": leaf(B, H), "W": leaf(N, K, scale=K ** -0.5), "Wh": leaf(N, K, scale=K ** -0.5),
            "b": leaf(N) if bias else None, "bh": leaf(N) if bias else None, "V": leaf(N, H), "C": leaf(N, H)}


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 3, 7), (4, 1, 7)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [D64, torch.float32], ids=str)
def test_public_hyper_linear_on_a_batch_first_sequence(shape, bias, dtype, monkeypatch):
    used = _counting(monkeypatch, functional, "hyper_linear_seq")
    p = _linear_leaves(shape[-1], 6, 3, shape[0], bias, dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = functional.hyper_linear(x, p["hparams"], p["W"], p["Wh"], p["b"], p["bh"], p["V"], p["C"] if bias else None)
    assert used == [1]
    leaves = [x] + [t for t in p.values() if t is not None]
    ref = {k: (None if v is None else v.detach().double().requires_grad_()) for k, v in p.items()}
    x64 = x.detach().double().requires_grad_()
    want = naive_hyper_linear(x64, ref["hparams"], ref["W"], ref["Wh"], ref["b"], ref["bh"], ref["V"],
                              ref["C"] if bias else None)
    g = torch.randn(out.shape, dtype=D64)
    names = ["x"] + [k for k, v in p.items() if v is not None]
    _check(out, want, _grads(out, leaves, g.to(dtype)),
           _grads(want, [x64] + [t for t in ref.values() if t is not None], g), dtype, names)


def test_converted_linear_on_a_time_major_sequence(monkeypatch):
    """λ's rows along dim 1 of [T, B, K] (an hparams block with batch_dim=1): the scales once per example."""
    used = _counting(monkeypatch, functional, "hyper_linear_seq")
    torch.manual_seed(0)
    layer = stn_kernels.convert(nn.Linear(5, 4).double(), num_hparams=2)
    with torch.no_grad():
        layer.hparam_weight.normal_()
    x = torch.randn(6, 3, 5, dtype=D64, requires_grad=True)
    lam = torch.randn(3, 2, dtype=D64, requires_grad=True)
    with stn_kernels.hparams(lam, batch_dim=1):
        out = layer(x)
    assert used == [1]
    params = [layer.weight, layer.hyper_weight, layer.bias, layer.hyper_bias, layer.hparam_weight]
    refs = [t.detach().clone().requires_grad_() for t in [x, lam] + params]
    xr, lr, W, Wh, b, bh, hw = refs
    want = naive_hyper_linear(xr.transpose(0, 1), lr, W, Wh, b, bh, hw[:4], hw[4:]).transpose(0, 1)
    g = torch.randn_like(out)
    _check(out, want, _grads(out, [x, lam] + params, g), _grads(want, refs, g), D64,
           ["x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight"])


def test_attention_projections_as_the_python_path(monkeypatch):
    used = _counting(monkeypatch, functional, "hyper_linear_seq")
    torch.manual_seed(0)
    attention = stn_kernels.convert(nn.MultiheadAttention(8, 2, batch_first=True).double(), num_hparams=2)
    with torch.no_grad():
        for name, p in attention.named_parameters():
            if "hparam_weight" in name:
                p.normal_()
    x = torch.randn(3, 5, 8, dtype=D64, requires_grad=True)
    lam = torch.randn(3, 2, dtype=D64, requires_grad=True)

    def run(on):
        monkeypatch.setenv("STN_KERNELS_HOST", "1" if on else "0")
        out = attention(x, x, x, need_weights=False, hparams=lam)[0]
        return [out] + list(torch.autograd.grad(out.square().sum(), [x, lam] + list(attention.parameters())))

    got = run(True)
    assert len(used) == 2  # the packed in-projection and out_proj
    for a, b in zip(got, run(False)):
        assert_close_rel(a, b, D64)


def test_hyper_linear_sequence_double_backward():
    p = _linear_leaves(3, 4, 2, 2, True, D64)
    x = torch.randn(2, 3, 3, dtype=D64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *t: functional.hyper_linear(x, *t), [x] + list(p.values()))


# ----------------------------------------------------------------------------- HyperConv2d

def _conv(bias, stride, padding, dilation, groups=1, dtype=D64):
    torch.manual_seed(0)
    layer = stn_kernels.HyperConv2d(4, 6, 3, stride, padding, dilation, groups, bias, num_hparams=2, dtype=dtype)
    with torch.no_grad():
        layer.hparam_weight.normal_()
    return layer


def _conv_against_naive(layer, x, lam, dtype):
    out = layer(x, lam)
    params = [p for p in (layer.weight, layer.hyper_weight, layer.bias, layer.hyper_bias, layer.hparam_weight)
              if p is not None]
    refs = [t.detach().double().requires_grad_() for t in [x, lam] + params]
    n = layer.out_channels
    W, Wh = refs[2], refs[3]
    b, bh = (refs[4], refs[5]) if layer.bias is not None else (None, None)
    hw = refs[-1]
    want = naive_hyper_conv2d(refs[0], refs[1], W, Wh, b, bh, hw[:n], hw[n:] if b is not None else None,
                              stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    g = torch.randn(out.shape, dtype=D64)
    names = ["x", "hparams"] + ["weight", "hyper_weight"] + (["bias", "hyper_bias"] if b is not None else []) + [
        "hparam_weight"]
    _check(out, want, _grads(out, [x, lam] + params, g.to(dtype)), _grads(want, refs, g), dtype, names)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, (1, 0), 1), ((1, 2), 2, (2, 1))], ids=str)
@pytest.mark.parametrize("dtype", [D64, torch.float32], ids=str)
def test_conv_against_the_naive_formula(bias, stride, padding, dilation, dtype, monkeypatch):
    used = _counting(monkeypatch, modules, "hyper_conv2d")
    layer = _conv(bias, stride, padding, dilation, dtype=dtype)
    x = torch.randn(3, 4, 9, 8, dtype=dtype, requires_grad=True)
    lam = torch.randn(3, 2, dtype=dtype, requires_grad=True)
    _conv_against_naive(layer, x, lam, dtype)
    assert used == [1]


@pytest.mark.parametrize("case", ["channels_last", "groups", "switched_off"])
def test_conv_not_used_where_it_cannot_run(case, monkeypatch):
    used = _counting(monkeypatch, modules, "hyper_conv2d")
    layer = _conv(True, 1, 1, 1, groups=2 if case == "groups" else 1)
    x = torch.randn(2, 4, 6, 6, dtype=D64)
    if case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if case == "switched_off":
        monkeypatch.setenv("STN_KERNELS_HOST", "0")
    _conv_against_naive(layer, x.requires_grad_(), torch.randn(2, 2, dtype=D64, requires_grad=True), D64)
    assert used == []


def test_conv_with_the_published_elem_scalar_and_double_backward():
    layer = _conv(True, 1, 1, 1)
    layer.register_parameter("elem_scalar", nn.Parameter(torch.tensor(1.7, dtype=D64)))
    x = torch.randn(2, 4, 5, 5, dtype=D64, requires_grad=True)
    lam = torch.randn(2, 2, dtype=D64, requires_grad=True)
    out = layer(x, lam)
    (d_scalar,) = torch.autograd.grad(out.sum(), layer.elem_scalar)
    with torch.no_grad():
        plain = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    assert_close_rel(d_scalar, plain.sum(), D64, "d elem_scalar")
    small = stn_kernels.HyperConv2d(2, 2, 2, padding=1, num_hparams=2, dtype=D64)
    x = torch.randn(2, 2, 3, 3, dtype=D64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, lam, *ps: small(x, lam), [x, lam] + list(small.parameters()))
