"""Independent naive formulations of the STN layers, tolerances and parameter factories.

Written from the layer formulas only (plain F.linear / F.conv2d / F.embedding
calls), deliberately NOT using ``stn_kernels.reference``, so that the tests
compare the package against something it does not share code with:

    linear:    out[b] = W·x[b] + (V·λ_b) ⊙ (W_hyper·x[b]) + bias + (C·λ_b) ⊙ hyper_bias
    conv2d:    out[b,c] = conv(x,W)[b,c] + (V·λ_b)[c]·conv(x,W_hyper)[b,c] + bias[c] + (C·λ_b)[c]·hyper_bias[c]
    embedding: out[b,...] = E[i] + (V·λ_b) ⊙ E_hyper[i]
    HyperLSTM: the published HyperLSTMCell loop, naive_hyper_linear for i2h and h2h at every step
               (λ scales recomputed each step), gates sigmoid on [0:3N] = forget, input, output and
               tanh on [3N:4N]

λ is [B, H] (one row per example, shared by any middle dims), [H] (shared by the
batch) or None (the elementary path only).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import stn_kernels

try:  # what torch.library.opcheck raises (an internal class; any Exception on other torch versions)
    from torch.testing._internal.optests.generate_tests import OpCheckError
except ImportError:  # pragma: no cover
    OpCheckError = Exception

# Largest accepted max|actual - expected| / max|expected|. Every dtype is compared
# against a float64 ground truth computed from the same (upcast) data, so each entry
# bounds the rounding error of the computation in that dtype: float64 1e-10 (the
# observed error is ~1e-16; any formula mistake is O(1) with the O(1)-scaled data
# below), float32 about 80 ulps (observed ~5e-7), the half types 4-5 ulps of their
# 11-bit (float16) and 8-bit (bfloat16) mantissas, since every [M, N] intermediate
# (x·Wᵀ, x·W_hyperᵀ, the scaled sum) is rounded to the half type (observed: ~1/5
# of the tolerance).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max|actual - expected| / max|expected| (absolute error when expected is all zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return 0.0
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    return err / scale if scale > 0 else err


def assert_close_rel(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Same shape, all finite, and max|actual - expected| <= TOL[dtype]·max|expected|."""
    assert isinstance(actual, Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert bool(torch.isfinite(actual.detach().double()).all()), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > tolerance {TOL[dtype]:.0e} for {dtype}"


# ----------------------------------------------------------------------------- naive formulations

def _scales(hparams: Tensor, scale: Tensor, example_dims: int) -> Tensor:
    """λ·scaleᵀ shaped to broadcast against an output [B, *, N] with ``example_dims`` middle dims.

    [B, H] -> [B, 1, ..., 1, N]; [H] -> [N].
    """
    s = F.linear(hparams, scale)
    if hparams.dim() == 2:
        s = s.reshape(s.shape[0], *([1] * example_dims), s.shape[1])
    return s


def naive_hyper_linear(x: Tensor, hparams: Optional[Tensor], W: Tensor, Wh: Tensor, b: Optional[Tensor] = None,
                       bh: Optional[Tensor] = None, V: Optional[Tensor] = None, C: Optional[Tensor] = None) -> Tensor:
    """x [B, *, K]; hparams [B, H], [H] or None."""
    out = F.linear(x, W, b)
    if hparams is None:
        return out
    middle = x.dim() - 2 if hparams.dim() == 2 else 0
    out = out + _scales(hparams, V, middle) * F.linear(x, Wh)
    if bh is not None:
        out = out + _scales(hparams, C, middle) * bh
    return out


def naive_hyper_conv2d(x: Tensor, hparams: Optional[Tensor], W: Tensor, Wh: Tensor, b: Optional[Tensor] = None,
                       bh: Optional[Tensor] = None, V: Optional[Tensor] = None, C: Optional[Tensor] = None,
                       stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    """x [B, C_in, H, W]; hparams [B, H], [H] or None; per-example, per-output-channel scales."""
    out = F.conv2d(x, W, b, stride, padding, dilation, groups)
    if hparams is None:
        return out
    s = F.linear(hparams, V)  # [B, C_out] or [C_out]
    z = F.conv2d(x, Wh, None, stride, padding, dilation, groups)
    out = out + s[..., :, None, None] * z
    if bh is not None:
        t = F.linear(hparams, C)
        out = out + (t * bh)[..., :, None, None]
    return out


def naive_hyper_embedding(idx: Tensor, hparams: Optional[Tensor], E: Tensor, Eh: Tensor,
                          V: Optional[Tensor] = None) -> Tensor:
    """idx [B, *] (batch-major); hparams [B, H], [H] or None."""
    out = F.embedding(idx.long(), E)
    if hparams is None:
        return out
    middle = idx.dim() - 1 if hparams.dim() == 2 else 0
    return out + _scales(hparams, V, middle) * F.embedding(idx.long(), Eh)


# ----------------------------------------------------------------------------- factories

def make_linear_params(K: int, N: int, H: int, dtype=torch.float64, bias: bool = True, generator=None) -> dict:
    """W, Wh [N, K], b, bh [N], V, C [N, H], all scaled so that every path of the output is O(1).

    (The modules' default init makes the hyper path ~1% of the output; random O(1)
    scales make a wrong hyper path show up far above every tolerance.)
    """
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(dtype)

    return {
        "W": r(N, K, scale=K ** -0.5), "Wh": r(N, K, scale=K ** -0.5),
        "b": r(N) if bias else None, "bh": r(N) if bias else None,
        "V": r(N, H, scale=H ** -0.5), "C": r(N, H, scale=H ** -0.5),
    }


def make_conv_params(C_in: int, C_out: int, kernel, H: int, groups: int = 1, dtype=torch.float64,
                     bias: bool = True, generator=None) -> dict:
    """W, Wh [C_out, C_in/groups, kh, kw], b, bh [C_out], V, C [C_out, H]; kernel an int or (kh, kw)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    fan_in = C_in // groups * kh * kw
    p = make_linear_params(fan_in, C_out, H, dtype, bias, generator)
    p["W"] = p["W"].reshape(C_out, C_in // groups, kh, kw)
    p["Wh"] = p["Wh"].reshape(C_out, C_in // groups, kh, kw)
    return p


def make_embedding_params(num: int, D: int, H: int, dtype=torch.float64, generator=None) -> dict:
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=generator) * scale).to(dtype)

    return {"E": r(num, D), "Eh": r(num, D), "V": r(D, H, scale=H ** -0.5)}


def make_hparams(kind: str, B: int, H: int, dtype=torch.float64, generator=None) -> Optional[Tensor]:
    """kind: "per_example" -> [B, H], "shared" -> [H], "none" -> None."""
    if kind == "none":
        return None
    shape = (B, H) if kind == "per_example" else (H,)
    return torch.randn(*shape, dtype=torch.float64, generator=generator).to(dtype)


def randomize_module_(module: torch.nn.Module, generator=None) -> torch.nn.Module:
    """Re-draw every parameter of an STN module at O(1) output scale (see make_linear_params).

    Linear/conv weights get std 1/sqrt(fan_in), hparam_weight std 1/sqrt(H),
    biases and embedding tables std 1.
    """
    is_embedding = module.__class__.__name__ == "HyperEmbedding"
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "hparam_weight":
                std = p.shape[1] ** -0.5
            elif name in ("weight", "hyper_weight") and not is_embedding:
                std = p[0].numel() ** -0.5
            else:
                std = 1.0
            p.copy_((torch.randn(p.shape, dtype=torch.float64, generator=generator) * std).to(p.dtype))
    return module


def leaf_copies(tensors: dict, dtype=None, requires_grad: bool = True) -> dict:
    """Detached copies (optionally cast) of the floating tensors in ``tensors``, as leaves requiring grad."""
    out = {}
    for k, v in tensors.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            c = v.detach().clone() if dtype is None else v.detach().to(dtype)
            out[k] = c.requires_grad_(requires_grad)
        else:
            out[k] = v
    return out


def transposed_layout(t: Tensor) -> Tensor:
    """Same values, last two dims stored transposed (non-contiguous, dense)."""
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not out.is_contiguous()
    return out


def strided_layout(t: Tensor) -> Tensor:
    """Same values as a strided view (every dim stride-2 into a twice-as-large tensor); differentiable."""
    big = t
    for d in range(t.dim()):
        big = torch.repeat_interleave(big, 2, dim=d)
    out = big[tuple(slice(None, None, 2) for _ in range(t.dim()))]
    assert not out.is_contiguous()
    return out


def check_against_naive(op_fn, naive_fn, inputs: dict, dtype: torch.dtype, tol_dtype=None,
                        out_dtype=None, layouts: Optional[dict] = None, grad_of=None) -> None:
    """Run ``op_fn(**inputs)`` and, on float64 copies of the same values, ``naive_fn(**inputs)``;
    compare the outputs and the gradients of every floating input for one random grad_out.

    ``layouts`` maps an input name to a value-preserving function (e.g.
    :func:`strided_layout`) applied to the op's copy only, to feed the op
    non-contiguous tensors. ``dtype`` is the dtype the op computes in (its output dtype unless ``out_dtype``
    says otherwise); ``tol_dtype`` picks the tolerance (default ``dtype``). Inputs the
    naive formulation does not use (grad None) must get no gradient (None) or zeros.
    ``grad_of`` (a collection of names) makes only those inputs require grad (default: all).
    """
    tol_dtype = tol_dtype or dtype
    act = leaf_copies(inputs)
    exp = leaf_copies(inputs, torch.float64)
    if grad_of is not None:
        for k in act:
            if isinstance(act[k], Tensor) and act[k].is_floating_point() and k not in grad_of:
                act[k].requires_grad_(False)
                exp[k].requires_grad_(False)
    viewed = dict(act)
    for name, layout in (layouts or {}).items():
        viewed[name] = layout(act[name])
    out = op_fn(**viewed)
    ref = naive_fn(**exp)
    assert out.dtype == (out_dtype or dtype), f"output dtype {out.dtype}, expected {out_dtype or dtype}"
    assert_close_rel(out, ref, tol_dtype, "output")
    names = [k for k, v in act.items() if isinstance(v, Tensor) and v.requires_grad]
    g = torch.randn(ref.shape, dtype=torch.float64)
    g_act = g.to(out.dtype)
    grads = torch.autograd.grad(out, [act[k] for k in names], g_act, allow_unused=True)
    expected = torch.autograd.grad(ref, [exp[k] for k in names], g_act.double(), allow_unused=True)
    for name, a, e in zip(names, grads, expected):
        if e is None:
            assert a is None or not bool(a.any()), f"grad {name}: expected none (input unused), got nonzero"
            continue
        assert a is not None, f"grad {name}: missing"
        assert a.dtype == act[name].dtype, f"grad {name}: dtype {a.dtype}, expected {act[name].dtype}"
        assert_close_rel(a, e, tol_dtype, f"grad {name}")


# ----------------------------------------------------------------------------- HyperLinear kernel checks
# Direct tests of the 2-D hyper_linear_forward / hyper_linear_backward of a backend module (Triton
# kernels, CUDA extension): inputs in the ops' argument order and a float64 autograd ground truth.

HL_NAMES = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale", "bias_scale")
# Largest max|got - want| / max|want| of :func:`close_to_ref64` (tests may raise an entry for a block).
KERNEL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_hl_inputs(M, K, N, H, dtype, lam_dtype=None, bias=True, hyper_bias=True, hparams=True, seed=0,
                   device="cpu"):
    """Inputs in argument order (x, hparams, weight, hyper_weight, bias, hyper_bias, V, C) and grad_out."""
    gen = torch.Generator().manual_seed(seed)
    lam_dtype = lam_dtype or dtype

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt).to(device)

    x = rnd(M, K)
    lam = rnd(M, H, dt=lam_dtype) if hparams else None
    we = rnd(N, K, scale=K ** -0.5)
    wh = rnd(N, K, scale=K ** -0.5)
    be = rnd(N) if bias else None
    has_hb = hparams and hyper_bias
    bh = rnd(N) if has_hb else None
    V = rnd(N, H, scale=H ** -0.5, dt=lam_dtype) if hparams else None
    C = rnd(N, H, scale=H ** -0.5, dt=lam_dtype) if has_hb else None
    g = rnd(M, N)
    return [x, lam, we, wh, be, bh, V, C], g


def hl_ref64(inputs, g):
    """float64 forward (out, z) and autograd gradients of Σ out⊙g, on the CPU."""
    leaves = [None if t is None else t.detach().to("cpu", torch.float64).requires_grad_() for t in inputs]
    x, lam, we, wh, be, bh, V, C = leaves
    out = F.linear(x, we, be)
    z = None
    if lam is not None:
        z = F.linear(x, wh)
        out = out + (lam @ V.t()) * z
        if bh is not None:
            out = out + (lam @ C.t()) * bh
    used = [t for t in leaves if t is not None and (lam is not None or t is not wh)]
    gr = torch.autograd.grad(out, used, g.to("cpu", torch.float64), allow_unused=True)
    grads = dict(zip(map(id, used), gr))
    return out.detach(), None if z is None else z.detach(), [None if t is None else grads.get(id(t)) for t in leaves]


def close_to_ref64(got, want, dtype, what):
    """got finite, of want's shape, and max|got - want| <= KERNEL_TOL[dtype]·max|want| (want float64, CPU)."""
    assert got is not None, what
    assert tuple(got.shape) == tuple(want.shape), (what, got.shape, want.shape)
    got = got.detach().to("cpu", torch.float64)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got - want).abs().max() / scale).item()
    tol = KERNEL_TOL[dtype]
    assert err <= tol, f"{what}: max error {err:.3g} relative to max|ref| > {tol}"


