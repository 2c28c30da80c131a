"""Ahead-of-time compilation of every Triton kernel from its real launches: what a GPU would compile.

Without a GPU, Triton's bundled ptxas compiles cubins on the CPU for an explicit ``GPUTarget`` (no driver);
on a GPU (``scripts/device_check.sh``) the same step compiles for the device and also loads each kernel, so
the driver's figures stand beside the prediction::

    python -m stn_kernels.backends.triton.aot [--arch 90 80] [--full] [--json FILE]
    python -m stn_kernels.backends.triton.aot --device

1. **record**: the representative calls of :mod:`.aot_cases` (all seven ops, forward and backward, every
   dtype, λ per example / shared / none, ...) run through the public API and the modules on CPU tensors,
   with the kernel modules imported as on a GPU (TRITON_INTERPRET unset at their import, autotuning on: the
   GPU config lists and block sizes). Each launch is recorded instead of run (arguments, constexprs, launch
   options); the host code around it runs as on a GPU of ``GPU_SMS`` multiprocessors.
2. **bind**: each launch goes through Triton's own JIT binder for the target (what ``kernel[grid](...)``
   does before compiling: ``create_function_from_signature`` and ``JITFunction._pack_args``, the same in
   Triton 3.6-3.8), so the signature, the specialisations (integers equal to 1, 16-divisible pointers and
   integers) and the constexprs are the GPU JIT's.
3. **configs**: for an autotuned kernel, the configs its ``early_config_prune`` keeps on that target for the
   recorded sizes and for large ones (all it may try), and the no-autotune default; else the launch's own.
4. **compile** each distinct job and read ptxas's report (``-v``): registers, spill stores and loads,
   stack frame; and the shared memory Triton allocates (``metadata.shared``).

:func:`problems` lists what a GPU would hit: a compile error, shared memory over the target's per-block
limit, more than ``SPILL_LIMIT`` bytes of spill stores per thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

MODULES = ("hyper_linear", "hyper_conv2d", "hyper_embedding", "hyper_lstm_recurrence", "per_example_dropout",
           "augment", "affine")
PACKAGE = __package__ or "stn_kernels.backends.triton"  # also when run with python -m
SMEM_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory per block (opt-in maximum): H100/H200, A100
SPILL_LIMIT = 1024  # bytes of spill stores per thread that a config may have
GPU_SMS = 132  # the host code's SM count while recording (H100 SXM; splits and chunking follow it)
BIG = 1 << 16  # the sizes at which the autotuners' prunes are also asked (the most configs they keep)
# The no-autotune configs of the autotuned kernels: (module attribute of the tuples, block names).
NO_AUTOTUNE = {
    ("hyper_linear", "_fwd_kernel"): ("_DEFAULT_FWD", ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
    ("hyper_linear", "_dx_kernel"): ("_DEFAULT_DX", ("BLOCK_M", "BLOCK_K", "BLOCK_N")),
    ("hyper_linear", "_dw_kernel"): ("_DEFAULT_DW", ("BLOCK_N", "BLOCK_K", "BLOCK_M")),
    ("hyper_lstm_recurrence", "_fwd_step_kernel"): ("_DEFAULT_FWD", ("BLOCK_B", "BLOCK_J", "BLOCK_K")),
    ("hyper_lstm_recurrence", "_bwd_step_kernel"): ("_DEFAULT_BWD", ("BLOCK_B", "BLOCK_K", "BLOCK_J")),
}
_SIZE_ARGS = ("M", "N", "K", "B")  # the integer arguments the prunes read as problem sizes


def _module(name: str):
    import importlib

    return importlib.import_module(f"{PACKAGE}.{name}")


def gpu_mode_env(env: Optional[dict] = None) -> dict:
    """A copy of ``env`` (default os.environ) in which the kernel modules import as on a GPU."""
    env = dict(os.environ if env is None else env)
    env.pop("TRITON_INTERPRET", None)
    env["STN_KERNELS_TRITON_AUTOTUNE"] = "1"
    return env


def kernels() -> Dict[tuple, object]:
    """(module, kernel name) -> the launched object (an Autotuner or a JITFunction) of every kernel of the
    seven modules; @triton.jit helpers (called inside kernels) are left out."""
    common = _module("_common")
    if common.INTERPRET or not common.AUTOTUNE:
        raise RuntimeError("the Triton kernel modules were imported for the interpreter or without autotuning: "
                           "run this in a process whose environment has no TRITON_INTERPRET and "
                           "STN_KERNELS_TRITON_AUTOTUNE=1 when they are imported (aot.gpu_mode_env())")
    out = {}
    for short in MODULES:
        mod = _module(short)
        for name, obj in vars(mod).items():
            fn = obj if type(obj).__name__ == "JITFunction" else getattr(obj, "fn", None)
            if type(fn).__name__ != "JITFunction" or fn.module != mod.__name__:
                continue
            if not any(a.endswith("_ptr") for a in fn.arg_names):
                continue  # a helper
            out[(short, name)] = obj
    return out


def jit_function(obj):
    while type(obj).__name__ != "JITFunction":
        obj = obj.fn
    return obj


# --------------------------------------------------------------------------- 1. record


@dataclass
class Launch:
    key: tuple
    args: tuple
    kwargs: dict
    case: str


@contextlib.contextmanager
def recording(launches: List[Launch], case: List[str]):
    """Every kernel launch appends a :class:`Launch` to ``launches`` instead of running; the host code sees a
    GPU of GPU_SMS multiprocessors; the registry lets the ``triton`` backend run CPU tensors."""
    objs = kernels()
    saved_env = os.environ.get("TRITON_INTERPRET")
    saved_sms = {}

    def recorder(key):
        def run(*args, grid=None, warmup=False, **kwargs):
            launches.append(Launch(key, args, kwargs, case[0]))
        return run

    try:
        for key, obj in objs.items():
            obj.run = recorder(key)
        for short in MODULES:
            mod = _module(short)
            if hasattr(mod, "_num_sms"):
                saved_sms[short] = mod._num_sms
                mod._num_sms = lambda device: GPU_SMS
        os.environ["TRITON_INTERPRET"] = "1"  # read by the registry per call: the triton backend on CPU tensors
        yield
    finally:
        for obj in objs.values():
            vars(obj).pop("run", None)
        for short, f in saved_sms.items():
            _module(short)._num_sms = f
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def record(cases: Sequence[tuple]) -> List[Launch]:
    """Runs each (name, callable) of ``cases`` with the triton backend and returns the launches."""
    import torch

    import stn_kernels

    launches: List[Launch] = []
    case = [""]
    with recording(launches, case):
        for name, call in cases:
            case[0] = name
            tf32 = torch.backends.cuda.matmul.allow_tf32
            try:
                with stn_kernels.use_backend("triton"):
                    call()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
    return launches


# --------------------------------------------------------------------------- 2.-3. bind, configs


@dataclass
class Job:
    key: tuple
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str  # "default (no autotune)", "kept", "launch"
    arg_names: tuple = ()
    cases: List[str] = field(default_factory=list)

    @property
    def ident(self) -> str:
        return repr((self.key, self.arch, self.signature, sorted(self.constexprs.items(), key=str),
                     sorted(self.attrs.items(), key=str), self.options.get("num_warps"),
                     self.options.get("num_stages")))

    @property
    def variant(self) -> str:
        """The kernel variant: everything but the config (block sizes, GROUP, warps, stages)."""
        meta = {k: v for k, v in self.constexprs.items()
                if not (str(self.names.get(k, "")).startswith("BLOCK") or self.names.get(k) == "GROUP")}
        return repr((self.key, self.arch, self.signature, sorted(meta.items(), key=str),
                     sorted(self.attrs.items(), key=str)))

    @property
    def names(self) -> dict:
        """constexpr path -> argument name."""
        return {(i,): n for i, n in enumerate(self.arg_names)}


def target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


@contextlib.contextmanager
def on_target(arch: int):
    """The kernel modules' device queries answer for sm_<arch> (used by the prunes)."""
    patched = []
    for short in MODULES:
        mod = _module(short)
        for name, value in (("_smem_limit", lambda t: SMEM_LIMIT[arch]), ("_device_arch", lambda t: arch)):
            if hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, value)
    try:
        yield
    finally:
        for mod, name, value in patched:
            setattr(mod, name, value)


