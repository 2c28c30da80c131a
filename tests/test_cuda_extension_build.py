"""The optional compiled CUDA extension (``stn_kernels._C``, csrc/): how it is built and loaded.

Without a GPU:
* the build decision of setup.py (STN_KERNELS_BUILD_CUDA=0, no sources, FORCE_CUDA, finding the
  toolkit behind an nvcc wrapper), and that the extension is built where nvcc is;
* the guarded loader (stn_kernels.backends.extension: missing build, build for another torch:
  warning naming both versions, load failure) and that the other backends keep working;
* the registration of the private ops' CUDA kernels against the schemas stn_kernels.ops.hyper_linear
  defines, and their fake kernels.
The kernels themselves: tests/test_cuda_emulated_kernels.py (CPU emulation) and
tests/test_cuda_hyper_linear.py (the "cuda" backend, over the emulation and on a GPU).
"""

import importlib.util
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from stn_kernels.backends import BackendUnavailableError, extension, resolve_backend, use_backend
from stn_kernels.ops import hyper_linear as hyper_linear_ops

from _cuda import extension_build_expected, require_extension_built, small_hyper_linear

ROOT = Path(__file__).resolve().parents[1]
F32 = torch.float32
F16 = torch.float16
EPILOGUE = "stn_kernels::_cuda_hyper_linear_epilogue"
REDUCE = "stn_kernels::_cuda_hyper_linear_backward_reduce"


def _load_setup():
    spec = importlib.util.spec_from_file_location("stn_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() runs only as __main__
    return module


# ----------------------------------------------------------------------------- setup.py


def test_setup_skips_the_build_when_disabled():
    """`python setup.py` with STN_KERNELS_BUILD_CUDA=0 and STN_KERNELS_BUILD_HOST=0 decides not to build either
    extension (and imports no torch)."""
    env = {**os.environ, "STN_KERNELS_BUILD_CUDA": "0", "STN_KERNELS_BUILD_HOST": "0"}
    code = ("import runpy, sys; sys.argv = ['setup.py', '--name']; runpy.run_path('setup.py', run_name='__main__'); "
            "print('torch imported:', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not building the CUDA extension (STN_KERNELS_BUILD_CUDA=0)" in proc.stdout
    assert "not building the host extension (STN_KERNELS_BUILD_HOST=0)" in proc.stdout
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
    if not extension_build_expected():
        pytest.skip("no nvcc on the PATH (or STN_KERNELS_BUILD_CUDA=0): nothing is built here")
    require_extension_built()


# ----------------------------------------------------------------------------- loader


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not run yet (the real state comes back after the test)."""
    fresh = extension.GuardedExtension(extension.CUDA.name, extension.CUDA.what, extension.CUDA.without,
                                       extension.CUDA.built_where)
    monkeypatch.setattr(extension, "CUDA", fresh)
    return fresh


def test_loader_missing_build(fresh_loader, monkeypatch):
    monkeypatch.setattr(fresh_loader, "_find", lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh_loader.loaded() is False
    assert "not built" in fresh_loader.load_error()
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="not built"):
        resolve_backend("hyper_linear", torch.device("cuda"))


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
        resolve_backend("hyper_linear", torch.device("cuda"))
    # The other backends still work.
    x, hp, m = small_hyper_linear()
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
    assert extension._built_for(str(lib)) == "2.11.0"
    lib.write_bytes(b"\x7fELF no marker")
    assert extension._built_for(str(lib)) is None
    assert extension._built_for(str(tmp_path / "missing.so")) is None


# ----------------------------------------------------------------------------- registration


def test_extension_loads_and_registers_cuda_kernels():
    require_extension_built()
    assert extension.loaded(), extension.load_error()
    import stn_kernels._C as ext

    assert ext.TORCH_VERSION == torch.__version__.split("+")[0]
    assert extension._built_for(extension._find()) == ext.TORCH_VERSION
    for name in (EPILOGUE, REDUCE):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    # The kernels were registered against the schemas cuda defines.
    op = torch.ops.stn_kernels._cuda_hyper_linear_backward_reduce.default
    assert str(op._schema) == "stn_kernels::" + hyper_linear_ops.CUDA_SCHEMAS[REDUCE]
    assert str(torch.ops.stn_kernels._cuda_hyper_linear_epilogue.default._schema) == \
        "stn_kernels::" + hyper_linear_ops.CUDA_SCHEMAS[EPILOGUE]


def test_private_ops_fake_kernels():
    """Shapes and dtypes through the fake (meta) kernels."""
    import stn_kernels.ops  # noqa: F401  (defines the ops)

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