def check_hl_kernels(kernels, inputs, g, mask=None, tol_dtype=None, z_given=True):
    """Forward and backward of ``kernels`` (a module with hyper_linear_forward/backward) against hl_ref64;
    returns (out, z, grads)."""
    x, lam, we, wh, be, bh, V, C = inputs
    tol_dtype = tol_dtype or x.dtype
    out, z = kernels.hyper_linear_forward(x, lam, we, wh, be, bh, V, C)
    ref_out, ref_z, ref_grads = hl_ref64(inputs, g)
    assert out.dtype == x.dtype
    close_to_ref64(out, ref_out, tol_dtype, "out")
    if lam is None:
        assert z.numel() == 0
    else:
        assert z.dtype == x.dtype
        close_to_ref64(z, ref_z, tol_dtype, "z_hyper")
    if mask is None:
        mask = [t is not None for t in inputs]
    grads = kernels.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, z if z_given else None, mask)
    assert len(grads) == 8
    for i, (name, t, gr, want) in enumerate(zip(HL_NAMES, inputs, grads, ref_grads)):
        if not mask[i] or t is None or (lam is None and name in ("hyper_weight", "hyper_bias")):
            if t is None and i == 4 and mask[i]:
                continue  # like the reference: Σ_m g whenever asked for
            assert gr is None, f"{name}: expected None"
            continue
        assert gr.dtype == t.dtype, (name, gr.dtype, t.dtype)
        close_to_ref64(gr, want, tol_dtype, "d" + name)
    return out, z, grads


