"""Guarded loading of the optional compiled extensions: ``stn_kernels._C`` (the CUDA kernels of the ``cuda``
backend, csrc/) and ``stn_kernels._host`` (the modules' eager calls on CPU tensors issued from C++,
csrc/host/, :mod:`stn_kernels.backends.host`).

Loaded on first use, never at ``import stn_kernels``. A missing build leaves everything else working (the
Python paths); a build for another torch gives a warning naming both versions and is not used.

The torch version a build was made for is read from a marker string in the library file *before* it is
loaded (``STN_KERNELS_BUILT_FOR_TORCH=<version>;``, see csrc/module.cpp), so a build for another torch is
reported instead of being loaded, which could fail on undefined symbols or, worse, load with a different
ABI. Once loaded, the module's ``TORCH_VERSION`` attribute is checked as well.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import warnings
from typing import Optional

REBUILD = "pip install --no-build-isolation -e ."
_MARKER = re.compile(rb"STN_KERNELS_BUILT_FOR_TORCH=([0-9A-Za-z.+_-]+);")


# What loading an extension found (GuardedExtension.status()).
LOADED, NOT_BUILT, OTHER_TORCH, LOAD_FAILED = "loaded", "not built", "built for another torch", "failed to load"
STATUSES = (LOADED, NOT_BUILT, OTHER_TORCH, LOAD_FAILED)


def _built_for(path: str) -> Optional[str]:
    """The torch version the library at ``path`` was built against (from its marker), or None."""
    try:
        with open(path, "rb") as f:
            found = _MARKER.search(f.read())
    except OSError:
        return None
    return found.group(1).decode() if found else None


def _release(version: str) -> str:
    return version.split("+")[0]


class GuardedExtension:
    """One optional compiled module: ``loaded()``, ``load_error()``, ``module()`` (None unless loaded), ``status()``.

    ``what``: how warnings name it; ``without``: what the user loses when it is not used; ``built_where``: where
    ``pip install`` builds it (for the "not built" reason)."""

    def __init__(self, module: str, what: str, without: str, built_where: str) -> None:
        self.name, self.what, self.without, self.built_where = module, what, without, built_where
        self._state: dict = {}

    def _find(self) -> Optional[str]:
        """Path of the built module's library file, or None when it is not built."""
        try:
            spec = importlib.util.find_spec(self.name)
        except (ImportError, ValueError):
            return None
        return spec.origin if spec is not None and spec.origin else None

    def _built_for(self, path: str) -> Optional[str]:
        return _built_for(path)

    def _import(self):
        return importlib.import_module(self.name)

    def _mismatch(self, built_for: str, running: str, path: str) -> None:
        self._state.update(status=OTHER_TORCH, built_for=built_for,
                           error=f"built for torch {built_for}, running torch {running}")
        warnings.warn(f"stn_kernels: {self.what} ({path}) was built for torch {built_for} but torch {running} is "
                      f"running; it is not used, so {self.without}. Rebuild it with `{REBUILD}`.", RuntimeWarning,
                      stacklevel=5)

    def _load(self) -> None:
        state = self._state
        if "loaded" in state:
            return
        state.update(loaded=False, error=None, module=None, status=NOT_BUILT, path=None, built_for=None)
        path = self._find()
        if path is None:  # not built: the normal case where its compiler is missing
            state["error"] = f"not built (no {self.name}; `{REBUILD}` builds it {self.built_where})"
            return
        state["path"] = path
        import torch

        running = torch.__version__
        built_for = self._built_for(path)
        if built_for is not None and built_for != _release(running):
            self._mismatch(built_for, running, path)
            return
        try:
            module = self._import()
        except (ImportError, OSError) as exc:  # e.g. undefined symbols of another torch, or a missing library
            state.update(status=LOAD_FAILED, built_for=built_for)
            state["error"] = (f"failed to load (built for torch {built_for or 'unknown'}, running torch {running}): "
                              f"{exc}")
            warnings.warn(f"stn_kernels: {self.what} ({path}), built for torch {built_for or 'unknown'}, could not be "
                          f"loaded under torch {running}: {exc}. It is not used, so {self.without}. Rebuild it with "
                          f"`{REBUILD}`.", RuntimeWarning, stacklevel=4)
            return
        module_built_for = getattr(module, "TORCH_VERSION", None)
        if module_built_for is not None and module_built_for != _release(running):
            self._mismatch(module_built_for, running, path)
            return
        state.update(loaded=True, module=module, status=LOADED, built_for=module_built_for or built_for)

    def loaded(self) -> bool:
        self._load()
        return self._state["loaded"]

    def load_error(self) -> Optional[str]:
        self._load()
        return self._state["error"]

    def module(self):
        self._load()
        return self._state["module"]

    def status(self) -> dict:
        """What loading found (loads it first): ``status`` (one of :data:`STATUSES`), ``path`` of the library
        file (None when not built), ``built_for`` (the torch release it was built for, when known) and ``error``
        (why it is not used; None when loaded)."""
        self._load()
        return {key: self._state[key] for key in ("status", "path", "built_for", "error")}


CUDA = GuardedExtension("stn_kernels._C", "the compiled CUDA extension",
                        "the 'cuda' backend is unavailable (the 'reference' and 'triton' backends still work)",
                        "where nvcc and a CUDA build of torch are present")


def loaded() -> bool:
    return CUDA.loaded()


def load_error() -> Optional[str]:
    return CUDA.load_error()


def _find() -> Optional[str]:
    return CUDA._find()


def unavailable_reason(device) -> Optional[str]:
    """Why the CUDA extension cannot run tensors on ``device`` (a torch.device), or None when it can."""
    if device.type != "cuda":
        return f"tensors are on {device}, the extension runs CUDA tensors only"
    if not loaded():
        return f"the compiled extension is not loaded ({load_error() or 'not built'})"
    return None
