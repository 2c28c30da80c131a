"""Ahead-of-time compilation of every Triton kernel from its real launches, for sm_90 and sm_80, without a GPU.

The other Triton tests run the kernels under the interpreter, which catches no GPU compilation problem: a
loop-carried variable that changes type, a ``tl.dot`` smaller than Triton takes (K < 16 in Triton 3.6, the GPU
machines'; 3.8 takes K = 8 in fp32), shared memory over the device's, a config that spills registers. Here
:mod:`stn_kernels.backends.triton.aot` records the launches of the calls of
:mod:`stn_kernels.backends.triton.aot_cases` (all seven ops through the public API and the modules, forward and
backward, every dtype, λ per example / shared / none, biases, the conv / LSTM / augment / affine variants) with
the GPU's config lists and block sizes, binds each with Triton's own JIT binder for the target, and compiles the
configs (every one the autotuner's prune keeps on that target, and the no-autotune default) down to cubins with
Triton's bundled ptxas, in worker subprocesses (the kernel modules must be imported without TRITON_INTERPRET).

Asserted per compile: it compiles; its shared memory fits the target's per-block limit; ptxas's report
(registers, spill stores / loads, stack) shows at most 1 KB of spill stores per thread. The default run compiles
the fast subset of ``aot_cases.select`` (every kernel × dtype × target at its widest variant, the no-autotune
defaults, the riskiest kept configs); STN_KERNELS_AOT_FULL=1 compiles every job (several minutes) and prints the
table of every compile. The summary table is printed either way (``pytest -s``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from stn_kernels.backends.triton import aot

pytestmark = pytest.mark.triton

WORKERS = 2


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return p.is_file() and os.access(p, os.X_OK)


needs_ptxas = pytest.mark.skipif(not _ptxas_available(), reason="needs Triton with its bundled ptxas")


@needs_ptxas
def test_every_kernel_compiles_for_sm90_and_sm80_within_shared_memory_and_without_spills():
    full = os.environ.get("STN_KERNELS_AOT_FULL") == "1"
    kernels, total, results, finished = aot.compile_in_workers(["--arch", "90", "80", *(["--full"] if full else [])],
                                                               WORKERS)
    kernels = set(kernels)
    assert finished and len(results) == total > 0
    print()
    print(aot.summary(results))
    if full:
        for r in sorted(results, key=aot.label):
            print(aot.each(r))

    # Coverage: every kernel of the seven modules on both targets, each autotuned one also at its no-autotune
    # default, the fp32 dots with TF32 off, colour jitter.
    assert len(kernels) == 15 and {k.split(".")[0] for k in kernels} == set(aot.MODULES)
    for arch in (90, 80):
        assert {r["kernel"] for r in results if r["arch"] == arch} == kernels, f"sm_{arch}"
        defaults = {r["kernel"] for r in results if r["arch"] == arch and r["config"].startswith("default")}
        assert defaults == {f"{a}.{b}" for a, b in aot.NO_AUTOTUNE}, f"sm_{arch}"
        ieee = {r["kernel"] for r in results if r["arch"] == arch and r["flags"].get("PREC") == "ieee"}
        assert ieee == {f"{a}.{b}" for a, b in aot.NO_AUTOTUNE}, f"sm_{arch}"
        assert any(r["kernel"] == "augment._augment_kernel" and r["flags"]["JITTER"] for r in results
                   if r["arch"] == arch)

    found = aot.problems(results)
    assert not found, f"{len(found)} compiles a GPU would fail or spill on:\n" + "\n".join(found)


@needs_ptxas
def test_augment_kernel_compiles_with_colour_jitter():
    """The jitter section's loop variable once reappeared as a tensor in the cutout loop: a loop-carried type
    change the GPU compiler rejects (the interpreter runs it)."""
    _, _, results, _ = aot.compile_in_workers(["--arch", "80", "--modules", "augment"], 1)
    jitter = [r for r in results if r["flags"]["JITTER"]]
    assert jitter and not [r["error"] for r in jitter if "error" in r]


def test_problems_names_each_kind_of_failure():
    base = dict(kernel="hyper_linear._fwd_kernel", arch=90, dtype="fp32", flags={"PREC": "ieee"},
                blocks={"BLOCK_M": 64}, num_warps=4, num_stages=3, config="kept", cases=["linear"])
    ok = dict(base, shared=1000, regs=128, spill_stores=0, spill_loads=0, stack=0)
    assert aot.problems([ok]) == []
    assert aot.problems([dict(ok, spill_stores=1024)]) == []
    found = aot.problems([dict(base, error="CompilationError: K >= 8"), dict(ok, shared=232449),
                          dict(ok, arch=80, shared=166913), dict(ok, spill_stores=1025, regs=255)])
    assert len(found) == 4
    assert "does not compile" in found[0] and "232449 B of shared memory > 232448" in found[1]
    assert "166913 B of shared memory > 166912" in found[2] and "1025 B of spill stores" in found[3]
    assert all("sm_" in f and "hyper_linear._fwd_kernel" in f for f in found)


def test_ptxas_report_is_read():
    log = ("ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _fwd_kernel\n"
           "    48 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 632 bytes cmem[0]\n")
    assert aot.ptxas_report(log) == dict(regs=255, spill_stores=44, spill_loads=40, stack=48)
    assert aot.ptxas_report("nothing") is None


if __name__ == "__main__":  # python tests/test_triton_aot.py: the full matrix and its table
    os.environ["STN_KERNELS_AOT_FULL"] = "1"
    sys.exit(pytest.main([__file__, "-q", "-s", "-k", "sm90_and_sm80"]))