def hl_deterministic_runs(kernels, inputs, g, runs: int = 2) -> list:
    """``runs`` forward + backward evaluations of ``kernels`` under torch.use_deterministic_algorithms(True)
    (then restored), every gradient asked for: a list of [out, z, *grads] per run."""
    x, lam, we, wh, be, bh, V, C = inputs
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(runs):
            out, z = kernels.hyper_linear_forward(x, lam, we, wh, be, bh, V, C)
            grads = kernels.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, z, [True] * 8)
            results.append([out, z, *grads])
    finally:
        torch.use_deterministic_algorithms(old)
    return results


def nan_empty(shape, dtype, device, memory_format=torch.contiguous_format) -> Tensor:
    """A buffer full of NaN: any part a kernel leaves unwritten shows in its result."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format).fill_(float("nan"))


@contextlib.contextmanager
def no_warnings() -> Iterator[None]:
    """Any warning inside the block fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """torch on one intra-op thread for the block (then restored).

    gradcheck/gradgradcheck run thousands of tiny ops; on a small shared machine,
    once a large op has started the intra-op thread pool, each tiny parallel op pays
    a thread wake-up and these checks become ~10x slower. One thread avoids that
    and changes no result.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Parametrisations shared by the layer test files.
# ----------------------------------------------------------------------------- HyperLSTM

def naive_cell_sequence(x, hparams, i2h, h2h, h, c):
    """Published HyperLSTMCell over x [T, B, K]; i2h/h2h dicts W, Wh, b, bh, V, C. Returns out, h, c."""
    n = h.shape[-1]
    outs = []
    for t in range(x.shape[0]):
        pre = naive_hyper_linear(x[t], hparams, **i2h) + naive_hyper_linear(h, hparams, **h2h)
        gates = torch.sigmoid(pre[:, :3 * n])
        forget, inp, outg = gates[:, :n], gates[:, n:2 * n], gates[:, 2 * n:]
        c = forget * c + inp * torch.tanh(pre[:, 3 * n:])
        h = outg * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def lstm_linear_params(layer, dtype=None):
    """A HyperLinear's parameters as the naive formula's dict (V, C = halves of hparam_weight)."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    n = layer.weight.shape[0]
    return {"W": cast(layer.weight), "Wh": cast(layer.hyper_weight), "b": cast(layer.bias),
            "bh": cast(layer.hyper_bias), "V": cast(layer.hparam_weight[:n]), "C": cast(layer.hparam_weight[n:])}


