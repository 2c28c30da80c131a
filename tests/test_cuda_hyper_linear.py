"""The ``"cuda"`` backend of hyper_linear (stn_kernels.backends.cuda: cuBLAS GEMMs around the compiled
extension's kernels), against float64:
* without a GPU, its Python code over the CPU emulation of the kernels (the ``emu`` fixture), and its
  refusal of CPU tensors;
* with a GPU (marked ``gpu``): float32, float16 and bfloat16 at odd and STN shapes, every gradient,
  deterministic mode bitwise, opcheck of the private ops, the public API on the backend.
"""

import pytest
import torch

import stn_kernels
from stn_kernels.backends import BackendUnavailableError, extension, resolve_backend, use_backend

# float64 ground truth, shared with test_triton_hyper_linear.py; run_and_check(kernels, inputs, g, ...)
from _cuda import require_extension_built, rows as _rows, small_hyper_linear
from _naive import (
    HL_NAMES as NAMES,
    check_hl_kernels as run_and_check,
    close_to_ref64 as close,
    hl_deterministic_runs,
    hl_ref64 as ref64,
    make_hl_inputs as make,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def test_cuda_backend_refuses_cpu_tensors():
    x, hp, m = small_hyper_linear()
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        m(x, hp)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        resolve_backend("hyper_linear", x.device)
    from stn_kernels.backends import cuda

    args = (x, hp, m.weight, m.hyper_weight, m.bias, m.hyper_bias, *m._scales())
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        cuda.hyper_linear_forward(*args)


# ----------------------------------------------------------------------------- cuda over the emulation


def _cpu_epilogue(emulated):
    def epilogue(acc, z, hparams, weight_scale, bias, hyper_bias, bias_scale):
        has_hb = hyper_bias is not None and bias_scale is not None
        out = torch.empty(z.shape, dtype=z.dtype)
        code = emulated.epilogue(_rows(acc), _rows(z), out, _rows(hparams), _rows(weight_scale),
                                 _rows(bias_scale) if has_hb else None, None if bias is None else bias.contiguous(),
                                 hyper_bias.contiguous() if has_hb else None)
        assert code == 0
        return out

    return epilogue


def _cpu_reduce(emulated):
    def reduce(grad_out, z_hyper, hparams, weight_scale, hyper_bias, bias_scale, grad_scaled, need_hparams,
               need_weight_scale, need_bias_scale, need_bias, need_hyper_bias, deterministic):
        M, N = grad_out.shape
        H = hparams.shape[1]
        has_hb = hyper_bias is not None and bias_scale is not None
        need_dc, need_dbh = need_bias_scale and has_hb, need_hyper_bias and has_hb

        def new(flag, *shape, like):
            return torch.full(shape, float("nan"), dtype=like.dtype) if flag else None

        gs = new(grad_scaled, M, N, like=grad_out)
        dlam = new(need_hparams, M, H, like=hparams)
        dv = new(need_weight_scale, N, H, like=weight_scale)
        dc = new(need_dc, N, H, like=hparams)
        dbe = new(need_bias, N, like=grad_out)
        dbh = new(need_dbh, N, like=grad_out)
        code = emulated.reduce(_rows(grad_out), _rows(z_hyper), _rows(hparams), _rows(weight_scale),
                               _rows(bias_scale) if has_hb else None, hyper_bias.contiguous() if has_hb else None,
                               gs, dlam, dv, dc, dbe, dbh, deterministic)
        assert code == 0
        return tuple(grad_out.new_empty(0) if t is None else t for t in (gs, dlam, dv, dc, dbe, dbh))

    return reduce


@pytest.fixture
def emulated_backend(emu, monkeypatch):
    """stn_kernels.cuda with its private ops running the emulated kernels on CPU tensors."""
    from stn_kernels.backends import cuda

    emu.set_sms(4)
    lib = torch.library.Library("stn_kernels", "IMPL")
    lib.impl("_cuda_hyper_linear_epilogue", _cpu_epilogue(emu), "CPU")
    lib.impl("_cuda_hyper_linear_backward_reduce", _cpu_reduce(emu), "CPU")
    monkeypatch.setattr(cuda, "_require", lambda x: None)
    try:
        yield cuda
    finally:
        lib._destroy()


@pytest.mark.parametrize("M,K,N,H,dtype,ldt", [
    (1, 37, 53, 1, F32, F32), (33, 37, 53, 7, F32, F32), (5, 70, 64, 16, F16, F32), (33, 37, 53, 20, BF16, BF16)])
def test_cuda_over_emulation(emulated_backend, M, K, N, H, dtype, ldt):
    inputs, g = make(M, K, N, H, dtype, lam_dtype=ldt)
    run_and_check(emulated_backend, inputs, g)


@pytest.mark.parametrize("variant", ["no_hparams", "no_biases", "hyper_bias_only", "bias_only"])
def test_cuda_over_emulation_variants(emulated_backend, variant):
    kw = {"no_hparams": dict(hparams=False), "no_biases": dict(bias=False, hyper_bias=False),
          "hyper_bias_only": dict(bias=False), "bias_only": dict(hyper_bias=False)}[variant]
    inputs, g = make(33, 37, 53, 7, F32, **kw)
    run_and_check(emulated_backend, inputs, g)


@pytest.mark.parametrize("mask", [
    (True, False, False, False, False, False, False, False),  # dx only
    (False, True, False, False, False, False, True, False),  # dλ, dV
    (False, False, False, True, False, True, False, True),  # dW_h, db_h, dC
    (False, False, True, False, True, False, False, False),  # dW_e, db_e
])
def test_cuda_over_emulation_output_mask(emulated_backend, mask):
    inputs, g = make(33, 37, 53, 7, F32)
    run_and_check(emulated_backend, inputs, g, mask=list(mask))


def test_cuda_over_emulation_recomputes_z_and_falls_back(emulated_backend):
    inputs, g = make(5, 37, 53, 7, F32)
    run_and_check(emulated_backend, inputs, g, z_given=False)
    inputs, g = make(5, 7, 6, 3, torch.float64)  # a dtype the kernels do not take: the reference runs
    run_and_check(emulated_backend, inputs, g)


def test_cuda_over_emulation_deterministic(emulated_backend):
    inputs, g = make(40, 37, 53, 7, F32, seed=4)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_and_check(emulated_backend, inputs, g)
    finally:
        torch.use_deterministic_algorithms(old)


# ----------------------------------------------------------------------------- GPU


@pytest.fixture
def cuda_backend():
    require_extension_built()
    assert extension.loaded(), extension.load_error()
    from stn_kernels.backends import cuda

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield cuda
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


ODD_SHAPES = [(1, 37, 53, 1), (5, 70, 53, 7), (33, 37, 53, 16), (33, 37, 56, 20), (70, 200, 300, 15),
              (45, 64, 130, 40)]
STN = [(128, 1024, 4096, 15), (40, 650, 2600, 7), (128, 784, 1200, 3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("M,K,N,H", ODD_SHAPES + STN)
def test_gpu_forward_and_gradients(cuda_backend, M, K, N, H, dtype):
    inputs, g = make(M, K, N, H, dtype, device="cuda")
    run_and_check(cuda_backend, inputs, g)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("M,K,N,H", [(33, 70, 53, 7)] + STN)
def test_gpu_mixed_precision(cuda_backend, M, K, N, H, dtype):
    """Half x and weights with float32 λ, V, C: λ-side gradients in float32."""
    inputs, g = make(M, K, N, H, dtype, lam_dtype=F32, device="cuda")
    _, _, grads = run_and_check(cuda_backend, inputs, g)
    assert grads[1].dtype == F32 and grads[6].dtype == F32 and grads[7].dtype == F32


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["no_hparams", "no_biases", "hyper_bias_only", "bias_only"])
def test_gpu_variants(cuda_backend, variant):
    kw = {"no_hparams": dict(hparams=False), "no_biases": dict(bias=False, hyper_bias=False),
          "hyper_bias_only": dict(bias=False), "bias_only": dict(hyper_bias=False)}[variant]
    inputs, g = make(33, 37, 53, 7, F32, device="cuda", **kw)
    run_and_check(cuda_backend, inputs, g)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [
    (True, False, False, False, False, False, False, False),
    (False, True, False, False, False, False, True, False),
    (False, False, False, True, False, True, False, True),
    (False, False, True, False, True, False, False, False),
])
def test_gpu_output_mask(cuda_backend, mask):
    inputs, g = make(33, 37, 53, 7, F32, device="cuda")
    run_and_check(cuda_backend, inputs, g, mask=list(mask))


@pytest.mark.gpu
def test_gpu_non_contiguous_and_shared_hparams(cuda_backend):
    inputs, g = make(5, 37, 53, 7, F32, device="cuda")
    x, lam, we, wh, be, bh, V, C = inputs
    x_t = x.t().contiguous().t()
    lam_shared = lam[0].expand(5, 7)  # row stride 0
    g_s = torch.zeros(5, 106, device="cuda")[:, ::2].copy_(g)  # inner stride 2
    run_and_check(cuda_backend, [x_t, lam_shared, we.t().contiguous().t(), wh, be, bh, V, C], g_s)
    out, z = cuda_backend.hyper_linear_forward(x, lam, we, wh, be, bh, V, C)
    z_wide = torch.zeros(5, 60, device="cuda")[:, :53].copy_(z)
    a = cuda_backend.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, z_wide, [True] * 8)
    b = cuda_backend.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, z, [True] * 8)
    for u, v in zip(a, b):  # equal up to the order of float atomics
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_gpu_deterministic_bitwise(cuda_backend, monkeypatch, dtype):
    """Deterministic mode: no float atomics; two runs bitwise equal, and close to the atomic variant."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    inputs, g = make(257, 300, 520, 15, dtype, seed=3, device="cuda")
    x, lam, we, wh, be, bh, V, C = inputs
    runs = hl_deterministic_runs(cuda_backend, inputs, g)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _, _, ref = ref64(inputs, g)
    for name, got, want in zip(NAMES, runs[0][2:], ref):
        close(got, want, dtype, "d" + name)
    atomic = cuda_backend.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, runs[0][1], [True] * 8)
    for name, got, want in zip(NAMES, atomic, ref):
        close(got, want, dtype, "d" + name + " (atomic)")


@pytest.mark.gpu
def test_gpu_outputs_own_their_storage(cuda_backend):
    inputs, g = make(33, 37, 53, 7, F32, device="cuda")
    out, z = cuda_backend.hyper_linear_forward(*inputs)
    grads = cuda_backend.hyper_linear_backward(g, *inputs[:4], *inputs[5:], z, [True] * 8)
    storages = [t.untyped_storage().data_ptr() for t in [*inputs, g] if t is not None]
    for t in [out, z, *grads]:
        ptr = t.untyped_storage().data_ptr()
        assert ptr not in storages
        storages.append(ptr)


@pytest.mark.gpu
def test_gpu_opcheck_private_ops(cuda_backend):
    inputs, g = make(17, 37, 40, 5, F16, lam_dtype=F32, device="cuda")
    x, lam, we, wh, be, bh, V, C = inputs
    acc, z = x @ we.t(), x @ wh.t()
    torch.library.opcheck(torch.ops.stn_kernels._cuda_hyper_linear_epilogue.default, (acc, z, lam, V, be, bh, C))
    torch.library.opcheck(torch.ops.stn_kernels._cuda_hyper_linear_backward_reduce.default,
                          (g, z, lam, V, bh, C, True, True, True, True, True, True, True))


@pytest.mark.gpu
def test_gpu_public_api_on_the_cuda_backend(cuda_backend):
    torch.manual_seed(0)
    m = stn_kernels.HyperLinear(37, 53, num_hparams=7).cuda()
    x = torch.randn(9, 37, device="cuda", requires_grad=True)
    hp = torch.randn(9, 7, device="cuda", requires_grad=True)
    results = {}
    for backend in ("reference", "cuda"):
        with use_backend(backend):
            out = m(x, hp)
            grads = torch.autograd.grad(out, [x, hp, *m.parameters()], torch.ones_like(out))
        results[backend] = [out, *grads]
    for a, b in zip(results["reference"], results["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
