"""``stn_kernels.show_config()``: what this installation is and what runs here, as ``torch.__config__.show()``.

Versions, the optional compiled extensions (built? loaded? used? and why not), the backend requested, and the
backend each op takes on each device here. Every answer comes from the code that decides it at run time (the
guarded loaders of :mod:`stn_kernels.backends.extension`, :func:`stn_kernels.backends.host.host_ops`,
:func:`stn_kernels.backends.resolve_backend`), never from a second copy of its rules.

Calling it loads the compiled extensions that are built and asks torch for the CUDA devices;
``import stn_kernels`` does neither. ``python -m stn_kernels`` prints it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .backends import extension, fallback, host, registry, rules, selection
from .version import __version__

# The problems the op table is resolved for: every dtype the fused kernels take, at the rows of each class of the
# rules table (how "auto" may tell "triton" from "cuda"), so that an answer that depends on them is seen.
PROBE_DTYPES = fallback.KERNEL_DTYPES
HOST_USERS = ("HyperLinear (also over sequences), HyperConv2d, HyperEmbedding, HyperLSTMCell steps, HyperLSTM layers "
              "and per-example dropout")


def _probe_rows() -> Tuple[int, ...]:
    edges = rules.load_rules()["m_buckets"]
    return tuple(edges) + (edges[-1] + 1,)


def _triton_version() -> str:
    if "triton" in sys.modules:  # imported already: the version that runs
        return f"triton {getattr(sys.modules['triton'], '__version__', '(version unknown)')}"
    if importlib.util.find_spec("triton") is None:
        return "triton not installed (the 'triton' backend is unavailable)"
    for dist in ("triton", "pytorch-triton"):
        try:
            return f"triton {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "triton (version unknown)"


def _cuda_devices() -> Tuple[bool, str]:
    """(CUDA usable here, a line naming torch's CUDA build and the devices)."""
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else (
        f"ROCm {torch.version.hip} build" if getattr(torch.version, "hip", None) else "CPU-only build")
    try:
        available = torch.cuda.is_available()
        names = [f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
                 for i in range(torch.cuda.device_count())] if available else []
    except Exception as exc:  # noqa: BLE001 - a broken driver is reported, not raised
        return False, f"{build}; asking for CUDA devices failed: {type(exc).__name__}: {exc}"
    if not available:
        return False, f"{build}; no CUDA device: torch.cuda.is_available() is False"
    return True, f"{build}; {len(names)} CUDA device(s): {', '.join(names)}"


def _versions(cuda_line: str) -> List[str]:
    return [
        f"stn_kernels {__version__} ({os.path.dirname(os.path.abspath(__file__))})",
        f"  Python {platform.python_version()} ({platform.platform()})",
        f"  torch {torch.__version__} ({cuda_line})",
        f"  {_triton_version()}",
    ]


def _resolve(op: str, device: torch.device, rows: Optional[int], dtype: Optional[torch.dtype]) -> str:
    try:
        return registry.resolve_backend(op, device, rows, dtype)
    except selection.BackendUnavailableError as exc:
        return f"unavailable: {str(exc).removeprefix(f'stn_kernels::{op}: ')}"


def _cell(op: str, device: torch.device) -> Tuple[str, Dict[str, str]]:
    """(what runs ``op`` on ``device`` under the backend in force, {shape class: backend} when that depends on the
    problem's dtype and rows, else {})."""
    answers = {rules.shape_class(m, dtype): _resolve(op, device, m, dtype)
               for dtype in PROBE_DTYPES for m in _probe_rows()}
    distinct = sorted(set(answers.values()))
    if len(distinct) == 1:
        return distinct[0], {}
    return " or ".join(distinct) + " (by dtype and rows)", answers


def _op_table(devices: List[torch.device]) -> Tuple[List[str], Dict[Tuple[str, str], str]]:
    """The lines of the op table under the backend in force, and each (op, device type) cell."""
    cells, notes = {}, []
    for op in registry.TABLE:
        for device in devices:
            cell, by_class = _cell(op, device)
            if cell.startswith("unavailable: "):
                notes.append(f"  [{len(notes) + 1}] {op} on {device.type}: {cell[len('unavailable: '):]}")
                cell = f"unavailable [{len(notes)}]"
            elif by_class:
                choice = ", ".join(f"{cls}: {name}" for cls, name in by_class.items())
                notes.append(f"  [{len(notes) + 1}] {op} on {device.type}: {choice} ({rules.RULES_FILE})")
                cell = f"{cell} [{len(notes)}]"
            cells[(op, device.type)] = cell
    width = max(len(op) for op in registry.TABLE) + 2
    widths = [max(len(cells[(op, d.type)]) for op in registry.TABLE) + 2 for d in devices]
    lines = ["  " + "op".ljust(width) + "".join(d.type.ljust(w) for d, w in zip(devices, widths))]
    lines += ["  " + op.ljust(width) + "".join(cells[(op, d.type)].ljust(w) for d, w in zip(devices, widths))
              for op in registry.TABLE]
    return [line.rstrip() for line in lines] + notes, cells


def _requested() -> Tuple[Optional[str], str]:
    """(the backend requested, or None when the request is invalid; the line that says so and where it comes
    from)."""
    source = selection.request_source()
    try:
        name = selection.requested_backend()
    except (TypeError, ValueError) as exc:
        return None, f"Backend requested: invalid, so every op call raises: {exc}"
    where = {"use_backend": f"an enclosing use_backend({name!r}) block",
             "default": f"the default: no use_backend block, {selection.ENV_VAR} unset"}.get(
                 source, f"{selection.ENV_VAR}={os.environ.get(selection.ENV_VAR)}")
    return name, f"Backend requested: {name} ({where})"


def _state(ext: extension.GuardedExtension) -> Tuple[bool, str]:
    """(loaded, what loading it found)."""
    found = ext.status()
    if found["status"] == extension.LOADED:
        return True, f"built for torch {found['built_for'] or '(unknown)'} ({found['path']}), loaded"
    if found["status"] == extension.NOT_BUILT:
        return False, (f"not built: `pip install` builds it {ext.built_where}; where that build failed, the install "
                       "said why on the terminal, and `pip install -v --no-build-isolation .` shows why it was "
                       f"skipped or failed. So {ext.without}")
    return False, f"{found['status']}: {found['error']}; not used, so {ext.without}. Rebuild: `{extension.REBUILD}`"


def _host_line() -> str:
    loaded, state = _state(host.HOST)
    if not loaded:
        return state
    if host.host_ops(torch.device("cpu"), torch.float32, torch.float32) is None:
        why = (f"switched off by {host.OFF_VAR}=0" if host.switched_off() else "not used")
        return f"{state}; {why}, so {host.HOST.without}"
    dtypes = " or ".join(rules.dtype_name(d) for d in host.HOST_DTYPES)
    return (f"{state}; used by {HOST_USERS} on CPU tensors ({dtypes}, eager, where the reference backend runs "
            f"them); {host.OFF_VAR}=0 switches it off")


def _cuda_line(devices: List[torch.device], cells: Dict[Tuple[str, str], str]) -> str:
    loaded, state = _state(extension.CUDA)
    if not loaded:
        return state
    ops = [op for op, entry in registry.TABLE.items() if "cuda" in entry.kernels]
    cuda = [d for d in devices if d.type == "cuda"]
    if not cuda:
        return f"{state}; not used here: no CUDA device"
    picked = [op for op in ops if "cuda" in cells.get((op, "cuda"), "")]
    where = f"'auto' picks it for {', '.join(picked)} (table below)" if picked else "'auto' does not pick it"
    return f"{state}; runs {', '.join(ops)} on CUDA tensors with use_backend('cuda'); {where}"


def show_config() -> str:
    """What this stn_kernels is and what runs here, as a printable report (``print(stn_kernels.show_config())``,
    or ``python -m stn_kernels``): versions of stn_kernels, Python, torch (its CUDA build and devices) and triton;
    the optional compiled extensions ``stn_kernels._host`` and ``stn_kernels._C``: built, loaded, used, or why
    not (not built, built for another torch, failed to load, switched off by ``STN_KERNELS_HOST=0``); the
    backend requested (``use_backend`` / ``STN_KERNELS_BACKEND``) and ``TRITON_INTERPRET``; and the backend each
    op takes on each device here (the CPU, and CUDA where torch sees a device), as resolved by
    :func:`stn_kernels.backends.resolve_backend` for the request in force, and for ``"auto"`` when another
    is requested.

    Calling it loads the compiled extensions that are built (``import stn_kernels`` never does), asks torch for
    its CUDA devices, and where there is one imports triton (to resolve the backends on it). Returns a str.
    """
    cuda_ok, cuda_line = _cuda_devices()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if cuda_ok else [])
    name, request_line = _requested()
    interpret = os.environ.get("TRITON_INTERPRET")
    lines = _versions(cuda_line) + [
        request_line,
        ("TRITON_INTERPRET unset" if interpret is None else f"TRITON_INTERPRET={interpret}") + (
            ": the Triton kernels run CPU tensors in the interpreter (for testing; set it before triton is imported)"
            if registry.triton_interpreting() else ": Triton runs CUDA tensors only"),
    ]
    others = sorted(f"{key}={value}" for key, value in os.environ.items()
                    if key.startswith("STN_KERNELS_") and key not in (selection.ENV_VAR, host.OFF_VAR))
    if others:  # the Triton kernels' knobs and the build's (see their modules and setup.py)
        lines.append(f"Other STN_KERNELS_* variables set: {', '.join(others)}")
    tables = []
    for request in ([name] if name == "auto" else [name, "auto"] if name else ["auto"]):
        with selection.use_backend(request):
            table, cells = _op_table(devices)
        tables.append((request, table, cells))
    auto_cells = tables[-1][2]
    lines += [
        "Compiled extensions (loaded by this call where built; `import stn_kernels` loads neither):",
        f"  stn_kernels._host (the modules' host paths on the CPU): {_host_line()}",
        f"  stn_kernels._C (the 'cuda' backend): {_cuda_line(devices, auto_cells)}",
    ]
    for request, table, _ in tables:
        lines += [f"Backend of each op under {request!r} (stn_kernels.backends.resolve_backend; the same for "
                  "every dtype and number of rows unless a note says otherwise):"] + table
    kernel_dtypes = ", ".join(rules.dtype_name(d) for d in fallback.KERNEL_DTYPES)
    lines.append(f"The fused backends (triton, cuda) take {kernel_dtypes}; other dtypes (float64) and empty problems "
                 "run the reference. On the CPU, the modules' calls that run the reference take the host path where "
                 "stn_kernels._host is used (above).")
    return "\n".join(lines)
