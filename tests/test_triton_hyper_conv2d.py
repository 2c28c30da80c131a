"""The Triton (GPU) path of HyperConv2d: stn_kernels.backends.triton.hyper_conv2d directly, and
end to end through stn_kernels.hyper_conv2d / HyperConv2d under use_backend("triton").

Without CUDA the Triton parts (epilogue, gradient preparation, reductions) run in the
interpreter and the convolutions on the CPU. Ground truth: float64 autograd through the
naive two-conv formulation of tests/_naive.py on copies of the same rounded inputs.
"""

import pytest
import torch

pytest.importorskip("triton")  # the kernel module imported below needs it

import stn_kernels
from stn_kernels.backends.triton import hyper_conv2d as hc
from stn_kernels.ops.hyper_conv2d import conv2d_output_shape

from _naive import (
    TOL,
    OpCheckError,
    assert_close_rel,
    check_against_naive,
    make_conv_params,
    naive_hyper_conv2d,
    nan_empty,
    randomize_module_,
)

HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CL = torch.channels_last
NAMES = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale", "bias_scale")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    """No TF32 in fp32 convs and matmuls; the packed path and its cache as by default (tests that
    change them use monkeypatch)."""
    monkeypatch.setattr(hc, "PACKED", True)
    monkeypatch.setattr(hc, "CACHE_PACKED_WEIGHT", True)
    torch.manual_seed(0)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(params=[True, False], ids=["packed", "two-conv"])
def path(request, monkeypatch):
    monkeypatch.setattr(hc, "PACKED", request.param)
    return request.param


class Geo:
    def __init__(self, B, C_in, C_out, k, stride=1, padding=0, dilation=1, groups=1, H=7, size=(7, 9)):
        pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
        self.B, self.C_in, self.C_out, self.k, self.H, self.size = B, C_in, C_out, k, H, size
        self.stride, self.padding, self.dilation, self.groups = pair(stride), pair(padding), pair(dilation), groups

    @property
    def conv_args(self):
        return self.stride, self.padding, self.dilation, self.groups

    def __repr__(self):
        return (f"B{self.B}-{self.C_in}to{self.C_out}-k{self.k}-s{self.stride}-p{self.padding}-d{self.dilation}"
                f"-g{self.groups}-H{self.H}").replace(" ", "")


GEOS = [
    Geo(3, 3, 5, 3, padding=1),
    Geo(1, 3, 10, 3, stride=2, padding=1, H=1),
    Geo(3, 4, 10, 3, dilation=2, groups=2),
    Geo(3, 6, 10, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    Geo(3, 3, 5, 1, stride=2),
]
GROUPED = GEOS[3]


def make(geo, dtype=F32, lam_dtype=None, bias=True, hyper_bias=True, hparams="per_example", x_format=None,
         w_format=None, seed=0):
    """Inputs in argument order (x, hparams, W, W_h, b, b_h, V, C) on DEVICE, and a grad_out."""
    gen = torch.Generator().manual_seed(seed)
    lam_dtype = lam_dtype or dtype
    p = make_conv_params(geo.C_in, geo.C_out, geo.k, geo.H, geo.groups, torch.float64, True, gen)
    x = torch.randn(geo.B, geo.C_in, *geo.size, dtype=torch.float64, generator=gen)
    lam = torch.randn(geo.B, geo.H, dtype=torch.float64, generator=gen)
    if hparams == "shared":
        lam = lam[:1].expand(geo.B, geo.H)  # row stride 0, as rows_of_hparams passes [H]
    elif hparams == "none":
        lam = None

    def dev(t, dt, fmt=None):
        if t is None:
            return None
        t = t.to(DEVICE, dt)
        return t.contiguous(memory_format=fmt) if fmt is not None else t

    has_hb = hparams != "none" and hyper_bias
    inputs = [dev(x, dtype, x_format), None if lam is None else lam.to(DEVICE, lam_dtype),
              dev(p["W"], dtype, w_format), dev(p["Wh"], dtype, w_format), dev(p["b"], dtype) if bias else None,
              dev(p["bh"], dtype) if has_hb else None, dev(p["V"], lam_dtype) if lam is not None else None,
              dev(p["C"], lam_dtype) if has_hb else None]
    out_shape = conv2d_output_shape(x.shape, p["W"].shape, geo.stride, geo.padding, geo.dilation)
    g = torch.randn(out_shape, dtype=torch.float64, generator=gen).to(DEVICE, dtype)
    if x_format is not None:
        g = g.contiguous(memory_format=x_format)
    return inputs, g


def ref64(inputs, g, geo):
    """float64 out, z = conv(x, W_h) and the gradients of Σ out⊙g (the bias one as Σ g, asked for or not)."""
    leaves = [None if t is None else t.detach().to("cpu", torch.float64).requires_grad_() for t in inputs]
    x, lam, W, Wh, b, bh, V, C = leaves
    stride, padding, dilation, groups = geo.conv_args
    out = naive_hyper_conv2d(x, lam, W, Wh, b, bh, V, C, stride, padding, dilation, groups)
    z = torch.nn.functional.conv2d(x, Wh, None, stride, padding, dilation, groups).detach()
    used = [t for t in leaves if t is not None]
    gd = g.detach().to("cpu", torch.float64)
    found = dict(zip(map(id, used), torch.autograd.grad(out, used, gd, allow_unused=True)))
    grads = [None if t is None else found.get(id(t)) for t in leaves]
    grads[4] = gd.sum((0, 2, 3))
    return out.detach(), z, grads


def run_and_check(geo, inputs, g, mask=None, tol_dtype=None, z_for_backward="returned"):
    x, lam, W, Wh, b, bh, V, C = inputs
    tol_dtype = tol_dtype or x.dtype
    out, z = hc.hyper_conv2d_forward(*inputs, *geo.conv_args)
    ref_out, ref_z, ref_grads = ref64(inputs, g, geo)
    fmt = CL if (x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=CL)) else None
    assert out.dtype == x.dtype
    assert_close_rel(out, ref_out, tol_dtype, "out")
    if fmt is not None:
        assert out.is_contiguous(memory_format=CL), "out: expected the input's channels_last layout"
    if lam is None:
        assert z.numel() == 0
    else:
        assert z.dtype == x.dtype and z.shape == out.shape and z.stride() == out.stride()
        assert_close_rel(z, ref_z, tol_dtype, "z_hyper")
    if mask is None:
        mask = [t is not None for t in inputs]
        mask[4] = True
    z_in = z if z_for_backward == "returned" else x.new_empty(0)
    grads = hc.hyper_conv2d_backward(g, x, lam, W, Wh, bh, V, C, z_in, *geo.conv_args, mask)
    assert len(grads) == 8
    for i, (name, t, gr, want) in enumerate(zip(NAMES, inputs, grads, ref_grads)):
        if not mask[i] or (t is None and i != 4) or (lam is None and i in (3, 5, 6, 7)):
            assert gr is None, f"{name}: expected None"
            continue
        like = x if i == 4 else t
        assert gr.dtype == like.dtype, (name, gr.dtype, like.dtype)
        assert gr.shape == (want.shape if i == 4 else like.shape), (name, gr.shape)
        assert_close_rel(gr, want, tol_dtype, "d" + name)
        if i in (0, 2, 3) and not like.is_contiguous() and like.is_contiguous(memory_format=CL):
            assert gr.is_contiguous(memory_format=CL), f"d{name}: expected channels_last like the input"
    return out, z, grads


def _small_blocks(monkeypatch):
    """Several channel and pixel blocks and pixel splits even at these sizes."""
    monkeypatch.setattr(hc, "_tiles", lambda C, P, channel_inner, max_c=128: (8, 32))
    monkeypatch.setattr(hc, "_num_sms", lambda device: 64)
    monkeypatch.setattr(hc, "_HP_BLOCKS", (16, 16))


# ----------------------------------------------------------------------------- kernels directly


@pytest.mark.parametrize("geo", GEOS, ids=repr)
def test_geometry(geo, path):
    inputs, g = make(geo)
    run_and_check(geo, inputs, g)


@pytest.mark.parametrize("lam_dtype", [F16, F32], ids=["lam-f16", "lam-f32"])
def test_float16(lam_dtype):
    """Half input and weights; λ, V, C in half or float32 (λ-side gradients in their dtype)."""
    inputs, g = make(GROUPED, F16, lam_dtype=lam_dtype)
    _, _, grads = run_and_check(GROUPED, inputs, g)
    assert grads[1].dtype == grads[6].dtype == grads[7].dtype == lam_dtype
    assert grads[0].dtype == grads[2].dtype == grads[4].dtype == F16


@pytest.mark.gpu
@pytest.mark.parametrize("lam_dtype", [BF16, F32], ids=["lam-bf16", "lam-f32"])
def test_bfloat16(lam_dtype, path):
    inputs, g = make(GROUPED, BF16, lam_dtype=lam_dtype)
    run_and_check(GROUPED, inputs, g)


@pytest.mark.parametrize("weights_cl", [False, True], ids=["w-contig", "w-cl"])
def test_channels_last(path, weights_cl):
    """channels_last input: out, z_hyper and dx channels_last; dW in each weight's layout."""
    inputs, g = make(GROUPED, x_format=CL, w_format=CL if weights_cl else None)
    _, _, grads = run_and_check(GROUPED, inputs, g)
    assert grads[2].is_contiguous(memory_format=CL) == weights_cl
    assert grads[3].is_contiguous(memory_format=CL) == weights_cl