def _configs(key, obj, launch: Launch, arch: int) -> List[tuple]:
    """(config kwargs incl. num_warps / num_stages, label) to compile for this launch on sm_<arch>."""
    if type(obj).__name__ == "JITFunction":
        return [(dict(launch.kwargs), "launch")]
    fn = jit_function(obj)
    nargs = dict(zip(fn.arg_names, launch.args))
    out, seen = [], set()
    with on_target(arch):
        for sizes in (nargs, {k: (BIG if k in _SIZE_ARGS else v) for k, v in nargs.items()}):
            kept = obj.configs
            if obj.early_config_prune is not None and len(obj.configs) > 1:
                kept = obj.early_config_prune(obj.configs, sizes, **launch.kwargs)
            for c in kept:
                if id(c) not in seen:
                    seen.add(id(c))
                    out.append(({**launch.kwargs, **c.all_kwargs()}, "kept"))
    attr, names = NO_AUTOTUNE[key]
    for blocks in getattr(_module(key[0]), attr):
        meta = {k: v for k, v in obj.configs[0].kwargs.items() if not k.startswith("BLOCK")}
        out.append(({**launch.kwargs, **dict(zip(names, blocks[:3])), **meta, "num_warps": blocks[3],
                     "num_stages": blocks[4]}, "default (no autotune)"))
    return out


