"""The Triton (GPU) path of HyperEmbedding: stn_kernels.backends.triton.hyper_embedding directly,
and end to end through stn_kernels.hyper_embedding / HyperEmbedding under use_backend("triton").

Without CUDA the kernels run in the Triton interpreter. Ground truth: float64 autograd through
the naive two-F.embedding formulation of tests/_naive.py on copies of the same rounded inputs.
"""

import pytest
import torch

pytest.importorskip("triton")  # the kernel module imported below needs it

import stn_kernels
from stn_kernels.backends.triton import hyper_embedding as he

from _naive import (
    OpCheckError,
    assert_close_rel,
    check_against_naive,
    make_embedding_params,
    naive_hyper_embedding,
    randomize_module_,
)

HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = ("indices", "hparams", "weight", "hyper_weight", "weight_scale")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    """Default table-gradient mode; no TF32."""
    monkeypatch.setattr(he, "TABLE_GRAD", "auto")
    torch.manual_seed(0)
    old = torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled()
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old[0]
        torch.use_deterministic_algorithms(old[1])


@pytest.fixture(params=["atomic", "sorted"])
def table_grad(request, monkeypatch):
    monkeypatch.setattr(he, "TABLE_GRAD", request.param)
    return request.param


def make(M, N, D, H, dtype=F32, lam_dtype=None, hparams="per_example", index_dtype=torch.int64, seed=0):
    """(indices [M], hparams [M, H] or stride-0 rows or None, E, E_h [N, D], V [D, H]) and grad_out [M, D]."""
    gen = torch.Generator().manual_seed(seed)
    lam_dtype = lam_dtype or dtype
    p = make_embedding_params(N, D, H, torch.float64, gen)
    idx = torch.randint(0, N, (M,), generator=gen).to(DEVICE, index_dtype)
    lam = torch.randn(M, H, dtype=torch.float64, generator=gen)
    if hparams == "shared":
        lam = lam[:1].expand(M, H)
    lam = None if hparams == "none" else lam.to(DEVICE, lam_dtype)
    inputs = [idx, lam, p["E"].to(DEVICE, dtype), p["Eh"].to(DEVICE, dtype),
              None if lam is None else p["V"].to(DEVICE, lam_dtype)]
    g = torch.randn(M, D, dtype=torch.float64, generator=gen).to(DEVICE, dtype)
    return inputs, g


def ref64(inputs, g):
    idx, *rest = inputs
    leaves = [None if t is None else t.detach().to("cpu", torch.float64).requires_grad_() for t in rest]
    lam, E, Eh, V = leaves
    out = naive_hyper_embedding(idx.cpu(), lam, E, Eh, V)
    used = [t for t in leaves if t is not None]
    found = dict(zip(map(id, used), torch.autograd.grad(out, used, g.to("cpu", torch.float64),
                                                        allow_unused=True)))
    return out.detach(), [None] + [None if t is None else found.get(id(t)) for t in leaves]


def run_and_check(inputs, g, mask=None, tol_dtype=None):
    idx, lam, E, Eh, V = inputs
    tol_dtype = tol_dtype or E.dtype
    out = he.hyper_embedding_forward(*inputs)
    ref_out, ref_grads = ref64(inputs, g)
    assert out.dtype == E.dtype
    assert_close_rel(out, ref_out, tol_dtype, "out")
    if mask is None:
        mask = [False] + [t is not None for t in inputs[1:]]
    grads = he.hyper_embedding_backward(g, *inputs, mask)
    assert len(grads) == 5
    for i, (name, t, gr, want) in enumerate(zip(NAMES, inputs, grads, ref_grads)):
        if not mask[i] or t is None or (lam is None and i in (3, 4)):
            assert gr is None, f"{name}: expected None"
            continue
        assert gr.dtype == t.dtype and gr.shape == t.shape, (name, gr.dtype, gr.shape)
        assert_close_rel(gr, want, tol_dtype, "d" + name)
    return out, grads


# ----------------------------------------------------------------------------- kernels directly

SHAPES = [(1, 5, 37, 1), (7, 11, 37, 7), (60, 5, 70, 7)]


@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("M,N,D,H", SHAPES, ids=lambda v: str(v))
def test_full(M, N, D, H, dtype, table_grad):
    inputs, g = make(M, N, D, H, dtype)
    run_and_check(inputs, g)


