"""The compiled host paths (``stn_kernels._host``, csrc/host/, stn_kernels/backends/host.py).

They run the reference's ATen ops, in its order, from C++ (HyperLinear: a C++ autograd Function with the
reference's written-out backward; HyperEmbedding and a HyperLSTMCell step: plain ops torch differentiates), so:
* every output and every gradient equals the Python path's bit for bit (the same ops on the same data), and the
  naive float64 formulas to the dtype's tolerance, for odd sizes, with and without biases and λ, with only some
  inputs requiring grad, non-contiguous inputs; HyperLinear at a tiny problem (M·N·K ≤ 32768) runs plain loops
  instead (the same formula, not the same bits: bounded against the Python path and the naive formulas);
* double backward (create_graph=True) is exact: gradgradcheck in float64;
* it is used exactly where it can be (CPU, one float dtype, the reference backend, ``STN_KERNELS_HOST`` not 0)
  and the Python path everywhere else; a missing build or one for another torch falls back with a warning;
* setup.py builds it wherever torch is (unless STN_KERNELS_BUILD_HOST=0), so it must be built here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import setup as build_script
import stn_kernels
from stn_kernels.backends import extension, host

from _naive import assert_close_rel, naive_hyper_embedding, naive_hyper_linear, randomize_module_


def _host_expected() -> bool:
    return os.environ.get("STN_KERNELS_BUILD_HOST", "").strip() != "0"


@pytest.fixture(autouse=True)
def built():
    if not host.HOST.loaded():
        if _host_expected():
            pytest.fail(f"stn_kernels._host is not usable here: {host.HOST.load_error()} (run `make install`)")
        pytest.skip("STN_KERNELS_BUILD_HOST=0: the host extension is not built")


def _use_host(monkeypatch, module, on: bool) -> None:
    """The compiled host path on or off (STN_KERNELS_HOST) for ``module``'s next call: its cached parameter
    checks, where that is decided, are dropped."""
    monkeypatch.setenv("STN_KERNELS_HOST", "1" if on else "0")
    module.__dict__.pop("_param_cache", None)


def _run(module, args, grads_of, g, monkeypatch, host=True):
    """(output, gradients of ``grads_of``) of ``module(*args)`` with g as the output gradient, the host path on
    or off."""
    _use_host(monkeypatch, module, host)
    out = module(*args)
    first = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(first, grads_of, g, allow_unused=True) if first.requires_grad else ()
    return out, grads


def _same(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max().item():.3g}"


def _linear_case(dtype, M=7, K=13, N=11, H=3, bias=True, lam=True, grad=("x", "lam", "params")):
    torch.manual_seed(0)
    m = randomize_module_(stn_kernels.HyperLinear(K, N, bias, num_hparams=H, dtype=dtype))
    x = torch.randn(M, K, dtype=dtype, requires_grad="x" in grad)
    hp = torch.randn(M, H, dtype=dtype, requires_grad="lam" in grad) if lam else None
    for p in m.parameters():
        p.requires_grad_("params" in grad)
    return m, x, hp


LINEAR_CASES = [
    pytest.param(dict(), id="all"),
    pytest.param(dict(bias=False), id="nobias"),
    pytest.param(dict(lam=False), id="nolam"),
    pytest.param(dict(grad=("lam",)), id="lam-only"),
    pytest.param(dict(grad=("x",)), id="x-only"),
    pytest.param(dict(grad=("params",)), id="params-only"),
    pytest.param(dict(M=1, K=1, N=1, H=1), id="ones"),
    pytest.param(dict(M=0), id="empty-batch"),
]


# Above TINY_WORK multiply-adds (M·N·K) the host path runs the reference's ATen ops (the same bits); at or below it,
# its loops (csrc/host/hyper_linear.cpp: tiny problems, where the ops' dispatch costs more than their arithmetic).
TINY_WORK = 32768
SIZES = {"tiny": dict(M=7, K=13, N=11), "large": dict(M=40, K=33, N=31)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("size", list(SIZES))
def test_hyper_linear_equals_python_path_and_naive(dtype, case, size, monkeypatch):
    m, x, hp = _linear_case(dtype, **{**SIZES[size], **case})
    tiny = x.shape[0] * m.out_features * m.in_features <= TINY_WORK
    inputs = [t for t in (x, hp, *m.parameters()) if t is not None]
    wanted = [t for t in inputs if t.requires_grad]
    g = torch.randn(x.shape[0], m.out_features, dtype=dtype)
    out, grads = _run(m, (x, hp), wanted, g, monkeypatch)
    if hp is not None and wanted:
        assert type(out.grad_fn).__name__ == "CppFunction"  # the host path ran
    ref, ref_grads = _run(m, (x, hp), wanted, g, monkeypatch, host=False)
    same = (lambda a, b, what: assert_close_rel(a, b, dtype, what)) if tiny and hp is not None else _same
    same(out, ref, "out")
    for a, b, t in zip(grads, ref_grads, wanted):
        if b is None:
            assert a is None or not a.any()
        else:
            same(a, b, f"grad {tuple(t.shape)}")
    # and the formula, in float64
    n = m.out_features
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (x, hp, *m.parameters()) if t is not None]
    x64, hp64 = leaves[0], (leaves[1] if hp is not None else None)
    w, wh, *rest = leaves[2 if hp is not None else 1:]
    b, bh, vc = (rest if m.bias is not None else [None, None, rest[0]])
    naive = naive_hyper_linear(x64, hp64, w, wh, b, bh, vc[:n], vc[n:])
    assert_close_rel(out, naive, dtype, "out")
    wanted64 = [t for t in leaves if t.requires_grad]
    if wanted64:
        for a, e in zip(grads, torch.autograd.grad(naive, wanted64, g.double(), allow_unused=True)):
            if e is None:
                assert a is None or not a.any()
            else:
                assert_close_rel(a, e, dtype, "grad")


def test_hyper_linear_non_contiguous_input_and_expanded_grad(monkeypatch):
    m, x, hp = _linear_case(torch.float64, M=6, K=9)
    xt = torch.randn(9, 6, dtype=torch.float64).t().requires_grad_()   # transposed layout
    hps = torch.randn(6, 6, dtype=torch.float64)[:, ::2].requires_grad_()  # strided λ
    out = m(xt, hps)
    assert type(out.grad_fn).__name__ == "CppFunction"
    out.sum().backward()  # an expanded (stride 0) output gradient
    grads = [t.grad.clone() for t in (xt, hps, *m.parameters())]
    for t in (xt, hps, *m.parameters()):
        t.grad = None
    _use_host(monkeypatch, m, False)
    ref = m(xt, hps)
    ref.sum().backward()
    _same(out, ref, "out")
    for a, t in zip(grads, (xt, hps, *m.parameters())):
        _same(a, t.grad, "grad")


@pytest.mark.parametrize("bias", [True, False])
def test_hyper_linear_double_backward(bias):
    """create_graph=True: the gradients are differentiable again (Delta-STN's Jacobian-vector products)."""
    m, x, hp = _linear_case(torch.float64, M=3, K=4, N=5, H=2, bias=bias)
    params = list(m.parameters())
    assert type(m(x, hp).grad_fn).__name__ == "CppFunction"
    assert torch.autograd.gradgradcheck(lambda x, hp: m(x, hp), (x, hp))
    # with respect to the parameters too: gradients of a gradient, against the naive formula's
    g = torch.randn(3, 5, dtype=torch.float64)
    n = m.out_features
    first = torch.autograd.grad(m(x, hp), [x, hp] + params, g, create_graph=True)
    second = torch.autograd.grad(sum((t * t).sum() for t in first), [x, hp] + params, allow_unused=True)
    b, bh = (m.bias, m.hyper_bias) if bias else (None, None)
    naive_first = torch.autograd.grad(naive_hyper_linear(x, hp, m.weight, m.hyper_weight, b, bh, m.hparam_weight[:n],
                                                         m.hparam_weight[n:]), [x, hp] + params, g, create_graph=True)
    naive_second = torch.autograd.grad(sum((t * t).sum() for t in naive_first), [x, hp] + params, allow_unused=True)
    for a, e in zip(second, naive_second):
        if e is None:
            assert a is None or not a.any()
        else:
            assert_close_rel(a, e, torch.float64, "second-order gradient")


def test_hyper_linear_in_place_change_of_a_saved_input_raises():
    m, x, hp = _linear_case(torch.float64)
    out = m(x, hp)
    assert type(out.grad_fn).__name__ == "CppFunction"
    with torch.no_grad():
        m.weight.add_(1.0)  # what the backward would read: torch's version check says so
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("batch_dim, shape", [(0, (4, 5)), (1, (5, 4)), (0, (4,)), (0, (4, 2, 3))])
@pytest.mark.parametrize("lam", [True, False])
def test_hyper_embedding_equals_python_path_and_naive(batch_dim, shape, lam, monkeypatch):
    torch.manual_seed(1)
    m = randomize_module_(stn_kernels.HyperEmbedding(17, 6, num_hparams=3, dtype=torch.float64))
    idx = torch.randint(0, 17, shape)
    B = shape[batch_dim]
    hp = torch.randn(B, 3, dtype=torch.float64, requires_grad=True) if lam else None
    wanted = [t for t in (hp, *m.parameters()) if t is not None]
    g = torch.randn(*shape, 6, dtype=torch.float64)
    out, grads = _run(m, (idx, hp, batch_dim), wanted, g, monkeypatch)
    ref, ref_grads = _run(m, (idx, hp, batch_dim), wanted, g, monkeypatch, host=False)
    _same(out, ref, "out")
    for a, b in zip(grads, ref_grads):
        _same(a, b, "grad")
    moved = idx if batch_dim == 0 else idx.transpose(0, 1)
    naive = naive_hyper_embedding(moved, hp, m.weight, m.hyper_weight, m.hparam_weight)
    assert_close_rel(out, naive if batch_dim == 0 else naive.transpose(0, 1), torch.float64)


def test_hyper_embedding_out_of_range_index_still_names_it():
    m = stn_kernels.HyperEmbedding(10, 4, num_hparams=3)
    with pytest.raises(ValueError, match=r"input: expected indices in \[0, 9\]"):
        m(torch.tensor([[1, 12]]), torch.randn(1, 3))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lam", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_hyper_lstm_cell_step_equals_python_path(bias, lam, batch_first, monkeypatch):
    torch.manual_seed(2)
    cell = randomize_module_(stn_kernels.HyperLSTMCell(5, 4, bias, batch_first=batch_first, num_hparams=3,
                                                       dtype=torch.float64))
    x = torch.randn(3, 1, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    hp = torch.randn(3, 3, dtype=torch.float64, requires_grad=True) if lam else None
    if not batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    wanted = [t for t in (x, h0, c0, hp, *cell.parameters()) if t is not None]
    g = torch.randn(x.shape, dtype=torch.float64)[..., :4].contiguous()
    out, grads = _run(cell, (x, (h0, c0), hp), wanted, g, monkeypatch)
    ref, ref_grads = _run(cell, (x, (h0, c0), hp), wanted, g, monkeypatch, host=False)
    _same(out[0], ref[0], "out")
    _same(out[1][1], ref[1][1], "c")
    for a, b in zip(grads, ref_grads):
        _same(a, b, "grad")
    with torch.no_grad():  # no_grad: addcmul where autograd records a product and a sum; the same numbers
        plain, _ = _run(cell, (x, (h0, c0), hp), wanted, g, monkeypatch)
        plain_ref, _ = _run(cell, (x, (h0, c0), hp), wanted, g, monkeypatch, host=False)
    _same(plain[0], plain_ref[0], "no_grad out")
    assert_close_rel(plain[0], out[0], torch.float64)


# ----------------------------------------------------------------------------- where it is used, and where not

def test_used_only_where_it_can_run(monkeypatch):
    m, x, hp = _linear_case(torch.float32)
    assert type(m(x, hp).grad_fn).__name__ == "CppFunction"
    _use_host(monkeypatch, m, False)
    assert type(m(x, hp).grad_fn).__name__ != "CppFunction"
    _use_host(monkeypatch, m, True)
    # half inputs (float32 λ), and a module converted to float64 afterwards (the cache is reset by .to())
    half = randomize_module_(stn_kernels.HyperLinear(13, 11, num_hparams=3)).to(torch.bfloat16)
    assert type(half(x.to(torch.bfloat16), hp.to(torch.bfloat16)).grad_fn).__name__ != "CppFunction"
    m.double()
    out = m(x.double(), hp.double())
    assert type(out.grad_fn).__name__ == "CppFunction" and out.dtype == torch.float64
    assert host.host_ops(torch.device("cuda"), torch.float32, torch.float32) is None
    assert host.host_ops(torch.device("cpu"), torch.float16, torch.float32) is None
    assert host.host_ops(torch.device("cpu"), torch.float32, torch.float32) is host.HOST.module()


def test_explicit_triton_request_is_not_answered_by_the_host_path(monkeypatch):
    pytest.importorskip("triton")
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the Triton backend on CPU tensors needs TRITON_INTERPRET=1")
    m, x, hp = _linear_case(torch.float32, M=3, K=4, N=5, H=2)
    with stn_kernels.use_backend("triton"):
        out = m(x, hp)
    assert type(out.grad_fn).__name__ != "CppFunction"


def test_missing_or_mismatched_build_falls_back(monkeypatch):
    m, x, hp = _linear_case(torch.float64, **SIZES["large"])  # (the reference's ops: the same bits)
    expected = m(x, hp)
    fresh = extension.GuardedExtension(host.HOST.name, host.HOST.what, host.HOST.without, host.HOST.built_where)
    monkeypatch.setattr(host, "HOST", fresh)
    monkeypatch.setattr(fresh, "_find", lambda: "/somewhere/_host.so")
    monkeypatch.setattr(fresh, "_built_for", lambda path: "1.2.3")
    monkeypatch.setattr(fresh, "_import", lambda: pytest.fail("a mismatched build must not be loaded"))
    m.__dict__.pop("_param_cache", None)
    with pytest.warns(RuntimeWarning, match=r"host extension .* built for torch 1\.2\.3.*Python path"):
        out = m(x, hp)
    assert type(out.grad_fn).__name__ != "CppFunction"
    _same(out, expected, "out")
    assert "1.2.3" in fresh.load_error()


def test_import_does_not_load_it():
    code = ("import sys, stn_kernels; assert 'stn_kernels._host' not in sys.modules; "
            "stn_kernels.HyperLinear(3, 2, num_hparams=1)(__import__('torch').randn(2, 3)); "
            "assert 'stn_kernels._host' in sys.modules")
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=root))