def randomize_lstm_(model, gen=None):
    """O(1) pre-activations: weights std 1/sqrt(fan_in), biases std 0.5, λ maps std 1/sqrt(H)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("hparam_weight"):
                std = p.shape[1] ** -0.5
            elif name.endswith("weight"):
                std = p.shape[1] ** -0.5
            else:
                std = 0.5
            p.copy_((torch.randn(p.shape, dtype=torch.float64, generator=gen) * std).to(p.dtype))
    return model


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def run_lstm_stack(model, x, hparams, hx, g_out, g_h, g_c, backend="auto"):
    """Our model: outputs and gradients w.r.t. x, hparams, h0, c0 and every parameter."""
    x, hparams = leaves(x, hparams)
    hx = None if hx is None else tuple(leaves(*hx))
    with stn_kernels.use_backend(backend):
        out, (h, c) = model(x, hx, hparams)
        inputs = [x] + ([hparams] if hparams is not None else []) + (list(hx) if hx else []) + list(model.parameters())
        loss = (out * g_out).sum() + (h * g_h).sum() + (c * g_c).sum()
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = (["x"] + (["hparams"] if hparams is not None else []) + (["h0", "c0"] if hx else [])
             + [n for n, _ in model.named_parameters()])
    return out, h, c, dict(zip(names, grads))


def naive_lstm_stack(model, x, hparams, hx, g_out, g_h, g_c, batch_first=False):
    """The same in float64 through the naive published loop (cells = model.cells or [model])."""
    cells = list(model.cells) if hasattr(model, "cells") else [model]
    params = {n: p.detach().to(torch.float64).requires_grad_(True) for n, p in model.named_parameters()}
    x, hparams = leaves(None if x is None else x.to(torch.float64),
                        None if hparams is None else hparams.to(torch.float64))
    h0 = c0 = None
    if hx is not None:
        h0, c0 = leaves(hx[0].to(torch.float64), hx[1].to(torch.float64))
    prefix = {id(cell): (f"cells.{i}." if hasattr(model, "cells") else "") for i, cell in enumerate(cells)}
    seq = x.transpose(0, 1) if batch_first else x
    B, N = seq.shape[1], cells[0].hidden_size
    hs, cs = [], []
    for i, cell in enumerate(cells):
        p = prefix[id(cell)]
        layer_params = []
        for m in ("i2h", "h2h"):
            g = 4 * N
            layer_params.append({"W": params[p + m + ".weight"], "Wh": params[p + m + ".hyper_weight"],
                                 "b": params.get(p + m + ".bias"), "bh": params.get(p + m + ".hyper_bias"),
                                 "V": params[p + m + ".hparam_weight"][:g], "C": params[p + m + ".hparam_weight"][g:]})
        if h0 is None:
            h_init = c_init = torch.zeros(B, N, dtype=torch.float64)
        else:
            h_init = h0[i] if h0.dim() == 3 else h0
            c_init = c0[i] if c0.dim() == 3 else c0
        seq, h, c = naive_cell_sequence(seq, hparams, layer_params[0], layer_params[1], h_init, c_init)
        hs.append(h)
        cs.append(c)
    out = seq.transpose(0, 1) if batch_first else seq
    h, c = torch.stack(hs), torch.stack(cs)
    if hx is not None and hx[0].dim() == 2:
        h, c = h[0], c[0]
    loss = (out * g_out.to(torch.float64)).sum() + (h * g_h.to(torch.float64)).sum() + (c * g_c.to(torch.float64)).sum()
    inputs = [x] + ([hparams] if hparams is not None else []) + ([h0, c0] if hx is not None else []) + list(
        params.values())
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = (["x"] + (["hparams"] if hparams is not None else []) + (["h0", "c0"] if hx is not None else [])
             + list(params))
    return out, h, c, dict(zip(names, grads))


def compare_lstm(got, want, dtype, skip_zero_grads=True):
    out, h, c, grads = got
    out_r, h_r, c_r, grads_r = want
    assert_close_rel(out, out_r, dtype, "output")
    assert_close_rel(h, h_r, dtype, "h_T")
    assert_close_rel(c, c_r, dtype, "c_T")
    assert grads.keys() == grads_r.keys()
    for name in grads:
        if grads_r[name] is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name] is not None, f"grad {name}: missing"
        assert grads[name].dtype == dtype, name
        assert_close_rel(grads[name], grads_r[name], dtype, f"grad {name}")


def lstm_stack_inputs(T, B, K, N, H, layers, hparams_kind, batch_first, dtype, device="cpu", with_hx=True):
    x = torch.randn((B, T, K) if batch_first else (T, B, K), dtype=dtype, device=device)
    hparams = {"per_example": torch.randn(B, H, dtype=dtype, device=device),
               "shared": torch.randn(H, dtype=dtype, device=device), "none": None}[hparams_kind]
    hx = None
    if with_hx:
        hx = (torch.randn(layers, B, N, dtype=dtype, device=device) * 0.5,
              torch.randn(layers, B, N, dtype=dtype, device=device) * 0.5)
    g = (torch.randn((B, T, N) if batch_first else (T, B, N), dtype=dtype, device=device),
         torch.randn(layers, B, N, dtype=dtype, device=device), torch.randn(layers, B, N, dtype=dtype, device=device))
    return x, hparams, hx, g


def lstm_recurrence_args(T=3, B=2, N=3, H=2, dtype=torch.float64, hparams=True, bias=True, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, dtype=torch.float64, generator=gen) * scale).to(dtype).to(device)

    G = 4 * N
    return [r(T, B, G), r(B, N, scale=0.5), r(B, N, scale=0.5), r(B, H) if hparams else None,
            r(G, N, scale=N ** -0.5), r(G, N, scale=N ** -0.5), r(G, scale=0.5) if bias else None,
            r(G, scale=0.5) if bias and hparams else None, r(G, H, scale=H ** -0.5) if hparams else None,
            r(G, H, scale=H ** -0.5) if bias and hparams else None]


def lstm_recurrence_fn(*args):
    out, (h, c) = stn_kernels.hyper_lstm_recurrence(*args)
    return out, c


DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
HALF_DTYPES = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
HPARAMS = ["per_example", "shared", "none"]


def on_both_backends(fn):
    """(fn() under use_backend("reference"), fn() under use_backend("triton"))."""
    with stn_kernels.use_backend("reference"):
        expected = fn()
    with stn_kernels.use_backend("triton"):
        got = fn()
    return expected, got


def assert_rejected(call, error, words) -> None:
    """call() raises ``error`` whose message holds every one of ``words`` (argument name, expected, actual)."""
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def assert_compiled_matches_eager(f, x: Tensor) -> None:
    """torch.compile(f, fullgraph=True) (aot_eager) gives f(x) and its gradient w.r.t. x bit for bit."""
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for fn in (f, compiled):
        out = fn(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        if fn is f:
            expected = out, grad
    assert torch.equal(out, expected[0])
    assert torch.equal(grad, expected[1])
