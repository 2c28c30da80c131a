"""Backend selection: ``use_backend`` and the ``STN_KERNELS_BACKEND`` variable.

The backend is resolved when an op runs (inside the op, below autograd and
torch.compile), from the innermost ``use_backend`` block, else the environment
variable, else ``"auto"``. The setting is process-wide, like the
``torch.backends`` flags, not thread- or context-local: the autograd engine runs
CUDA backward ops on its own worker threads, which must see the same backend as
the forward. Nothing here touches the GPU at import.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
ENV_VAR = "STN_KERNELS_BACKEND"

_override_stack: list = []  # names from the enclosing use_backend blocks, innermost last


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run the op where it was asked to."""


def _check_name(name, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a backend name (str), got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend name in force here (not yet checked against a device)."""
    if _override_stack:
        return _override_stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env.strip().lower(), f"environment variable {ENV_VAR}")
    return "auto"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops inside the block on backend ``name``.

    ``"auto"`` picks the fastest available one per device, ``"reference"`` the
    pure-PyTorch path, ``"triton"`` the fused Triton kernels (CUDA tensors, or CPU
    tensors under ``TRITON_INTERPRET=1``), ``"cuda"`` the compiled extension.
    A backend that cannot run an op's tensors raises BackendUnavailableError
    when the op runs; there is no silent fallback.
    """
    _override_stack.append(_check_name(name, "use_backend(name)"))
    try:
        yield name
    finally:
        _override_stack.pop()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)  # asked on every call of an op; an import attempt is not free
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device) -> bool:
    if device.type == "cuda":
        return _triton_importable()
    return device.type == "cpu" and triton_interpreting() and _triton_importable()


def cuda_extension_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from . import _extension

    return _extension.loaded()


def _rules_prefer_cuda(rows: Optional[int], dtype: Optional[torch.dtype]) -> bool:
    """Whether the measured table stn_kernels/backend_rules.json picks the compiled extension over
    Triton for this shape class (dtype, bucket of rows); False when the call gives neither."""
    if rows is None or dtype is None:
        return False
    from .backend_rules import prefers_cuda

    return prefers_cuda(rows, dtype)


def resolve_backend(device: torch.device, op: str, implemented: tuple = ("reference",),
                    auto_choices: tuple = (), rows: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The concrete backend ("reference", "triton" or "cuda") for ``op`` on ``device``.

    ``implemented`` names the backends that have a kernel for ``op``; ``auto_choices``
    those of them that "auto" may pick (kernels checked on a GPU). An explicit request
    that cannot run raises BackendUnavailableError; "auto" takes the first of
    ``auto_choices`` that can run on CUDA tensors, else the reference; between triton and
    cuda it follows stn_kernels/backend_rules.json for the problem's ``rows`` and ``dtype``
    (triton where the table has no measured entry).
    """
    name = requested_backend()
    if name == "auto":
        # The fused kernels on CUDA, the reference on the CPU (the interpreter is for testing only).
        if device.type == "cuda":
            triton_ok = "triton" in auto_choices and _triton_importable()
            # Triton, except where the rules table measured the extension faster for this
            # (dtype, rows) class, or where Triton is missing; the extension only if it is loaded.
            if ("cuda" in auto_choices and (not triton_ok or _rules_prefer_cuda(rows, dtype))
                    and cuda_extension_available(device)):
                return "cuda"
            if triton_ok:
                return "triton"
        return "reference"
    if name != "reference" and name not in implemented:
        raise BackendUnavailableError(f"{op}: backend {name!r} has no kernel for this op yet; "
                                      f"available: {', '.join(implemented)} (or 'auto')")
    if name == "triton" and not triton_available(device):
        why = ("Triton is not installed" if not _triton_importable() else
               f"tensors are on {device}; Triton runs CUDA tensors, or CPU tensors only with TRITON_INTERPRET=1 "
               "set before stn_kernels is imported")
        raise BackendUnavailableError(f"{op}: backend 'triton' cannot run here: {why}")
    if name == "cuda" and not cuda_extension_available(device):
        from . import _extension

        why = (f"tensors are on {device}, the extension runs CUDA tensors only" if device.type != "cuda"
               else f"the compiled extension is not loaded ({_extension.load_error() or 'not built'})")
        raise BackendUnavailableError(f"{op}: backend 'cuda' cannot run here: {why}")
    return name