def test_grad_out_expanded_and_other_layout():
    """grad_out with stride-0 dims (from a sum) and one in the other layout than x."""
    geo = GEOS[0]
    inputs, g = make(geo)
    g_exp = torch.ones((), device=DEVICE).expand(g.shape)
    run_and_check(geo, inputs, g_exp)
    run_and_check(geo, inputs, g.contiguous(memory_format=CL))


@pytest.mark.parametrize("hparams", ["shared", "none"])
def test_hparams_shared_or_none(hparams, path):
    inputs, g = make(GEOS[2], hparams=hparams)
    run_and_check(GEOS[2], inputs, g)


@pytest.mark.parametrize("variant", ["no_biases", "hyper_bias_only", "bias_only"])
def test_bias_variants(variant):
    kw = {"no_biases": dict(bias=False, hyper_bias=False), "hyper_bias_only": dict(bias=False),
          "bias_only": dict(hyper_bias=False)}[variant]
    inputs, g = make(GROUPED, **kw)
    run_and_check(GROUPED, inputs, g)


@pytest.mark.parametrize("mask", [
    (True, False, False, False, False, False, False, False),   # dx only
    (False, True, False, False, False, False, True, False),    # dλ, dV
    (False, False, False, True, False, True, False, True),     # dW_h, db_h, dC (no dx: one conv backward)
    (False, False, True, False, True, False, False, False),    # dW_e, db_e
    (True, False, True, False, False, False, False, True),     # dx, dW_e, dC
    (False, True, True, True, True, True, True, True),         # all but dx (an input layer): packed dW only
], ids=["dx", "dlam-dV", "dWh-dbh-dC", "dWe-dbe", "dx-dWe-dC", "no-dx"])
def test_output_mask(mask, monkeypatch):
    """Weight-gradient-only calls never read the packed weight (a NaN stand-in here)."""
    monkeypatch.setattr(hc, "_weight_placeholder", lambda shape, like, fmt: nan_empty(shape, like.dtype,
                                                                                       like.device, fmt))
    inputs, g = make(GROUPED)
    run_and_check(GROUPED, inputs, g, mask=list(mask))


