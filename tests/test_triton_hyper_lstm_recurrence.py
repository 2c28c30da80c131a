"""The Triton kernels of stn_kernels::hyper_lstm_recurrence (stn_kernels.backends.triton.hyper_lstm_recurrence)
directly, and the op and layers on the "triton" backend, against the float64 reference composite and the
published loop (tests/_naive.py). On the CPU the kernels run through the Triton interpreter (tests/conftest.py);
sizes are tiny and odd (T ≤ 4). GPU-marked: bfloat16 and the PTB shape.
"""

import pytest
import torch

import stn_kernels
from stn_kernels import reference_lstm
from stn_kernels.ops.hyper_lstm_recurrence import INPUT_NAMES as NAMES

from _naive import (
    OpCheckError,
    assert_close_rel,
    compare_lstm,
    lstm_recurrence_args,
    lstm_stack_inputs,
    naive_lstm_stack,
    randomize_lstm_,
    run_lstm_stack,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
F32 = torch.float32


pytestmark = pytest.mark.usefixtures("seeded_no_tf32")


triton_only = pytest.mark.triton


def _kernels():
    from stn_kernels.backends.triton import hyper_lstm_recurrence

    return hyper_lstm_recurrence


def _check_kernels(args, mask=None, tol=F32, seed=1):
    """Triton forward/backward of the op against the float64 reference composite (autograd)."""
    K = _kernels()
    args = [None if a is None else a.to(DEVICE) for a in args]
    x_proj = args[0]
    T, B, G = x_proj.shape
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(T, B, G // 4, generator=gen).to(x_proj.dtype).to(DEVICE)
    g_c = torch.randn(B, G // 4, generator=gen).to(x_proj.dtype).to(DEVICE)
    out, c_T, gates, cells, z = K.hyper_lstm_recurrence_forward(*args)
    leaves = [None if a is None else a.detach().cpu().double().requires_grad_(True) for a in args]
    ref_out, ref_c = reference_lstm.hyper_lstm_recurrence(*leaves)
    assert_close_rel(out, ref_out, tol, "out")
    assert_close_rel(c_T, ref_c, tol, "c_T")
    if T:
        assert_close_rel(cells[-1], ref_c, tol, "cells[-1]")
    present = [i for i, a in enumerate(leaves) if a is not None]
    ref = dict(zip(present, torch.autograd.grad((ref_out, ref_c), [leaves[i] for i in present],
                                                (g_out.cpu().double(), g_c.cpu().double()), allow_unused=True)))
    if mask is None:
        mask = [a is not None for a in args]
        mask[5] = mask[5] and args[3] is not None  # W_h takes no part without hparams
    grads = K.hyper_lstm_recurrence_backward(g_out, g_c, args[1], args[2], args[3], args[4], args[5], args[7],
                                             args[8], args[9], out, gates, cells, z, mask)
    assert len(grads) == 10
    for i, (name, need) in enumerate(zip(NAMES, mask)):
        if not need:
            assert grads[i] is None, name
            continue
        assert grads[i].dtype == args[i].dtype, name
        assert_close_rel(grads[i], ref[i], tol, f"d{name}")
    return (out, c_T, gates, cells, z), grads


@triton_only
@pytest.mark.parametrize("T,B,N,H", [(4, 3, 5, 1), (3, 3, 13, 7), (2, 17, 21, 3), (1, 2, 5, 2)], ids=str)
def test_triton_kernels_match_reference(T, B, N, H):
    """Odd sizes; (2, 17, 21, 3) spans two row blocks and two unit blocks of the interpreter's 16."""
    _check_kernels(lstm_recurrence_args(T, B, N, H, dtype=F32))


@triton_only
@pytest.mark.parametrize("variant", ["no_hparams", "no_bias", "hyper_bias_only", "mask"])
def test_triton_kernel_variants(variant):
    args = lstm_recurrence_args(3, 3, 5, 7, dtype=F32, hparams=variant != "no_hparams", bias=variant != "no_bias")
    mask = None
    if variant == "hyper_bias_only":
        args[6] = None
    if variant == "mask":  # no dh0 (the last step skips its GEMM), λ and W_h only
        mask = [False, False, True, True, False, True, False, False, False, False]
    _check_kernels(args, mask)


@triton_only
def test_triton_fp16():
    args = lstm_recurrence_args(3, 3, 13, 7, dtype=torch.float16)
    args[3], args[8], args[9] = args[3].float(), args[8].float(), args[9].float()  # λ, V, C stay float32
    _check_kernels(args, tol=torch.float16)


@triton_only
def test_triton_non_contiguous_inputs():
    """x_proj transposed from a batch-first projection, h0 with row padding, c0 with inner stride 2."""
    args = lstm_recurrence_args(3, 3, 5, 2, dtype=F32)
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    args[1] = torch.zeros(3, 9)[:, :5].copy_(args[1])
    args[2] = torch.zeros(3, 10)[:, ::2].copy_(args[2])
    assert not (args[0].is_contiguous() or args[1].is_contiguous() or args[2].is_contiguous())
    _check_kernels(args)


@triton_only
def test_triton_nan_poisoned_buffers(nan_poison):
    """Every buffer the LSTM and HyperLinear kernels write in full starts as NaN."""
    from stn_kernels.backends.triton import hyper_linear as hl

    nan_poison(_kernels(), hl)
    (out, c_T, gates, cells, z), grads = _check_kernels(lstm_recurrence_args(3, 3, 13, 7, dtype=F32, seed=4))
    for t in (out, c_T, gates, cells, z, *grads):
        assert torch.isfinite(t).all()


@triton_only
def test_triton_deterministic_bitwise():
    args = [None if a is None else a.to(DEVICE) for a in lstm_recurrence_args(3, 3, 5, 7, dtype=F32, seed=5)]
    K = _kernels()
    g_out, g_c = torch.randn(3, 3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            fwd = K.hyper_lstm_recurrence_forward(*args)
            grads = K.hyper_lstm_recurrence_backward(g_out, g_c, args[1], args[2], args[3], args[4], args[5],
                                                     args[7], args[8], args[9], fwd[0], fwd[2], fwd[3], fwd[4])
            runs.append([*fwd, *grads])
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@triton_only
@pytest.mark.parametrize("hparams_kind,batch_first", [("per_example", False), ("shared", True)])
def test_triton_stack_gradients_equal_reference(hparams_kind, batch_first):
    """2 layers, K=11, N=5, H=7, T=3: output, (h, c) and the gradients of all parameters, λ, x, h0 and c0
    from the Triton path (i2h HyperLinear kernels + recurrence kernels) equal the reference path's."""
    T, B, K, N, H = 3, 3, 11, 5, 7
    model = randomize_lstm_(stn_kernels.HyperLSTM(K, N, 2, num_hparams=H, batch_first=batch_first, device=DEVICE))
    x, hparams, hx, g = lstm_stack_inputs(T, B, K, N, H, 2, hparams_kind, batch_first, F32, DEVICE)
    got = run_lstm_stack(model, x, hparams, hx, *g, "triton")
    ref = run_lstm_stack(model, x, hparams, hx, *g, "reference")
    compare_lstm(got, ref, F32)
    want = naive_lstm_stack(model.cpu(), x.cpu(), None if hparams is None else hparams.cpu(),
                       tuple(t.cpu() for t in hx), *(t.cpu() for t in g), batch_first)
    compare_lstm(tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in got[:3])
            + ({k: v.cpu() for k, v in got[3].items()},), want, F32)


@triton_only
def test_triton_backend_runs_the_lstm_kernels(monkeypatch):
    K = _kernels()
    calls = []
    for name in ("hyper_lstm_recurrence_forward", "hyper_lstm_recurrence_backward"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    cell = stn_kernels.HyperLSTMCell(3, 5, num_hparams=2, device=DEVICE)
    lam = torch.randn(2, 2, device=DEVICE, requires_grad=True)
    with stn_kernels.use_backend("triton"):
        out, _ = cell(torch.randn(2, 2, 3, device=DEVICE), None, lam)
        out.sum().backward()
    assert calls == ["hyper_lstm_recurrence_forward", "hyper_lstm_recurrence_backward"]
    assert lam.grad is not None and torch.isfinite(lam.grad).all()


@triton_only
def test_opcheck_triton():
    args = [None if a is None else a.to(DEVICE) for a in lstm_recurrence_args(2, 3, 5, 2, dtype=F32)]
    for i in (0, 1, 3, 5, 8):
        args[i].requires_grad_(True)
    with stn_kernels.use_backend("triton"):
        try:
            torch.library.opcheck(torch.ops.stn_kernels.hyper_lstm_recurrence.default, args,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        except OpCheckError as exc:  # pragma: no cover
            pytest.fail(str(exc))


@triton_only
def test_compile_fullgraph_with_triton_backend():
    torch._dynamo.reset()
    cell = randomize_lstm_(stn_kernels.HyperLSTMCell(3, 5, num_hparams=2, device=DEVICE))
    x = torch.randn(2, 3, 3, device=DEVICE)
    lam = torch.randn(3, 2, device=DEVICE, requires_grad=True)
    with stn_kernels.use_backend("triton"):
        out, (h, c) = cell(x, None, lam)
        (grad,) = torch.autograd.grad(out.square().sum() + c.sum(), lam)
        compiled = torch.compile(cell, fullgraph=True)
        out_c, (h_c, c_c) = compiled(x, None, lam)
        (grad_c,) = torch.autograd.grad(out_c.square().sum() + c_c.sum(), lam)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_bf16_kernels():
    args = lstm_recurrence_args(3, 5, 37, 7, dtype=torch.bfloat16)
    args[3], args[8], args[9] = args[3].float(), args[8].float(), args[9].float()
    _check_kernels(args, tol=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, torch.float16], ids=["fp32", "fp16"])
def test_gpu_ptb_shape(dtype):
    """B=40, N=650, H=7 (the published PTB layer), 4 steps, against the float64 composite."""
    args = lstm_recurrence_args(4, 40, 650, 7, dtype=dtype)
    if dtype != F32:
        args[3], args[8], args[9] = args[3].float(), args[8].float(), args[9].float()
    _check_kernels(args, tol=dtype)