_BINDERS: Dict[tuple, tuple] = {}


def bind(fn, arch: int, args: tuple, kwargs: dict) -> tuple:
    """(signature, constexprs, attrs, options) as Triton's JIT binds ``fn[grid](*args, **kwargs)`` for
    sm_<arch>."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if (fn, arch) not in _BINDERS:
        backend = make_backend(target(arch))
        _BINDERS[(fn, arch)] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[(fn, arch)]
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):  # Triton 3.8
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def jobs(launches: Iterable[Launch], archs: Sequence[int]) -> List[Job]:
    """The distinct compile jobs of ``launches`` on each target, in a deterministic order."""
    objs = kernels()
    found: Dict[str, Job] = {}
    for launch in launches:
        obj = objs[launch.key]
        fn = jit_function(obj)
        for arch in archs:
            for kwargs, label in _configs(launch.key, obj, launch, arch):
                sig, consts, attrs, options = bind(fn, arch, launch.args, kwargs)
                job = Job(launch.key, arch, sig, consts, attrs, options, label, tuple(fn.arg_names))
                known = found.setdefault(job.ident, job)
                if label.startswith("default"):
                    known.config = label
                if launch.case not in known.cases:
                    known.cases.append(launch.case)
    return list(found.values())


# --------------------------------------------------------------------------- 4. compile


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                    r"Used (\d+) registers", re.S)


def ptxas_report(log: str) -> Optional[dict]:
    """registers, spill stores / loads and stack frame (bytes per thread) from ptxas -v output."""
    found = _PTXAS.search(log)
    if found is None:
        return None
    stack, stores, loads, regs = (int(v) for v in found.groups())
    return dict(regs=regs, spill_stores=stores, spill_loads=loads, stack=stack)


def _reports_dir() -> str:
    from triton import knobs

    return os.path.join(knobs.cache.dir, "stn_kernels_ptxas")


def _compile(src, job: Job):
    """triton.compile with ptxas's report captured: (kernel, report or None when the cubin came from Triton's
    cache without a stored report)."""
    import triton
    from triton import knobs

    log = io.StringIO()
    with knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target(job.arch), options=job.options)
    path = os.path.join(_reports_dir(), f"{kernel.hash}-sm{job.arch}.json")
    report = ptxas_report(log.getvalue())
    if report is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f)
    elif os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    return kernel, report


def compile_job(job: Job, load: bool = False) -> dict:
    """Compiles ``job``; the result: the job's description, and ``error`` or shared / ptxas figures (with
    ``load``, on a GPU: the driver's registers and local memory per thread too). ptxas's report is kept beside
    Triton's cache (``<cache dir>/stn_kernels_ptxas``), so a cached cubin still has it."""
    from triton.compiler import ASTSource

    fn = jit_function(kernels()[job.key])
    out = describe(job)
    start = time.perf_counter()
    try:
        kernel, report = _compile(ASTSource(fn, job.signature, job.constexprs, job.attrs), job)
        if report is None:  # cached before its report was kept: compile once more in an empty cache
            saved = os.environ.get("TRITON_CACHE_DIR")
            with tempfile.TemporaryDirectory() as empty:
                os.environ["TRITON_CACHE_DIR"] = empty
                try:
                    kernel, report = _compile(ASTSource(fn, job.signature, job.constexprs, job.attrs), job)
                finally:
                    if saved is None:
                        os.environ.pop("TRITON_CACHE_DIR")
                    else:
                        os.environ["TRITON_CACHE_DIR"] = saved
        if load:
            kernel._init_handles()
            out.update(driver_regs=int(kernel.n_regs), driver_local=int(kernel.n_spills))
    except Exception as e:  # noqa: BLE001 - reported with the job
        out["error"] = f"{type(e).__name__}: {str(e)[-1200:]}"
        return out
    finally:
        out["seconds"] = round(time.perf_counter() - start, 2)
    out.update(shared=int(kernel.metadata.shared), **(report or {}))
    return out


