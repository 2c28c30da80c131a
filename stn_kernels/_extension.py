"""Guarded loading of the optional compiled CUDA extension (``stn_kernels._C``).

Loaded on first use, never at ``import stn_kernels``. A missing build leaves the
other backends working; a build for another torch gives a warning naming both
versions.
"""

from __future__ import annotations

import importlib
import warnings

_state: dict = {}


def _load() -> None:
    if "loaded" in _state:
        return
    _state["loaded"] = False
    _state["error"] = None
    try:
        module = importlib.import_module("stn_kernels._C")
    except ImportError as exc:  # not built: the normal case on CPU-only machines
        _state["error"] = f"not built ({exc})"
        return
    except OSError as exc:  # built against another torch: undefined symbols and the like
        import torch

        _state["error"] = f"failed to load: {exc}"
        warnings.warn(f"stn_kernels: the compiled CUDA extension could not be loaded under torch "
                      f"{torch.__version__}: {exc}. Rebuild it with `pip install --no-build-isolation -e .`; "
                      "the 'reference' and 'triton' backends still work.", RuntimeWarning, stacklevel=3)
        return
    import torch

    built_for = getattr(module, "TORCH_VERSION", None)
    if built_for is not None and built_for != torch.__version__.split("+")[0]:
        _state["error"] = f"built for torch {built_for}, running torch {torch.__version__}"
        warnings.warn(f"stn_kernels: the compiled CUDA extension was built for torch {built_for} but torch "
                      f"{torch.__version__} is running; it is not used. Rebuild it with "
                      "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=3)
        return
    _state["loaded"] = True


def loaded() -> bool:
    _load()
    return _state["loaded"]


def load_error():
    _load()
    return _state["error"]