def test_z_hyper_recomputed():
    """An empty z_hyper makes the backward recompute conv(x, W_h)."""
    inputs, g = make(GEOS[0])
    run_and_check(GEOS[0], inputs, g, z_for_backward="empty")


@pytest.mark.parametrize("fmt", [None, CL], ids=["nchw", "nhwc"])
def test_nan_poisoned_and_split(monkeypatch, nan_poison, path, fmt):
    """Every buffer the kernels write in full starts as NaN; several channel blocks, pixel
    blocks and pixel splits; 18 output channels in 2 groups (9 each), 2 blocks of dλ partials."""
    nan_poison(hc)
    _small_blocks(monkeypatch)
    geo = Geo(2, 4, 18, 3, padding=1, groups=2, H=7, size=(9, 7))
    inputs, g = make(geo, x_format=fmt, seed=1)
    run_and_check(geo, inputs, g)


def test_deterministic_bitwise(monkeypatch):
    """Two runs bitwise equal with deterministic algorithms on (pixel splits included)."""
    _small_blocks(monkeypatch)
    geo = Geo(2, 4, 18, 3, padding=1, groups=2, H=7)
    inputs, g = make(geo, seed=3)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            out, z = hc.hyper_conv2d_forward(*inputs, *geo.conv_args)
            grads = hc.hyper_conv2d_backward(g, inputs[0], inputs[1], *inputs[2:4], *inputs[5:], z, *geo.conv_args,
                                             [True] * 8)
            runs.append([out, z, *grads])
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "two-conv"])
def test_outputs_own_their_storage(monkeypatch, packed):
    """torch.library custom ops may not return tensors that alias inputs or each other."""
    monkeypatch.setattr(hc, "PACKED", packed)
    inputs, g = make(GROUPED)
    x, lam, W, Wh, b, bh, V, C = inputs
    out, z = hc.hyper_conv2d_forward(*inputs, *GROUPED.conv_args)
    grads = hc.hyper_conv2d_backward(g, x, lam, W, Wh, bh, V, C, z, *GROUPED.conv_args, [True] * 8)
    storages = [t.untyped_storage().data_ptr() for t in [*inputs, g] if t is not None]
    for t in [out, z, *grads]:
        ptr = t.untyped_storage().data_ptr()
        assert ptr not in storages
        storages.append(ptr)