def describe(job: Job) -> dict:
    names = job.names
    consts = {names[k]: (str(v) if not isinstance(v, (bool, int, float, str, type(None))) else v)
              for k, v in job.constexprs.items() if k in names}
    blocks = {k: v for k, v in consts.items() if k.startswith("BLOCK")}
    flags = {k: v for k, v in consts.items() if not k.startswith("BLOCK") and k != "GROUP"}
    dtype = next((t[1:] for n, t in job.signature.items() if str(t).startswith("*")), "")
    return dict(kernel=f"{job.key[0]}.{job.key[1]}", arch=job.arch, dtype=dtype, flags=flags, blocks=blocks,
                num_warps=job.options.get("num_warps"), num_stages=job.options.get("num_stages"),
                config=job.config, cases=job.cases[:3], variant=job.variant)


# --------------------------------------------------------------------------- checks and the report


def problems(results: Sequence[dict], spill_limit: int = SPILL_LIMIT) -> List[str]:
    """What a GPU would hit, one line each: compile errors, shared memory over the target's limit, spill
    stores over ``spill_limit`` bytes per thread, a compile without a ptxas report."""
    out = []
    for r in results:
        where = label(r)
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["shared"] > SMEM_LIMIT[r["arch"]]:
            out.append(f"{where}: {r['shared']} B of shared memory > {SMEM_LIMIT[r['arch']]} (sm_{r['arch']})")
        if "regs" not in r:
            out.append(f"{where}: no ptxas report")
        elif r["spill_stores"] > spill_limit:
            out.append(f"{where}: {r['regs']} registers, {r['spill_stores']} B of spill stores per thread "
                       f"> {spill_limit} (loads {r['spill_loads']} B, stack {r['stack']} B)")
    return out


def label(r: dict) -> str:
    flags = " ".join(f"{k}={v}" for k, v in r["flags"].items())
    blocks = "x".join(str(v) for v in r["blocks"].values())
    return (f"sm_{r['arch']} {r['kernel']} {r['dtype']} {flags} [{blocks} w{r['num_warps']} s{r['num_stages']}"
            f" {r['config']}] (from {', '.join(r['cases'])})")