def test_mixed_precision():
    """Half tables with float32 λ and V: dλ and dV in float32, table gradients in half."""
    inputs, g = make(60, 5, 70, 7, F16, lam_dtype=F32)
    _, grads = run_and_check(inputs, g)
    assert grads[1].dtype == grads[4].dtype == F32 and grads[2].dtype == grads[3].dtype == F16


@pytest.mark.gpu
@pytest.mark.parametrize("lam_dtype", [BF16, F32], ids=["lam-bf16", "lam-f32"])
def test_bfloat16(lam_dtype, table_grad):
    inputs, g = make(60, 5, 70, 7, BF16, lam_dtype=lam_dtype)
    run_and_check(inputs, g)


@pytest.mark.parametrize("hparams", ["shared", "none"])
def test_hparams_shared_or_none(hparams, table_grad):
    inputs, g = make(20, 5, 37, 7, hparams=hparams)
    run_and_check(inputs, g)


@pytest.mark.parametrize("mask", [
    (False, True, False, False, True),   # dλ, dV
    (False, False, True, False, False),  # dE_e
    (False, False, False, True, False),  # dE_h
    (False, True, False, True, False),   # dλ, dE_h
], ids=["dlam-dV", "dE", "dEh", "dlam-dEh"])
def test_output_mask(mask, table_grad):
    inputs, g = make(20, 5, 37, 7)
    run_and_check(inputs, g, mask=list(mask))


def test_int32_indices_and_strided_operands():
    """int32 indices, a grad_out with inner stride 2, λ rows with a row stride, transposed V."""
    inputs, g = make(20, 5, 37, 7, index_dtype=torch.int32)
    idx, lam, E, Eh, V = inputs
    lam_s = torch.zeros(40, 7, device=DEVICE)[::2].copy_(lam)
    V_t = V.t().contiguous().t()
    g_s = torch.zeros(20, 74, device=DEVICE)[:, ::2].copy_(g)
    run_and_check([idx, lam_s, E, Eh, V_t], g_s)


@pytest.mark.parametrize("table_grad_mode", ["atomic", "sorted"])
def test_nan_poisoned_outputs(monkeypatch, nan_poison, table_grad_mode):
    """Every buffer the kernels write in full starts as NaN; several D blocks and row chunks;
    in sorted mode every table row is written, also those that no index hits."""
    monkeypatch.setattr(he, "TABLE_GRAD", table_grad_mode)
    nan_poison(he)
    monkeypatch.setattr(he, "_ROWS_BLOCKS", (16, 16))
    monkeypatch.setattr(he, "_FWD_BLOCKS", (16, 16))
    monkeypatch.setattr(he, "_SEG_BLOCKS", (16, 16))
    inputs, g = make(40, 24, 37, 7, seed=1)
    assert len(torch.unique(inputs[0])) < 24, "some table rows must get no index"
    run_and_check(inputs, g)


