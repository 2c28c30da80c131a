"""Backend resolution rules (no kernel runs here: resolve_backend only reads the device type)."""

import pytest
import torch

import stn_kernels
from stn_kernels import ops
from stn_kernels._backend import resolve_backend

CUDA = torch.device("cuda")


def _auto(op):
    return resolve_backend(CUDA, op, ("reference", *ops._KERNEL_MODULES[op]), ops._AUTO_CHOICES[op])


def test_auto_on_cuda_takes_only_gpu_checked_kernels():
    pytest.importorskip("triton")
    assert _auto("hyper_linear") == "triton"
    # Interpreter-tested only: opt-in until a GPU run checks them.
    assert _auto("hyper_conv2d") == "reference"
    assert _auto("hyper_embedding") == "reference"


def test_auto_on_cpu_is_the_reference():
    for op in ops._KERNEL_MODULES:
        assert resolve_backend(torch.device("cpu"), op, ("reference", *ops._KERNEL_MODULES[op]),
                               ops._AUTO_CHOICES[op]) == "reference"


def test_explicit_backend_without_a_kernel_for_the_op_raises():
    with stn_kernels.use_backend("cuda"):
        with pytest.raises(stn_kernels.BackendUnavailableError, match="hyper_conv2d.*'cuda'"):
            resolve_backend(CUDA, "stn_kernels::hyper_conv2d", ("reference", "triton"), ())


def test_use_backend_is_seen_from_other_threads():
    """The autograd engine runs CUDA backward ops on worker threads: they must see the same backend."""
    import threading

    seen = []
    with stn_kernels.use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(stn_kernels.requested_backend()))
        thread.start()
        thread.join()
    assert seen == ["reference"]
    assert stn_kernels.requested_backend() == "auto"
