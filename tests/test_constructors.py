"""The module constructors take torch.nn's arguments in torch.nn's order plus the keyword-only num_hparams: a
valid nn-style call means what torch.nn means (parameter shapes, outputs with hparams=None against torch.nn's
own layer with the same weights), and each misread of the published positional order raises, naming the
argument and showing the call with ``num_hparams=``."""

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import stn_kernels
from stn_kernels import HyperConv2d, HyperEmbedding, HyperLinear, HyperLSTM, HyperLSTMCell

D64 = torch.float64


def raises(exc, *fragments):
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


# ----------------------------------------------------------------------------- misreads raise

MISREADS = {
    # the published order (num_hparams third): now bias, which must be a bool
    "linear-H-as-bias": (lambda: HyperLinear(8, 5, 3), TypeError,
                         ("bias: expected a bool, got int 3 (num_hparams is keyword-only: "
                          "HyperLinear(8, 5, num_hparams=3))",)),
    "linear-negative": (lambda: HyperLinear(8, 5, -1), TypeError,
                        ("bias: expected a bool, got int -1", "HyperLinear(8, 5, num_hparams=-1)")),
    # the nn.Linear habit without H: bias=False is right, num_hparams is missing
    "linear-bias-false-no-H": (lambda: HyperLinear(8, 5, False), TypeError,
                               ("num_hparams: missing", "HyperLinear(8, 5, num_hparams=H)")),
    # the nn.Conv2d habit (stride 1, padding 1) without H
    "conv-nn-habit-no-H": (lambda: HyperConv2d(3, 16, 3, 1, 1), TypeError,
                           ("num_hparams: missing", "HyperConv2d(3, 16, 3, num_hparams=H)")),
    "conv-padding-string": (lambda: HyperConv2d(3, 16, 3, padding="sane", num_hparams=2), ValueError,
                            ("padding: expected 'same', 'valid', an int >= 0 or a pair of them, got 'sane'",)),
    "conv-same-strided": (lambda: HyperConv2d(3, 16, 3, 2, "same", num_hparams=2), ValueError,
                          ("padding: 'same' is not supported for strided convolutions", "stride=(2, 2)")),
    "conv-padding-mode": (lambda: HyperConv2d(3, 16, 3, padding_mode="mirror", num_hparams=2), ValueError,
                          ("padding_mode: expected one of ['zeros', 'reflect', 'replicate', 'circular']",
                           "'mirror'")),
    "embedding-H-as-padding-idx": (lambda: HyperEmbedding(10, 4, 30), ValueError,
                                   ("padding_idx: expected None or an int in [-10, 10)", "got 30",
                                    "HyperEmbedding(10, 4, num_hparams=30)")),
    "embedding-no-H": (lambda: HyperEmbedding(10, 4, 3), TypeError,
                       ("num_hparams: missing", "HyperEmbedding(10, 4, num_hparams=H)")),
    "lstm-H-as-bias": (lambda: HyperLSTM(4, 3, 2, 3), TypeError,
                       ("bias: expected a bool, got int 3", "HyperLSTM(4, 3, 2, num_hparams=3)")),
    "lstm-cell-H-as-bias": (lambda: HyperLSTMCell(4, 3, 2), TypeError,
                            ("bias: expected a bool, got int 2", "HyperLSTMCell(4, 3, num_hparams=2)")),
}


