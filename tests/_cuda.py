"""Helpers of the CUDA-extension tests: where the extension must be built, and a ctypes view of
csrc/emulate/ (the CUDA kernels of csrc/hyper_linear_kernels.cuh built with g++ for a CPU emulation of
the CUDA execution model; the conftest fixture ``emu`` builds it once per session)."""

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import stn_kernels
from stn_kernels.backends import extension

ROOT = Path(__file__).resolve().parents[1]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def small_hyper_linear(device="cpu", dtype=F32):
    """(x [3, 4], hparams [3, 2], a HyperLinear 4 -> 5 with H = 2), seeded."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=gen, dtype=dtype)
    hp = torch.randn(3, 2, generator=gen, dtype=dtype)
    m = stn_kernels.HyperLinear(4, 5, num_hparams=2, dtype=dtype)
    return x.to(device), hp.to(device), m.to(device)


def extension_build_expected() -> bool:
    """Where `make install` / `pip install -e .` must have built the extension."""
    return (shutil.which("nvcc") is not None and torch.version.cuda is not None
            and os.environ.get("STN_KERNELS_BUILD_CUDA", "").strip() != "0")


def require_extension_built():
    if extension._find() is None:
        if extension_build_expected():
            pytest.fail("nvcc is on the PATH but stn_kernels._C is not built: run `make install` "
                        "(or `pip install --no-build-isolation -e .`)")
        pytest.skip("the CUDA extension is not built here (no nvcc, or STN_KERNELS_BUILD_CUDA=0)")

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_CODES = {F32: 0, F16: 1, BF16: 2}


def rows(t):
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _rs(t):
    return 0 if t is None else t.stride(0)


class Emulated:
    """The kernels of csrc/hyper_linear_kernels.cuh, run by csrc/emulate/ on CPU tensors."""

    def __init__(self, path):
        lib = self.lib = ctypes.CDLL(str(path))
        lib.stn_hl_epilogue.argtypes = [_INT, _INT] + [_P, _I64] * 6 + [_P, _P, _I64, _I64, _I64, _P]
        lib.stn_hl_epilogue.restype = _INT
        lib.stn_hl_reduce_workspace_bytes.argtypes = [_I64, _I64, _I64] + [_INT] * 5
        lib.stn_hl_reduce_workspace_bytes.restype = _I64
        lib.stn_hl_reduce.argtypes = ([_INT, _INT] + [_P, _I64] * 5 + [_P, _P, _I64] + [_P] * 5
                                      + [_I64, _I64, _I64, _INT, _P, _I64, _P])
        lib.stn_hl_reduce.restype = _INT
        lib.stn_hl_emu_set_sms.argtypes = [_INT]
        lib.stn_hl_error_string.argtypes = [_INT]
        lib.stn_hl_error_string.restype = ctypes.c_char_p

    def set_sms(self, n):
        self.lib.stn_hl_emu_set_sms(n)

    def epilogue(self, acc, z, out, lam, V, C=None, be=None, bh=None):
        M, N = z.shape
        return self.lib.stn_hl_epilogue(_CODES[z.dtype], _CODES[lam.dtype], _ptr(acc), _rs(acc), _ptr(z), _rs(z),
                                        _ptr(out), _rs(out), _ptr(lam), _rs(lam), _ptr(V), _rs(V), _ptr(C), _rs(C),
                                        _ptr(be), _ptr(bh), M, N, lam.shape[1], None)

    def reduce(self, g, z, lam, V, C, bh, gs, dlam, dv, dc, dbe, dbh, deterministic):
        M, N = g.shape
        H = lam.shape[1]
        nbytes = self.lib.stn_hl_reduce_workspace_bytes(M, N, H, int(deterministic), dlam is not None,
                                                        dv is not None, dc is not None or dbh is not None,
                                                        dbe is not None)
        ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8)  # NaN-filled float32 partial sums
        return self.lib.stn_hl_reduce(_CODES[g.dtype], _CODES[lam.dtype], _ptr(g), _rs(g), _ptr(z), _rs(z),
                                      _ptr(lam), _rs(lam), _ptr(V), _rs(V), _ptr(C), _rs(C), _ptr(bh),
                                      _ptr(gs), _rs(gs), _ptr(dlam), _ptr(dv), _ptr(dc), _ptr(dbe), _ptr(dbh),
                                      M, N, H, int(deterministic), ws.data_ptr(), nbytes, None)


def build_emulation():
    """The emulation library, built (once per source digest, under build/) with the C++ compiler here;
    None without one."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return None
    sources = [ROOT / "csrc" / "emulate" / "emulator.h", ROOT / "csrc" / "emulate" / "host_kernels.cpp",
               ROOT / "csrc" / "hyper_linear_kernels.cuh", ROOT / "csrc" / "hyper_linear_kernels.h"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + cxx.encode())
    out_dir = ROOT / "build" / "stn_emulate" / digest.hexdigest()[:16]
    lib = out_dir / "libstn_hl_emu.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"tmp-{os.getpid()}.so"
        cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE", "-w",
               str(ROOT / "csrc" / "emulate" / "host_kernels.cpp"), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"building the kernel emulation failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
        os.replace(tmp, lib)
    return Emulated(lib)


def nan(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def d(t):
    return None if t is None else t.double()