def test_packed_weight_handed_to_backward(monkeypatch):
    """The backward reuses the forward's packed weight while W_e and W_h are unchanged; after an
    in-place change (version bump) it packs anew; the entry goes when a weight is freed."""
    packs = []
    original = hc._pack
    monkeypatch.setattr(hc, "_pack", lambda *a: packs.append(1) or original(*a))
    hc.clear_pack_cache()
    inputs, g = make(GROUPED)
    x, lam, W, Wh, b, bh, V, C = inputs
    out, z = hc.hyper_conv2d_forward(*inputs, *GROUPED.conv_args)
    mask = [True] + [False] * 7
    dx = hc.hyper_conv2d_backward(g, x, lam, W, Wh, bh, V, C, z, *GROUPED.conv_args, mask)[0]
    assert len(packs) == 1
    with torch.no_grad():
        W.mul_(1.0)  # same values, new version
    dx2 = hc.hyper_conv2d_backward(g, x, lam, W, Wh, bh, V, C, z, *GROUPED.conv_args, mask)[0]
    assert len(packs) == 2
    torch.testing.assert_close(dx2, dx)
    hc.hyper_conv2d_forward(*inputs, *GROUPED.conv_args)
    assert len(hc._pack_cache) == 1
    del inputs, W
    assert len(hc._pack_cache) == 0
    monkeypatch.setattr(hc, "CACHE_PACKED_WEIGHT", False)
    inputs, g = make(GROUPED)
    hc.hyper_conv2d_forward(*inputs, *GROUPED.conv_args)
    assert len(hc._pack_cache) == 0


def test_float64_runs_the_reference():
    inputs, g = make(GEOS[0], dtype=torch.float64)
    run_and_check(GEOS[0], inputs, g)


# ----------------------------------------------------------------------------- end to end (backend "triton")


def _functional(geo):
    def run(x, hparams, W, Wh, b, bh, V, C):
        stride, padding, dilation, groups = geo.conv_args
        return stn_kernels.hyper_conv2d(x, hparams, W, Wh, b, bh, V, C, stride, padding, dilation, groups)
    return run


def _naive(geo):
    def run(x, hparams, W, Wh, b, bh, V, C):
        return naive_hyper_conv2d(x, hparams, W, Wh, b, bh, V, C, *geo.conv_args)
    return run