def test_build_decision():
    assert build_script.host_build_decision({"STN_KERNELS_BUILD_HOST": "0"}) == (False, "STN_KERNELS_BUILD_HOST=0")
    assert build_script.host_build_decision({}, root="/nonexistent")[0] is False
    build, reason = build_script.host_build_decision({})
    assert build and torch.__version__ in reason
    assert build_script.host_sources() and all(s.endswith(".cpp") for s in build_script.host_sources())



def test_a_failed_build_does_not_fail_the_install(tmp_path):
    """A compiler error in csrc/host/ is reported and the extension left out (the Python path then runs)."""
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "csrc" / "host").mkdir(parents=True)
    (tmp_path / "csrc" / "host" / "broken.cpp").write_text("#error broken on purpose\n")
    (tmp_path / "stn_kernels").mkdir()
    (tmp_path / "stn_kernels" / "__init__.py").write_text("")
    (tmp_path / "setup.py").write_text((root / "setup.py").read_text())
    env = dict(os.environ, STN_KERNELS_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the optional extension stn_kernels._host was not built" in proc.stdout
    assert not list((tmp_path / "stn_kernels").glob("_host*"))


def _module_cases():
    torch.manual_seed(3)
    lam = torch.randn(3, 2)
    return [
        ("linear", stn_kernels.HyperLinear(4, 5, num_hparams=2), (torch.randn(3, 4), lam)),
        ("conv2d", stn_kernels.HyperConv2d(2, 3, 3, padding=1, num_hparams=2), (torch.randn(3, 2, 5, 5), lam)),
        ("embedding", stn_kernels.HyperEmbedding(7, 4, num_hparams=2), (torch.randint(0, 7, (3, 2)), lam)),
        ("lstm_cell", stn_kernels.HyperLSTMCell(4, 5, num_hparams=2), (torch.randn(1, 3, 4), None, lam)),
        ("lstm", stn_kernels.HyperLSTM(4, 5, 2, num_hparams=2), (torch.randn(2, 3, 4), None, lam)),
    ]


@pytest.mark.parametrize("name, module, args", _module_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_modules_copy_and_pickle_after_a_call(name, module, args, tmp_path):
    """The per-module cache of the parameter checks (which may hold the compiled host module) is left out of deep
    copies and pickles: copy.deepcopy and torch.save of a model that has run work, and the copies compute the same."""
    import copy

    first = module(*args)
    first = first[0] if isinstance(first, tuple) else first
    copied = copy.deepcopy(module)
    torch.save(module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (copied, loaded):
        out = other(*args)
        _same((out[0] if isinstance(out, tuple) else out), first, name)
        assert all(p is not q for p, q in zip(other.parameters(), module.parameters()))