BUILDERS = {
    "HyperLinear": lambda **kw: HyperLinear(8, 5, **kw),
    "HyperConv2d": lambda **kw: HyperConv2d(3, 6, 3, **kw),
    "HyperEmbedding": lambda **kw: HyperEmbedding(10, 4, **kw),
    "HyperLSTMCell": lambda **kw: HyperLSTMCell(4, 3, **kw),
    "HyperLSTM": lambda **kw: HyperLSTM(4, 3, **kw),
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("value, exc, shown", [(0, ValueError, "got 0"), (-2, ValueError, "got -2"),
                                               (True, TypeError, "got bool True"),
                                               (2.0, TypeError, "got float 2.0"),
                                               (None, TypeError, "got NoneType None")])
def test_num_hparams_validated(name, value, exc, shown):
    with raises(exc, "num_hparams: expected an int >= 1", shown, "num_hparams is keyword-only", f"{name}("):
        BUILDERS[name](num_hparams=value)


BAD_ARGUMENTS = {
    "in_features-0": (lambda: HyperLinear(0, 5, num_hparams=2), ValueError, ("in_features: expected an int >= 1",)),
    "out_features-float": (lambda: HyperLinear(8, 5.0, num_hparams=2), TypeError,
                           ("out_features: expected an int >= 1, got float 5.0",)),
    "linear-bias-int": (lambda: HyperLinear(8, 5, 1, num_hparams=2), TypeError,
                        ("bias: expected a bool, got int 1",)),
    "in_channels-bool": (lambda: HyperConv2d(True, 6, 3, num_hparams=2), TypeError, ("in_channels", "bool True")),
    "kernel-0": (lambda: HyperConv2d(3, 6, 0, num_hparams=2), ValueError, ("kernel_size: expected an int >= 1",)),
    "kernel-triple": (lambda: HyperConv2d(3, 6, (3, 3, 3), num_hparams=2), ValueError,
                      ("kernel_size", "pair", "(3, 3, 3)")),
    "stride-0": (lambda: HyperConv2d(3, 6, 3, 0, num_hparams=2), ValueError, ("stride: expected an int >= 1",)),
    "padding-negative": (lambda: HyperConv2d(3, 6, 3, 1, (1, -1), num_hparams=2), ValueError,
                         ("padding: expected an int >= 0", "(1, -1)")),
    "dilation-float": (lambda: HyperConv2d(3, 6, 3, dilation=1.5, num_hparams=2), TypeError,
                       ("dilation", "float 1.5")),
    "groups-0": (lambda: HyperConv2d(3, 6, 3, groups=0, num_hparams=2), ValueError, ("groups: expected an int >= 1",)),
    "groups-not-divisor": (lambda: HyperConv2d(3, 6, 3, groups=2, num_hparams=2), ValueError,
                           ("groups", "in_channels=3", "got 2")),
    "conv-bias-none": (lambda: HyperConv2d(3, 6, 3, bias=None, num_hparams=2), TypeError,
                       ("bias: expected a bool, got NoneType None",)),
    "embedding-dim-0": (lambda: HyperEmbedding(10, 0, num_hparams=2), ValueError, ("embedding_dim",)),
    "lstm-hidden-0": (lambda: HyperLSTM(4, 0, num_hparams=2), ValueError, ("hidden_size: expected an int >= 1",)),
    "lstm-layers-0": (lambda: HyperLSTM(4, 3, 0, num_hparams=2), ValueError, ("num_layers: expected an int >= 1",)),
    "lstm-batch-first-int": (lambda: HyperLSTM(4, 3, 1, True, 1, num_hparams=2), TypeError,
                             ("batch_first: expected a bool, got int 1",)),
    "lstm-dropconnect-1": (lambda: HyperLSTM(4, 3, num_hparams=2, dropconnect=1.0), ValueError,
                           ("dropconnect: expected a probability in [0, 1), got 1.0",)),
    "cell-dropconnect-str": (lambda: HyperLSTMCell(4, 3, num_hparams=2, dropconnect="0.5"), TypeError,
                             ("dropconnect", "str '0.5'")),
    "lstm-dropout-above-1": (lambda: HyperLSTM(4, 3, 2, dropout=1.5, num_hparams=2), ValueError,
                             ("dropout: expected a probability in [0, 1]", "got 1.5")),
    "lstm-bidirectional": (lambda: HyperLSTM(4, 3, 2, True, False, 0.0, True, num_hparams=2), ValueError,
                           ("bidirectional: expected False", "got True")),
    "lstm-proj-size": (lambda: HyperLSTM(4, 3, proj_size=2, num_hparams=2), ValueError,
                       ("proj_size: expected 0", "got 2")),
}


def test_hyper_lstm_takes_nn_lstm_positional_arguments():
    """nn.LSTM(input_size, hidden_size, num_layers, bias, batch_first, dropout, ...): the same positions here, and
    the dropout between layers is nn.LSTM's (same draws, same outputs without λ)."""
    torch.manual_seed(0)
    plain = torch.nn.LSTM(4, 3, 2, True, True, 0.4).double()
    ours = HyperLSTM(4, 3, 2, True, True, 0.4, num_hparams=2).double()
    assert ours.dropout == 0.4 and "dropout=0.4" in repr(ours)
    with torch.no_grad():
        for layer in range(2):
            for name, cell in (("ih", ours.cells[layer].i2h), ("hh", ours.cells[layer].h2h)):
                i, f, g, o = getattr(plain, f"weight_{name}_l{layer}").chunk(4)
                cell.weight.copy_(torch.cat((f, i, o, g)))
                i, f, g, o = getattr(plain, f"bias_{name}_l{layer}").chunk(4)
                cell.bias.copy_(torch.cat((f, i, o, g)))
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    torch.manual_seed(1)
    expected = plain(x)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x)[0], expected)
    with pytest.warns(UserWarning, match="num_layers=1"):
        HyperLSTM(4, 3, 1, dropout=0.2, num_hparams=2)


