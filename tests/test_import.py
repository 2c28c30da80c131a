"""`import stn_kernels` is cheap: no Triton kernel module, no compiled extension, no CUDA initialisation,
no process group; the ops are registered."""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import torch
import stn_kernels
ops = torch.ops.stn_kernels
print(json.dumps({
    "kernel_modules": sorted(m for m in sys.modules if m.startswith("stn_kernels.backends.triton")),
    "triton_imported": "triton" in sys.modules,
    "extension_imported": "stn_kernels._C" in sys.modules,
    "cuda_initialized": torch.cuda.is_initialized(),
    "distributed_initialized": torch.distributed.is_available() and torch.distributed.is_initialized(),
    "ops": {name: hasattr(ops, name) for name in (
        "hyper_linear", "hyper_linear_backward", "hyper_conv2d", "hyper_conv2d_backward",
        "hyper_embedding", "hyper_embedding_backward", "hyper_lstm_recurrence",
        "hyper_lstm_recurrence_backward", "per_example_dropout")},
    "public": [name for name in ("hyper_linear", "hyper_conv2d", "hyper_embedding", "HyperLinear",
                                 "HyperConv2d", "HyperEmbedding", "HyperLSTM", "HyperLSTMCell", "convert",
                                 "use_backend", "BackendUnavailableError")
               if not hasattr(stn_kernels, name)],
}))
"""


@pytest.fixture(scope="module")
def probe():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("STN_KERNELS_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_triton_kernel_module_imported(probe):
    assert probe["kernel_modules"] == []


def test_triton_itself_not_imported(probe):
    """Triton loads on first use of the triton backend only (a plain `import torch` does not import it)."""
    assert not probe["triton_imported"]


def test_no_compiled_extension_loaded(probe):
    assert not probe["extension_imported"]


def test_cuda_not_initialized(probe):
    assert probe["cuda_initialized"] is False


def test_no_process_group_initialized(probe):
    """stn_kernels.stn.distributed asks for the process group only when its functions are called."""
    assert probe["distributed_initialized"] is False


def test_ops_registered(probe):
    assert probe["ops"] == {name: True for name in probe["ops"]}
    assert len(probe["ops"]) == 9


def test_public_names(probe):
    assert probe["public"] == []
