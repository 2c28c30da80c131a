"""``stn_kernels.show_config()`` (and ``python -m stn_kernels``): versions, the compiled extensions (built,
loaded, used, or why not), the backend requested and the backend each op takes on each device, as the loaders and
the registry decide them; ``import stn_kernels`` loads nothing and asks for no GPU."""

import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stn_kernels
from stn_kernels import config
from stn_kernels.backends import extension, host, registry, rules

from _cuda import extension_build_expected

ROOT = Path(__file__).resolve().parents[1]
RELEASE = torch.__version__.split("+")[0]
HOST_LINE = "stn_kernels._host (the modules' host paths on the CPU): "
CUDA_LINE = "stn_kernels._C (the 'cuda' backend): "


def _line(text: str, start: str) -> str:
    found = [line.strip() for line in text.splitlines() if line.strip().startswith(start)]
    assert len(found) == 1, text
    return found[0][len(start):]


def _table(text: str, request: str) -> dict:
    """{op: [cell per device column]} of the op table under ``request``, and the columns under key None."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"Backend of each op under {request!r}"))
    header = lines[start + 1].split()
    assert header[0] == "op"
    table = {None: header[1:]}
    for line in lines[start + 2:start + 2 + len(registry.TABLE)]:
        op, rest = line.split(None, 1)
        table[op] = [cell.strip() for cell in rest.split("  ") if cell.strip()]
    assert set(table) - {None} == set(registry.TABLE), text
    return table


def _fresh(ext: extension.GuardedExtension, monkeypatch, module, attribute: str) -> extension.GuardedExtension:
    """A loader of the same extension that has not run yet, in place of ``module.attribute`` for this test."""
    fresh = extension.GuardedExtension(ext.name, ext.what, ext.without, ext.built_where)
    monkeypatch.setattr(module, attribute, fresh)
    return fresh


@pytest.fixture
def no_request(monkeypatch):
    monkeypatch.delenv("STN_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("STN_KERNELS_HOST", raising=False)


# ----------------------------------------------------------------------------- this machine

def test_versions_and_this_machines_extensions(no_request):
    text = stn_kernels.show_config()
    assert isinstance(text, str)
    first = text.splitlines()[0]
    assert first.startswith(f"stn_kernels {stn_kernels.__version__} (") and str(ROOT / "stn_kernels") in first
    assert f"Python {platform.python_version()}" in text and f"torch {torch.__version__}" in text
    assert "Backend requested: auto (the default: no use_backend block, STN_KERNELS_BACKEND unset)" in text
    # setup.py builds the host extension wherever torch is: built and used here
    if os.environ.get("STN_KERNELS_BUILD_HOST", "").strip() != "0":
        assert _line(text, HOST_LINE).startswith(f"built for torch {RELEASE} ({ROOT / 'stn_kernels'}")
        assert f"loaded; used by {config.HOST_USERS}" in text
    # the CUDA extension is built where nvcc is, and loads without a GPU; it runs CUDA tensors only
    cuda = _line(text, CUDA_LINE)
    if extension_build_expected():
        assert cuda.startswith(f"built for torch {RELEASE}") and "loaded" in cuda
        if not torch.cuda.is_available():
            assert cuda.endswith("not used here: no CUDA device")
            assert "no CUDA device: torch.cuda.is_available() is False" in text
    elif extension._find() is None:
        assert cuda.startswith("not built")
    if "triton" in sys.modules or importlib.util.find_spec("triton") is not None:
        import triton

        assert f"  triton {triton.__version__}" in text


def test_op_table_on_the_cpu(no_request):
    """Under "auto", every op runs the reference on CPU tensors; on a machine without a GPU the table has the
    CPU column only."""
    table = _table(stn_kernels.show_config(), "auto")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    assert table[None] == devices
    assert all(table[op][0] == "reference" for op in registry.TABLE)
    assert all(len(table[op]) == len(devices) for op in registry.TABLE)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter")
def test_requested_backend_and_its_own_table(no_request):
    pytest.importorskip("triton")
    with stn_kernels.use_backend("triton"):
        text = stn_kernels.show_config()
    assert "Backend requested: triton (an enclosing use_backend('triton') block)" in text
    assert "TRITON_INTERPRET=1: the Triton kernels run CPU tensors in the interpreter" in text
    assert all(cells[0] == "triton" for op, cells in _table(text, "triton").items() if op)
    assert all(cells[0] == "reference" for op, cells in _table(text, "auto").items() if op)


def test_a_backend_that_cannot_run_is_shown_with_the_reason(monkeypatch, no_request):
    monkeypatch.setenv("STN_KERNELS_BACKEND", "cuda")
    text = stn_kernels.show_config()
    assert "Backend requested: cuda (STN_KERNELS_BACKEND=cuda)" in text
    table = _table(text, "cuda")
    assert all(cells[0].startswith("unavailable [") for op, cells in table.items() if op)
    assert "hyper_linear on cpu: backend 'cuda' cannot run here: tensors are on cpu" in text
    assert "hyper_conv2d on cpu: backend 'cuda' has no kernel for this op yet" in text


def test_other_knobs_are_listed(monkeypatch, no_request):
    monkeypatch.setenv("STN_KERNELS_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("STN_KERNELS_HOST", "0")
    line = _line(stn_kernels.show_config(), "Other STN_KERNELS_* variables set: ")
    assert "STN_KERNELS_TRITON_AUTOTUNE=0" in line.split(", ") and "STN_KERNELS_HOST" not in line


def test_an_invalid_request_is_reported_not_raised(monkeypatch, no_request):
    monkeypatch.setenv("STN_KERNELS_BACKEND", "fastest")
    text = stn_kernels.show_config()
    assert "Backend requested: invalid, so every op call raises" in text and "'fastest'" in text
    assert _table(text, "auto")["hyper_linear"][0] == "reference"


# ----------------------------------------------------------------------------- why an extension is not used

def test_host_switched_off(monkeypatch, no_request):
    if not host.HOST.loaded():
        pytest.skip(f"the host extension is not usable here: {host.HOST.load_error()}")
    monkeypatch.setenv("STN_KERNELS_HOST", "0")
    assert _line(stn_kernels.show_config(), HOST_LINE).startswith(f"built for torch {RELEASE}")
    assert "loaded; switched off by STN_KERNELS_HOST=0, so the modules take their Python path" in \
        _line(stn_kernels.show_config(), HOST_LINE)


def test_host_not_built(monkeypatch, no_request):
    fresh = _fresh(host.HOST, monkeypatch, host, "HOST")
    monkeypatch.setattr(fresh, "_find", lambda: None)
    line = _line(stn_kernels.show_config(), HOST_LINE)
    assert line.startswith("not built: `pip install` builds it wherever torch is installed")
    assert "pip install -v --no-build-isolation ." in line and "the modules take their Python path" in line


def test_host_built_for_another_torch(monkeypatch, no_request):
    fresh = _fresh(host.HOST, monkeypatch, host, "HOST")
    monkeypatch.setattr(fresh, "_find", lambda: "/somewhere/_host.so")
    monkeypatch.setattr(fresh, "_built_for", lambda path: "1.2.3")
    monkeypatch.setattr(fresh, "_import", lambda: pytest.fail("a mismatched build must not be loaded"))
    with pytest.warns(RuntimeWarning, match="1.2.3"):
        line = _line(stn_kernels.show_config(), HOST_LINE)
    assert line.startswith(f"built for another torch: built for torch 1.2.3, running torch {torch.__version__}")
    assert "not used, so the modules take their Python path" in line and "Rebuild: `pip install" in line


def test_cuda_extension_failed_to_load(monkeypatch, no_request):
    fresh = _fresh(extension.CUDA, monkeypatch, extension, "CUDA")
    monkeypatch.setattr(fresh, "_find", lambda: "/somewhere/_C.so")
    monkeypatch.setattr(fresh, "_built_for", lambda path: RELEASE)

    def fail():
        raise ImportError("/somewhere/_C.so: undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(fresh, "_import", fail)
    with pytest.warns(RuntimeWarning, match="could not be loaded"):
        line = _line(stn_kernels.show_config(), CUDA_LINE)
    assert line.startswith("failed to load: ") and "undefined symbol" in line
    assert "the 'cuda' backend is unavailable" in line


# ----------------------------------------------------------------------------- a CUDA device (faked)

@pytest.fixture
def fake_gpu(monkeypatch, no_request):
    """torch reports one CUDA device (nothing runs on it: show_config only resolves backends for it)."""
    if not extension.loaded():
        pytest.skip("the CUDA extension is not loaded here")
    pytest.importorskip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (9, 0))


def test_cuda_column_with_a_device(fake_gpu):
    text = stn_kernels.show_config()
    assert "1 CUDA device(s): Fake GPU (sm_90)" in text
    table = _table(text, "auto")
    assert table[None] == ["cpu", "cuda"]
    # what "auto" may pick on CUDA tensors is the registry's TABLE[op].auto
    for op, entry in registry.TABLE.items():
        assert table[op][1] == ("triton" if "triton" in entry.auto else "reference"), op
    assert _line(text, CUDA_LINE).endswith(
        "runs hyper_linear on CUDA tensors with use_backend('cuda'); 'auto' does not pick it")


def test_a_choice_that_depends_on_the_shape_is_spelled_out(fake_gpu, monkeypatch):
    """Once "auto" may pick the extension, the rules table decides by (dtype, rows): the cell says so and a note
    lists each class."""
    entry = registry.TABLE["hyper_linear"]
    monkeypatch.setitem(registry.TABLE, "hyper_linear", registry.OpBackends(entry.kernels, ("triton", "cuda")))
    monkeypatch.setattr(rules, "prefers_cuda", lambda m, dtype: dtype == torch.float16 and m <= 64)
    text = stn_kernels.show_config()
    cell = _table(text, "auto")["hyper_linear"][1]
    assert cell == "cuda or triton (by dtype and rows) [1]"
    note = _line(text, "[1] hyper_linear on cuda: ")
    assert "float16/M<=64: cuda" in note and "float16/M<=256: triton" in note and "float32/M<=64: triton" in note
    assert "'auto' picks it for hyper_linear" in _line(text, CUDA_LINE)


# ----------------------------------------------------------------------------- import, python -m

PROBE = r"""
import json, runpy, sys
import torch
calls = []
for name in ("is_available", "device_count", "get_device_name"):
    real = getattr(torch.cuda, name)
    setattr(torch.cuda, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
import stn_kernels
at_import = {"calls": list(calls), "extensions": sorted(m for m in sys.modules if m in
             ("stn_kernels._host", "stn_kernels._C")), "cuda_initialized": torch.cuda.is_initialized()}
runpy.run_module("stn_kernels", run_name="__main__")
print(json.dumps({"at_import": at_import, "after": {"calls": sorted(set(calls)), "extensions": sorted(
    m for m in sys.modules if m in ("stn_kernels._host", "stn_kernels._C"))}}))
"""


def test_import_asks_nothing_and_python_m_prints_the_report():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("STN_KERNELS_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    *report, last = proc.stdout.strip().splitlines()
    probe = json.loads(last)
    assert probe["at_import"] == {"calls": [], "extensions": [], "cuda_initialized": False}
    assert "is_available" in probe["after"]["calls"]
    assert report[0].startswith(f"stn_kernels {stn_kernels.__version__} (")
    assert any(line.startswith("Backend of each op under 'auto'") for line in report)
    loaded = sorted(name for name, ext in (("stn_kernels._host", host.HOST), ("stn_kernels._C", extension.CUDA))
                    if ext.loaded())
    assert probe["after"]["extensions"] == loaded
    assert "runpy" not in proc.stderr  # no "found in sys.modules" warning for python -m stn_kernels


def test_version_is_the_one_in_pyproject():
    """The version is written twice (pyproject.toml for pip, stn_kernels/version.py for the package)."""
    found = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert found and found.group(1) == stn_kernels.__version__ == config.__version__