CONSTRUCTOR_ERRORS = {**MISREADS, **BAD_ARGUMENTS}


@pytest.mark.parametrize("case", list(CONSTRUCTOR_ERRORS), ids=list(CONSTRUCTOR_ERRORS))
def test_misreads_and_bad_arguments_raise(case):
    """Each misread of the published order, and each invalid argument, raises naming the argument."""
    build, exc, fragments = CONSTRUCTOR_ERRORS[case]
    with raises(exc, *fragments):
        build()


# ----------------------------------------------------------------------------- nn-style calls mean what torch.nn means

def test_linear_like_nn_linear():
    torch.manual_seed(0)
    for args in [(8, 5), (8, 5, False), (8, 5, True)]:
        ours, theirs = HyperLinear(*args, num_hparams=3, dtype=D64), nn.Linear(*args, dtype=D64)
        assert ours.weight.shape == theirs.weight.shape and (ours.bias is None) == (theirs.bias is None)
        assert ours.hparam_weight.shape == (10, 3)
        with torch.no_grad():
            ours.weight.copy_(theirs.weight)
            if theirs.bias is not None:
                ours.bias.copy_(theirs.bias)
        x = torch.randn(4, 8, dtype=D64)
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("args", [(3, 6, 3), (3, 6, 3, 1, 1), (3, 6, 3, 2, 1, 2, 3, False), (3, 6, (3, 1), (2, 1),
                                                                                               (0, 1), (1, 2))])
