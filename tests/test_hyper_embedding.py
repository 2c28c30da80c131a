"""stn_kernels.hyper_embedding and stn_kernels.HyperEmbedding against the naive two-F.embedding formulation."""

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
    make_embedding_params,
    make_hparams,
    naive_hyper_embedding,
    randomize_module_,
    rel_err,
    single_threaded,
    strided_layout,
)

INDEX_DTYPES = [pytest.param(torch.int64, id="i64"), pytest.param(torch.int32, id="i32")]
IDX_SHAPES = [pytest.param((5,), id="B5"), pytest.param((1,), id="B1"), pytest.param((5, 3), id="B5-T3"),
              pytest.param((2, 3, 4), id="B2-3x4")]
NUM, DIM, H = 7, 11, 4  # few rows: every index batch below repeats rows


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def functional(idx, hparams, E, Eh, V):
    return stn_kernels.hyper_embedding(idx, hparams, E, Eh, V)


def emb_inputs(idx_shape, dtype, hparams_kind, index_dtype=torch.int64, hparams_dtype=None):
    p = make_embedding_params(NUM, DIM, H, dtype)
    if hparams_dtype is not None:
        p["V"] = p["V"].to(hparams_dtype)
    idx = torch.randint(0, NUM, idx_shape, dtype=index_dtype)
    return {"idx": idx, "hparams": make_hparams(hparams_kind, idx_shape[0], H, hparams_dtype or dtype), **p}


def module_fn(module, batch_dim=0):
    def run(idx, hparams, weight, hyper_weight, hparam_weight):
        params = {"weight": weight, "hyper_weight": hyper_weight, "hparam_weight": hparam_weight}
        return functional_call(module, params, (idx, hparams), {"batch_dim": batch_dim})
    return run


def module_naive(idx, hparams, weight, hyper_weight, hparam_weight):
    return naive_hyper_embedding(idx, hparams, weight, hyper_weight, hparam_weight)


def naive_time_major(idx, hparams, weight, hyper_weight, hparam_weight):
    """[T, B] indices, λ [B, H] (the published LSTM layout): out[t, b] = E[i] + (V·λ_b) ⊙ E_h[i]."""
    out = F.embedding(idx.long(), weight)
    if hparams is None:
        return out
    s = F.linear(hparams, hparam_weight)  # [B, D] broadcasts over T as dim -2; [D] over everything
    return out + s * F.embedding(idx.long(), hyper_weight)


def module_inputs(m, idx, hparams):
    return {"idx": idx, "hparams": hparams, "weight": m.weight, "hyper_weight": m.hyper_weight,
            "hparam_weight": m.hparam_weight}


# ----------------------------------------------------------------------------- the harness can fail

def test_naive_detects_wrong_hyper_paths():
    inp = emb_inputs((5, 3), torch.float64, "per_example")
    ref = naive_hyper_embedding(**inp)
    wrong = {"λ rows rolled": dict(inp, hparams=inp["hparams"].roll(1, 0)),
             "tables swapped": dict(inp, E=inp["Eh"], Eh=inp["E"]),
             "λ ignored": dict(inp, hparams=None)}
    for what, bad in wrong.items():
        assert rel_err(naive_hyper_embedding(**bad), ref) > 100 * TOL[torch.float32], what
    b, t = 3, 1
    i = inp["idx"][b, t]
    manual = inp["E"][i] + (inp["V"] @ inp["hparams"][b]) * inp["Eh"][i]
    assert_close_rel(ref[b, t], manual, torch.float64)


# ----------------------------------------------------------------------------- vs naive

