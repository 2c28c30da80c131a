"""stn_kernels.hyper_conv2d and stn_kernels.HyperConv2d against the naive two-F.conv2d formulation."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import stn_kernels

from _naive import (
    DTYPES,
    HALF_DTYPES,
    HPARAMS,
    TOL,
    assert_close_rel,
    check_against_naive,
    make_conv_params,
    make_hparams,
    naive_hyper_conv2d,
    randomize_module_,
    rel_err,
    strided_layout,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Conf:
    """One convolution geometry."""

    def __init__(self, C_in, C_out, kernel, stride=1, padding=0, dilation=1, groups=1, size=(7, 9)):
        self.C_in, self.C_out, self.kernel = C_in, C_out, kernel
        self.stride, self.padding, self.dilation, self.groups, self.size = stride, padding, dilation, groups, size

    @property
    def geometry(self):
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def __repr__(self):
        return (f"{self.C_in}to{self.C_out}-k{self.kernel}-s{self.stride}-p{self.padding}-d{self.dilation}"
                f"-g{self.groups}").replace(" ", "").replace("(", "").replace(")", "").replace(",", "x")


CONFS = [
    Conf(3, 6, 3),
    Conf(3, 10, 3, stride=2, padding=1),
    Conf(3, 6, 3, padding=1, dilation=2),
    Conf(3, 10, 1),
    Conf(4, 6, 1, stride=2, padding=1, groups=2),
    Conf(4, 10, 3, stride=2, dilation=2, groups=2),
    Conf(4, 6, 3, padding=1, groups=2),
    Conf(3, 6, (3, 1), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
]
CONF_PARAMS = [pytest.param(c, id=repr(c)) for c in CONFS]


def conv_inputs(conf, B, H, dtype, hparams_kind, bias=True, hparams_dtype=None):
    p = make_conv_params(conf.C_in, conf.C_out, conf.kernel, H, conf.groups, dtype, bias)
    if hparams_dtype is not None:
        p["V"], p["C"] = p["V"].to(hparams_dtype), p["C"].to(hparams_dtype)
    x = torch.randn(B, conf.C_in, *conf.size, dtype=torch.float64).to(dtype)
    return {"x": x, "hparams": make_hparams(hparams_kind, B, H, hparams_dtype or dtype), **p}


def functional(conf):
    def run(x, hparams, W, Wh, b, bh, V, C):
        return stn_kernels.hyper_conv2d(x, hparams, W, Wh, b, bh, V, C, **conf.geometry)
    return run


def naive(conf):
    def run(x, hparams, W, Wh, b, bh, V, C):
        return naive_hyper_conv2d(x, hparams, W, Wh, b, bh, V, C, **conf.geometry)
    return run


def make_module(conf, H, dtype, bias=True):
    m = stn_kernels.HyperConv2d(conf.C_in, conf.C_out, conf.kernel, bias=bias, num_hparams=H, dtype=dtype,
                                **conf.geometry)
    return randomize_module_(m)


def module_fn(module):
    def run(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
        params = {"weight": weight, "hyper_weight": hyper_weight, "bias": bias, "hyper_bias": hyper_bias,
                  "hparam_weight": hparam_weight}
        return functional_call(module, {k: v for k, v in params.items() if v is not None}, (x, hparams))
    return run


def module_naive(conf):
    def run(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
        n = weight.shape[0]
        return naive_hyper_conv2d(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight[:n],
                                  hparam_weight[n:], **conf.geometry)
    return run


def module_inputs(module, x, hparams):
    return {"x": x, "hparams": hparams, "weight": module.weight, "hyper_weight": module.hyper_weight,
            "bias": module.bias, "hyper_bias": module.hyper_bias, "hparam_weight": module.hparam_weight}


# ----------------------------------------------------------------------------- the harness can fail

def test_naive_detects_wrong_hyper_paths():
    conf = CONFS[1]
    inp = conv_inputs(conf, 3, 4, torch.float64, "per_example")
    ref = naive(conf)(**inp)
    wrong = {
        "V and C swapped": dict(inp, V=inp["C"], C=inp["V"]),
        "λ rows rolled": dict(inp, hparams=inp["hparams"].roll(1, 0)),
        "no hyper bias": dict(inp, bh=None),
        "W and W_hyper swapped": dict(inp, W=inp["Wh"], Wh=inp["W"]),
    }
    for what, bad in wrong.items():
        assert rel_err(naive(conf)(**bad), ref) > 100 * TOL[torch.float32], what
    # scales per output channel, not per input channel or position: channel c of example b is
    # conv(x, W)[b, c] + s[b, c]·conv(x, W_h)[b, c] + b[c] + t[b, c]·b_h[c]
    s, t = inp["hparams"] @ inp["V"].t(), inp["hparams"] @ inp["C"].t()
    b_, c_ = 1, 7
    z = F.conv2d(inp["x"][b_:b_ + 1], inp["Wh"][c_:c_ + 1], None, 2, 1)[0, 0]
    e = F.conv2d(inp["x"][b_:b_ + 1], inp["W"][c_:c_ + 1], None, 2, 1)[0, 0]
    manual = e + s[b_, c_] * z + inp["b"][c_] + t[b_, c_] * inp["bh"][c_]
    assert_close_rel(ref[b_, c_], manual, torch.float64)


# ----------------------------------------------------------------------------- vs naive

@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("conf", CONF_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_matches_naive(dtype, conf, hparams_kind):
    inp = conv_inputs(conf, 3, 4, dtype, hparams_kind)
    check_against_naive(functional(conf), naive(conf), inp, dtype)


@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("conf", CONF_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_matches_naive(dtype, conf, hparams_kind):
    m = make_module(conf, 4, dtype)
    x = torch.randn(3, conf.C_in, *conf.size, dtype=dtype)
    check_against_naive(module_fn(m), module_naive(conf), module_inputs(m, x, make_hparams(hparams_kind, 3, 4, dtype)),
                        dtype)


@pytest.mark.parametrize("B", [pytest.param(1, id="B1"), pytest.param(5, id="B5")])
@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_bias(dtype, hparams_kind, B):
    conf = CONFS[2]
    inp = conv_inputs(conf, B, 3, dtype, hparams_kind, bias=False)
    check_against_naive(functional(conf), naive(conf), inp, dtype)
    m = make_module(conf, 3, dtype, bias=False)
    assert m.bias is None and m.hyper_bias is None
    x = torch.randn(B, conf.C_in, *conf.size, dtype=dtype)
    check_against_naive(module_fn(m), module_naive(conf), module_inputs(m, x, make_hparams(hparams_kind, B, 3, dtype)),
                        dtype)


@pytest.mark.parametrize("subset", [["hparams"], ["hparams", "V", "C"], ["W", "Wh", "b", "bh", "V", "C"], ["x"],
                                    ["Wh"], ["C"]],
                         ids=["only-hparams", "hparams-and-scales", "only-weights", "only-x", "only-hyper-weight",
                              "only-bias-scale"])
def test_gradients_of_a_subset(subset):
    conf = CONFS[5]
    inp = conv_inputs(conf, 3, 4, torch.float64, "per_example")
    check_against_naive(functional(conf), naive(conf), inp, torch.float64, grad_of=subset)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_backward_fills_parameter_grads(dtype):
    conf = CONFS[5]
    m = make_module(conf, 4, dtype)
    x = torch.randn(3, conf.C_in, *conf.size, dtype=dtype, requires_grad=True)
    lam = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    out = m(x, lam)
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g.to(dtype)).sum().backward()
    ref_in = {k: v.detach().double().requires_grad_() for k, v in module_inputs(m, x, lam).items()}
    (module_naive(conf)(**ref_in) * g).sum().backward()
    assert_close_rel(x.grad, ref_in["x"].grad, dtype, "x")
    assert_close_rel(lam.grad, ref_in["hparams"].grad, dtype, "hparams")
    for name, p in m.named_parameters():
        assert_close_rel(p.grad, ref_in[name].grad, dtype, name)


def test_module_without_hparams_is_plain_conv():
    conf = CONFS[1]
    m = make_module(conf, 4, torch.float64)
    x = torch.randn(2, conf.C_in, *conf.size, dtype=torch.float64)
    assert_close_rel(m(x), F.conv2d(x, m.weight, m.bias, **conf.geometry), torch.float64)


# ----------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("conf", [CONF_PARAMS[1], CONF_PARAMS[5]])
@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_input(dtype, conf, hparams_kind):
    inp = conv_inputs(conf, 3, 4, dtype, hparams_kind)
    to_cl = {"x": lambda t: t.contiguous(memory_format=torch.channels_last)}
    check_against_naive(functional(conf), naive(conf), inp, dtype, layouts=to_cl)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_module(dtype):
    conf = CONFS[2]
    m = make_module(conf, 4, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(3, conf.C_in, *conf.size, dtype=dtype)
    to_cl = {"x": lambda t: t.contiguous(memory_format=torch.channels_last)}
    check_against_naive(module_fn(m), module_naive(conf), module_inputs(m, x, torch.randn(3, 4, dtype=dtype)),
                        dtype, layouts=to_cl)


@pytest.mark.parametrize("layout", ["x-strided", "hparams-strided", "all-strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, layout):
    conf = CONFS[6]
    inp = conv_inputs(conf, 3, 4, dtype, "per_example")
    names = {"x-strided": ["x"], "hparams-strided": ["hparams"],
             "all-strided": ["x", "hparams", "W", "Wh", "b", "bh", "V", "C"]}[layout]
    check_against_naive(functional(conf), naive(conf), inp, dtype, layouts={k: strided_layout for k in names})


@pytest.mark.parametrize("hparams_kind", HPARAMS)
def test_empty_batch(hparams_kind):
    conf = CONFS[1]
    inp = conv_inputs(conf, 0, 4, torch.float32, hparams_kind)
    out = functional(conf)(**inp)
    assert out.shape == (0, conf.C_out, 4, 5)
    check_against_naive(functional(conf), naive(conf), inp, torch.float32)


# ----------------------------------------------------------------------------- AlexNet-like shape

def test_alexnet_like_float32():
    conf = Conf(64, 192, 5, padding=2, size=(8, 8))
    m = make_module(conf, 8, torch.float32)
    x = torch.randn(8, 64, 8, 8)
    check_against_naive(module_fn(m), module_naive(conf), module_inputs(m, x, torch.randn(8, 8)), torch.float32)


# ----------------------------------------------------------------------------- half precision, autocast

@pytest.mark.parametrize("hparams_kind", ["per_example", "shared"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_float32_hparams(dtype, hparams_kind):
    conf = CONFS[1]
    inp = conv_inputs(conf, 3, 4, dtype, hparams_kind, hparams_dtype=torch.float32)
    check_against_naive(functional(conf), naive(conf), inp, dtype)


def test_autocast_bf16():
    conf = CONFS[1]
    m = make_module(conf, 4, torch.float32)
    x = torch.randn(3, conf.C_in, *conf.size)
    lam = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, lam)
    assert out.dtype == torch.bfloat16
    p64 = {k: v.detach().double() for k, v in module_inputs(m, x, lam).items()}
    assert_close_rel(out, module_naive(conf)(**p64), torch.bfloat16)


# ----------------------------------------------------------------------------- gradcheck, JVP

GRADCHECK_CONFS = [
    pytest.param(Conf(2, 2, 3, stride=2, padding=1, size=(4, 5)), id="2to2-k3-s2-p1"),
    pytest.param(Conf(2, 4, 3, dilation=2, padding=1, groups=2, size=(5, 5)), id="2to4-k3-d2-p1-g2"),
]


@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("conf", GRADCHECK_CONFS)
def test_gradcheck_functional(conf, hparams_kind, one_thread):
    inp = conv_inputs(conf, 2, 2, torch.float64, hparams_kind)
    args = tuple(None if inp[k] is None else inp[k].requires_grad_()
                 for k in ("x", "hparams", "W", "Wh", "b", "bh", "V", "C"))
    fn = functional(conf)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("hparams_kind", HPARAMS)
def test_gradcheck_module(hparams_kind, one_thread):
    conf = GRADCHECK_CONFS[0].values[0]
    m = make_module(conf, 2, torch.float64)
    x = torch.randn(2, conf.C_in, *conf.size, dtype=torch.float64, requires_grad=True)
    hp = make_hparams(hparams_kind, 2, 2)
    params = tuple(p.detach().clone().requires_grad_() for p in
                   (m.weight, m.hyper_weight, m.bias, m.hyper_bias, m.hparam_weight))
    args = (x, None if hp is None else hp.requires_grad_(), *params)
    assert torch.autograd.gradcheck(module_fn(m), args)
    assert torch.autograd.gradgradcheck(module_fn(m), args)


def test_jvp_wrt_hparams():
    conf = CONFS[1]
    inp = conv_inputs(conf, 3, 4, torch.float64, "per_example")
    v = torch.randn_like(inp["hparams"])
    rest = [inp[k] for k in ("W", "Wh", "b", "bh", "V", "C")]
    f = lambda lam: functional(conf)(inp["x"], lam, *rest)  # noqa: E731
    out, jvp = torch.autograd.functional.jvp(f, (inp["hparams"],), (v,))
    z = F.conv2d(inp["x"], inp["Wh"], None, **conf.geometry)
    expected = (v @ inp["V"].t())[:, :, None, None] * z + ((v @ inp["C"].t()) * inp["bh"])[:, :, None, None]
    assert_close_rel(jvp, expected, torch.float64, "tangent")
    fd = (f(inp["hparams"] + 1e-3 * v) - f(inp["hparams"] - 1e-3 * v)) / 2e-3
    assert_close_rel(jvp, fd, torch.float64, "finite difference")


def test_jvp_wrt_hparams_torch_func():
    conf = CONFS[1]
    inp = conv_inputs(conf, 3, 4, torch.float64, "per_example")
    v = torch.randn_like(inp["hparams"])
    rest = [inp[k] for k in ("W", "Wh", "b", "bh", "V", "C")]
    _, jvp = torch.func.jvp(lambda lam: functional(conf)(inp["x"], lam, *rest), (inp["hparams"],), (v,))
    _, expected = torch.func.jvp(lambda lam: naive(conf)(inp["x"], lam, *rest), (inp["hparams"],), (v,))
    assert_close_rel(jvp, expected, torch.float64, "tangent")


# ----------------------------------------------------------------------------- opcheck

def _op_args(dtype, with_hparams, with_bias, conf, requires_grad=True, B=2, H=3, channels_last=False):
    inp = conv_inputs(conf, B, H, dtype, "per_example" if with_hparams else "none", with_bias)
    if not (with_hparams and with_bias):
        inp["C"] = None
    if not with_hparams:
        inp["V"] = None
    if channels_last:
        inp["x"] = inp["x"].contiguous(memory_format=torch.channels_last)
    tensors = [None if inp[k] is None else inp[k].requires_grad_(requires_grad)
               for k in ("x", "hparams", "W", "Wh", "b", "bh", "V", "C")]
    geometry = [list(torch.nn.modules.utils._pair(v)) for v in (conf.stride, conf.padding, conf.dilation)]
    return tensors, geometry


OPCHECK = [pytest.param(h, b, id=f"{'hparams' if h else 'nohparams'}-{'bias' if b else 'nobias'}")
           for h in (True, False) for b in (True, False)]
OPCHECK_CONF = Conf(4, 6, 3, stride=2, padding=1, groups=2)


@pytest.mark.parametrize("with_hparams, with_bias", OPCHECK)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_forward(dtype, with_hparams, with_bias):
    tensors, geometry = _op_args(dtype, with_hparams, with_bias, OPCHECK_CONF)
    torch.library.opcheck(torch.ops.stn_kernels.hyper_conv2d.default, (*tensors, *geometry, OPCHECK_CONF.groups))


def _backward_args(dtype, with_hparams, with_bias, mask, channels_last=False):
    tensors, geometry = _op_args(dtype, with_hparams, with_bias, OPCHECK_CONF, requires_grad=False,
                                 channels_last=channels_last)
    x, hp, W, Wh, b, bh, V, C = tensors
    z = F.conv2d(x, Wh, None, *geometry, OPCHECK_CONF.groups) if with_hparams else x.new_empty(0)
    g = torch.randn_like(F.conv2d(x, W, None, *geometry, OPCHECK_CONF.groups))
    return (g, x, hp, W, Wh, bh, V, C, z, *geometry, OPCHECK_CONF.groups, mask)


@pytest.mark.parametrize("with_hparams, with_bias", OPCHECK)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_backward(dtype, with_hparams, with_bias):
    mask = [True, with_hparams, True, with_hparams, with_bias, with_hparams and with_bias, with_hparams,
            with_hparams and with_bias]
    torch.library.opcheck(torch.ops.stn_kernels.hyper_conv2d_backward.default,
                          _backward_args(dtype, with_hparams, with_bias, mask))


def test_opcheck_backward_full_mask_without_hparams():
    torch.library.opcheck(torch.ops.stn_kernels.hyper_conv2d_backward.default,
                          _backward_args(torch.float32, False, True, [True] * 8))


def test_opcheck_forward_channels_last():
    tensors, geometry = _op_args(torch.float32, True, True, OPCHECK_CONF, channels_last=True)
    torch.library.opcheck(torch.ops.stn_kernels.hyper_conv2d.default, (*tensors, *geometry, OPCHECK_CONF.groups))


def test_opcheck_backward_channels_last():
    mask = [True] * 8
    torch.library.opcheck(torch.ops.stn_kernels.hyper_conv2d_backward.default,
                          _backward_args(torch.float32, True, True, mask, channels_last=True))