def test_conv2d_like_nn_conv2d(args):
    torch.manual_seed(0)
    ours, theirs = HyperConv2d(*args, num_hparams=2, dtype=D64), nn.Conv2d(*args, dtype=D64)
    for name in ("kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.weight.shape == theirs.weight.shape and (ours.bias is None) == (theirs.bias is None)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
        if theirs.bias is not None:
            ours.bias.copy_(theirs.bias)
    x = torch.randn(2, 3, 9, 8, dtype=D64)
    assert torch.equal(ours(x), theirs(x))


def test_embedding_like_nn_embedding():
    torch.manual_seed(0)
    ours, theirs = HyperEmbedding(10, 4, -3, num_hparams=2, dtype=D64), nn.Embedding(10, 4, -3, dtype=D64)
    assert ours.padding_idx == theirs.padding_idx == 7
    assert ours.weight.shape == theirs.weight.shape and not ours.weight[7].any() and not ours.hyper_weight[7].any()
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
    idx = torch.tensor([[1, 7, 3], [7, 0, 9]])
    out = ours(idx)
    assert torch.equal(out, theirs(idx))
    out.sum().backward()
    assert not ours.weight.grad[7].any() and ours.weight.grad[1].all()


def _published_gates(w):
    """torch's gate blocks (input, forget, cell, output) in the published order (forget, input, output, cell)."""
    i, f, g, o = w.chunk(4)
    return torch.cat([f, i, o, g])


@pytest.mark.parametrize("args", [(4, 3), (4, 3, 2), (4, 3, 2, False), (4, 3, 2, True, True)])
def test_lstm_like_nn_lstm(args):
    torch.manual_seed(0)
    ours, theirs = HyperLSTM(*args, num_hparams=2, dtype=D64), nn.LSTM(*args, dtype=D64)
    for name in ("input_size", "hidden_size", "num_layers", "batch_first"):
        assert getattr(ours, name) == getattr(theirs, name), name
    with torch.no_grad():
        for layer, cell in enumerate(ours.cells):
            for ours_lin, suffix in ((cell.i2h, "ih"), (cell.h2h, "hh")):
                ours_lin.weight.copy_(_published_gates(getattr(theirs, f"weight_{suffix}_l{layer}")))
                assert (ours_lin.bias is None) == (not theirs.bias)
                if theirs.bias:
                    ours_lin.bias.copy_(_published_gates(getattr(theirs, f"bias_{suffix}_l{layer}")))
    x = torch.randn(5, 2, 4, dtype=D64)
    out, (h, c) = ours(x)
    ref, (h_ref, c_ref) = theirs(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)


def test_lstm_cell_positional_order():
    cell = HyperLSTMCell(4, 3, False, True, num_hparams=2, dropconnect=0.25)
    assert cell.i2h.bias is None and cell.batch_first and cell.dropconnect == 0.25 and cell.num_hparams == 2
    lstm = HyperLSTM(4, 3, num_hparams=2)
    assert lstm.num_layers == 1 and lstm.cells[0].i2h.bias is not None


def test_extra_repr_nn_order():
    assert repr(HyperLinear(8, 5, False, num_hparams=3)) == \
        "HyperLinear(in_features=8, out_features=5, bias=False, num_hparams=3)"
    assert repr(HyperConv2d(3, 6, 3, 1, 1, num_hparams=2)) == \
        "HyperConv2d(3, 6, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), num_hparams=2)"
    assert repr(HyperEmbedding(10, 4, 2, num_hparams=2)) == "HyperEmbedding(10, 4, padding_idx=2, num_hparams=2)"


def test_convert_and_checkpoints_unaffected():
    """convert builds the layers with the new constructors; a state dict round-trips."""
    model = stn_kernels.convert(nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.Flatten(),
                                              nn.Linear(4 * 2 * 2, 5)), num_hparams=2)
    assert isinstance(model[0], HyperConv2d) and model[0].stride == (2, 2) and model[0].bias is None
    assert isinstance(model[2], HyperLinear) and model[2].num_hparams == 2
    copy = nn.Sequential(HyperConv2d(3, 4, 3, 2, 1, bias=False, num_hparams=2), nn.Flatten(),
                         HyperLinear(16, 5, num_hparams=2))
    copy.load_state_dict(model.state_dict())
    x, lam = torch.randn(2, 3, 4, 4), torch.randn(2, 2)
    assert torch.equal(copy[2](copy[1](copy[0](x, lam)), lam), model[2](model[1](model[0](x, lam)), lam))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel_size, padding, dilation", [
    (3, "same", 1), ((2, 3), "same", 1), ((2, 3), "same", (2, 1)), (3, "valid", 1), (3, 1, 1), ((3, 2), (1, 2), 1)])
