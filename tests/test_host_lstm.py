"""The compiled whole-sequence HyperLSTM layer (csrc/host/lstm.cpp: the time loop and its backward in C++, the i2h
products of all steps as one GEMM, [W; W_hyper] packed): what HyperLSTM, and an nn.LSTM that ``convert`` made into
one, run on CPU tensors. Not the reference's op order, so bounded, not equal: every output and every gradient (input,
λ, h0, c0, each parameter) against the naive published loop in float64 (and float32 to its tolerance), against the
Python path for a converted nn.LSTM (its Parameters in torch's gate order) and with layer dropout, double backward by
gradgradcheck; used exactly where it can run (not with DropConnect, another dtype for λ, STN_KERNELS_HOST=0)."""

import copy

import pytest
import torch
from torch import nn

import stn_kernels
import stn_kernels.modules_lstm as modules_lstm

from _naive import (
    assert_close_rel,
    compare_lstm,
    lstm_stack_inputs,
    naive_lstm_stack,
    randomize_lstm_,
    run_lstm_stack,
)

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("host_built")


@pytest.fixture
def calls(monkeypatch):
    """The number of host layer calls made (a list that grows by one per layer run through the host)."""
    made = []
    real = modules_lstm.host_ops

    class Counting:
        def __init__(self, module):
            self.module = module

        def hyper_lstm_layer(self, *args):
            made.append(1)
            return self.module.hyper_lstm_layer(*args)

    def counting(*args):
        found = real(*args)
        return None if found is None else Counting(found)

    monkeypatch.setattr(modules_lstm, "host_ops", counting)
    return made


def _model(K, N, layers, H, batch_first, bias=True, dtype=D64):
    torch.manual_seed(0)
    return randomize_lstm_(stn_kernels.HyperLSTM(K, N, layers, bias, batch_first, num_hparams=H, dtype=dtype))


@pytest.mark.parametrize("hparams_kind", ["per_example", "shared", "none"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("layers, with_hx, bias", [(1, True, True), (2, False, True), (2, True, False)])
def test_stack_against_the_naive_loop_in_float64(hparams_kind, batch_first, layers, with_hx, bias, calls):
    T, B, K, N, H = 5, 3, 4, 6, 2
    model = _model(K, N, layers, H, batch_first, bias)
    torch.manual_seed(1)
    x, hparams, hx, g = lstm_stack_inputs(T, B, K, N, H, layers, hparams_kind, batch_first, D64, with_hx=with_hx)
    got = run_lstm_stack(model, x, hparams, hx, *g)
    assert len(calls) == layers
    compare_lstm(got, naive_lstm_stack(model, x, hparams, hx, *g, batch_first=batch_first), D64)


@pytest.mark.parametrize("T, B", [(1, 1), (7, 2)])
def test_float32_against_the_naive_loop(T, B, calls):
    K, N, H = 5, 3, 3
    model = _model(K, N, 2, H, False, dtype=torch.float32)
    x, hparams, hx, g = lstm_stack_inputs(T, B, K, N, H, 2, "per_example", False, torch.float32)
    got = run_lstm_stack(model, x, hparams, hx, *g)
    assert len(calls) == 2
    compare_lstm(got, naive_lstm_stack(model, x, hparams, hx, *g), torch.float32)


def _run(model, x, lam, monkeypatch, on: bool, seed=0, **kwargs):
    monkeypatch.setenv("STN_KERNELS_HOST", "1" if on else "0")
    torch.manual_seed(seed)
    out, (h, c) = model(x, None, lam, **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + h.sum() - 2 * c.sum()
    return [out, h, c] + list(torch.autograd.grad(loss, [x, lam] + params))


@pytest.mark.parametrize("layers, bias", [(1, True), (2, True), (1, False)])
def test_converted_nn_lstm_equals_the_python_path(layers, bias, calls, monkeypatch):
    """The nn.LSTM's own Parameters, in torch's gate order (i, f, g, o), read in place by the host layer: outputs and
    every gradient (weight_ih_l0 & co. in torch's order) as the Python path's, which reorders them per forward."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, layers, bias, dropout=0.3 if layers > 1 else 0.0).double()
    model = stn_kernels.convert(copy.deepcopy(lstm), num_hparams=2)
    randomize_lstm_(model)  # hparam_weight non-zero: the hyper path takes part
    x = torch.randn(6, 3, 4, dtype=D64, requires_grad=True)
    lam = torch.randn(3, 2, dtype=D64, requires_grad=True)
    got = _run(model, x, lam, monkeypatch, True, seed=3)
    assert len(calls) == layers
    want = _run(model, x, lam, monkeypatch, False, seed=3)
    assert len(calls) == layers
    names = ["out", "h", "c", "x", "hparams"] + [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got, want):
        assert_close_rel(a, b, D64, name)


def test_layer_dropout_draws_as_the_python_path(calls, monkeypatch):
    model = _model(3, 4, 3, 2, False).train()
    x = torch.randn(5, 4, 3, dtype=D64, requires_grad=True)
    lam = torch.randn(4, 2, dtype=D64, requires_grad=True)
    rates = torch.tensor([0.0, 0.5, 0.7, 0.3])
    got = _run(model, x, lam, monkeypatch, True, seed=7, layer_dropout=rates)
    want = _run(model, x, lam, monkeypatch, False, seed=7, layer_dropout=rates)
    assert len(calls) == 3
    for a, b in zip(got, want):
        assert_close_rel(a, b, D64)


def test_only_the_hyperparameters_differentiated(calls):
    """A validation step's backward: λ alone requires grad (weights frozen, input without grad)."""
    model = _model(3, 4, 2, 2, False)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 2, 3, dtype=D64)
    lam = torch.randn(2, 2, dtype=D64, requires_grad=True)
    out, _ = model(x, None, lam)
    (got,) = torch.autograd.grad(out.sum(), lam)
    assert len(calls) == 2
    g = torch.ones(4, 2, 4, dtype=D64), torch.zeros(2, 2, 4, dtype=D64), torch.zeros(2, 2, 4, dtype=D64)
    want = naive_lstm_stack(model, x, lam, None, *g)[3]["hparams"]
    assert_close_rel(got, want, D64, "dλ")


def test_double_backward(calls):
    model = _model(2, 3, 1, 2, False)
    x = torch.randn(3, 2, 2, dtype=D64, requires_grad=True)
    lam = torch.randn(2, 2, dtype=D64, requires_grad=True)
    params = list(model.parameters())

    def f(x, lam, *ps):
        return model(x, None, lam)[0]

    assert torch.autograd.gradgradcheck(f, [x, lam] + params)
    assert calls


def test_not_used_where_it_cannot_run(calls, monkeypatch):
    x = torch.randn(4, 2, 3)
    lam = torch.randn(2, 2)
    model = stn_kernels.HyperLSTM(3, 4, 2, num_hparams=2, dropconnect=0.3)
    model.train()(x, None, lam)  # DropConnect in training mode: the Python path draws the masks
    assert calls == []
    model.eval()(x, None, lam)
    assert len(calls) == 2
    monkeypatch.setenv("STN_KERNELS_HOST", "0")
    model(x, None, lam)
    assert len(calls) == 2
    monkeypatch.setenv("STN_KERNELS_HOST", "1")
    model.to(torch.bfloat16)(x.bfloat16(), None, lam)  # a half layer (with a float32 λ)
    assert len(calls) == 2
