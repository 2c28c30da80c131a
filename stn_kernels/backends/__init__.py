"""Backends: which one runs each op (``use_backend``, the one table in :mod:`.registry`) and the
backend modules themselves (:mod:`.triton`, :mod:`.cuda` with its loader :mod:`.extension` and
measured choice :mod:`.rules`; :mod:`.fallback` for what the fused kernels hand to the reference).

Importing this package imports no Triton and loads no compiled extension.
"""

from .registry import TABLE, OpBackends, kernels, load, resolve_backend
from .selection import BACKENDS, ENV_VAR, BackendUnavailableError, requested_backend, use_backend

__all__ = ["BACKENDS", "ENV_VAR", "TABLE", "BackendUnavailableError", "OpBackends", "kernels", "load",
           "requested_backend", "resolve_backend", "use_backend"]
