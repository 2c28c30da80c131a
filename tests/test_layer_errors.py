"""Bad calls of every layer's forward (HyperLinear, HyperConv2d, HyperEmbedding, HyperLSTMCell, HyperLSTM, the
layers convert() makes of plain and published ones): each raises the right exception type with a message that
starts with the user's argument (``input``, ``hparams``, ``hidden[0]``, ``hx[1]``, or a parameter's public name as
the caller sees it, ``cells.1.h2h.hparam_weight``) and never names an internal one (``weight_scale``, ``x_proj``,
``h0``, "h2h weight_scale"...). 0-dim inputs raise a ValueError naming ``input`` through the fast path (dtype and
device as the layer's, so it is tried) and the full path, with and without λ."""

import re

import pytest
import torch
from torch import nn

import stn_kernels
from stn_kernels import HyperConv2d, HyperEmbedding, HyperLinear, HyperLSTM, HyperLSTMCell
from stn_kernels.convert import DropConnectHyperLinear, TimeMajorHyperEmbedding

H = 3
B = 2
# The public functions' names for what a module passes them (h0 and c0 only inside "(h0, c0)", the documented
# form of a hidden state tuple).
INTERNAL = re.compile(r"\b(weight_scale|bias_scale|x_proj)\b|(?<!\()\bh0\b|(?<!, )\bc0\b"
                      r"|(i2h|h2h) (weight|hyper|bias|hparam)")


def assert_names(excinfo, name: str, *fragments: str) -> None:
    message = str(excinfo.value)
    assert message.startswith(f"{name}: "), f"expected the message to name {name!r} first, got: {message}"
    assert not INTERNAL.search(message), f"internal name in: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


def lam(*shape, dtype=torch.float32, device="cpu"):
    return torch.rand(*shape, dtype=dtype, device=device)


