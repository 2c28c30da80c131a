"""Direct tests of the fused Triton HyperLinear kernels (stn_kernels.backends.triton.hyper_linear).

On a machine without CUDA the kernels run on CPU tensors through the Triton interpreter.
Ground truth is a float64 computation (two F.linear calls and autograd, tests/_naive.py), on
float64 copies of the same rounded inputs, never the package's reference module.
"""

import pytest
import torch

pytest.importorskip("triton")  # the kernel module imported below needs it

from stn_kernels.backends.triton import hyper_linear as hl

from _naive import (  # TOL: the dict close() reads
    HL_NAMES as NAMES,
    KERNEL_TOL as TOL,
    check_hl_kernels,
    close_to_ref64 as close,
    hl_deterministic_runs,
    hl_ref64 as ref64,
    make_hl_inputs,
)

HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def make(*args, **kwargs):
    """Inputs (x, hparams, weight, hyper_weight, bias, hyper_bias, V, C) and grad_out on DEVICE."""
    return make_hl_inputs(*args, device=DEVICE, **kwargs)


def run_and_check(inputs, g, mask=None, tol_dtype=None):
    return check_hl_kernels(hl, inputs, g, mask, tol_dtype)


SHAPES = [(1, 37, 53, 1), (5, 70, 53, 7), (33, 37, 53, 16)]


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("M,K,N,H", SHAPES)
def test_full(M, K, N, H, dtype):
    inputs, g = make(M, K, N, H, dtype)
    run_and_check(inputs, g)


@pytest.mark.parametrize("variant", ["no_hparams", "no_biases", "hyper_bias_only", "bias_only"])
def test_variants(variant):
    kw = {
        "no_hparams": dict(hparams=False),
        "no_biases": dict(bias=False, hyper_bias=False),
        "hyper_bias_only": dict(bias=False),
        "bias_only": dict(hyper_bias=False),
    }[variant]
    inputs, g = make(33, 37, 53, 7, F32, **kw)
    run_and_check(inputs, g)


def test_mixed_precision():
    """fp16 x / weights with fp32 λ, V, C: λ-side gradients come back in fp32."""
    inputs, g = make(33, 70, 53, 7, F16, lam_dtype=F32)
    _, _, grads = run_and_check(inputs, g)
    assert grads[1].dtype == F32 and grads[6].dtype == F32 and grads[7].dtype == F32
    assert grads[0].dtype == F16 and grads[2].dtype == F16


def test_non_contiguous():
    """Transposed x, row-sliced hparams and grad_out, transposed weight, sliced z_hyper."""
    inputs, g = make(5, 37, 53, 7, F32)
    x, lam, we, wh, be, bh, V, C = inputs
    x_t = x.t().contiguous().t()  # stride (1, M): inner stride not 1
    lam_s = torch.zeros(10, 7, device=DEVICE)[::2].copy_(lam)  # row stride 14
    we_t = we.t().contiguous().t()
    g_s = torch.zeros(5, 106, device=DEVICE)[:, ::2].copy_(g)  # inner stride 2
    assert not x_t.is_contiguous() and not lam_s.is_contiguous() and not g_s.is_contiguous()
    inputs = [x_t, lam_s, we_t, wh, be, bh, V, C]
    out, z, _ = run_and_check(inputs, g_s)
    # A z_hyper view with a row stride other than N gives the same gradients.
    z_wide = torch.zeros(5, 60, device=DEVICE)[:, :53].copy_(z)
    grads = hl.hyper_linear_backward(g_s, x_t, lam_s, we_t, wh, bh, V, C, z_wide, [True] * 8)
    ref = hl.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, z.contiguous(), [True] * 8)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [
    (True, False, False, False, False, False, False, False),   # dx only
    (False, True, False, False, False, False, True, False),    # dλ, dV
    (False, False, False, True, False, True, False, True),     # dW_h, db_h, dC
    (False, False, True, False, True, False, False, False),    # dW_e, db_e
])
def test_output_mask(mask):
    inputs, g = make(33, 37, 53, 7, F32)
    run_and_check(inputs, g, mask=list(mask))


