"""Markers with auto-skip: ``gpu`` needs CUDA; ``triton`` needs a GPU or the
Triton interpreter, which is switched on here, before any kernel module is
imported, when there is no GPU."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# One fixed Triton config in tests: several would each be compiled (GPU) or fail (interpreter).
os.environ.setdefault("STN_KERNELS_TRITON_AUTOTUNE", "0")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="needs Triton, and a GPU or TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not (HAS_TRITON and (HAS_CUDA or INTERPRETING)):
            item.add_marker(skip_triton)


@pytest.fixture
def nan_poison(monkeypatch):
    """``nan_poison(module, ...)``: every buffer those Triton kernel modules allocate through their ``_alloc``
    (the buffers their kernels write in full) starts as NaN, for this test."""
    from _naive import nan_empty

    def poison(*modules):
        for module in modules:
            monkeypatch.setattr(module, "_alloc", nan_empty)

    return poison


@pytest.fixture
def seeded_no_tf32():
    """torch.manual_seed(0) and no TF32 in float32 matmuls (restored after the test)."""
    torch.manual_seed(0)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="session")
def emu():
    """The CUDA kernels of csrc/ built with g++ for a CPU emulation of the CUDA execution model (tests/_cuda.py)."""
    from _cuda import build_emulation

    emulated = build_emulation()
    if emulated is None:
        pytest.skip("no C++ compiler for the CPU emulation of the kernels")
    yield emulated
    emulated.set_sms(4)


@pytest.fixture
def one_thread():
    """torch on one thread: gradchecks on a shared 2-core machine slow down badly once a large conv
    has started torch's thread pool (see tests/_naive.py single_threaded)."""
    from _naive import single_threaded

    with single_threaded():
        yield


@pytest.fixture
def host_built():
    """Skips a test of the compiled host paths where stn_kernels._host is not loaded (tests/test_host_extension.py
    fails where it should have been built)."""
    from stn_kernels.backends import host

    if not host.HOST.loaded():
        pytest.skip(f"stn_kernels._host is not loaded: {host.HOST.load_error()} (tests/test_host_extension.py "
                    "fails where it should be built)")
