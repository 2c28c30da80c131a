"""Guarded loading of the optional compiled CUDA extension (``stn_kernels._C``).

Loaded on first use, never at ``import stn_kernels``. A missing build leaves the
other backends working (the normal case on machines without nvcc); a build for
another torch gives a warning naming both versions and is not used.

The torch version a build was made for is read from a marker string in the
library file *before* it is loaded (``STN_KERNELS_BUILT_FOR_TORCH=<version>;``,
see csrc/module.cpp), so a build for another torch is reported instead of being
loaded, which could fail on undefined symbols or, worse, load with a different
ABI. Once loaded, the module's ``TORCH_VERSION`` attribute is checked as well.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import warnings
from typing import Optional

MODULE = "stn_kernels._C"
REBUILD = "pip install --no-build-isolation -e ."
_MARKER = re.compile(rb"STN_KERNELS_BUILT_FOR_TORCH=([0-9A-Za-z.+_-]+);")

_state: dict = {}


def _find() -> Optional[str]:
    """Path of the built extension's library file, or None when it is not built."""
    try:
        spec = importlib.util.find_spec(MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _built_for(path: str) -> Optional[str]:
    """The torch version the library at ``path`` was built against (from its marker), or None."""
    try:
        with open(path, "rb") as f:
            found = _MARKER.search(f.read())
    except OSError:
        return None
    return found.group(1).decode() if found else None


def _import():
    return importlib.import_module(MODULE)


def _release(version: str) -> str:
    return version.split("+")[0]


def _mismatch(built_for: str, running: str, path: str) -> None:
    _state["error"] = f"built for torch {built_for}, running torch {running}"
    warnings.warn(f"stn_kernels: the compiled CUDA extension ({path}) was built for torch {built_for} but torch "
                  f"{running} is running; it is not used, so the 'cuda' backend is unavailable (the 'reference' and "
                  f"'triton' backends still work). Rebuild it with `{REBUILD}`.", RuntimeWarning, stacklevel=4)


def _load() -> None:
    if "loaded" in _state:
        return
    _state["loaded"] = False
    _state["error"] = None
    path = _find()
    if path is None:  # not built: the normal case on CPU-only machines
        _state["error"] = (f"not built (no {MODULE}; `{REBUILD}` builds it where nvcc and a CUDA build of torch "
                           "are present)")
        return
    import torch

    running = torch.__version__
    built_for = _built_for(path)
    if built_for is not None and built_for != _release(running):
        _mismatch(built_for, running, path)
        return
    try:
        module = _import()
    except (ImportError, OSError) as exc:  # e.g. undefined symbols of another torch, or a missing CUDA library
        _state["error"] = f"failed to load (built for torch {built_for or 'unknown'}, running torch {running}): {exc}"
        warnings.warn(f"stn_kernels: the compiled CUDA extension ({path}), built for torch {built_for or 'unknown'}, "
                      f"could not be loaded under torch {running}: {exc}. The 'reference' and 'triton' backends "
                      f"still work. Rebuild it with `{REBUILD}`.", RuntimeWarning, stacklevel=3)
        return
    module_built_for = getattr(module, "TORCH_VERSION", None)
    if module_built_for is not None and module_built_for != _release(running):
        _mismatch(module_built_for, running, path)
        return
    _state["loaded"] = True
    _state["path"] = path


def loaded() -> bool:
    _load()
    return _state["loaded"]


def load_error():
    _load()
    return _state["error"]


def unavailable_reason(device) -> Optional[str]:
    """Why the extension cannot run tensors on ``device`` (a torch.device), or None when it can."""
    if device.type != "cuda":
        return f"tensors are on {device}, the extension runs CUDA tensors only"
    if not loaded():
        return f"the compiled extension is not loaded ({load_error() or 'not built'})"
    return None