@pytest.mark.parametrize("hparams_kind", ["per_example", "shared", "none"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_functional_end_to_end(dtype, hparams_kind):
    geo = GROUPED
    p = make_conv_params(geo.C_in, geo.C_out, geo.k, geo.H, geo.groups, torch.float64)
    hp_dtype = F32 if dtype == F16 else dtype
    hparams = {"per_example": torch.randn(geo.B, geo.H, dtype=torch.float64),
               "shared": torch.randn(geo.H, dtype=torch.float64), "none": None}[hparams_kind]
    inputs = {"x": torch.randn(geo.B, geo.C_in, *geo.size, dtype=torch.float64).to(DEVICE, dtype),
              "hparams": None if hparams is None else hparams.to(DEVICE, hp_dtype),
              "W": p["W"].to(DEVICE, dtype), "Wh": p["Wh"].to(DEVICE, dtype), "b": p["b"].to(DEVICE, dtype),
              "bh": p["bh"].to(DEVICE, dtype), "V": p["V"].to(DEVICE, hp_dtype), "C": p["C"].to(DEVICE, hp_dtype)}
    layouts = {"x": lambda t: t.contiguous(memory_format=CL)} if dtype == F16 else None
    with stn_kernels.use_backend("triton"):
        check_against_naive(_functional(geo), _naive(geo), inputs, dtype, layouts=layouts)


def test_module_end_to_end_and_kernels_called(monkeypatch):
    """stn_kernels.HyperConv2d under use_backend("triton") runs this module's forward and backward."""
    calls = []
    for name in ("hyper_conv2d_forward", "hyper_conv2d_backward"):
        original = getattr(hc, name)
        monkeypatch.setattr(hc, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    geo = GEOS[3]
    layer = randomize_module_(stn_kernels.HyperConv2d(geo.C_in, geo.C_out, geo.k, num_hparams=geo.H, stride=geo.stride,
                                                      padding=geo.padding, dilation=geo.dilation,
                                                      groups=geo.groups)).to(DEVICE)
    x = torch.randn(geo.B, geo.C_in, *geo.size, device=DEVICE).contiguous(memory_format=CL).requires_grad_()
    hparams = torch.randn(geo.B, geo.H, device=DEVICE, requires_grad=True)
    params = [layer.weight, layer.hyper_weight, layer.bias, layer.hyper_bias, layer.hparam_weight]
    with stn_kernels.use_backend("triton"):
        out = layer(x, hparams)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, hparams, *params], grad)
    assert out.is_contiguous(memory_format=CL)
    assert calls == ["hyper_conv2d_forward", "hyper_conv2d_backward"]

    wanted = [t.detach().double().requires_grad_() for t in [x, hparams, *params]]
    xd, hd, Wd, Whd, bd, bhd, Md = wanted
    ref = naive_hyper_conv2d(xd, hd, Wd, Whd, bd, bhd, Md[:geo.C_out], Md[geo.C_out:], *geo.conv_args)
    ref_grads = torch.autograd.grad(ref, wanted, grad.double())
    assert_close_rel(out, ref, F32, "out")
    for name, a, e in zip(["x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight"], got,
                          ref_grads):
        assert_close_rel(a, e, F32, "d" + name)
    assert got[0].is_contiguous(memory_format=CL)


def test_opcheck_with_triton_backend():
    """Schema, autograd registration and fake kernels (layouts included) agree with the kernels."""
    geo = GROUPED
    inputs, _ = make(geo, x_format=CL)
    args = [None if t is None else t.requires_grad_() for t in inputs]
    stride, padding, dilation, groups = geo.conv_args
    with stn_kernels.use_backend("triton"):
        try:
            torch.library.opcheck(torch.ops.stn_kernels.hyper_conv2d.default,
                                  (*args, stride, padding, dilation, groups),
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        except OpCheckError as exc:  # pragma: no cover - shows which check failed
            pytest.fail(str(exc))


def test_triton_and_reference_agree_on_the_hypergradient():
    geo = GEOS[0]
    layer = randomize_module_(stn_kernels.HyperConv2d(geo.C_in, geo.C_out, geo.k, padding=geo.padding,
                                                      num_hparams=geo.H))
    layer = layer.to(DEVICE)
    x = torch.randn(geo.B, geo.C_in, *geo.size, device=DEVICE)
    hparams = torch.randn(geo.B, geo.H, device=DEVICE, requires_grad=True)
    grads = {}
    for backend in ("reference", "triton"):
        with stn_kernels.use_backend(backend):
            (grads[backend],) = torch.autograd.grad(layer(x, hparams).tanh().sum(), hparams)
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-4, atol=1e-5)
    assert TOL[F32] <= 1e-5