def test_z_hyper_recomputed():
    """z_hyper=None (double-backward convention): recomputed inside."""
    inputs, g = make(5, 37, 53, 7, F32)
    x, lam, we, wh, be, bh, V, C = inputs
    _, _, ref = ref64(inputs, g)
    grads = hl.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, None, [False, True] + [False] * 4 + [True, False])
    close(grads[1], ref[1], F32, "dhparams")
    close(grads[6], ref[6], F32, "dweight_scale")


@pytest.mark.parametrize("deterministic", [False, True])
def test_nan_poisoned_outputs_and_split(monkeypatch, nan_poison, deterministic):
    """Every buffer the kernels write in full starts as NaN; the reduction is split in 3 (one split empty),
    the [N]-side gradients go through per-chunk partial sums."""
    nan_poison(hl)
    monkeypatch.setattr(hl, "_num_splits", lambda rows, cols, red, sms: 3)
    monkeypatch.setattr(hl, "_DIRECT_ROW_BLOCKS", 0)
    inputs, g = make(33, 37, 53, 7, F32, seed=1)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        run_and_check(inputs, g)
    finally:
        torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("row_path", ["direct", "slots"])
def test_nan_poisoned_unsplit(monkeypatch, nan_poison, row_path):
    """No split reductions; dV, dC, db_e, db_h stored final by one program per N block ("direct", M ≤
    _DIRECT_ROW_BLOCKS row blocks) or summed from per-chunk slots: only dλ's reduction in the first."""
    nan_poison(hl)
    monkeypatch.setattr(hl, "_num_splits", lambda rows, cols, red, sms: 1)
    if row_path == "slots":
        monkeypatch.setattr(hl, "_DIRECT_ROW_BLOCKS", 0)
    reductions = []
    reduce = hl._reduce

    def counting_reduce(slots, dtype, *args):
        reductions.append(tuple(slots.shape))
        return reduce(slots, dtype, *args)

    monkeypatch.setattr(hl, "_reduce", counting_reduce)
    inputs, g = make(70, 37, 53, 16, F16, lam_dtype=F32, seed=2)
    _, _, grads = run_and_check(inputs, g)
    assert len(reductions) == (1 if row_path == "direct" else 5), reductions
    assert [grads[i].dtype for i in (4, 5, 6, 7)] == [F16, F16, F32, F32]


@pytest.mark.parametrize("direct_row_blocks", [0, 4])
@pytest.mark.parametrize("deterministic", [False, True])
def test_outputs_own_their_storage(monkeypatch, deterministic, direct_row_blocks):
    """torch.library custom ops may not return tensors that alias inputs or each other."""
    monkeypatch.setattr(hl, "_num_splits", lambda rows, cols, red, sms: 2)
    monkeypatch.setattr(hl, "_DIRECT_ROW_BLOCKS", direct_row_blocks)
    inputs, g = make(33, 37, 53, 7, F32)
    x, lam, we, wh, be, bh, V, C = inputs
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out, z = hl.hyper_linear_forward(x, lam, we, wh, be, bh, V, C)
        grads = hl.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, z, [True] * 8)
    finally:
        torch.use_deterministic_algorithms(old)
    storages = [t.untyped_storage().data_ptr() for t in [*inputs, g] if t is not None]
    for t in [out, z, *grads]:
        ptr = t.untyped_storage().data_ptr()
        assert ptr not in storages
        storages.append(ptr)


@pytest.mark.parametrize("direct_row_blocks", [0, 4])
def test_deterministic_bitwise(monkeypatch, direct_row_blocks):
    """Deterministic mode: no float atomics, two runs bitwise equal (split reductions too)."""
    monkeypatch.setattr(hl, "_num_splits", lambda rows, cols, red, sms: 2)
    monkeypatch.setattr(hl, "_DIRECT_ROW_BLOCKS", direct_row_blocks)
    inputs, g = make(33, 70, 53, 7, F32, seed=3)
    runs = hl_deterministic_runs(hl, inputs, g)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    _, _, ref = ref64(inputs, g)
    for name, got, want in zip(NAMES, runs[0][2:], ref):
        close(got, want, F32, "d" + name)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,H", [(5, 70, 53, 7), (33, 37, 53, 16)])
