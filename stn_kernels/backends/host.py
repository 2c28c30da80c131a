"""The compiled host paths of the modules (``stn_kernels._host``, csrc/host/): optional, loaded on first use.

At the STN shapes a layer's arithmetic on the CPU costs less than the Python around its ops. The extension runs
the reference's ATen ops, in the reference's order, from C++, with a C++ autograd Function (its backward runs
without Python): the same numbers as the reference path, less host time per call. The modules use it on their
fast path (:mod:`stn_kernels.modules`) when the backend resolved for the call is the reference, the tensors are
on the CPU and every float tensor has one dtype (float32 or float64); everything else, and every machine where
it is not built (``STN_KERNELS_BUILD_HOST=0``, no compiler) or was built for another torch, takes the Python
path. ``STN_KERNELS_HOST=0`` switches it off at run time (read when a module first checks its parameters).
"""

from __future__ import annotations

import os

import torch

from .extension import GuardedExtension

HOST = GuardedExtension("stn_kernels._host", "the compiled host extension",
                        "the modules take their Python path (same numbers, more host time per call)",
                        "wherever torch is installed (a C++ compiler is needed)")

HOST_DTYPES = (torch.float32, torch.float64)
OFF_VAR = "STN_KERNELS_HOST"


def switched_off() -> bool:
    """True where ``STN_KERNELS_HOST=0`` switches the host paths off (read now; a module reads it when it first
    checks its parameters)."""
    return os.environ.get(OFF_VAR, "").strip() == "0"


def dropout_ops(x: torch.Tensor):
    """The loaded ``stn_kernels._host`` module when the reference's per-example dropout of ``x`` can run through its
    one-pass kernel (a CPU tensor; every floating dtype; the same bits as the reference), else None.
    ``STN_KERNELS_HOST=0`` is read per call here."""
    if x.device.type != "cpu" or switched_off():
        return None
    return HOST.module()


def host_ops(device: torch.device, dtype: torch.dtype, hparams_dtype: torch.dtype):
    """The loaded ``stn_kernels._host`` module when a module's calls with parameters of this device and dtypes
    can run through it, else None."""
    if device.type != "cpu" or dtype not in HOST_DTYPES or hparams_dtype != dtype or switched_off():
        return None
    return HOST.module()