def _converted(layer: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return stn_kernels.convert(layer, num_hparams=H)


# The layers and a valid call of each (input, the keyword for λ, extra keyword arguments).
LAYERS = {
    "linear": (lambda: HyperLinear(6, 4, num_hparams=H), lambda: torch.randn(B, 6)),
    "conv": (lambda: HyperConv2d(3, 4, 3, num_hparams=H), lambda: torch.randn(B, 3, 5, 5)),
    "embedding": (lambda: HyperEmbedding(7, 4, num_hparams=H), lambda: torch.randint(0, 7, (B, 3))),
    "cell": (lambda: HyperLSTMCell(5, 4, num_hparams=H), lambda: torch.randn(3, B, 5)),
    "cell-step": (lambda: HyperLSTMCell(5, 4, num_hparams=H), lambda: torch.randn(1, B, 5)),
    "lstm": (lambda: HyperLSTM(5, 4, 2, num_hparams=H), lambda: torch.randn(3, B, 5)),
    "converted-linear": (lambda: _converted(nn.Linear(6, 4)), lambda: torch.randn(B, 6)),
    "converted-conv": (lambda: _converted(nn.Conv2d(3, 4, 3)), lambda: torch.randn(B, 3, 5, 5)),
    "converted-embedding": (lambda: _converted(nn.Embedding(7, 4)), lambda: torch.randint(0, 7, (B, 3))),
    "converted-lstm": (lambda: _converted(nn.LSTM(5, 4, 2)), lambda: torch.randn(3, B, 5)),
    "converted-lstm-batch-first": (lambda: _converted(nn.LSTM(5, 4, batch_first=True)), lambda: torch.randn(B, 3, 5)),
}
RECURRENT = ("cell", "cell-step", "lstm", "converted-lstm", "converted-lstm-batch-first")


def call(name, layer, input, hparams, **kwargs):
    if name in RECURRENT:
        return layer(input, kwargs.pop("hidden", None), hparams)
    return layer(input, hparams)


@pytest.mark.parametrize("name", list(LAYERS))
def test_valid_call_runs(name):
    """Every case below differs from this call in one argument."""
    make, data = LAYERS[name]
    call(name, make(), data(), lam(B, H))


# ----------------------------------------------------------------------------- hparams

HPARAMS_CASES = {
    "width": (lambda: lam(B, 2), ValueError, (f"{H} hyperparameters", "(2, 2)")),
    "shared-width": (lambda: lam(H + 1), ValueError, (f"{H} hyperparameters", f"({H + 1},)")),
    "batch": (lambda: lam(B + 1, H), ValueError, (f"batch size {B}", f"({B + 1}, {H})")),
    "3d": (lambda: lam(B, 1, H), ValueError, (f"[B, {H}] or [{H}]", f"({B}, 1, {H})")),
    "list": (lambda: [[0.5] * H] * B, TypeError, ("torch.Tensor", "list")),
    "int": (lambda: torch.ones(B, H, dtype=torch.int64), TypeError, ("floating-point", "torch.int64")),
    "float64": (lambda: lam(B, H, dtype=torch.float64), TypeError, ("torch.float32", "torch.float64")),
    "meta": (lambda: lam(B, H, device="meta"), ValueError, ("device cpu", "meta")),
}


@pytest.mark.parametrize("case", list(HPARAMS_CASES))
@pytest.mark.parametrize("name", list(LAYERS))
def test_bad_hparams_named(name, case):
    make, data = LAYERS[name]
    bad, exc, fragments = HPARAMS_CASES[case]
    with pytest.raises(exc) as excinfo:
        call(name, make(), data(), bad())
    assert_names(excinfo, "hparams", *fragments)


@pytest.mark.parametrize("name", ["converted-linear", "converted-conv", "converted-embedding", "converted-lstm"])
@pytest.mark.parametrize("case", ["width", "float64", "meta"])
def test_bad_hparams_from_the_context_named(name, case):
    """λ from an enclosing ``stn_kernels.hparams`` block: the same errors, naming hparams."""
    make, data = LAYERS[name]
    bad, exc, fragments = HPARAMS_CASES[case]
    layer, input = make(), data()
    with stn_kernels.hparams(bad()), pytest.raises(exc) as excinfo:
        call(name, layer, input, None)
    assert_names(excinfo, "hparams", *fragments)


def test_issue_example_hyper_lstm_hparams_width():
    """HyperLSTM(4, 6, 1, num_hparams=3) with λ [2, 2]: said ``h2h weight_scale: expected shape (24, 2)``."""
    with pytest.raises(ValueError) as excinfo:
        HyperLSTM(4, 6, 1, num_hparams=3)(torch.randn(5, 2, 4), hparams=torch.randn(2, 2))
    assert_names(excinfo, "hparams", "3 hyperparameters", "(2, 2)")


# ----------------------------------------------------------------------------- input

def _input_cases(name):
    make, data = LAYERS[name]
    x = data()
    cases = {"list": (x.tolist(), TypeError, ("torch.Tensor", "list")),
             "meta": (x.to("meta"), ValueError, ("device cpu", "meta"))}
    if x.is_floating_point():
        cases.update({
            "float64": (x.double(), TypeError, ("torch.float32", "torch.float64")),
            "bfloat16": (x.bfloat16(), TypeError, ("torch.float32", "torch.bfloat16")),
            "int": (x.long(), TypeError, ("floating-point", "torch.int64")),
            "features": (x[:, :-1] if x.dim() == 4 else x[..., :-1], ValueError,
                         (str(tuple((x[:, :-1] if x.dim() == 4 else x[..., :-1]).shape)),)),
        })
    else:
        cases.update({"float": (x.float(), TypeError, ("integer indices", "torch.float32")),
                      "out-of-range": (x + 7, ValueError, ("[0, 6]",))})
    return cases


INPUT_CASES = [(name, case) for name in LAYERS for case in _input_cases(name)]


@pytest.mark.parametrize("name, case", INPUT_CASES, ids=[f"{n}-{c}" for n, c in INPUT_CASES])
def test_bad_input_named(name, case):
    make, data = LAYERS[name]
    bad, exc, fragments = _input_cases(name)[case]
    with pytest.raises(exc) as excinfo:
        call(name, make(), bad, lam(B, H))
    assert_names(excinfo, "input", *fragments)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("hparams", ["none", "shared", "one-row", "context"])
def test_zero_dim_input(name, hparams):
    """A 0-dim input in the layer's dtype and device (the fast path is tried first): a ValueError naming input,
    with λ None, shared [H], one row [1, H], or from an ``stn_kernels.hparams`` block."""
    make, data = LAYERS[name]
    layer, x = make(), data()
    scalar = torch.tensor(1, dtype=x.dtype)
    lam_arg = {"none": None, "shared": lam(H), "one-row": lam(1, H), "context": None}[hparams]
    with stn_kernels.hparams(lam(1, H)) if hparams == "context" else _nothing():
        with pytest.raises(ValueError) as excinfo:
            call(name, layer, scalar, lam_arg)
    assert_names(excinfo, "input", "()")


@pytest.mark.parametrize("name", ["linear", "conv", "cell-step"])
def test_zero_dim_input_under_autocast(name):
    """The full path (autocast leaves the fast path): the same error."""
    make, _ = LAYERS[name]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError) as excinfo:
        call(name, make(), torch.tensor(1.0), lam(1, H))
    assert_names(excinfo, "input", "()")


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------- hidden states

def _hidden_cases(name):
    make, data = LAYERS[name]
    layer, x = make(), data()
    _, (h, c) = call(name, layer, x, lam(B, H))   # the state shapes the layer returns, as it takes them back
    prefix = "hidden" if name.startswith("cell") else "hx"
    return {
        "batch": ((h[..., :1, :].expand(*h.shape[:-2], B + 1, h.shape[-1]).contiguous(), c), ValueError,
                  f"{prefix}[0]", ()),
        "size": ((h, c[..., :-1]), ValueError, f"{prefix}[1]", ()),
        "float64": ((h, c.double()), TypeError, f"{prefix}[1]", ("torch.float32", "torch.float64")),
        "meta": ((h.to("meta"), c), ValueError, f"{prefix}[0]", ("device cpu", "meta")),
        "list": (([0.0], c), TypeError, f"{prefix}[0]", ("torch.Tensor",)),
        "one": (h, TypeError, prefix, ("tuple",)),
    }


