"""The optional compiled CUDA extension (``stn_kernels._C``, csrc/) and the ``"cuda"`` backend
(``stn_kernels.cuda_ops``).

Without a GPU:
* the build decision of setup.py (STN_KERNELS_BUILD_CUDA=0, no sources, FORCE_CUDA, finding the
  toolkit behind an nvcc wrapper), and that the extension is built where nvcc is;
* the guarded loader (missing build, build for another torch: warning naming both versions,
  load failure) and that the other backends keep working;
* the registration of the private ops' CUDA kernels against the schemas cuda_ops defines, their
  fake kernels, the error for the 'cuda' backend on CPU tensors;
* the auto rules table (stn_kernels/backend_rules.json) and its regeneration from a results CSV;
* the CUDA kernels themselves, compiled with g++ for a CPU emulation of the CUDA execution model
  (csrc/emulate/) and checked against float64, directly and under cuda_ops' Python code.
With a GPU (marked ``gpu``): the 'cuda' backend against float64 in float32, float16 and bfloat16 at
odd and STN shapes, every gradient, deterministic mode bitwise, opcheck of the private ops.
"""

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import stn_kernels
from stn_kernels import _extension, backend_rules
from stn_kernels._backend import BackendUnavailableError, resolve_backend, use_backend
# float64 ground truth, shared with test_triton_hyper_linear.py; run_and_check(kernels, inputs, g, ...)
from _naive import HL_NAMES as NAMES, check_hl_kernels as run_and_check, close_to_ref64 as close
from _naive import hl_deterministic_runs, hl_ref64 as ref64, make_hl_inputs as make

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPILOGUE = "stn_kernels::_cuda_hyper_linear_epilogue"
REDUCE = "stn_kernels::_cuda_hyper_linear_backward_reduce"


