"""stn_kernels.hyper_linear and stn_kernels.HyperLinear against the naive formulation in tests/_naive.py.

Every forward output and every gradient (x, λ, weight, hyper_weight, bias,
hyper_bias, V/C or hparam_weight) is compared with the autograd gradients of
the two-F.linear naive formula computed in float64 from the same values.
"""

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
    make_hparams,
    make_linear_params,
    naive_hyper_linear,
    randomize_module_,
    rel_err,
    strided_layout,
    transposed_layout,
)

SHAPES = [pytest.param((37, 53, 1), id="K37-N53-H1"), pytest.param((37, 53, 7), id="K37-N53-H7")]
BATCHES = [pytest.param(1, id="B1"), pytest.param(5, id="B5")]
BIAS = [pytest.param(True, id="bias"), pytest.param(False, id="nobias")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def functional(x, hparams, W, Wh, b, bh, V, C):
    return stn_kernels.hyper_linear(x, hparams, W, Wh, b, bh, V, C)


def linear_inputs(x_shape, K, N, H, dtype, hparams_kind, bias=True, hparams_dtype=None):
    p = make_linear_params(K, N, H, dtype, bias)
    if hparams_dtype is not None:
        p["V"], p["C"] = p["V"].to(hparams_dtype), p["C"].to(hparams_dtype)
    x = torch.randn(*x_shape, dtype=torch.float64).to(dtype)
    hp = make_hparams(hparams_kind, x_shape[0] if len(x_shape) > 1 else 1, H, hparams_dtype or dtype)
    return {"x": x, "hparams": hp, **p}


def module_fn(module):
    """A function of (x, hparams, parameters...) that runs ``module.forward`` on those parameters."""
    def run(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
        params = {"weight": weight, "hyper_weight": hyper_weight, "bias": bias, "hyper_bias": hyper_bias,
                  "hparam_weight": hparam_weight}
        params = {k: v for k, v in params.items() if v is not None}
        return functional_call(module, params, (x, hparams))
    return run


def module_naive(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
    n = weight.shape[0]
    return naive_hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight[:n],
                              hparam_weight[n:])


def module_inputs(module, x, hparams):
    return {"x": x, "hparams": hparams, "weight": module.weight, "hyper_weight": module.hyper_weight,
            "bias": module.bias, "hyper_bias": module.hyper_bias, "hparam_weight": module.hparam_weight}


# ----------------------------------------------------------------------------- the harness can fail

def test_naive_detects_wrong_hyper_paths():
    """The data make every plausible mistake show far above the float32 tolerance."""
    inp = linear_inputs((5, 37), 37, 53, 7, torch.float64, "per_example")
    ref = naive_hyper_linear(**inp)
    wrong = {
        "V and C swapped": dict(inp, V=inp["C"], C=inp["V"]),
        "λ rows rolled": dict(inp, hparams=inp["hparams"].roll(1, 0)),
        "no hyper bias": dict(inp, bh=None),
        "W and W_hyper swapped": dict(inp, W=inp["Wh"], Wh=inp["W"]),
        "λ ignored": dict(inp, hparams=None),
    }
    for what, bad in wrong.items():
        assert rel_err(naive_hyper_linear(**bad), ref) > 100 * TOL[torch.float32], what


def test_naive_matches_hand_computed_example():
    """One example with integers: out = W·x + (V·λ)(W_h·x) + b + (C·λ) b_h."""
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    Wh = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([10.0, 20.0], dtype=torch.float64)
    bh = torch.tensor([1.0, -1.0], dtype=torch.float64)
    V = torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    C = torch.tensor([[5.0], [7.0]], dtype=torch.float64)
    lam = torch.tensor([[0.5]], dtype=torch.float64)
    # row 0: 1 + 1.0*3 + 10 + 2.5*1 = 16.5; row 1: 2 + 1.5*2 + 20 + 3.5*(-1) = 21.5
    expected = torch.tensor([[16.5, 21.5]], dtype=torch.float64)
    assert torch.equal(naive_hyper_linear(x, lam, W, Wh, b, bh, V, C), expected)
    assert torch.allclose(stn_kernels.hyper_linear(x, lam, W, Wh, b, bh, V, C), expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- functional and module vs naive

@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_matches_naive(dtype, B, shape, hparams_kind, bias):
    K, N, H = shape
    inp = linear_inputs((B, K), K, N, H, dtype, hparams_kind, bias)
    check_against_naive(functional, naive_hyper_linear, inp, dtype)


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_matches_naive(dtype, B, shape, hparams_kind, bias):
    K, N, H = shape
    m = randomize_module_(stn_kernels.HyperLinear(K, N, num_hparams=H, bias=bias, dtype=dtype))
    x = torch.randn(B, K, dtype=dtype)
    check_against_naive(module_fn(m), module_naive, module_inputs(m, x, make_hparams(hparams_kind, B, H, dtype)),
                        dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_backward_fills_parameter_grads(dtype):
    """The ordinary training path: loss.backward() fills .grad of every parameter, hparam_weight = [dV; dC]."""
    K, N, H, B = 37, 53, 7, 5
    m = randomize_module_(stn_kernels.HyperLinear(K, N, num_hparams=H, dtype=dtype))
    x = torch.randn(B, K, dtype=dtype, requires_grad=True)
    lam = torch.randn(B, H, dtype=dtype, requires_grad=True)
    g = torch.randn(B, N, dtype=torch.float64)
    (m(x, lam) * g.to(dtype)).sum().backward()
    ref_in = {k: v.detach().double().requires_grad_() for k, v in
              module_inputs(m, x, lam).items()}
    ref = module_naive(**ref_in)
    (ref * g).sum().backward()
    assert_close_rel(x.grad, ref_in["x"].grad, dtype, "x")
    assert_close_rel(lam.grad, ref_in["hparams"].grad, dtype, "hparams")
    for name, p in m.named_parameters():
        assert_close_rel(p.grad, ref_in[name].grad, dtype, name)


def test_module_without_hparams_is_plain_linear():
    m = randomize_module_(stn_kernels.HyperLinear(37, 53, num_hparams=7, dtype=torch.float64))
    x = torch.randn(5, 37, dtype=torch.float64)
    assert_close_rel(m(x), F.linear(x, m.weight, m.bias), torch.float64)
    m(x).sum().backward()
    assert m.hyper_weight.grad is None and m.hparam_weight.grad is None and m.hyper_bias.grad is None


@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("x_shape", [pytest.param((5, 3, 37), id="B5-T3"), pytest.param((4, 2, 3, 37), id="B4-2x3"),
                                     pytest.param((1, 6, 37), id="B1-T6")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims(dtype, x_shape, hparams_kind):
    """[B, *, K]: λ_b is shared across the middle dims."""
    inp = linear_inputs(x_shape, 37, 53, 7, dtype, hparams_kind)
    check_against_naive(functional, naive_hyper_linear, inp, dtype)
    m = randomize_module_(stn_kernels.HyperLinear(37, 53, num_hparams=7, dtype=dtype))
    check_against_naive(module_fn(m), module_naive, module_inputs(m, inp["x"], inp["hparams"]), dtype)


@pytest.mark.parametrize("hparams_kind", ["shared", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unbatched_input(dtype, hparams_kind):
    """input [K] with hparams [H] or None gives [N]."""
    inp = linear_inputs((37,), 37, 53, 7, dtype, hparams_kind)
    check_against_naive(functional, naive_hyper_linear, inp, dtype)


def test_leading_dims_lambda_really_per_example():
    """With [B, T, K] input, row b of the output uses λ_b for every t (not λ_t, not λ_0)."""
    inp = linear_inputs((4, 3, 37), 37, 53, 7, torch.float64, "per_example")
    out = functional(**inp)
    for b in range(4):
        row = naive_hyper_linear(inp["x"][b], inp["hparams"][b], *(inp[k] for k in ("W", "Wh", "b", "bh", "V", "C")))
        assert_close_rel(out[b], row, torch.float64, f"example {b}")


GRAD_SUBSETS = {
    "only-hparams": ["hparams"],                       # the hypernetwork step of STN training
    "hparams-and-scales": ["hparams", "V", "C"],
    "only-weights": ["W", "Wh", "b", "bh", "V", "C"],  # the weight step (input without grad)
    "only-x": ["x"],
    "only-hyper-weight": ["Wh"],
    "only-bias-scale": ["C"],
}


@pytest.mark.parametrize("subset", list(GRAD_SUBSETS), ids=list(GRAD_SUBSETS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_of_a_subset(dtype, subset):
    """Only some inputs require grad: the masked backward paths give those gradients right."""
    inp = linear_inputs((5, 3, 37), 37, 53, 7, dtype, "per_example")
    check_against_naive(functional, naive_hyper_linear, inp, dtype, grad_of=GRAD_SUBSETS[subset])


LAYOUTS = {
    "x-transposed": {"x": transposed_layout},
    "x-strided": {"x": strided_layout},
    "hparams-transposed": {"hparams": transposed_layout},
    "hparams-strided": {"hparams": strided_layout},
    "weights-transposed": {"W": transposed_layout, "Wh": transposed_layout, "V": transposed_layout,
                           "C": transposed_layout},
    "all-strided": {k: strided_layout for k in ("x", "hparams", "W", "Wh", "b", "bh", "V", "C")},
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, layout):
    inp = linear_inputs((5, 37), 37, 53, 7, dtype, "per_example")
    check_against_naive(functional, naive_hyper_linear, inp, dtype, layouts=LAYOUTS[layout])


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_leading_dims(dtype):
    """[B, T, K] that cannot be viewed as [B·T, K] (a transposed [T, B, K] tensor)."""
    inp = linear_inputs((5, 3, 37), 37, 53, 7, dtype, "per_example")
    to_tbk = {"x": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)}
    check_against_naive(functional, naive_hyper_linear, inp, dtype, layouts=to_tbk)


@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("x_shape", [pytest.param((0, 37), id="B0"), pytest.param((0, 3, 37), id="B0-T3"),
                                     pytest.param((3, 0, 37), id="B3-T0")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype, x_shape, hparams_kind):
    """No rows: an empty [..., N] output, and backward gives zero (or empty) gradients."""
    inp = linear_inputs(x_shape, 37, 53, 7, dtype, hparams_kind)
    out = functional(**inp)
    assert out.shape == (*x_shape[:-1], 53) and out.dtype == dtype
    check_against_naive(functional, naive_hyper_linear, inp, dtype)
    m = stn_kernels.HyperLinear(37, 53, num_hparams=7, dtype=dtype)
    x = torch.randn(x_shape, dtype=dtype, requires_grad=True)
    out = m(x, inp["hparams"])
    assert out.shape == (*x_shape[:-1], 53)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert not m.weight.grad.any()


# ----------------------------------------------------------------------------- STN shapes

STN_SHAPES = [
    pytest.param((128, 15, 1024, 4096), id="B128-H15-1024x4096"),
    pytest.param((128, 3, 784, 1200), id="B128-H3-784x1200"),
    pytest.param((40, 7, 650, 2600), id="B40-H7-650x2600"),
]


@pytest.mark.parametrize("shape", STN_SHAPES)
def test_stn_shapes_float32(shape):
    B, H, K, N = shape
    m = randomize_module_(stn_kernels.HyperLinear(K, N, num_hparams=H, dtype=torch.float32))
    x = torch.randn(B, K)
    check_against_naive(module_fn(m), module_naive, module_inputs(m, x, torch.randn(B, H)), torch.float32)


# ----------------------------------------------------------------------------- gradcheck

def _small(dtype=torch.float64, hparams_kind="per_example", bias=True, x_shape=(3, 4)):
    inp = linear_inputs(x_shape, 4, 3, 2, dtype, hparams_kind, bias)
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inp.items()}


GRADCHECK_CASES = [
    pytest.param("per_example", True, (3, 4), id="per_example"),
    pytest.param("shared", True, (3, 4), id="shared"),
    pytest.param("none", True, (3, 4), id="none"),
    pytest.param("per_example", False, (3, 4), id="per_example-nobias"),
    pytest.param("shared", False, (3, 4), id="shared-nobias"),
    pytest.param("per_example", True, (2, 2, 4), id="per_example-B2-T2"),
]


@pytest.mark.parametrize("hparams_kind, bias, x_shape", GRADCHECK_CASES)
def test_gradcheck_functional(hparams_kind, bias, x_shape, one_thread):
    inp = _small(hparams_kind=hparams_kind, bias=bias, x_shape=x_shape)
    args = tuple(inp[k] for k in ("x", "hparams", "W", "Wh", "b", "bh", "V", "C"))
    assert torch.autograd.gradcheck(stn_kernels.hyper_linear, args)
    assert torch.autograd.gradgradcheck(stn_kernels.hyper_linear, args)


@pytest.mark.parametrize("hparams_kind", HPARAMS)
def test_gradcheck_module(hparams_kind, one_thread):
    m = randomize_module_(stn_kernels.HyperLinear(4, 3, num_hparams=2, dtype=torch.float64))
    run = module_fn(m)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    hp = make_hparams(hparams_kind, 3, 2)
    hp = hp.requires_grad_() if hp is not None else None
    params = tuple(p.detach().clone().requires_grad_() for p in
                   (m.weight, m.hyper_weight, m.bias, m.hyper_bias, m.hparam_weight))
    args = (x, hp, *params)
    assert torch.autograd.gradcheck(run, args)
    assert torch.autograd.gradgradcheck(run, args)


# ----------------------------------------------------------------------------- JVP (Delta-STN)

def _jvp_setup():
    inp = linear_inputs((5, 37), 37, 53, 7, torch.float64, "per_example")
    v = torch.randn(5, 7, dtype=torch.float64)
    rest = {k: inp[k] for k in ("W", "Wh", "b", "bh", "V", "C")}
    # The layer is affine in λ: d out / dλ · v = (V·v) ⊙ (W_h·x) + (C·v) ⊙ b_h.
    expected = F.linear(v, rest["V"]) * F.linear(inp["x"], rest["Wh"]) + F.linear(v, rest["C"]) * rest["bh"]
    return inp, rest, v, expected


def test_jvp_wrt_hparams_autograd_functional():
    inp, rest, v, expected = _jvp_setup()
    f = lambda lam: stn_kernels.hyper_linear(inp["x"], lam, *rest.values())  # noqa: E731
    out, jvp = torch.autograd.functional.jvp(f, (inp["hparams"],), (v,))
    assert_close_rel(out, naive_hyper_linear(**inp), torch.float64, "primal")
    assert_close_rel(jvp, expected, torch.float64, "tangent")
    # ... and a central finite difference agrees (exact for an affine map up to rounding).
    eps = 1e-3
    fd = (f(inp["hparams"] + eps * v) - f(inp["hparams"] - eps * v)) / (2 * eps)
    assert_close_rel(jvp, fd, torch.float64, "finite difference")


def test_jvp_is_differentiable_wrt_weights():
    """Delta-STN trains through the linearised response f(λ0) + J·(λ - λ0): the JVP must carry gradients
    into the weights, x and V/C, equal to the naive formulation's."""
    inp, rest, v, _ = _jvp_setup()

    def linearised(fn, tensors):
        lam0 = tensors["hparams"]
        f = lambda lam: fn(tensors["x"], lam, *(tensors[k] for k in ("W", "Wh", "b", "bh", "V", "C")))  # noqa
        out, jvp = torch.autograd.functional.jvp(f, (lam0,), (v,), create_graph=True)
        return out + jvp

    act = {k: t.clone().requires_grad_() for k, t in inp.items()}
    exp = {k: t.clone().requires_grad_() for k, t in inp.items()}
    y, y_ref = linearised(stn_kernels.hyper_linear, act), linearised(naive_hyper_linear, exp)
    assert_close_rel(y, y_ref, torch.float64, "linearised output")
    g = torch.randn_like(y)
    names = ["x", "W", "Wh", "b", "bh", "V", "C"]
    grads = torch.autograd.grad(y, [act[k] for k in names], g)
    ref = torch.autograd.grad(y_ref, [exp[k] for k in names], g)
    for name, a, e in zip(names, grads, ref):
        assert_close_rel(a, e, torch.float64, f"grad {name}")


def test_jvp_wrt_hparams_torch_func():
    inp, rest, v, expected = _jvp_setup()
    f = lambda lam: stn_kernels.hyper_linear(inp["x"], lam, *rest.values())  # noqa: E731
    out, jvp = torch.func.jvp(f, (inp["hparams"],), (v,))
    assert_close_rel(out, naive_hyper_linear(**inp), torch.float64, "primal")
    assert_close_rel(jvp, expected, torch.float64, "tangent")


# ----------------------------------------------------------------------------- half precision, autocast

@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_float32_hparams(dtype, hparams_kind):
    """x and weights in half, λ and V, C in float32: output in the input dtype, close to float64 math."""
    inp = linear_inputs((5, 37), 37, 53, 7, dtype, hparams_kind, hparams_dtype=torch.float32)
    check_against_naive(functional, naive_hyper_linear, inp, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_half_hparams(dtype):
    inp = linear_inputs((5, 3, 37), 37, 53, 7, dtype, "per_example")
    check_against_naive(functional, naive_hyper_linear, inp, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_module_float32_hparam_weight(dtype):
    m = randomize_module_(stn_kernels.HyperLinear(37, 53, num_hparams=7, dtype=dtype))
    m.hparam_weight.data = m.hparam_weight.data.float()
    x = torch.randn(5, 37).to(dtype)
    check_against_naive(module_fn(m), module_naive, module_inputs(m, x, torch.randn(5, 7)), dtype)


def test_autocast_bf16():
    m = randomize_module_(stn_kernels.HyperLinear(37, 53, num_hparams=7))
    x = torch.randn(5, 37, requires_grad=True)
    lam = torch.randn(5, 7, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, lam)
    assert out.dtype == torch.bfloat16
    n = 53
    p64 = {k: v.detach().double() for k, v in m.named_parameters()}
    ref = naive_hyper_linear(x.detach().double(), lam.detach().double(), p64["weight"], p64["hyper_weight"],
                             p64["bias"], p64["hyper_bias"], p64["hparam_weight"][:n], p64["hparam_weight"][n:])
    assert_close_rel(out, ref, torch.bfloat16)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lam.grad.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


# ----------------------------------------------------------------------------- opcheck

def _op_args(dtype, with_hparams, with_bias, requires_grad=True, M=6, K=5, N=4, H=3):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)

    return (r(M, K), r(M, H) if with_hparams else None, r(N, K), r(N, K), r(N) if with_bias else None,
            r(N) if with_bias else None, r(N, H) if with_hparams else None,
            r(N, H) if with_hparams and with_bias else None)


OPCHECK = [pytest.param(h, b, id=f"{'hparams' if h else 'nohparams'}-{'bias' if b else 'nobias'}")
           for h in (True, False) for b in (True, False)]


@pytest.mark.parametrize("with_hparams, with_bias", OPCHECK)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_forward(dtype, with_hparams, with_bias):
    torch.library.opcheck(torch.ops.stn_kernels.hyper_linear.default, _op_args(dtype, with_hparams, with_bias))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_opcheck_half_input_float32_hparams(dtype):
    """The mixed-precision call the functional makes: x, weights, biases in half; λ, V, C in float32."""
    x, hp, W, Wh, b, bh, V, C = _op_args(dtype, True, True)
    hp, V, C = (t.detach().float().requires_grad_() for t in (hp, V, C))
    torch.library.opcheck(torch.ops.stn_kernels.hyper_linear.default, (x, hp, W, Wh, b, bh, V, C))
    g = torch.randn(x.shape[0], W.shape[0], dtype=dtype)
    args = [t.detach() for t in (g, x, hp, W, Wh, bh, V, C)]
    z = F.linear(args[1], args[4])
    torch.library.opcheck(torch.ops.stn_kernels.hyper_linear_backward.default, (*args, z, [True] * 8))


def test_opcheck_forward_expanded_hparams():
    """Shared λ [H] reaches the op as a stride-0 [M, H] expansion."""
    x, hp, W, Wh, b, bh, V, C = _op_args(torch.float32, True, True)
    shared = torch.randn(hp.shape[1], requires_grad=True)
    torch.library.opcheck(torch.ops.stn_kernels.hyper_linear.default,
                          (x, shared.expand(x.shape[0], -1), W, Wh, b, bh, V, C))


def _backward_args(dtype, with_hparams, with_bias, mask):
    x, hp, W, Wh, b, bh, V, C = _op_args(dtype, with_hparams, with_bias, requires_grad=False)
    z = F.linear(x, Wh) if with_hparams else x.new_empty(0)
    g = torch.randn(x.shape[0], W.shape[0], dtype=dtype)
    return (g, x, hp, W, Wh, bh, V, C, z, mask)


@pytest.mark.parametrize("with_hparams, with_bias", OPCHECK)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_backward(dtype, with_hparams, with_bias):
    """With the output mask autograd passes (inputs that take no part masked out)."""
    mask = [True, with_hparams, True, with_hparams, with_bias, with_hparams and with_bias, with_hparams,
            with_hparams and with_bias]
    torch.library.opcheck(torch.ops.stn_kernels.hyper_linear_backward.default,
                          _backward_args(dtype, with_hparams, with_bias, mask))


@pytest.mark.parametrize("with_hparams, with_bias", [
    pytest.param(True, True, id="hparams-bias"),
    pytest.param(True, False, id="hparams-nobias"),
    pytest.param(False, True, id="nohparams-bias"),
    pytest.param(False, False, id="nohparams-nobias"),
])
def test_opcheck_backward_full_mask(with_hparams, with_bias):
    """All-True output mask: the fake kernel must agree with the real one on which grads are empty."""
    torch.library.opcheck(torch.ops.stn_kernels.hyper_linear_backward.default,
                          _backward_args(torch.float32, with_hparams, with_bias, [True] * 8))


def test_backward_op_matches_naive_grads():
    """The backward op called directly gives the naive formulation's gradients."""
    x, hp, W, Wh, b, bh, V, C = _op_args(torch.float64, True, True, requires_grad=False)
    g = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64)
    grads = torch.ops.stn_kernels.hyper_linear_backward(g, x, hp, W, Wh, bh, V, C, F.linear(x, Wh), [True] * 8)
    leaves = [t.clone().requires_grad_() for t in (x, hp, W, Wh, b, bh, V, C)]
    expected = torch.autograd.grad(naive_hyper_linear(leaves[0], leaves[1], *leaves[2:]), leaves, g)
    names = ["x", "hparams", "W", "Wh", "b", "bh", "V", "C"]
    for name, a, e in zip(names, grads, expected):
        assert_close_rel(a, e, torch.float64, name)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "embedding"])
def test_calls_autograd_would_not_record_skip_the_function(monkeypatch, layer):
    """Under no_grad (and with nothing requiring grad) the layers call the kernels directly, with the same
    result; a call autograd records goes through the autograd.Function (for the modules with a stacked
    hparam_weight, the one that splits it inside: StackedScalesFunction). HyperEmbedding and HyperConv2d on
    the reference backend run plain torch ops (no Function at all), so they are checked on the Triton
    backend; HyperLinear's compiled host path (tests/test_host_extension.py) is switched off here."""
    from stn_kernels.ops import _support, hyper_embedding

    monkeypatch.setenv("STN_KERNELS_HOST", "0")
    if layer in ("embedding", "conv2d"):
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("STN_KERNELS_BACKEND", "triton")

    torch.manual_seed(0)
    module, x = {
        "linear": (stn_kernels.HyperLinear(7, 5, num_hparams=3), torch.randn(4, 7)),
        "conv2d": (stn_kernels.HyperConv2d(2, 3, 3, num_hparams=3, padding=1), torch.randn(4, 2, 5, 5)),
        "embedding": (stn_kernels.HyperEmbedding(11, 5, num_hparams=3), torch.randint(0, 11, (4, 2))),
    }[layer]
    fn = {"linear": _support.StackedScalesFunction, "conv2d": _support.StackedScalesFunction,
          "embedding": hyper_embedding.HyperEmbeddingFunction}[layer]
    calls = []
    apply = fn.apply
    monkeypatch.setattr(fn, "apply", lambda *a: calls.append(1) or apply(*a))
    lam = torch.randn(4, 3)
    recorded = module(x, lam)
    assert calls and recorded.requires_grad
    calls.clear()
    with torch.no_grad():
        direct = module(x, lam)
    module.requires_grad_(False)
    frozen = module(x, lam)
    assert not calls and not direct.requires_grad and not frozen.requires_grad
    torch.testing.assert_close(direct, recorded.detach(), rtol=0, atol=0)
    torch.testing.assert_close(frozen, recorded.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_module_resolves_its_backend_once_per_call(monkeypatch, layer):
    """A module's forward and backward resolve the backend once; a backward under another use_backend
    resolves it anew (and raises where that backend cannot run), as the ops' own backward does. (The second
    part on the Triton backend: on the reference one HyperConv2d's backward is torch's, with no backend.)"""
    from stn_kernels.backends import registry

    pytest.importorskip("triton")
    monkeypatch.delenv("STN_KERNELS_BACKEND", raising=False)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    module, x = {
        "linear": (stn_kernels.HyperLinear(7, 5, num_hparams=3), torch.randn(4, 7)),
        "conv2d": (stn_kernels.HyperConv2d(2, 3, 3, num_hparams=3, padding=1), torch.randn(4, 2, 5, 5)),
    }[layer]
    calls = []
    resolve = registry.resolve_backend
    monkeypatch.setattr(registry, "resolve_backend", lambda *a: calls.append(a[0]) or resolve(*a))
    module(x, torch.randn(4, 3, requires_grad=True)).sum().backward()
    assert calls == [f"hyper_{layer}"]
    with stn_kernels.use_backend("triton"):
        out = module(x, torch.randn(4, 3, requires_grad=True))
    with stn_kernels.use_backend("cuda"), pytest.raises(stn_kernels.BackendUnavailableError, match="'cuda'"):
        out.sum().backward()