def test_conv2d_padding_like_nn_conv2d_and_the_naive_formula(kernel_size, padding, dilation, padding_mode):
    torch.manual_seed(0)
    ours = HyperConv2d(3, 4, kernel_size, padding=padding, dilation=dilation, padding_mode=padding_mode,
                       num_hparams=2, dtype=D64)
    theirs = nn.Conv2d(3, 4, kernel_size, padding=padding, dilation=dilation, padding_mode=padding_mode, dtype=D64)
    assert (ours.padding, ours.padding_mode) == (theirs.padding, theirs.padding_mode)
    with torch.no_grad():
        ours.weight.copy_(theirs.weight)
        ours.bias.copy_(theirs.bias)
        ours.hyper_weight.normal_()
        ours.hyper_bias.normal_()
        ours.hparam_weight.normal_()
    x = torch.randn(2, 3, 7, 6, dtype=D64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-13, atol=1e-13)   # λ = None: the layer is nn.Conv2d
    lam = torch.randn(2, 2, dtype=D64)
    # The naive formula on the input as nn.Conv2d pads it (its own _reversed_padding_repeated_twice).
    pad = theirs._reversed_padding_repeated_twice
    padded = F.pad(x, pad, mode="constant" if padding_mode == "zeros" else padding_mode)
    conv = lambda w: F.conv2d(padded, w, None, 1, 0, dilation)  # noqa: E731
    s, t = (lam @ ours.hparam_weight.T).chunk(2, 1)
    expected = (conv(ours.weight) + ours.bias[:, None, None] + s[:, :, None, None] * conv(ours.hyper_weight)
                + (t * ours.hyper_bias)[:, :, None, None])
    torch.testing.assert_close(ours(x, lam), expected, rtol=1e-12, atol=1e-12)
    if padding_mode != "zeros":
        assert f"padding_mode='{padding_mode}'" in repr(ours)


def _lstm_pair(*args, **kwargs):
    torch.manual_seed(0)
    ours, theirs = HyperLSTM(*args, num_hparams=2, dtype=D64, **kwargs), nn.LSTM(*args, dtype=D64)
    with torch.no_grad():
        for layer, cell in enumerate(ours.cells):
            for ours_lin, suffix in ((cell.i2h, "ih"), (cell.h2h, "hh")):
                ours_lin.weight.copy_(_published_gates(getattr(theirs, f"weight_{suffix}_l{layer}")))
                ours_lin.bias.copy_(_published_gates(getattr(theirs, f"bias_{suffix}_l{layer}")))
    return ours, theirs


@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_unbatched_input_like_nn_lstm(batch_first):
    ours, theirs = _lstm_pair(4, 3, 2, True, batch_first)
    x = torch.randn(5, 4, dtype=D64)
    hx = (torch.randn(2, 3, dtype=D64), torch.randn(2, 3, dtype=D64))
    for state in (None, hx):
        out, (h, c) = ours(x, state)
        ref, (h_ref, c_ref) = theirs(x, state)
        assert out.shape == ref.shape == (5, 3) and h.shape == h_ref.shape == (2, 3)
        for got, expected in ((out, ref), (h, h_ref), (c, c_ref)):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # With λ: the same as the batch of one.
    lam = torch.randn(1, 2, dtype=D64)
    out, (h, c) = ours(x, hx, lam)
    batched = x.unsqueeze(0 if batch_first else 1)
    out1, (h1, c1) = ours(batched, (hx[0].unsqueeze(1), hx[1].unsqueeze(1)), lam)
    assert torch.equal(out, out1.squeeze(0 if batch_first else 1)) and torch.equal(h, h1.squeeze(1))
    with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(2, 3\), got \(2, 1, 3\)"):
        ours(x, (torch.zeros(2, 1, 3, dtype=D64), torch.zeros(2, 1, 3, dtype=D64)))


def test_lstm_reset_parameters_and_repr():
    lstm = HyperLSTM(4, 3, 2, False, True, num_hparams=2, dropconnect=0.25)
    assert lstm.extra_repr() == "4, 3, num_layers=2, bias=False, batch_first=True, dropconnect=0.25, num_hparams=2"
    assert HyperLSTM(4, 3, num_hparams=2).extra_repr() == "4, 3, num_layers=1, num_hparams=2"
    with torch.no_grad():
        for p in lstm.parameters():
            p.fill_(7.0)
    torch.manual_seed(1)
    lstm.reset_parameters()
    torch.manual_seed(1)
    fresh = HyperLSTM(4, 3, 2, False, True, num_hparams=2, dropconnect=0.25)
    for (name, got), expected in zip(lstm.named_parameters(), fresh.parameters()):
        assert torch.equal(got, expected), name  # the constructor's initialisation, draw for draw
