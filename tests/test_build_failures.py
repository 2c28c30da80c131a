"""setup.py with compilers that exist but fail: the optional extensions are reported and left out, the install
goes on (README: "a failed build is reported and left out").

Each build fails fast (torch's check of the compiler, before any source is compiled) or compiles one empty file,
in a small source tree of its own (the real setup.py and pyproject.toml, stub sources), so these take seconds.
A compiler error inside the real sources: tests/test_host_extension.py (test_a_failed_build_does_not_fail_the_install).
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import setup as build_script

ROOT = Path(__file__).resolve().parents[1]
NOT_BUILT = "stn_kernels: the optional extension {} was not built"

# Runs a command with a pseudo-terminal as its controlling terminal (as a user's shell would) and prints what
# appeared on that terminal, then the command's exit status. A fresh interpreter forks, not the test process.
ON_A_TERMINAL = r"""
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
seen = b""
while True:
    try:
        chunk = os.read(fd, 65536)
    except OSError:
        break
    if not chunk:
        break
    seen += chunk
_, status = os.waitpid(pid, 0)
sys.stdout.write(seen.decode(errors="replace"))
sys.stdout.write("\nexit status %d\n" % os.waitstatus_to_exitcode(status))
"""


def _source_tree(root: Path, host_source: str = "int stn_kernels_tiny() { return 1; }\n") -> Path:
    """The real build files around stub sources: csrc/host/ for stn_kernels._host, csrc/*.cu for stn_kernels._C."""
    (root / "csrc" / "host").mkdir(parents=True)
    (root / "csrc" / "host" / "tiny.cpp").write_text(host_source)
    (root / "csrc" / "kernel.cu").write_text("__global__ void stn_kernels_tiny() {}\n")
    (root / "stn_kernels").mkdir()
    (root / "stn_kernels" / "__init__.py").write_text("")
    (root / "README.md").write_text("stub\n")
    for name in ("setup.py", "pyproject.toml"):
        (root / name).write_text((ROOT / name).read_text())
    return root


def _failing_toolkit(root: Path) -> Path:
    """A CUDA toolkit folder whose nvcc exists but fails."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    return root


def _env(**changes) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "STN_KERNELS_BUILD_CUDA",
                                                             "STN_KERNELS_BUILD_HOST", "CUDA_HOME", "CUDA_PATH")}
    env.update(changes)
    return env


def _build_inplace(tree: Path, env: dict) -> subprocess.CompletedProcess:
    # start_new_session: no controlling terminal, so the reports go to the captured output only
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=300, start_new_session=True)


def test_pip_with_a_failing_cxx_installs_and_says_so_on_the_terminal(tmp_path):
    """`CXX=/bin/false pip wheel .` (what `pip install .` builds): the wheel is made without the extensions, and
    the report reaches the user's terminal although pip (without -v) shows nothing of a successful build."""
    tree = _source_tree(tmp_path / "src")
    env = _env(CXX="/bin/false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cuda_attempted = build_script.cuda_build_decision(env, root=str(tree))[0]
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
               "--no-cache-dir", "-w", str(tmp_path / "wheels"), str(tree)]
    proc = subprocess.run([sys.executable, "-c", ON_A_TERMINAL] + command, env=env, capture_output=True, text=True,
                          timeout=300)
    seen = proc.stdout
    assert proc.returncode == 0 and seen.rstrip().endswith("exit status 0"), seen[-3000:] + proc.stderr[-2000:]
    assert NOT_BUILT.format("stn_kernels._host") in seen and "/bin/false" in seen, seen[-3000:]
    assert "Python path" in seen
    assert (NOT_BUILT.format("stn_kernels._C") in seen) == cuda_attempted, seen[-3000:]
    wheels = list((tmp_path / "wheels").glob("stn_kernels-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "stn_kernels/__init__.py" in names and not [n for n in names if n.endswith(".so")], names


@pytest.mark.skipif(torch.version.cuda is None, reason="the CUDA extension is attempted with a CUDA build of torch")
def test_a_failing_nvcc_leaves_out_the_cuda_extension_only(tmp_path):
    """nvcc fails (torch's version check runs it before any build): stn_kernels._C is left out, and a copy left
    in the source tree by an earlier build is removed (it would be loaded); stn_kernels._host is still built."""
    tree = _source_tree(tmp_path / "src")
    (tree / "stn_kernels" / "_C.so").write_text("an earlier build")
    toolkit = _failing_toolkit(tmp_path / "cuda")
    proc = _build_inplace(tree, _env(CUDA_HOME=str(toolkit)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert NOT_BUILT.format("stn_kernels._C") in proc.stdout and "nvcc" in proc.stdout
    assert "'cuda' backend is unavailable" in proc.stdout
    assert NOT_BUILT.format("stn_kernels._host") not in proc.stdout
    assert not (tree / "stn_kernels" / "_C.so").exists()
    assert (tree / "stn_kernels" / "_host.so").exists()


@pytest.mark.skipif(torch.version.cuda is None, reason="the CUDA extension is attempted with a CUDA build of torch")
def test_force_cuda_makes_a_failed_cuda_build_fail_the_install(tmp_path):
    tree = _source_tree(tmp_path / "src")
    toolkit = _failing_toolkit(tmp_path / "cuda")
    proc = _build_inplace(tree, _env(CUDA_HOME=str(toolkit), FORCE_CUDA="1", STN_KERNELS_BUILD_HOST="0"))
    assert proc.returncode != 0
    assert "nvcc" in proc.stderr and NOT_BUILT.format("stn_kernels._C") not in proc.stdout


def test_a_failing_cxx_removes_an_earlier_inplace_copy(tmp_path):
    """`build_ext --inplace` (what editable installs do) with CXX=/bin/false: nothing is built, the host
    extension's copy from an earlier build is removed, and the build succeeds."""
    tree = _source_tree(tmp_path / "src")
    (tree / "stn_kernels" / "_host.so").write_text("an earlier build")
    proc = _build_inplace(tree, _env(CXX="/bin/false", STN_KERNELS_BUILD_CUDA="0"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert NOT_BUILT.format("stn_kernels._host") in proc.stdout
    assert "removed" in proc.stdout and not (tree / "stn_kernels" / "_host.so").exists()