def summary(results: Sequence[dict]) -> str:
    """A markdown table per target and kernel: variants, configs compiled, failures, the most registers,
    spill stores, stack and shared memory (and the driver's registers / local memory where loaded)."""
    rows = ["| target | kernel | variants | compiles | failed | max regs | max spill stores (B) | max stack (B) "
            "| max shared (B) | driver regs / local (B) |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: Dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r["arch"], r["kernel"]), []).append(r)
    for (arch, kernel), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        ok = [r for r in rs if "error" not in r]

        def most(name, rs=ok):
            return max((r.get(name, 0) for r in rs), default=0)
        drv = [r for r in ok if "driver_regs" in r]
        driver = f"{most('driver_regs', drv)} / {most('driver_local', drv)}" if drv else "-"
        rows.append(f"| sm_{arch} | {kernel} | {len({r['variant'] for r in rs})} | {len(rs)} | {len(rs) - len(ok)} "
                    f"| {most('regs')} | {most('spill_stores')} | {most('stack')} | {most('shared')} | {driver} |")
    return "\n".join(rows)


def each(r: dict) -> str:
    """One line per compile: its figures (or error) and :func:`label`."""
    if "error" in r:
        figures = f"{'ERROR ' + r['error'].splitlines()[0][:60]:<62}"
    else:
        figures = (f"{r.get('regs', '?'):>3} regs {r.get('spill_stores', '?'):>5} B spill "
                   f"{r.get('stack', '?'):>5} B stack {r['shared']:>6} B shared")
        if "driver_regs" in r:
            figures += f" | driver {r['driver_regs']:>3} regs {r['driver_local']:>5} B local"
    return f"{figures}  {label(r)}"


def compile_in_workers(argv: Sequence[str], workers: int, budget: Optional[float] = None) -> tuple:
    """Runs ``python -m stn_kernels.backends.triton.aot ARGV`` in ``workers`` processes (in the environment of
    :func:`gpu_mode_env`), one shard each, for at most ``budget`` seconds (then they are stopped and what they
    compiled so far is kept): (the kernels seen, the number of jobs, every result, whether all finished)."""
    env = gpu_mode_env()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    deadline = None if budget is None else time.monotonic() + budget
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"{i}.json") for i in range(workers)]
        logs = [open(os.path.join(tmp, f"{i}.log"), "w+") for i in range(workers)]
        procs = [subprocess.Popen([sys.executable, "-m", f"{PACKAGE}.aot", *argv, "--workers", "1", "--quiet",
                                   "--shard", f"{i}/{workers}", "--json", out], env=env, stdout=log,
                                  stderr=subprocess.STDOUT) for i, (out, log) in enumerate(zip(outs, logs))]
        finished = True
        for p, log in zip(procs, logs):
            try:
                p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                finished = False
                continue
            if p.returncode not in (0, 1):  # 1: it found problems
                log.seek(0)
                raise RuntimeError(f"AOT worker failed (exit {p.returncode}):\n{log.read()[-4000:]}")
        data = []
        for out, log in zip(outs, logs):
            log.close()
            if os.path.exists(out):
                with open(out) as f:
                    data.append(json.load(f))
    if not data:
        return [], 0, [], False
    return data[0]["kernels"], data[0]["total"], [r for d in data for r in d["results"]], finished


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (see the module docstring); exit status 1 when :func:`problems` finds any."""
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 80)")
    parser.add_argument("--device", action="store_true",
                        help="compile for this machine's GPU and load each kernel (driver registers / local memory)")
    parser.add_argument("--full", action="store_true", help="every job (default: the fast subset of make test)")
    parser.add_argument("--modules", nargs="+", choices=MODULES, help="only these kernel modules")
    parser.add_argument("--workers", type=int, default=1, help="processes compiling at once (default 1)")
    parser.add_argument("--shard", default="0/1", help="I/N: compile every N-th job from the I-th (a worker's)")
    parser.add_argument("--json", help="write the kernels seen, the number of jobs and every result to this file")
    parser.add_argument("--each", action="store_true", help="one line per compile after the table")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    parser.add_argument("--spill-limit", type=int, default=SPILL_LIMIT)
    parser.add_argument("--budget", type=float, help="with --workers: stop them after this many seconds and report "
                        "what they compiled")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    finished = True
    if args.workers > 1:
        passed = [a for a in argv if a != "--quiet"]
        if "--budget" in passed:
            del passed[passed.index("--budget"):passed.index("--budget") + 2]
        names, total, results, finished = compile_in_workers(passed, args.workers, args.budget)
    else:
        from . import aot_cases

        archs = args.arch
        if args.device:
            import torch

            major, minor = torch.cuda.get_device_capability()
            archs = [major * 10 + minor]
            SMEM_LIMIT.setdefault(archs[0], torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
        launches = [lc for lc in record(aot_cases.cases()) if not args.modules or lc.key[0] in args.modules]
        job_list = aot_cases.select(jobs(launches, archs), full=args.full)
        rank, n = (int(v) for v in args.shard.split("/"))
        names, total = sorted(f"{a}.{b}" for a, b in kernels()), len(job_list)

        def write(results):  # after each compile: a stopped worker leaves what it compiled
            if args.json:
                with open(args.json + ".tmp", "w") as f:
                    json.dump(dict(kernels=names, total=total, results=results), f, default=str)
                os.replace(args.json + ".tmp", args.json)
        results = []
        write(results)
        for job in job_list[rank::n]:
            results.append(compile_job(job, args.device))
            write(results)
    found = problems(results, args.spill_limit)
    if not args.quiet:
        import triton

        print(f"triton {triton.__version__}: {len(results)} compiles of {total} ({time.perf_counter() - start:.0f} s"
              f"{'' if finished else ', stopped at the budget'})\n")
        print(summary(results))
        if args.each:
            print()
            for r in sorted(results, key=label):
                print(each(r))
        print(f"\n{len(found)} problems (compile errors, shared memory over the limit, more than {args.spill_limit} B "
              "of spill stores per thread)")
        for line in found:
            print(" -", line)
    if args.json and args.workers > 1:
        with open(args.json, "w") as f:
            json.dump(dict(kernels=names, total=total, results=results), f, default=str)
    return 1 if found or not finished else 0


if __name__ == "__main__":
    if "stn_kernels.backends.triton._common" in sys.modules:
        raise SystemExit("run as python -m stn_kernels.backends.triton.aot")
    os.environ.update(gpu_mode_env())
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