def _load_setup():
    spec = importlib.util.spec_from_file_location("stn_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


def _build_expected() -> bool:
    """Where `make install` / `pip install -e .` must have built the extension."""
    return (shutil.which("nvcc") is not None and torch.version.cuda is not None
            and os.environ.get("STN_KERNELS_BUILD_CUDA", "").strip() != "0")


def _require_built():
    if _extension._find() is None:
        if _build_expected():
            pytest.fail("nvcc is on the PATH but stn_kernels._C is not built: run `make install` "
                        "(or `pip install --no-build-isolation -e .`)")
        pytest.skip("the CUDA extension is not built here (no nvcc, or STN_KERNELS_BUILD_CUDA=0)")


# ----------------------------------------------------------------------------- setup.py


def test_setup_skips_the_build_when_disabled():
    """`python setup.py` with STN_KERNELS_BUILD_CUDA=0 decides not to build (and imports no torch)."""
    env = {**os.environ, "STN_KERNELS_BUILD_CUDA": "0"}
    code = ("import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__'); "
            "print('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not building the CUDA extension (STN_KERNELS_BUILD_CUDA=0)" in proc.stdout
    assert "torch imported: False" in proc.stdout


def test_build_decision(tmp_path):
    setup = _load_setup()
    assert setup.cuda_build_decision({"STN_KERNELS_BUILD_CUDA": "0", "FORCE_CUDA": "1"}) == \
        (False, "STN_KERNELS_BUILD_CUDA=0")
    assert setup.cuda_build_decision({"FORCE_CUDA": "1"}, root=str(tmp_path)) == (False, "no sources in csrc/")
    assert setup.cuda_build_decision({"FORCE_CUDA": "1", "PATH": str(tmp_path)})[0] is True
    build, reason = setup.cuda_build_decision({"PATH": str(tmp_path)})  # no nvcc anywhere
    assert build is False and ("no CUDA toolkit" in reason or "not a CUDA build" in reason)
    assert {os.path.relpath(s, ROOT) for s in setup.cuda_sources()} >= {
        os.path.join("csrc", "hyper_linear_kernels.cu"), os.path.join("csrc", "hyper_linear_ops.cpp"),
        os.path.join("csrc", "module.cpp")}


def test_cuda_home_from_an_nvcc_wrapper(tmp_path):
    setup = _load_setup()
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    real = toolkit / "bin" / "nvcc"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    assert setup.find_cuda_home({"PATH": str(wrapper_dir)}) == str(toolkit)
    link_dir = tmp_path / "link"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(real)
    assert setup.find_cuda_home({"PATH": str(link_dir)}) == str(toolkit)
    assert setup.find_cuda_home({"PATH": str(wrapper_dir), "CUDA_HOME": "/opt/x"}) == "/opt/x"
    assert setup.find_cuda_home({"PATH": str(tmp_path)}) is None


def test_extension_built_where_nvcc_is():
    if not _build_expected():
        pytest.skip("no nvcc on the PATH (or STN_KERNELS_BUILD_CUDA=0): nothing is built here")
    _require_built()


# ----------------------------------------------------------------------------- loader


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not run yet (the real state comes back after the test)."""
    monkeypatch.setattr(_extension, "_state", {})
    return _extension


def _small_inputs(device="cpu", dtype=F32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen, dtype=dtype)
    hp = torch.randn(3, 2, generator=gen, dtype=dtype)
    m = stn_kernels.HyperLinear(4, 5, 2, dtype=dtype)
    return x.to(device), hp.to(device), m.to(device)


def test_loader_missing_build(fresh_loader, monkeypatch):
    monkeypatch.setattr(fresh_loader, "_find", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh_loader.loaded() is False
    assert "not built" in fresh_loader.load_error()
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="not built"):
        resolve_backend(torch.device("cuda"), "stn_kernels::hyper_linear", ("reference", "triton", "cuda"))


def test_loader_build_for_another_torch_is_not_loaded(fresh_loader, monkeypatch):
    """The marker in the library names another torch: a warning naming both, and no dlopen."""
    monkeypatch.setattr(fresh_loader, "_find", lambda: "/somewhere/_C.so")
    monkeypatch.setattr(fresh_loader, "_built_for", lambda path: "1.2.3")
    monkeypatch.setattr(fresh_loader, "_import", lambda: pytest.fail("a mismatched build must not be loaded"))
    with pytest.warns(RuntimeWarning) as record:
        assert fresh_loader.loaded() is False
    text = str(record[0].message)
    assert "1.2.3" in text and torch.__version__ in text and "pip install" in text
    assert "1.2.3" in fresh_loader.load_error() and torch.__version__ in fresh_loader.load_error()
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="built for torch 1.2.3"):
        resolve_backend(torch.device("cuda"), "stn_kernels::hyper_linear", ("reference", "triton", "cuda"))
    # The other backends still work.
    x, hp, m = _small_inputs()
    with use_backend("reference"):
        out = m(x, hp)
    out.sum().backward()
    assert out.shape == (3, 5) and x.shape == (3, 4)


def test_loader_module_attribute_mismatch(fresh_loader, monkeypatch):
    """No marker in the file (an older build): the module's TORCH_VERSION is checked after loading."""
    monkeypatch.setattr(fresh_loader, "_find", lambda: "/somewhere/_C.so")
    monkeypatch.setattr(fresh_loader, "_built_for", lambda path: None)
    monkeypatch.setattr(fresh_loader, "_import", lambda: types.SimpleNamespace(TORCH_VERSION="0.9.0"))
    with pytest.warns(RuntimeWarning, match=r"built for torch 0\.9\.0 but torch .* is running"):
        assert fresh_loader.loaded() is False
    assert torch.__version__ in fresh_loader.load_error()


def test_loader_load_failure(fresh_loader, monkeypatch):
    monkeypatch.setattr(fresh_loader, "_find", lambda: "/somewhere/_C.so")
    monkeypatch.setattr(fresh_loader, "_built_for", lambda path: torch.__version__.split("+")[0])

    def fail():
        raise ImportError("/somewhere/_C.so: undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(fresh_loader, "_import", fail)
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        assert fresh_loader.loaded() is False
    assert "undefined symbol" in fresh_loader.load_error()


def test_marker_read_from_the_library_file(tmp_path):
    lib = tmp_path / "_C.so"
    lib.write_bytes(b"\x7fELF...\x00STN_KERNELS_BUILT_FOR_TORCH=2.11.0;CUDA=13.0;\x00...")
    assert _extension._built_for(str(lib)) == "2.11.0"
    lib.write_bytes(b"\x7fELF no marker")
    assert _extension._built_for(str(lib)) is None
    assert _extension._built_for(str(tmp_path / "missing.so")) is None


# ----------------------------------------------------------------------------- registration


def test_extension_loads_and_registers_cuda_kernels():
    _require_built()
    from stn_kernels import cuda_ops

    assert _extension.loaded(), _extension.load_error()
    import stn_kernels._C as ext

    assert ext.TORCH_VERSION == torch.__version__.split("+")[0]
    assert _extension._built_for(_extension._find()) == ext.TORCH_VERSION
    for name in (EPILOGUE, REDUCE):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    # The kernels were registered against the schemas cuda_ops defines.
    op = torch.ops.stn_kernels._cuda_hyper_linear_backward_reduce.default
    assert str(op._schema) == "stn_kernels::" + cuda_ops.SCHEMAS[REDUCE]
    assert str(torch.ops.stn_kernels._cuda_hyper_linear_epilogue.default._schema) == \
        "stn_kernels::" + cuda_ops.SCHEMAS[EPILOGUE]


def test_private_ops_fake_kernels():
    """Shapes and dtypes through the fake (meta) kernels."""
    from stn_kernels import cuda_ops  # noqa: F401  (defines the ops)

    M, N, H = 6, 10, 3
    meta = dict(device="meta")
    z = torch.empty(M, N, dtype=F16, **meta)
    lam = torch.empty(M, H, **meta)
    V = torch.empty(N, H, **meta)
    b = torch.empty(N, dtype=F16, **meta)
    out = torch.ops.stn_kernels._cuda_hyper_linear_epilogue(z, z, lam, V, b, b, V)
    assert out.shape == (M, N) and out.dtype == F16
    res = torch.ops.stn_kernels._cuda_hyper_linear_backward_reduce(
        z, z, lam, V, b, V, True, True, True, True, True, True, False)
    assert [tuple(t.shape) for t in res] == [(M, N), (M, H), (N, H), (N, H), (N,), (N,)]
    assert [t.dtype for t in res] == [F16, F32, F32, F32, F16, F16]
    res = torch.ops.stn_kernels._cuda_hyper_linear_backward_reduce(
        z, None, lam, V, None, None, False, False, False, True, True, True, True)
    assert [t.numel() for t in res] == [0, 0, 0, 0, N, 0]


def test_cuda_backend_refuses_cpu_tensors():
    x, hp, m = _small_inputs()
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        m(x, hp)
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        resolve_backend(x.device, "stn_kernels::hyper_linear", ("reference", "triton", "cuda"))
    from stn_kernels import cuda_ops

    args = (x, hp, m.weight, m.hyper_weight, m.bias, m.hyper_bias, *m._scales())
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only"):
        cuda_ops.hyper_linear_forward(*args)


# ----------------------------------------------------------------------------- auto rules


def test_committed_rules_table_has_no_guessed_entries():
    with open(backend_rules.RULES_FILE, encoding="utf-8") as f:
        import json

        raw = json.load(f)
    table = backend_rules.load_rules()
    if not raw.get("measured"):
        assert raw["rules"] == {}, "an unmeasured table must not choose"
        assert "No GPU measurements" in raw["note"]
    assert table["default"] == "triton"
    for m in (1, 64, 65, 128, 4096, 10 ** 6):
        for dtype in (F32, F16, BF16):
            assert backend_rules.auto_choice(m, dtype) in ("triton", "cuda")
    assert backend_rules.auto_choice(128, F16, backend_rules.EMPTY_TABLE) == "triton"


def test_auto_follows_the_rules_table(tmp_path, monkeypatch):
    """"auto" on CUDA tensors: triton, except in classes the table gives to cuda (extension loaded)."""
    import inspect

    from stn_kernels import _backend

    if "rows" not in inspect.signature(resolve_backend).parameters:
        pytest.skip("resolve_backend does not take the problem's rows and dtype yet")
    table = dict(backend_rules.EMPTY_TABLE, measured=True, rules={"float16/M<=256": "cuda"})
    path = tmp_path / "rules.json"
    backend_rules.write_rules(table, str(path))
    real_load = backend_rules.load_rules
    monkeypatch.setattr(backend_rules, "load_rules", lambda p=None: real_load(str(path)))
    monkeypatch.setattr(_backend, "_triton_importable", lambda: True)
    monkeypatch.setattr(_backend, "cuda_extension_available", lambda device: True)
    cuda, both = torch.device("cuda"), ("triton", "cuda")
    impl = ("reference", "triton", "cuda")

    def pick(rows, dtype, auto_choices=both):
        return resolve_backend(cuda, "stn_kernels::hyper_linear", impl, auto_choices, rows=rows, dtype=dtype)

    assert pick(128, F16) == "cuda"
    assert pick(1000, F16) == "triton" and pick(128, BF16) == "triton"
    assert pick(128, F16, ("triton",)) == "triton"  # cuda not among the op's auto choices
    assert resolve_backend(cuda, "stn_kernels::hyper_linear", impl, both) == "triton"  # no shape given
    assert resolve_backend(torch.device("cpu"), "stn_kernels::hyper_linear", impl, both, rows=128,
                           dtype=F16) == "reference"
    monkeypatch.setattr(_backend, "cuda_extension_available", lambda device: False)
    assert pick(128, F16) == "triton"  # the table's choice needs the extension loaded
    monkeypatch.setattr(_backend, "_triton_importable", lambda: False)
    assert pick(1000, F16) == "reference"


def test_rules_regenerated_from_results_csv(tmp_path):
    csv_path = tmp_path / "results.csv"
    header = "case,B,H,K,N,dtype,mode,provider,median_ms,samples,vs_published,vs_floor,wall_ms,peak_mib," \
             "mem_vs_published,note\n"
    rows = [
        # M=128 float16: cuda faster on both cases -> cuda
        ("alexnet-fc1", 128, "float16", "fwd+bwd", "stn:triton", 0.10, ""),
        ("alexnet-fc1", 128, "float16", "fwd+bwd", "stn:cuda", 0.08, ""),
        ("mlp-fc1", 128, "float16", "fwd+bwd", "stn:triton", 0.05, ""),
        ("mlp-fc1", 128, "float16", "fwd+bwd", "stn:cuda", 0.045, ""),
        # M=4096 float16: cuda 3 % faster, inside the margin -> triton
        ("large-4k", 4096, "float16", "fwd+bwd", "stn:triton", 2.0, ""),
        ("large-4k", 4096, "float16", "fwd+bwd", "stn:cuda", 1.94, ""),
        # M=40 bfloat16: cuda faster but its result mismatched -> left out, no entry
        ("lstm-i2h", 40, "bfloat16", "fwd+bwd", "stn:triton", 0.09, ""),
        ("lstm-i2h", 40, "bfloat16", "fwd+bwd", "stn:cuda", 0.05, "mismatch: dx 0.3"),
        # other modes and providers are ignored
        ("alexnet-fc1", 128, "float32", "fwd", "stn:cuda", 0.01, ""),
        ("alexnet-fc1", 128, "float32", "fwd", "published", 0.5, ""),
    ]
    with open(csv_path, "w") as f:
        f.write(header)
        for case, b, dtype, mode, provider, ms, note in rows:
            f.write(f"{case},{b},15,1024,4096,{dtype},{mode},{provider},{ms},10,,,,,,{note}\n")
    table = backend_rules.rules_from_results([str(csv_path)], device="test GPU")
    assert table["rules"] == {"float16/M<=256": "cuda", "float16/M<=4096": "triton"}
    assert table["measured"] is True
    assert table["evidence"]["float16/M<=256"]["cases"] == ["alexnet-fc1", "mlp-fc1"]
    out = tmp_path / "rules.json"
    backend_rules.write_rules(table, str(out))
    loaded = backend_rules.load_rules(str(out))
    assert backend_rules.auto_choice(100, F16, loaded) == "cuda"
    assert backend_rules.auto_choice(300, F16, loaded) == "triton"
    assert backend_rules.auto_choice(40, BF16, loaded) == "triton"
    assert backend_rules.auto_choice(100, F32, loaded) == "triton"
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 1, "rules": {"float16/M<=64": "cudnn"}}')
    with pytest.warns(RuntimeWarning, match="ignoring"):
        assert backend_rules.load_rules(str(bad))["rules"] == {}


# ----------------------------------------------------------------------------- CPU emulation of the kernels

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_CODES = {F32: 0, F16: 1, BF16: 2}


def _rows(t):
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _rs(t):
    return 0 if t is None else t.stride(0)


class Emulated:
    """The kernels of csrc/hyper_linear_kernels.cuh, run by csrc/emulate/ on CPU tensors."""

    def __init__(self, path):
        lib = self.lib = ctypes.CDLL(str(path))
        lib.stn_hl_epilogue.argtypes = [_INT, _INT] + [_P, _I64] * 6 + [_P, _P, _I64, _I64, _I64, _P]
        lib.stn_hl_epilogue.restype = _INT
        lib.stn_hl_reduce_workspace_bytes.argtypes = [_I64, _I64, _I64] + [_INT] * 5
        lib.stn_hl_reduce_workspace_bytes.restype = _I64
        lib.stn_hl_reduce.argtypes = ([_INT, _INT] + [_P, _I64] * 5 + [_P, _P, _I64] + [_P] * 5
                                      + [_I64, _I64, _I64, _INT, _P, _I64, _P])
        lib.stn_hl_reduce.restype = _INT
        lib.stn_hl_emu_set_sms.argtypes = [_INT]
        lib.stn_hl_error_string.argtypes = [_INT]
        lib.stn_hl_error_string.restype = ctypes.c_char_p

    def set_sms(self, n):
        self.lib.stn_hl_emu_set_sms(n)

    def epilogue(self, acc, z, out, lam, V, C=None, be=None, bh=None):
        M, N = z.shape
        return self.lib.stn_hl_epilogue(_CODES[z.dtype], _CODES[lam.dtype], _ptr(acc), _rs(acc), _ptr(z), _rs(z),
                                        _ptr(out), _rs(out), _ptr(lam), _rs(lam), _ptr(V), _rs(V), _ptr(C), _rs(C),
                                        _ptr(be), _ptr(bh), M, N, lam.shape[1], None)

    def reduce(self, g, z, lam, V, C, bh, gs, dlam, dv, dc, dbe, dbh, deterministic):
        M, N = g.shape
        H = lam.shape[1]
        nbytes = self.lib.stn_hl_reduce_workspace_bytes(M, N, H, int(deterministic), dlam is not None,
                                                        dv is not None, dc is not None or dbh is not None,
                                                        dbe is not None)
        ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8)  # NaN-filled float32 partial sums
        return self.lib.stn_hl_reduce(_CODES[g.dtype], _CODES[lam.dtype], _ptr(g), _rs(g), _ptr(z), _rs(z),
                                      _ptr(lam), _rs(lam), _ptr(V), _rs(V), _ptr(C), _rs(C), _ptr(bh),
                                      _ptr(gs), _rs(gs), _ptr(dlam), _ptr(dv), _ptr(dc), _ptr(dbe), _ptr(dbh),
                                      M, N, H, int(deterministic), ws.data_ptr(), nbytes, None)


@pytest.fixture(scope="session")
def emu():
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CPU emulation of the kernels")
    sources = [ROOT / "csrc" / "emulate" / "emulator.h", ROOT / "csrc" / "emulate" / "host_kernels.cpp",
               ROOT / "csrc" / "hyper_linear_kernels.cuh", ROOT / "csrc" / "hyper_linear_kernels.h"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + cxx.encode())
    out_dir = ROOT / "build" / "stn_emulate" / digest.hexdigest()[:16]
    lib = out_dir / "libstn_hl_emu.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"tmp-{os.getpid()}.so"
        cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-w",
               str(ROOT / "csrc" / "emulate" / "host_kernels.cpp"), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"building the kernel emulation failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        os.replace(tmp, lib)
    emulated = Emulated(lib)
    yield emulated
    emulated.set_sms(4)


def _nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _d(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_emulated_conversions_match_torch(emu, dtype):
    """The emulation's half / bfloat16 conversions round like torch (and the GPU): bit for bit."""
    emu.set_sms(4)
    gen = torch.Generator().manual_seed(7)
    M, N = 16, 256
    scale = torch.logspace(-9, 5.2, N)  # subnormal halves up to overflow (65520 and beyond)
    g = (torch.randn(M, N, generator=gen) * scale).to(dtype)
    g[0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    v = torch.randn(N, 1, generator=gen) * 3
    lam = torch.ones(M, 1)
    gs = _nan(M, N, dtype=dtype)
    assert emu.reduce(g, None, lam, v, None, None, gs, None, None, None, None, None, True) == 0
    want = (g.float() * v.t()).to(dtype)  # one float32 product, rounded once: as the kernel
    assert torch.equal(gs.view(torch.int16), want.view(torch.int16))
    # Through the epilogue with s = 0 and no biases, acc comes back unchanged (but -0 + 0 = +0).
    out = _nan(M, N, dtype=dtype)
    assert emu.epilogue(g, torch.zeros(M, N, dtype=dtype), out, lam, torch.zeros(N, 1)) == 0
    assert torch.equal(out.view(torch.int16), (g.float() + 0.0).to(dtype).view(torch.int16))


EPILOGUE_CASES = [
    # M, N, H, dtype, lam dtype, sms    (aligned: N a multiple of 16 bytes of dtype)
    pytest.param(1, 53, 1, F32, F32, 4, id="M1-N53-H1-f32-unaligned"),
    pytest.param(33, 64, 4, F32, F32, 4, id="M33-N64-H4-f32-aligned"),
    pytest.param(37, 96, 16, F16, F32, 4, id="M37-N96-H16-f16-lamf32-aligned"),
    pytest.param(37, 100, 7, F16, F16, 4, id="M37-N100-H7-f16-unaligned"),
    pytest.param(70, 256, 20, BF16, BF16, 4, id="M70-N256-H20-bf16-aligned-2chunks"),
    pytest.param(70, 250, 33, BF16, F32, 4, id="M70-N250-H33-bf16-unaligned-3chunks"),
    pytest.param(200, 136, 3, F32, F32, 1, id="M200-N136-H3-f32-tiles-per-block"),
    pytest.param(150, 72, 24, F32, F32, 1, id="M150-N72-H24-f32-2chunks-tiles-per-block"),
]


@pytest.mark.parametrize("with_acc", [True, False])
@pytest.mark.parametrize("M,N,H,dtype,ldt,sms", EPILOGUE_CASES)
def test_emulated_epilogue(emu, M, N, H, dtype, ldt, sms, with_acc):
    emu.set_sms(sms)
    gen = torch.Generator().manual_seed(M * N + H)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    acc, z, lam, V, C, be, bh = rnd(M, N), rnd(M, N), rnd(M, H, dt=ldt), rnd(N, H, dt=ldt), rnd(N, H, dt=ldt), \
        rnd(N), rnd(N)
    for biases in ((be, bh, C), (None, None, None), (None, bh, C), (be, None, None)):
        b, hb, c = biases
        out = _nan(M, N, dtype=dtype)
        assert emu.epilogue(acc if with_acc else None, z, out, lam, V, c, b, hb) == 0
        want = (_d(lam) @ _d(V).t()) * _d(z)
        if with_acc:
            want = want + _d(acc)
        if b is not None:
            want = want + _d(b)
        if hb is not None:
            want = want + (_d(lam) @ _d(c).t()) * _d(hb)
        close(out, want, dtype if dtype != F32 else F32, "out")


def test_emulated_epilogue_strided(emu):
    """Row strides other than N (views of wider buffers), and hparams shared by the batch (row stride 0)."""
    emu.set_sms(4)
    M, N, H = 21, 64, 5
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(M, N + 8, generator=gen)
    acc, z = wide[:, 4:4 + N], torch.randn(M, N + 16, generator=gen)[:, :N]
    lam = torch.randn(H, generator=gen).expand(M, H)
    V, C = torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)
    be, bh = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    out_buf = _nan(M, N + 4, dtype=F32)
    out = out_buf[:, :N]
    assert lam.stride(0) == 0 and acc.stride(0) == N + 8
    assert emu.epilogue(acc, z, out, lam, V, C, be, bh) == 0
    want = _d(acc) + (_d(lam) @ _d(V).t()) * _d(z) + _d(be) + (_d(lam) @ _d(C).t()) * _d(bh)
    close(out, want, F32, "out")
    assert torch.isnan(out_buf[:, N:]).all(), "wrote outside the view"


REDUCE_CASES = [
    # M, N, H, dtype, lam dtype, sms
    pytest.param(1, 53, 1, F32, F32, 4, id="M1-N53-H1-f32"),
    pytest.param(33, 53, 7, F32, F32, 4, id="M33-N53-H7-f32"),
    pytest.param(70, 300, 15, F16, F32, 1, id="M70-N300-H15-f16-lamf32"),
    pytest.param(70, 256, 20, BF16, BF16, 4, id="M70-N256-H20-bf16-2chunks"),
    pytest.param(200, 136, 3, F32, F32, 64, id="M200-N136-H3-f32-7row-chunks"),
    pytest.param(45, 130, 40, F16, F16, 2, id="M45-N130-H40-f16-3chunks"),
]


def _reduce_reference(g, z, lam, V, C, bh):
    G, Z, L, VV = _d(g), _d(z), _d(lam), _d(V)
    ref = {"gs": G * (L @ VV.t()), "dlam": (G * Z) @ VV, "dv": (G * Z).t() @ L, "dbe": G.sum(0)}
    if C is not None:
        CC, BH = _d(C), _d(bh)
        ref["dlam"] = ref["dlam"] + (G * BH) @ CC
        ref["dc"] = (G * BH).t() @ L
        ref["dbh"] = (G * (L @ CC.t())).sum(0)
    return ref


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("M,N,H,dtype,ldt,sms", REDUCE_CASES)
def test_emulated_reduce(emu, M, N, H, dtype, ldt, sms, deterministic):
    emu.set_sms(sms)
    gen = torch.Generator().manual_seed(M + N + H)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    g, z, lam, V, C, bh = rnd(M, N), rnd(M, N), rnd(M, H, dt=ldt), rnd(N, H, dt=ldt), rnd(N, H, dt=ldt), rnd(N)
    ref = _reduce_reference(g, z, lam, V, C, bh)
    masks = [
        ("gs", "dlam", "dv", "dc", "dbe", "dbh"),
        ("gs",),
        ("dlam", "dv"),
        ("dc", "dbh", "dbe"),
        ("dlam",),
    ]
    for wanted in masks:
        outs = {"gs": _nan(M, N, dtype=dtype), "dlam": _nan(M, H, dtype=ldt), "dv": _nan(N, H, dtype=ldt),
                "dc": _nan(N, H, dtype=ldt), "dbe": _nan(N, dtype=dtype), "dbh": _nan(N, dtype=dtype)}
        outs = {k: (v if k in wanted else None) for k, v in outs.items()}
        needs_z = "dlam" in wanted or "dv" in wanted
        code = emu.reduce(g, z if needs_z else None, lam, V, C, bh, outs["gs"], outs["dlam"], outs["dv"],
                          outs["dc"], outs["dbe"], outs["dbh"], deterministic)
        assert code == 0
        for k in wanted:
            close(outs[k], ref[k], dtype, f"{k} (asked for {wanted})")


def test_emulated_reduce_without_hyper_bias_and_strided(emu):
    """No hyper bias (dλ from g⊙z only); g and z views with row strides > N; shared hparams."""
    emu.set_sms(3)
    M, N, H = 40, 72, 6
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(M, N + 5, generator=gen)[:, 2:2 + N]
    z = torch.randn(M, N + 9, generator=gen)[:, :N]
    lam = torch.randn(H, generator=gen).expand(M, H)
    V = torch.randn(N, H, generator=gen)
    ref = _reduce_reference(g, z, lam, V, None, None)
    gs, dlam, dv, dbe = _nan(M, N, dtype=F32), _nan(M, H, dtype=F32), _nan(N, H, dtype=F32), _nan(N, dtype=F32)
    assert emu.reduce(g, z, lam, V, None, None, gs, dlam, dv, None, dbe, None, True) == 0
    for name, got in (("gs", gs), ("dlam", dlam), ("dv", dv), ("dbe", dbe)):
        close(got, ref[name], F32, name)
    # dC / db_h without a hyper bias are refused.
    assert emu.reduce(g, z, lam, V, None, None, None, None, None, _nan(N, H, dtype=F32), None, None, True) != 0


def test_emulated_reduce_deterministic_repeats_bitwise(emu):
    emu.set_sms(8)
    gen = torch.Generator().manual_seed(11)
    M, N, H = 150, 200, 9
    g, z, lam, V, C, bh = (torch.randn(*s, generator=gen) for s in ((M, N), (M, N), (M, H), (N, H), (N, H), (N,)))
    runs = []
    for _ in range(2):
        outs = [_nan(M, N, dtype=F32), _nan(M, H, dtype=F32), _nan(N, H, dtype=F32), _nan(N, H, dtype=F32),
                _nan(N, dtype=F32), _nan(N, dtype=F32)]
        assert emu.reduce(g, z, lam, V, C, bh, *outs, True) == 0
        runs.append(outs)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- cuda_ops over the emulation


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
    """stn_kernels.cuda_ops with its private ops running the emulated kernels on CPU tensors."""
    from stn_kernels import cuda_ops

    emu.set_sms(4)
    lib = torch.library.Library("stn_kernels", "IMPL")
    lib.impl("_cuda_hyper_linear_epilogue", _cpu_epilogue(emu), "CPU")
    lib.impl("_cuda_hyper_linear_backward_reduce", _cpu_reduce(emu), "CPU")
    monkeypatch.setattr(cuda_ops, "_require", lambda x: None)
    try:
        yield cuda_ops
    finally:
        lib._destroy()


@pytest.mark.parametrize("M,K,N,H,dtype,ldt", [
    (1, 37, 53, 1, F32, F32), (33, 37, 53, 7, F32, F32), (5, 70, 64, 16, F16, F32), (33, 37, 53, 20, BF16, BF16)])
def test_cuda_ops_over_emulation(emulated_backend, M, K, N, H, dtype, ldt):
    inputs, g = make(M, K, N, H, dtype, lam_dtype=ldt)
    run_and_check(emulated_backend, inputs, g)


@pytest.mark.parametrize("variant", ["no_hparams", "no_biases", "hyper_bias_only", "bias_only"])
def test_cuda_ops_over_emulation_variants(emulated_backend, variant):
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
def test_cuda_ops_over_emulation_output_mask(emulated_backend, mask):
    inputs, g = make(33, 37, 53, 7, F32)
    run_and_check(emulated_backend, inputs, g, mask=list(mask))


def test_cuda_ops_over_emulation_recomputes_z_and_falls_back(emulated_backend):
    inputs, g = make(5, 37, 53, 7, F32)
    run_and_check(emulated_backend, inputs, g, z_given=False)
    inputs, g = make(5, 7, 6, 3, torch.float64)  # a dtype the kernels do not take: the reference runs
    run_and_check(emulated_backend, inputs, g)


def test_cuda_ops_over_emulation_deterministic(emulated_backend):
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
    _require_built()
    assert _extension.loaded(), _extension.load_error()
    from stn_kernels import cuda_ops

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield cuda_ops
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
    from stn_kernels import ops

    if "cuda" not in ops._KERNEL_MODULES["hyper_linear"]:
        pytest.skip("stn_kernels.ops does not route hyper_linear to the 'cuda' backend yet")
    torch.manual_seed(0)
    m = stn_kernels.HyperLinear(37, 53, 7).cuda()
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
