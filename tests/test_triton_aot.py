"""Ahead-of-time compilation of every Triton kernel for real GPU targets, without a GPU.

The other Triton tests run the kernels under the interpreter (TRITON_INTERPRET=1), which catches
no GPU compilation problem: a config whose shared memory exceeds the device's, a tl.dot dtype the
hardware does not take, an op the backend cannot lower, a ptxas error. Here each @triton.jit kernel
of ``stn_kernels.backends.triton.{hyper_linear, hyper_conv2d, hyper_embedding, hyper_lstm_recurrence,
per_example_dropout}`` goes through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 64))`` down to a cubin
(Triton's bundled ptxas), and the test asserts that it compiles and that its shared memory
(``compiled.metadata.shared``) fits sm_90's 232448 bytes; a failure names the kernel, the config,
the dtype and the flags.

The configs are the ones a GPU would use: the kernels are compiled in worker subprocesses (2) that
import the modules without TRITON_INTERPRET and with STN_KERNELS_TRITON_AUTOTUNE=1, so the modules
build their full autotune lists (the interpreter and STN_KERNELS_TRITON_AUTOTUNE=0 shrink them).
For the autotuned kernels the test compiles the configs the autotuner would try for a large problem
on that target: each config list after the kernel's own ``early_config_prune`` (hyper_linear's also
drops the configs whose pipelined tiles cannot fit the device's shared memory: its ``_smem_limit`` is
set to the target's here), so a config the prune keeps but that does not fit fails the test. Every
pointer and integer argument is marked 16-divisible, as the JIT does for aligned tensors and sizes
(hyper_lstm's N excepted: ``do_not_specialize``): that is the case that pipelines the loads through
shared memory (the most shared memory; unaligned fp16 K loads are not pipelined at all). λ, V and C
are fp32 (an STN's hyperparameters), the other tensors the input dtype, slot buffers fp32.

Coverage (default run, about 70 compiles, ~60-90 s on 2 cores), all for sm_90:

* hyper_linear ``_fwd_kernel``: every (kept) GPU config × fp16 and fp32 (input_precision "tf32",
  which pipelines fp32 tiles through shared memory), all flags on (HAS_HP, biases: the most
  accumulators and shared memory); bf16 and fp32 "ieee" (torch's default, TF32 off) for the first
  config. hyper_lstm ``_fwd_step_kernel``: every config in fp16, the 3 of largest tiles in fp32
  "tf32", the first in bf16 and fp32 "ieee".
* hyper_linear ``_dx_kernel`` / ``_dw_kernel`` and hyper_lstm ``_bwd_step_kernel``, hyper flags on:
  the 4 (fp16) and 3 (fp32 "tf32") kept configs of largest pipelined tiles; one SPLIT_OUT variant.
* hyper_linear ``_small_kernel`` (fp16, bf16, fp32), hyper_conv2d's three kernels (both tile shapes
  of the pixel kernels) and hyper_embedding's three kernels (with the fp32 atomics) in fp16 and fp32,
  dropout in fp16, bf16, fp32 and fp64: their fixed blocks, all flags on.
* sm_80 (A100, 166912 bytes): the single configs used without autotuning
  (STN_KERNELS_TRITON_AUTOTUNE=0), which the modules say fit Ampere, in fp32.

STN_KERNELS_AOT_FULL=1 compiles the whole matrix instead (every config × every dtype × flag
variants, sm_90 and sm_80; several minutes) and prints each kernel's shared memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum)
WORKERS = 2
# (dtype of the input tensors, input_precision of the fp32 dots)
HALF, BF16, F32_TF32, F32_IEEE = ("fp16", "tf32"), ("bf16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")
ALL_DTYPES = [HALF, BF16, F32_IEEE, F32_TF32]

# --------------------------------------------------------------------------- job list (in the workers)


def _ptxas_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return p.is_file() and os.access(p, os.X_OK)


class _Fake:
    """Stands in for a tensor in the nargs given to an autotuner's early_config_prune (no device:
    the module's ``_smem_limit`` is replaced by the target's limit while pruning)."""

    def __init__(self, dtype):
        self.dtype = dtype


def _kernels():
    """(module name, kernel name) -> (JITFunction, autotuner or None); modules with their GPU lists."""
    from stn_kernels.backends.triton import (
        hyper_conv2d,
        hyper_embedding,
        hyper_linear,
        hyper_lstm_recurrence,
        per_example_dropout,
    )

    out = {}
    for mod in (hyper_linear, hyper_conv2d, hyper_embedding, hyper_lstm_recurrence, per_example_dropout):
        short = mod.__name__.rsplit(".", 1)[1]
        for name, obj in vars(mod).items():
            fn = obj if type(obj).__name__ == "JITFunction" else getattr(obj, "fn", None)
            if type(fn).__name__ != "JITFunction" or getattr(fn, "module", None) != mod.__name__:
                continue
            if "_ptr" not in " ".join(fn.arg_names):
                continue  # a @triton.jit helper (_swizzle, _tanh, _mix32, ...), compiled inside the kernels
            out[(short, name)] = (fn, obj if obj is not fn else None)
    return out


# Pointer roles: X = the input dtype, L = λ-side (fp32), F = fp32 buffers, I = int64 indices.
# Only the pointers that are not X are listed; ``f32_when`` turns X outputs into fp32 under a flag.
_ROLES = {
    ("hyper_linear", "_fwd_kernel"): dict(L=("lam_ptr", "v_ptr", "c_ptr")),
    ("hyper_linear", "_dx_kernel"): dict(L=("lam_ptr", "v_ptr"), f32_when=("SPLIT_OUT", ("out_ptr",))),
    ("hyper_linear", "_dw_kernel"): dict(L=("lam_ptr", "v_ptr"), f32_when=("SPLIT_OUT", ("dwe_ptr", "dwh_ptr"))),
    # dV, dC (λ-side) and db_e, db_h (X) as stored final by one chunk; the per-chunk partial sums
    # (all fp32) are the same signature as the fp32 variant.
    ("hyper_linear", "_small_kernel"): dict(L=("lam_ptr", "v_ptr", "c_ptr", "dv_ptr", "dc_ptr"), F=("dlam_ptr",)),
    ("hyper_conv2d", "_epilogue_kernel"): dict(L=("lam_ptr", "v_ptr", "c_ptr")),
    ("hyper_conv2d", "_bwd_prep_kernel"): dict(L=("lam_ptr", "v_ptr"), F=("ds_ptr", "gsum_ptr")),
    ("hyper_conv2d", "_hparam_kernel"): dict(L=("lam_ptr", "v_ptr", "c_ptr"),
                                             F=("ds_ptr", "gsum_ptr", "dlam_ptr", "dv_ptr", "dc_ptr", "dbe_ptr",
                                                "dbh_ptr")),
    ("hyper_embedding", "_fwd_kernel"): dict(L=("lam_ptr", "v_ptr"), I=("idx_ptr",)),
    ("hyper_embedding", "_rows_kernel"): dict(L=("lam_ptr", "v_ptr"), I=("idx_ptr",),
                                              F=("dlam_ptr", "dv_ptr", "de_ptr", "dh_ptr")),
    ("hyper_embedding", "_segment_kernel"): dict(L=("lam_ptr", "v_ptr"), I=("perm_ptr", "starts_ptr")),
    ("hyper_lstm_recurrence", "_fwd_step_kernel"): dict(F=("s_ptr", "beta_ptr")),
    ("hyper_lstm_recurrence", "_bwd_step_kernel"): dict(F=("dhin_ptr", "dcin_ptr", "s_ptr", "dcout_ptr", "dhout_ptr")),
    ("per_example_dropout", "_per_example_dropout_kernel"): dict(F=("rate_ptr", "scale_ptr"), I=("seed_offset_ptr",)),
}
_NO_DIVISIBILITY = {("hyper_lstm_recurrence", "_fwd_step_kernel"): ("N",),
                    ("hyper_lstm_recurrence", "_bwd_step_kernel"): ("N",)}


def _signature(key, fn, dtype, consts):
    roles = _ROLES[key]
    f32 = set(roles.get("F", ()))
    flag, outs = roles.get("f32_when", (None, ()))
    if flag is not None and consts.get(flag):
        f32 |= set(outs)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            if name in roles.get("I", ()):
                sig[name] = "*i64"
            elif name in f32 or name in roles.get("L", ()):
                fp64_scale = key[0] == "per_example_dropout" and dtype == "fp64" and name == "scale_ptr"
                sig[name] = "*fp64" if fp64_scale else "*fp32"
            else:
                sig[name] = "*" + dtype
        else:
            sig[name] = "i32"
        if name not in _NO_DIVISIBILITY.get(key, ()):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _job(key, arch, dt, consts, num_warps=4, num_stages=3, note=""):
    dtype, prec = dt
    consts = dict(consts)
    for p in ("PREC", "LAM_PREC"):
        if p in consts:
            consts[p] = prec
    return dict(key=list(key), arch=arch, dtype=dtype, prec=prec, consts=consts, num_warps=num_warps,
                num_stages=num_stages, note=note)


def _tuned(key, kernel, arch, dtype, nargs, consts):
    """The autotuner's configs for a large problem on sm_<arch> (its early_config_prune applied, as
    at launch on that GPU)."""
    import torch

    configs = list(kernel.configs)
    prune = getattr(kernel, "early_config_prune", None)
    if prune is not None:
        mod = sys.modules["stn_kernels.backends.triton." + key[0]]
        td = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        full = {k: (_Fake(td) if v == "X" else v) for k, v in nargs.items()}
        saved = getattr(mod, "_smem_limit", None)
        if saved is not None:
            mod._smem_limit = lambda t: SMEM_LIMIT[arch]
        try:
            configs = prune(configs, full, **consts)
        finally:
            if saved is not None:
                mod._smem_limit = saved
    return configs


def _config_jobs(key, kernel, arch, dt, base, nargs, pick=None):
    configs = _tuned(key, kernel, arch, dt[0], nargs, base)
    if pick is not None:
        configs = pick(configs)
    return [_job(key, arch, dt, {**base, **c.kwargs}, c.num_warps, c.num_stages,
                 note=f"config {c.kwargs} w{c.num_warps} s{c.num_stages}") for c in configs]


def _largest(configs, n=3):
    """The n configs with the most pipelined tile elements (the most shared memory)."""
    def size(c):
        a, b, k = (v for kk, v in c.kwargs.items() if kk.startswith("BLOCK"))
        return (a * k + b * k) * c.num_stages
    return sorted(configs, key=size, reverse=True)[:n]


def _sample(full, dt):
    """Default run: the 4 (fp16) or 3 (fp32) configs of largest pipelined tiles; all with FULL."""
    if full:
        return None
    n = 4 if dt == HALF else 3
    return lambda configs: _largest(configs, n)


def make_jobs(full: bool):
    """The compile jobs (deterministic: every worker builds the same list and takes its share)."""
    from stn_kernels.backends.triton import (
        _common,
        hyper_conv2d as hc,
        hyper_embedding as he,
        hyper_linear as hl,
        hyper_lstm_recurrence as hs,
    )

    assert not _common.INTERPRET and _common.AUTOTUNE, "workers must see the GPU config lists"
    ks = _kernels()
    expected = set(_ROLES)
    assert set(ks) == expected, f"kernels without an AOT entry (or gone): {set(ks) ^ expected}"
    archs = (90, 80) if full else (90,)
    jobs = []
    big = dict(M=8192, N=8192, K=8192, B=4096)

    # hyper_linear: autotuned GEMMs
    lin_nargs = dict(x_ptr="X", M=big["M"], N=big["N"], K=big["K"])
    for arch in archs:
        k = ("hyper_linear", "_fwd_kernel")
        fwd = dict(HAS_HP=True, HAS_BIAS=True, HAS_HB=True, PREC="", LAM_PREC="", BLOCK_H=16)
        for dt in (ALL_DTYPES if full else [HALF, F32_TF32]):
            jobs += _config_jobs(k, ks[k][1], arch, dt, fwd, lin_nargs)
            if full:
                jobs += _config_jobs(k, ks[k][1], arch, dt, {**fwd, "HAS_HP": False, "HAS_HB": False}, lin_nargs)
        if not full:
            for dt in (BF16, F32_IEEE):
                jobs += _config_jobs(k, ks[k][1], arch, dt, fwd, lin_nargs, pick=lambda c: c[:1])
        k = ("hyper_linear", "_dx_kernel")
        dx = dict(HAS_HP=True, SPLIT_OUT=False, PREC="", LAM_PREC="", BLOCK_H=16)
        for dt in (ALL_DTYPES if full else [HALF, F32_TF32]):
            jobs += _config_jobs(k, ks[k][1], arch, dt, dx, dict(g_ptr="X", **lin_nargs), _sample(full, dt))
        jobs += _config_jobs(k, ks[k][1], arch, HALF, {**dx, "SPLIT_OUT": True}, dict(g_ptr="X", **lin_nargs),
                             pick=lambda c: c[:1])
        k = ("hyper_linear", "_dw_kernel")
        dw = dict(NEED_E=True, NEED_H=True, SPLIT_OUT=False, PREC="", LAM_PREC="", BLOCK_H=16)
        for dt in (ALL_DTYPES if full else [HALF, F32_TF32]):
            jobs += _config_jobs(k, ks[k][1], arch, dt, dw, dict(g_ptr="X", **lin_nargs), _sample(full, dt))
            if full:
                jobs += _config_jobs(k, ks[k][1], arch, dt, {**dw, "NEED_H": False}, dict(g_ptr="X", **lin_nargs))
        jobs += _config_jobs(k, ks[k][1], arch, F32_TF32, {**dw, "SPLIT_OUT": True}, dict(g_ptr="X", **lin_nargs),
                             pick=lambda c: c[:1])
        k = ("hyper_linear", "_small_kernel")
        bm, bn = hl._SMALL_BLOCKS
        for dt in (ALL_DTYPES if full else [HALF, BF16, F32_TF32]):
            for hb in ((True, False) if full else (True,)):
                jobs.append(_job(k, arch, dt, dict(NEED_DLAM=True, NEED_DV=True, NEED_DC=hb, NEED_DBE=True,
                                                   NEED_DBH=hb, HAS_HB=hb, NEED_Z=True, NEED_LAM=True, NEED_DT=hb,
                                                   LAM_PREC="", BLOCK_H=16, BLOCK_M=bm, BLOCK_N=bn)))

        # hyper_lstm: autotuned step kernels
        lstm_nargs = dict(B=big["B"], N=2048)
        k = ("hyper_lstm_recurrence", "_fwd_step_kernel")
        f = dict(HAS_HP=True, HAS_BETA=True, PREC="")
        for dt in (ALL_DTYPES if full else [HALF, F32_TF32]):
            jobs += _config_jobs(k, ks[k][1], arch, dt, f, lstm_nargs, None if dt == HALF else _sample(full, dt))
        if not full:
            for dt in (BF16, F32_IEEE):
                jobs += _config_jobs(k, ks[k][1], arch, dt, f, lstm_nargs, pick=lambda c: c[:1])
        k = ("hyper_lstm_recurrence", "_bwd_step_kernel")
        b = dict(HAS_HP=True, HAS_DH=True, NEED_DH=True, PREC="")
        for dt in (ALL_DTYPES if full else [HALF, F32_TF32]):
            jobs += _config_jobs(k, ks[k][1], arch, dt, b, lstm_nargs, _sample(full, dt))

        # hyper_conv2d: fixed blocks (the two tile shapes _tiles gives for large C and P)
        dts = ALL_DTYPES[:3] if full else [HALF, F32_IEEE]
        for dt in dts:
            for bc, bp in (hc._tiles(512, 4096, True), hc._tiles(512, 4096, False)):
                jobs.append(_job(("hyper_conv2d", "_epilogue_kernel"), arch, dt,
                                 dict(PACKED=True, HAS_BIAS=True, HAS_HB=True, WRITE_Z=True, BLOCK_C=bc, BLOCK_P=bp,
                                      BLOCK_H=16)))
            for bc, bp in (hc._tiles(512, 4096, True, 64), hc._tiles(512, 4096, False, 64)):
                jobs.append(_job(("hyper_conv2d", "_bwd_prep_kernel"), arch, dt,
                                 dict(PACKED=True, WRITE_GE=True, WRITE_GH=True, NEED_DS=True, NEED_GSUM=True,
                                      BLOCK_C=bc, BLOCK_P=bp, BLOCK_H=16)))
            bb, bc = hc._HP_BLOCKS
            jobs.append(_job(("hyper_conv2d", "_hparam_kernel"), arch, dt,
                             dict(NEED_DLAM=True, NEED_DV=True, NEED_DC=True, NEED_DBE=True, NEED_DBH=True,
                                  HAS_HB=True, NEED_DS=True, NEED_DT=True, BLOCK_B=bb, BLOCK_C=bc, BLOCK_H=16)))

            # hyper_embedding: fixed blocks
            bm, bd = he._FWD_BLOCKS
            jobs.append(_job(("hyper_embedding", "_fwd_kernel"), arch, dt,
                             dict(HAS_HP=True, BLOCK_M=bm, BLOCK_D=bd, BLOCK_H=16)))
            bm, bd = he._ROWS_BLOCKS
            jobs.append(_job(("hyper_embedding", "_rows_kernel"), arch, dt,
                             dict(NEED_DLAM=True, NEED_DV=True, ATOMIC_E=True, ATOMIC_H=True, BLOCK_M=bm,
                                  BLOCK_D=bd, BLOCK_H=16)))
            bk, bd = he._SEG_BLOCKS
            jobs.append(_job(("hyper_embedding", "_segment_kernel"), arch, dt,
                             dict(NEED_E=True, NEED_H=True, BLOCK_K=bk, BLOCK_D=bd, BLOCK_H=16)))

        # dropout
        from stn_kernels.backends.triton import per_example_dropout as dr
        for dt in ALL_DTYPES[:3] + [("fp64", "ieee")]:
            jobs.append(_job(("per_example_dropout", "_per_example_dropout_kernel"), arch, dt, dict(BLOCK=dr.BLOCK)))

    if not full:
        # sm_80: the single configs used without autotuning (said to fit Ampere in fp32).
        for key, cfg, base in ((("hyper_linear", "_fwd_kernel"), hl._DEFAULT_TWO[0],
                                dict(HAS_HP=True, HAS_BIAS=True, HAS_HB=True, PREC="", LAM_PREC="", BLOCK_H=16)),
                               (("hyper_lstm_recurrence", "_fwd_step_kernel"), hs._DEFAULT_FWD[0],
                                dict(HAS_HP=True, HAS_BETA=True, PREC=""))):
            names = [c for c in ks[key][1].configs[0].kwargs if c.startswith("BLOCK")]
            meta = {**dict(zip(names, cfg[:3])), **{c: v for c, v in ks[key][1].configs[0].kwargs.items()
                                                    if not c.startswith("BLOCK")}}
            jobs.append(_job(key, 80, F32_TF32, {**base, **meta}, cfg[3], cfg[4],
                             note=f"default (no autotune) {cfg}"))
    return jobs


def _compile(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    key = tuple(job["key"])
    fn = _KERNELS[key][0]
    sig, attrs = _signature(key, fn, job["dtype"], job["consts"])
    src = ASTSource(fn, sig, constexprs=job["consts"], attrs=attrs)
    target = GPUTarget("cuda", job["arch"], 64 if job["arch"] >= 90 else 32)
    try:
        k = triton.compile(src, target=target, options=dict(num_warps=job["num_warps"],
                                                            num_stages=job["num_stages"]))
    except Exception as e:  # noqa: BLE001 - reported, with the job, by the test
        return dict(job, error=f"{type(e).__name__}: {str(e)[-1500:]}")
    return dict(job, shared=int(k.metadata.shared))


_KERNELS = {}


def _worker(rank: int, n: int, full: bool, out_path: str):
    _KERNELS.update(_kernels())
    jobs = make_jobs(full)
    results = [_compile(j) for i, j in enumerate(jobs) if i % n == rank]
    Path(out_path).write_text(json.dumps(dict(total=len(jobs), results=results)))


# --------------------------------------------------------------------------- the test


def _describe(r):
    flags = {k: v for k, v in r["consts"].items() if not k.startswith("BLOCK") and k != "GROUP"}
    blocks = {k: v for k, v in r["consts"].items() if k.startswith("BLOCK")}
    return (f"sm_{r['arch']} {r['key'][0]}.{r['key'][1]} {r['dtype']} blocks={blocks} "
            f"num_warps={r['num_warps']} num_stages={r['num_stages']} {flags}")


@pytest.mark.skipif(not _ptxas_available(), reason="needs Triton with its bundled ptxas")
def test_kernels_compile_for_gpu_targets(tmp_path):
    full = os.environ.get("STN_KERNELS_AOT_FULL") == "1"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["STN_KERNELS_TRITON_AUTOTUNE"] = "1"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    code = ("import sys, test_triton_aot as t; "
            "t._worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == '1', sys.argv[4])")
    procs, outs = [], []
    for rank in range(WORKERS):
        out = tmp_path / f"aot_{rank}.json"
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(rank), str(WORKERS), "1" if full else "0",
                                       str(out)], env=env, cwd=str(root), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=3600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"AOT worker failed:\n{log[-4000:]}"
    data = [json.loads(o.read_text()) for o in outs]
    results = [r for d in data for r in d["results"]]
    assert len(results) == data[0]["total"] > 0

    if full:
        for r in sorted(results, key=lambda r: (r["arch"], r["key"], r["dtype"], r["prec"])):
            print(f"{r.get('shared', 'ERROR'):>8} {r['prec']:>4} {_describe(r)}")
    errors = [f"{_describe(r)}:\n    {r['error']}" for r in results if "error" in r]
    over = [f"{_describe(r)}: {r['shared']} B of shared memory > {SMEM_LIMIT[r['arch']]}"
            for r in results if "shared" in r and r["shared"] > SMEM_LIMIT[r["arch"]]]
    assert not errors, "kernels that do not compile for the GPU:\n" + "\n".join(errors)
    assert not over, ("configs whose shared memory does not fit the GPU (autotune would skip them, or a "
                      "fixed launch fail with OutOfResources):\n" + "\n".join(over))


if __name__ == "__main__":  # python tests/test_triton_aot.py: the full matrix, a table of shared memory
    os.environ["STN_KERNELS_AOT_FULL"] = "1"
    sys.exit(pytest.main([__file__, "-q", "-s"]))
