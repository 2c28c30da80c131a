"""The "triton" backend end to end through the torch.library ops: autograd, opcheck,
torch.compile and backend selection. On CPU the kernels run in the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 first); keep shapes tiny."""

import pytest
import torch

import stn_kernels

from _naive import OpCheckError, assert_close_rel, naive_hyper_linear

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(dtype, K=37, N=53, H=7, bias=True):
    torch.manual_seed(0)
    return stn_kernels.HyperLinear(K, N, num_hparams=H, bias=bias, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("hparams_kind", ["per-example", "shared", "none"])
def test_module_forward_backward_matches_naive(dtype, hparams_kind):
    layer = _layer(dtype)
    if dtype == torch.float16:  # λ and the scales stay float32 with half inputs
        layer.hparam_weight.data = layer.hparam_weight.data.float()
    hp_dtype = layer.hparam_weight.dtype
    x = torch.randn(2, 3, 37, device=DEVICE, dtype=dtype, requires_grad=True)  # leading dims [B, T, K]
    hparams = {"per-example": torch.randn(2, 7, device=DEVICE, dtype=hp_dtype),
               "shared": torch.randn(7, device=DEVICE, dtype=hp_dtype), "none": None}[hparams_kind]
    if hparams is not None:
        hparams.requires_grad_(True)
    params = [layer.weight, layer.hyper_weight, layer.bias, layer.hyper_bias, layer.hparam_weight]
    inputs = [x] + ([hparams] if hparams is not None else [])
    with stn_kernels.use_backend("triton"):
        out = layer(x, hparams)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs + params, grad, allow_unused=True)

    wanted = [t.detach().double().requires_grad_(True) for t in inputs + params]
    xd, hd = wanted[0], (wanted[1] if hparams is not None else None)
    Wd, Whd, bd, bhd, Md = wanted[len(inputs):]
    ref = naive_hyper_linear(xd, hd, Wd, Whd, bd, bhd, Md[:53], Md[53:])
    ref_grads = torch.autograd.grad(ref, wanted, grad.double(), allow_unused=True)
    assert out.dtype == dtype
    assert_close_rel(out, ref, dtype, "out")
    names = ["x", "hparams"][:len(inputs)] + ["weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight"]
    for name, g, r in zip(names, got, ref_grads):
        if r is None:  # no hyper path without hparams: no gradient reaches it
            assert g is None or not g.any(), name
            continue
        assert_close_rel(g, r, dtype, f"d{name}")


def test_opcheck_with_triton_backend():
    layer = _layer(torch.float32)
    x = torch.randn(5, 37, device=DEVICE, requires_grad=True)
    hparams = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    args = (x, hparams, layer.weight, layer.hyper_weight, layer.bias, layer.hyper_bias, layer.hparam_weight[:53],
            layer.hparam_weight[53:])
    with stn_kernels.use_backend("triton"):
        try:
            torch.library.opcheck(torch.ops.stn_kernels.hyper_linear.default, args,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        except OpCheckError as exc:  # pragma: no cover - shows which check failed
            pytest.fail(str(exc))


def test_compile_fullgraph_with_triton_backend():
    torch._dynamo.reset()
    layer = _layer(torch.float32, K=16, N=24, H=3)
    x = torch.randn(3, 16, device=DEVICE)
    hparams = torch.randn(3, 3, device=DEVICE, requires_grad=True)
    with stn_kernels.use_backend("triton"):
        eager = layer(x, hparams)
        (eager_grad,) = torch.autograd.grad(eager.square().sum(), hparams)
        compiled = torch.compile(layer, fullgraph=True)
        out = compiled(x, hparams)
        (grad,) = torch.autograd.grad(out.square().sum(), hparams)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)


def test_triton_and_reference_agree_on_the_hypergradient():
    """What STN learns must not depend on the backend: dL/dλ equal to float32 rounding."""
    layer = _layer(torch.float32)
    x = torch.randn(6, 37, device=DEVICE)
    hparams = torch.randn(6, 7, device=DEVICE, requires_grad=True)
    grads = {}
    for backend in ("reference", "triton"):
        with stn_kernels.use_backend(backend):
            (grads[backend],) = torch.autograd.grad(layer(x, hparams).tanh().sum(), hparams)
    torch.testing.assert_close(grads["triton"], grads["reference"], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_auto_uses_reference_on_cpu_even_when_interpreting(monkeypatch):
    import stn_kernels.reference as reference

    calls = []
    # The module path runs the stacked-[V; C] form of the reference forward, the functional path the other (the
    # compiled host path, the same ops from C++, is off here: tests/test_host_extension.py).
    monkeypatch.setenv("STN_KERNELS_HOST", "0")
    for name in ("hyper_linear_forward", "hyper_linear_stacked_forward"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _f=original: calls.append(1) or _f(*a))
    layer = _layer(torch.float32)
    layer(torch.randn(2, 37), torch.randn(2, 7))
    assert calls, "auto on CPU must run the reference path"


def test_triton_backend_runs_the_triton_kernels(monkeypatch):
    from stn_kernels.backends.triton import hyper_linear as kernels

    calls = []
    for name in ("hyper_linear_forward", "hyper_linear_backward"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    layer = _layer(torch.float32)
    hparams = torch.randn(2, 7, device=DEVICE, requires_grad=True)
    with stn_kernels.use_backend("triton"):
        layer(torch.randn(2, 37, device=DEVICE), hparams).sum().backward()
    assert calls == ["hyper_linear_forward", "hyper_linear_backward"]