@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("idx_shape", IDX_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_matches_naive(dtype, idx_shape, hparams_kind, index_dtype):
    inp = emb_inputs(idx_shape, dtype, hparams_kind, index_dtype)
    check_against_naive(functional, naive_hyper_embedding, inp, dtype)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("idx_shape", IDX_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_module_matches_naive(dtype, idx_shape, hparams_kind, index_dtype):
    m = randomize_module_(stn_kernels.HyperEmbedding(NUM, DIM, num_hparams=H, dtype=dtype))
    idx = torch.randint(0, NUM, idx_shape, dtype=index_dtype)
    inputs = module_inputs(m, idx, make_hparams(hparams_kind, idx_shape[0], H, dtype))
    check_against_naive(module_fn(m), module_naive, inputs, dtype)


@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_time_major_batch_dim_1(dtype, index_dtype, hparams_kind):
    T, B = 6, 4
    m = randomize_module_(stn_kernels.HyperEmbedding(NUM, DIM, num_hparams=H, dtype=dtype))
    idx = torch.randint(0, NUM, (T, B), dtype=index_dtype)
    inputs = module_inputs(m, idx, make_hparams(hparams_kind, B, H, dtype))
    check_against_naive(module_fn(m, batch_dim=1), naive_time_major, inputs, dtype)


def test_time_major_uses_lambda_of_column():
    """Under batch_dim=1 the output at [t, b] uses λ_b (not λ_t)."""
    m = randomize_module_(stn_kernels.HyperEmbedding(NUM, DIM, num_hparams=H, dtype=torch.float64))
    idx = torch.randint(0, NUM, (3, 2))
    lam = torch.randn(2, H, dtype=torch.float64)
    out = m(idx, lam, batch_dim=1)
    for t in range(3):
        for b in range(2):
            i = idx[t, b]
            expected = m.weight[i] + (m.hparam_weight @ lam[b]) * m.hyper_weight[i]
            assert_close_rel(out[t, b], expected, torch.float64, f"[{t}, {b}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_indices_accumulate(dtype):
    """Every position reads row 2: the table gradients sum over all positions."""
    idx = torch.full((5, 3), 2, dtype=torch.int64)
    inp = emb_inputs((5, 3), dtype, "per_example")
    inp["idx"] = idx
    check_against_naive(functional, naive_hyper_embedding, inp, dtype)
    m = stn_kernels.HyperEmbedding(NUM, DIM, num_hparams=H, dtype=dtype)
    lam = torch.randn(5, H, dtype=dtype)
    m(idx, lam).sum().backward()
    assert not m.weight.grad[torch.arange(NUM) != 2].any()
    assert torch.allclose(m.weight.grad[2], torch.full((DIM,), 15.0, dtype=dtype))


@pytest.mark.parametrize("subset", [["hparams"], ["hparams", "V"], ["E", "Eh", "V"], ["Eh"], ["E"]],
                         ids=["only-hparams", "hparams-and-scale", "only-tables", "only-hyper-table", "only-table"])
def test_gradients_of_a_subset(subset):
    inp = emb_inputs((5, 3), torch.float64, "per_example")
    check_against_naive(functional, naive_hyper_embedding, inp, torch.float64, grad_of=subset)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_backward_fills_parameter_grads(dtype):
    m = randomize_module_(stn_kernels.HyperEmbedding(NUM, DIM, num_hparams=H, dtype=dtype))
    idx = torch.randint(0, NUM, (5, 3))
    lam = torch.randn(5, H, dtype=dtype, requires_grad=True)
    g = torch.randn(5, 3, DIM, dtype=torch.float64)
    (m(idx, lam) * g.to(dtype)).sum().backward()
    ref_in = {k: (v.detach().double().requires_grad_() if v.is_floating_point() else v)
              for k, v in module_inputs(m, idx, lam).items()}
    (module_naive(**ref_in) * g).sum().backward()
    assert_close_rel(lam.grad, ref_in["hparams"].grad, dtype, "hparams")
    for name, p in m.named_parameters():
        assert_close_rel(p.grad, ref_in[name].grad, dtype, name)


def test_module_without_hparams_is_plain_embedding():
    m = randomize_module_(stn_kernels.HyperEmbedding(NUM, DIM, num_hparams=H, dtype=torch.float64))
    idx = torch.randint(0, NUM, (5, 3))
    assert torch.equal(m(idx), F.embedding(idx, m.weight))


@pytest.mark.parametrize("layout", ["idx-transposed", "hparams-strided", "tables-strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype, layout):
    inp = emb_inputs((5, 3), dtype, "per_example")
    if layout == "idx-transposed":
        inp["idx"] = inp["idx"].t().contiguous().t()
        assert not inp["idx"].is_contiguous()
        layouts = {}
    elif layout == "hparams-strided":
        layouts = {"hparams": strided_layout}
    else:
        layouts = {"E": strided_layout, "Eh": strided_layout, "V": strided_layout}
    check_against_naive(functional, naive_hyper_embedding, inp, dtype, layouts=layouts)


@pytest.mark.parametrize("hparams_kind", HPARAMS)
@pytest.mark.parametrize("idx_shape", [pytest.param((0,), id="B0"), pytest.param((0, 3), id="B0-T3")])
def test_empty_batch(idx_shape, hparams_kind):
    inp = emb_inputs(idx_shape, torch.float32, hparams_kind)
    out = functional(**inp)
    assert out.shape == (*idx_shape, DIM)
    check_against_naive(functional, naive_hyper_embedding, inp, torch.float32)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_tables_float32_hparams(dtype):
    inp = emb_inputs((5, 3), dtype, "per_example", hparams_dtype=torch.float32)
    check_against_naive(functional, naive_hyper_embedding, inp, dtype)


# ----------------------------------------------------------------------------- gradcheck, JVP

@pytest.mark.parametrize("hparams_kind", HPARAMS)
def test_gradcheck(hparams_kind):
    inp = emb_inputs((3, 2), torch.float64, hparams_kind)
    args = [inp["idx"]] + [None if inp[k] is None else inp[k].requires_grad_() for k in ("hparams", "E", "Eh", "V")]
    with single_threaded():
        assert torch.autograd.gradcheck(stn_kernels.hyper_embedding, tuple(args))
        assert torch.autograd.gradgradcheck(stn_kernels.hyper_embedding, tuple(args))


def test_gradcheck_module_time_major():
    m = randomize_module_(stn_kernels.HyperEmbedding(NUM, 3, num_hparams=2, dtype=torch.float64))
    idx = torch.randint(0, NUM, (3, 2))
    args = (idx, torch.randn(2, 2, dtype=torch.float64, requires_grad=True),
            *(p.detach().clone().requires_grad_() for p in (m.weight, m.hyper_weight, m.hparam_weight)))
    with single_threaded():
        assert torch.autograd.gradcheck(module_fn(m, batch_dim=1), args)
        assert torch.autograd.gradgradcheck(module_fn(m, batch_dim=1), args)


def test_jvp_wrt_hparams():
    inp = emb_inputs((5, 3), torch.float64, "per_example")
    v = torch.randn_like(inp["hparams"])
    f = lambda lam: functional(inp["idx"], lam, inp["E"], inp["Eh"], inp["V"])  # noqa: E731
    _, jvp = torch.autograd.functional.jvp(f, (inp["hparams"],), (v,))
    expected = (v @ inp["V"].t())[:, None, :] * F.embedding(inp["idx"], inp["Eh"])
    assert_close_rel(jvp, expected, torch.float64)


def test_jvp_wrt_hparams_torch_func():
    inp = emb_inputs((5, 3), torch.float64, "per_example")
    v = torch.randn_like(inp["hparams"])
    _, jvp = torch.func.jvp(lambda lam: functional(inp["idx"], lam, inp["E"], inp["Eh"], inp["V"]),
                            (inp["hparams"],), (v,))
    _, expected = torch.func.jvp(lambda lam: naive_hyper_embedding(inp["idx"], lam, inp["E"], inp["Eh"], inp["V"]),
                                 (inp["hparams"],), (v,))
    assert_close_rel(jvp, expected, torch.float64, "tangent")


# ----------------------------------------------------------------------------- opcheck

def _op_args(dtype, with_hparams, requires_grad=True, M=9):
    idx = torch.randint(0, NUM, (M,))
    p = make_embedding_params(NUM, DIM, H, dtype)
    lam = torch.randn(M, H, dtype=dtype) if with_hparams else None
    V = p["V"] if with_hparams else None
    tensors = [lam, p["E"], p["Eh"], V]
    return [idx] + [None if t is None else t.requires_grad_(requires_grad) for t in tensors]


@pytest.mark.parametrize("with_hparams", [pytest.param(True, id="hparams"), pytest.param(False, id="nohparams")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_forward(dtype, with_hparams):
    torch.library.opcheck(torch.ops.stn_kernels.hyper_embedding.default, tuple(_op_args(dtype, with_hparams)))


@pytest.mark.parametrize("with_hparams", [pytest.param(True, id="hparams"), pytest.param(False, id="nohparams")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_backward(dtype, with_hparams):
    """With the mask autograd passes: never the indices; without hparams only the table."""
    idx, lam, E, Eh, V = _op_args(dtype, with_hparams, requires_grad=False)
    mask = [False, with_hparams, True, with_hparams, with_hparams]
    g = torch.randn(idx.shape[0], DIM, dtype=dtype)
    torch.library.opcheck(torch.ops.stn_kernels.hyper_embedding_backward.default, (g, idx, lam, E, Eh, V, mask))