def test_bf16(M, K, N, H):
    inputs, g = make(M, K, N, H, BF16)
    run_and_check(inputs, g)


@pytest.mark.gpu
def test_bf16_mixed_and_split(monkeypatch, nan_poison):
    monkeypatch.setattr(hl, "_num_splits", lambda rows, cols, red, sms: 3)
    nan_poison(hl)
    inputs, g = make(70, 200, 300, 15, BF16, lam_dtype=F32)
    run_and_check(inputs, g)


@pytest.mark.gpu
def test_tf32_allowed():
    """With TF32 allowed the fp32 dots may use it: error of TF32 size, not more."""
    torch.backends.cuda.matmul.allow_tf32 = True
    inputs, g = make(130, 300, 200, 15, F32)
    old = TOL[F32]
    TOL[F32] = 5e-3
    try:
        run_and_check(inputs, g)
    finally:
        TOL[F32] = old


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,H", [(128, 1024, 4096, 15), (40, 650, 2600, 7), (128, 784, 1200, 3)])
def test_stn_shapes_fp16(M, K, N, H):
    inputs, g = make(M, K, N, H, F16, lam_dtype=F32)
    run_and_check(inputs, g)


# ----------------------------------------------------------------------------- 64-bit offsets
# Problems where M·N or N·K exceeds 2^31 elements: every pointer offset must be computed in int64.
# Too big for a full float64 reference, so the kernels' results are compared on a few rows (R) and
# columns (Cn of N, Ck of K), chosen at both ends, against a float64 evaluation of just those entries.


