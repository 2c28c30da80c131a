"""The one backend table of stn_kernels: for each op, the module implementing it on each backend.

    TABLE[op].kernels[backend]()  ->  the module with ``{op}_forward`` (and ``{op}_backward``)
    TABLE[op].auto                ->  the backends "auto" may pick on CUDA tensors

Every op in :mod:`stn_kernels.ops` gets its kernels from :func:`kernels` when it runs, so this
table is where a backend is added to an op. The modules are loaded on first use by the
loaders below (explicit imports, so a reader sees where the GPU path enters): the Triton
kernels and the compiled extension are never imported by ``import stn_kernels``.

"auto" picks only kernels whose tests have passed on a GPU (``benchmarks/results/``): the
conv, embedding, LSTM, dropout, augmentation and affine kernels have run in the Triton interpreter only so far, so
they stay opt-in (``use_backend("triton")``) until a GPU run checks them. Between ``triton``
and ``cuda``, "auto" follows the measured table :mod:`stn_kernels.backends.rules`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from .. import reference, reference_affine, reference_augment, reference_dropout, reference_lstm
from . import extension, rules
from .selection import BackendUnavailableError, requested_backend

Loader = Callable[[], ModuleType]


def _triton_hyper_linear() -> ModuleType:
    from .triton import hyper_linear
    return hyper_linear


def _triton_hyper_conv2d() -> ModuleType:
    from .triton import hyper_conv2d
    return hyper_conv2d


def _triton_hyper_embedding() -> ModuleType:
    from .triton import hyper_embedding
    return hyper_embedding


def _triton_hyper_lstm_recurrence() -> ModuleType:
    from .triton import hyper_lstm_recurrence
    return hyper_lstm_recurrence


def _triton_per_example_dropout() -> ModuleType:
    from .triton import per_example_dropout
    return per_example_dropout


def _triton_augment() -> ModuleType:
    from .triton import augment
    return augment


def _triton_affine() -> ModuleType:
    from .triton import affine
    return affine


def _cuda_hyper_linear() -> ModuleType:
    from . import cuda
    return cuda


@dataclass(frozen=True)
class OpBackends:
    """The backends of one op: a loader per backend name, and what "auto" may pick on CUDA tensors."""

    kernels: Mapping[str, Loader]
    auto: Tuple[str, ...] = ()


TABLE: Dict[str, OpBackends] = {
    "hyper_linear": OpBackends({"reference": lambda: reference, "triton": _triton_hyper_linear,
                                "cuda": _cuda_hyper_linear},
                               auto=("triton",)),  # add "cuda" once its GPU tests have passed on a GPU
    "hyper_conv2d": OpBackends({"reference": lambda: reference, "triton": _triton_hyper_conv2d}),
    "hyper_embedding": OpBackends({"reference": lambda: reference, "triton": _triton_hyper_embedding}),
    "hyper_lstm_recurrence": OpBackends({"reference": lambda: reference_lstm,
                                         "triton": _triton_hyper_lstm_recurrence}),
    "per_example_dropout": OpBackends({"reference": lambda: reference_dropout,
                                       "triton": _triton_per_example_dropout}),
    "augment": OpBackends({"reference": lambda: reference_augment, "triton": _triton_augment}),
    "affine": OpBackends({"reference": lambda: reference_affine, "triton": _triton_affine}),
}

_loaded: Dict[Loader, ModuleType] = {}


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)  # asked on every call of an op; an import attempt is not free
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return triton_importable()
    return device.type == "cpu" and triton_interpreting() and triton_importable()


def cuda_extension_available(device: torch.device) -> bool:
    return device.type == "cuda" and extension.loaded()


def resolve_backend(op: str, device: torch.device, rows: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend ("reference", "triton" or "cuda") that runs ``op`` on ``device`` now.

    An explicit request that cannot run raises BackendUnavailableError; "auto" takes the first
    of ``TABLE[op].auto`` that can run on CUDA tensors, else the reference; between triton and
    cuda it follows the rules table for the problem's ``rows`` and ``dtype`` (triton where the
    table has no measured entry).
    """
    entry = TABLE[op]
    name = requested_backend()
    if name == "auto":
        # The fused kernels on CUDA, the reference on the CPU (the interpreter is for testing only).
        if device.type == "cuda":
            triton_ok = "triton" in entry.auto and triton_importable()
            # Triton, except where the rules table measured the extension faster for this (dtype, rows)
            # class, or where Triton is missing; the extension only if it is loaded.
            if ("cuda" in entry.auto
                    and (not triton_ok or (rows is not None and dtype is not None and rules.prefers_cuda(rows, dtype)))
                    and cuda_extension_available(device)):
                return "cuda"
            if triton_ok:
                return "triton"
        return "reference"
    if name not in entry.kernels:
        raise BackendUnavailableError(f"stn_kernels::{op}: backend {name!r} has no kernel for this op yet; "
                                      f"available: {', '.join(entry.kernels)} (or 'auto')")
    if name == "triton" and not triton_available(device):
        why = ("Triton is not installed" if not triton_importable() else
               f"tensors are on {device}; Triton runs CUDA tensors, or CPU tensors only with TRITON_INTERPRET=1 "
               "set before stn_kernels is imported")
        raise BackendUnavailableError(f"stn_kernels::{op}: backend 'triton' cannot run here: {why}")
    if name == "cuda" and not cuda_extension_available(device):
        raise BackendUnavailableError(f"stn_kernels::{op}: backend 'cuda' cannot run here: "
                                      f"{extension.unavailable_reason(device)}")
    return name


def load(op: str, backend: str) -> ModuleType:
    """The module of ``op`` on ``backend`` (imported on first use)."""
    loader = TABLE[op].kernels[backend]
    module = _loaded.get(loader)
    if module is None:
        module = _loaded[loader] = loader()
    return module


def kernels(op: str, device: torch.device, rows: Optional[int] = None, dtype: Optional[torch.dtype] = None,
            empty: bool = False) -> ModuleType:
    """The module whose ``{op}_forward`` / ``{op}_backward`` run this call: the resolved backend's, or
    the reference's for an empty problem (nothing to launch; the backend is still checked)."""
    backend = resolve_backend(op, device, rows, dtype)
    return load(op, "reference" if empty else backend)
