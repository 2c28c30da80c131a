"""Which backend the user asked for: ``use_backend`` and the ``STN_KERNELS_BACKEND`` variable.

The request is read when an op runs (inside the op, below autograd and torch.compile),
from the innermost ``use_backend`` block, else the environment variable, else
``"auto"``. The setting is process-wide, like the ``torch.backends`` flags, not
thread- or context-local: the autograd engine runs CUDA backward ops on its own
worker threads, which must see the same backend as the forward. Whether the
requested backend can run an op is decided by :mod:`stn_kernels.backends.registry`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

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


# os.environ.get costs about 0.6 µs (it encodes the key on every call), and every op call asks, forward and
# backward: the mapping's own dict is read with the key encoded once (os.environ.get where it has none).
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not None and hasattr(os.environ, "encodekey") else None


def _env_value():
    if _ENV_KEY is None:
        return os.environ.get(ENV_VAR)
    raw = _ENVIRON.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def requested_backend() -> str:
    """The backend name in force here (not yet checked against an op or a device)."""
    if _override_stack:
        return _override_stack[-1]
    env = _env_value()
    if env:
        return _check_name(env.strip().lower(), f"environment variable {ENV_VAR}")
    return "auto"


def request_source() -> str:
    """Where the request of :func:`requested_backend` comes from: ``"use_backend"`` (an enclosing block),
    ``"STN_KERNELS_BACKEND"`` (the environment variable) or ``"default"``."""
    if _override_stack:
        return "use_backend"
    return ENV_VAR if _env_value() else "default"


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