def _large_inputs(M, K, N, H, dtype, seed=0):
    """Inputs as make_hl_inputs gives them (λ, V, C in float32), generated on DEVICE: the large ones
    would take seconds and gigabytes of host memory on the CPU."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device=DEVICE, dtype=dt) * scale).to(dt)

    x, lam = rnd(M, K), rnd(M, H, dt=F32)
    we, wh = rnd(N, K, scale=K ** -0.5), rnd(N, K, scale=K ** -0.5)
    be, bh = rnd(N), rnd(N)
    V, C = rnd(N, H, scale=H ** -0.5, dt=F32), rnd(N, H, scale=H ** -0.5, dt=F32)
    return [x, lam, we, wh, be, bh, V, C], rnd(M, N)


def sliced_ref64(inputs, g, R, Cn, Ck, chunk=2048):
    """float64 values of out[R][:, Cn], z[R][:, Cn], dx[R][:, Ck], dλ[R] and, for the rows Cn of the
    [N, ·] parameters, dW_e, dW_h, db_e, db_h, dV, dC (textbook formulas, on the inputs' device).
    z[R] over all N, which dλ needs, is formed ``chunk`` rows of W_h at a time."""
    d = lambda t: t.double()  # noqa: E731
    x, lam, we, wh, be, bh, V, C = inputs
    R, Cn, Ck = (torch.as_tensor(i, device=x.device) for i in (R, Cn, Ck))
    xr, lr, gr = d(x[R]), d(lam[R]), d(g[R])
    s_r, t_r = lr @ d(V).t(), lr @ d(C).t()  # [|R|, N]
    z_r = torch.cat([xr @ d(wh[i:i + chunk]).t() for i in range(0, wh.shape[0], chunk)], 1)
    out = xr @ d(we[Cn]).t() + s_r[:, Cn] * z_r[:, Cn] + d(be[Cn]) + t_r[:, Cn] * d(bh[Cn])
    dx = gr @ d(we[:, Ck]) + (gr * s_r) @ d(wh[:, Ck])
    dlam = (gr * z_r) @ d(V) + (gr * d(bh)) @ d(C)
    xa, la, gc = d(x), d(lam), d(g[:, Cn])
    s_c, t_c, z_c = la @ d(V[Cn]).t(), la @ d(C[Cn]).t(), xa @ d(wh[Cn]).t()  # [M, |Cn|]
    return {
        "out": out, "z": z_r[:, Cn], "dx": dx, "dlam": dlam,
        "dwe": gc.t() @ xa, "dwh": (gc * s_c).t() @ xa, "dbe": gc.sum(0), "dbh": (gc * t_c).sum(0),
        "dv": (gc * z_c).t() @ la, "dc": (gc * d(bh[Cn])).t() @ la,
    }


def check_sliced(inputs, g, R, Cn, Ck, tol_dtype):
    """Forward and backward kernels against sliced_ref64 on the rows R and columns Cn, Ck."""
    x, lam, we, wh, be, bh, V, C = inputs
    out, z = hl.hyper_linear_forward(x, lam, we, wh, be, bh, V, C)
    ref = sliced_ref64(inputs, g, R, Cn, Ck)
    cpu = lambda t: t.to("cpu", torch.float64)  # noqa: E731
    R, Cn, Ck = (torch.as_tensor(i, device=x.device) for i in (R, Cn, Ck))
    close(out[R][:, Cn], cpu(ref["out"]), tol_dtype, "out")
    close(z[R][:, Cn], cpu(ref["z"]), tol_dtype, "z_hyper")
    del out
    grads = hl.hyper_linear_backward(g, x, lam, we, wh, bh, V, C, z, [True] * 8)
    del z
    got = {"dx": grads[0][R][:, Ck], "dlam": grads[1][R], "dwe": grads[2][Cn], "dwh": grads[3][Cn],
           "dbe": grads[4][Cn], "dbh": grads[5][Cn], "dv": grads[6][Cn], "dc": grads[7][Cn]}
    for name, value in got.items():
        close(value, cpu(ref[name]), tol_dtype, name)


def test_sliced_reference_is_the_full_one():
    """sliced_ref64 (what the 64-bit offset tests compare with) agrees with hl_ref64 at a small size."""
    inputs, g = make(9, 13, 11, 3, torch.float64)
    out, z, grads = ref64(inputs, g)
    R, Cn, Ck = [0, 4, 8], [0, 5, 10], [0, 12]
    s = sliced_ref64(inputs, g, R, Cn, Ck, chunk=4)
    want = {"out": out[R][:, Cn], "z": z[R][:, Cn], "dx": grads[0][R][:, Ck], "dlam": grads[1][R],
            "dwe": grads[2][Cn], "dwh": grads[3][Cn], "dbe": grads[4][Cn], "dbh": grads[5][Cn],
            "dv": grads[6][Cn], "dc": grads[7][Cn]}
    for name, w in want.items():
        torch.testing.assert_close(s[name].cpu(), w, rtol=1e-12, atol=1e-12, msg=name)


def test_sliced_check_of_the_kernels():
    """The check the 64-bit offset tests run, at a size the interpreter can do."""
    inputs, g = _large_inputs(33, 37, 53, 7, F16, seed=4)
    check_sliced(inputs, g, [0, 17, 32], [0, 30, 52], [0, 36], F16)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N,H", [
    (65539, 16, 32771, 1),   # M·N = 2^31 + 294,921: out, z_hyper and grad_out
    (3, 32771, 65539, 2),    # N·K = 2^31 + 294,921: both weights and their gradients
], ids=["MxN", "NxK"])
def test_offsets_past_2_to_31(M, K, N, H):
    need = 6 * M * N * 2 + 5 * N * K * 2  # bytes of the fp16 tensors alive at once, about
    if torch.cuda.get_device_properties(0).total_memory < need + (8 << 30):
        pytest.skip(f"needs about {need / 2**30 + 8:.0f} GiB of GPU memory")
    assert M * N > 2**31 or N * K > 2**31
    inputs, g = _large_inputs(M, K, N, H, F16, seed=5)
    check_sliced(inputs, g, [0, M // 2, M - 1], [0, N // 2, N - 2, N - 1], [0, K // 2, K - 1], F16)