def test_deterministic_bitwise_with_repeated_indices(monkeypatch):
    """Deterministic mode: no float atomics (sorted segments), two runs bitwise equal, and the
    same values as the atomic path; 300 indices into 4 rows (segments of ~75 in 16-row steps)."""
    monkeypatch.setattr(he, "_ROWS_BLOCKS", (32, 32))
    inputs, g = make(300, 4, 37, 7, seed=2)
    calls = []
    original = he._segment_kernel
    monkeypatch.setattr(he, "_segment_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (calls.append(grid), original[grid])[1]})())
    torch.use_deterministic_algorithms(True)
    runs = []
    for _ in range(2):
        out = he.hyper_embedding_forward(*inputs)
        runs.append([out, *he.hyper_embedding_backward(g, *inputs, [False] + [True] * 4)[1:]])
    torch.use_deterministic_algorithms(False)
    assert len(calls) == 2, "deterministic mode must take the sorted table-gradient path"
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    atomic = he.hyper_embedding_backward(g, *inputs, [False] + [True] * 4)
    assert len(calls) == 2
    for a, b in zip(runs[0][1:], atomic[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    _, ref = ref64(inputs, g)
    for name, got, want in zip(NAMES[1:], runs[0][1:], ref[1:]):
        assert_close_rel(got, want, F32, "d" + name)


@pytest.mark.parametrize("table_grad_mode", ["atomic", "sorted"])
def test_outputs_own_their_storage(monkeypatch, table_grad_mode):
    monkeypatch.setattr(he, "TABLE_GRAD", table_grad_mode)
    inputs, g = make(20, 5, 37, 7)
    out = he.hyper_embedding_forward(*inputs)
    grads = he.hyper_embedding_backward(g, *inputs, [False] + [True] * 4)
    storages = [t.untyped_storage().data_ptr() for t in [*inputs, g] if t is not None]
    for t in [out, *grads[1:]]:
        ptr = t.untyped_storage().data_ptr()
        assert ptr not in storages
        storages.append(ptr)


def test_float64_and_empty_run_the_reference():
    inputs, g = make(20, 5, 37, 7, dtype=torch.float64)
    run_and_check(inputs, g)
    idx, lam, E, Eh, V = make(3, 5, 37, 7)[0]
    out = he.hyper_embedding_forward(idx[:0], lam[:0], E, Eh, V)
    assert out.shape == (0, 37)


# ----------------------------------------------------------------------------- end to end (backend "triton")


@pytest.mark.parametrize("hparams_kind", ["per_example", "shared", "none"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_functional_end_to_end(dtype, hparams_kind):
    """[B, T] indices with repeats; half tables take float32 λ and V."""
    B, T, N, D, H = 3, 5, 7, 37, 7
    p = make_embedding_params(N, D, H, torch.float64)
    hp_dtype = F32 if dtype == F16 else dtype
    hparams = {"per_example": torch.randn(B, H, dtype=torch.float64), "shared": torch.randn(H, dtype=torch.float64),
               "none": None}[hparams_kind]
    inputs = {"idx": torch.randint(0, N, (B, T), device=DEVICE),
              "hparams": None if hparams is None else hparams.to(DEVICE, hp_dtype),
              "E": p["E"].to(DEVICE, dtype), "Eh": p["Eh"].to(DEVICE, dtype), "V": p["V"].to(DEVICE, hp_dtype)}

    def run(idx, hparams, E, Eh, V):
        return stn_kernels.hyper_embedding(idx, hparams, E, Eh, V)

    with stn_kernels.use_backend("triton"):
        check_against_naive(run, naive_hyper_embedding, inputs, dtype)


def test_module_end_to_end_time_major_and_kernels_called(monkeypatch):
    """HyperEmbedding with [T, B] input (batch_dim=1) under use_backend("triton"), deterministic."""
    calls = []
    for name in ("hyper_embedding_forward", "hyper_embedding_backward"):
        original = getattr(he, name)
        monkeypatch.setattr(he, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    T, B, N, D, H = 6, 3, 9, 37, 7
    layer = randomize_module_(stn_kernels.HyperEmbedding(N, D, num_hparams=H)).to(DEVICE)
    idx = torch.randint(0, N, (T, B), device=DEVICE)
    hparams = torch.randn(B, H, device=DEVICE, requires_grad=True)
    params = [layer.weight, layer.hyper_weight, layer.hparam_weight]
    torch.use_deterministic_algorithms(True)
    with stn_kernels.use_backend("triton"):
        out = layer(idx, hparams, batch_dim=1)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [hparams, *params], grad)
    torch.use_deterministic_algorithms(False)
    assert calls == ["hyper_embedding_forward", "hyper_embedding_backward"]
    wanted = [t.detach().double().requires_grad_() for t in [hparams, *params]]
    hd, Ed, Ehd, Vd = wanted
    ref = naive_hyper_embedding(idx.t(), hd, Ed, Ehd, Vd).transpose(0, 1)
    ref_grads = torch.autograd.grad(ref, wanted, grad.double())
    assert_close_rel(out, ref, F32, "out")
    for name, a, e in zip(NAMES[1:], got, ref_grads):
        assert_close_rel(a, e, F32, "d" + name)


def test_opcheck_with_triton_backend():
    inputs, _ = make(12, 5, 37, 7)
    idx, lam, E, Eh, V = inputs
    args = (idx, lam.requires_grad_(), E.requires_grad_(), Eh.requires_grad_(), V.requires_grad_())
    with stn_kernels.use_backend("triton"):
        try:
            torch.library.opcheck(torch.ops.stn_kernels.hyper_embedding.default, args,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        except OpCheckError as exc:  # pragma: no cover - shows which check failed
            pytest.fail(str(exc))