HIDDEN_CASES = [(name, case) for name in RECURRENT for case in _hidden_cases(name)]


@pytest.mark.parametrize("name, case", HIDDEN_CASES, ids=[f"{n}-{c}" for n, c in HIDDEN_CASES])
def test_bad_hidden_state_named(name, case):
    make, data = LAYERS[name]
    hidden, exc, arg, fragments = _hidden_cases(name)[case]
    with pytest.raises(exc) as excinfo:
        call(name, make(), data(), lam(B, H), hidden=tuple(t.detach() if isinstance(t, torch.Tensor) else t
                                                           for t in hidden) if isinstance(hidden, tuple) else hidden)
    assert_names(excinfo, arg, *fragments)


# ----------------------------------------------------------------------------- parameters

def _set(module, path, value):
    *parents, last = path.split(".")
    for part in parents:
        module = getattr(module, part)
    getattr(module, last).data = value(getattr(module, last).data)


PARAM_CASES = {
    "linear-hparam_weight-dtype": ("linear", "hparam_weight", lambda t: t.double(), TypeError),
    "linear-hparam_weight-shape": ("linear", "hparam_weight", lambda t: t[:-1], ValueError),
    "linear-hyper_bias-dtype": ("linear", "hyper_bias", lambda t: t.double(), TypeError),
    "conv-hparam_weight-shape": ("conv", "hparam_weight", lambda t: t[:, :1].t(), ValueError),
    "embedding-hparam_weight-shape": ("embedding", "hparam_weight", lambda t: t[:-1], ValueError),
    "embedding-hparam_weight-dtype": ("embedding", "hparam_weight", lambda t: t.double(), TypeError),
    "cell-i2h.hparam_weight": ("cell", "i2h.hparam_weight", lambda t: t[:, :2], ValueError),
    "cell-h2h.hparam_weight": ("cell", "h2h.hparam_weight", lambda t: t.double(), TypeError),
    "cell-step-h2h.hyper_weight": ("cell-step", "h2h.hyper_weight", lambda t: t[:, :-1], ValueError),
    "lstm-cells.1.h2h.hparam_weight": ("lstm", "cells.1.h2h.hparam_weight", lambda t: t[:, :2], ValueError),
    "lstm-cells.1.i2h.weight": ("lstm", "cells.1.i2h.weight", lambda t: t.double(), TypeError),
    "converted-lstm-weight_ih_l1": ("converted-lstm", "weight_ih_l1", lambda t: t.double(), TypeError),
    "converted-lstm-cells.0.h2h.hyper_bias": ("converted-lstm", "cells.0.h2h.hyper_bias", lambda t: t[:-1],
                                              ValueError),
}


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_bad_parameter_named_by_its_public_name(case):
    """A parameter replaced by one of another dtype or shape (``p.data = ...`` before the first call): the error
    names it as the caller of the module sees it."""
    name, path, change, exc = PARAM_CASES[case]
    make, data = LAYERS[name]
    layer = make()
    _set(layer, path, change)
    with pytest.raises(exc) as excinfo:
        call(name, layer, data(), lam(B, H))
    assert_names(excinfo, path)


# ----------------------------------------------------------------------------- the published layers converted

def test_published_dropconnect_linear_with_mask_names_input():
    layer = DropConnectHyperLinear(6, 4, num_hparams=H)
    layer.mask_weights(0.3)
    with pytest.raises(TypeError) as excinfo:
        layer(torch.randn(B, 6, dtype=torch.float64), lam(B, H))
    assert_names(excinfo, "input", "torch.float32", "torch.float64")
    with pytest.raises(ValueError) as excinfo:
        layer(torch.tensor(1.0), lam(H))
    assert_names(excinfo, "input", "()")


def test_published_embedding_names_hparams_and_input():
    layer = TimeMajorHyperEmbedding(7, 4, 6, num_hparams=H)
    tokens = torch.randint(0, 7, (3, B))                  # time-major [T, B]
    with pytest.raises(ValueError) as excinfo:
        layer(tokens, lam(B, 2), dropoute=0.1)
    assert_names(excinfo, "hparams", f"{H} hyperparameters")
    with pytest.raises(ValueError) as excinfo:
        layer(torch.tensor(1), lam(H))
    assert_names(excinfo, "input", "()")
    layer = TimeMajorHyperEmbedding(7, 4, 6, num_hparams=H)   # (a fresh one: .data changes are seen at .to())
    layer.hparam_weight.data = layer.hparam_weight.data.double()
    with pytest.raises(TypeError) as excinfo:
        layer(tokens, lam(B, H))
    assert_names(excinfo, "hparam_weight", "torch.float64")
