"""The part of the benchmark that every layer shares (``python -m stn_kernels.bench``).

A layer module (``stn_kernels.bench.linear``, ``conv2d``, ``embedding``, ``lstm``) describes
itself with a :class:`Layer` record: its shapes, a case factory, a registry of providers
(:class:`ProviderSpec`) and the float32 ground truth of its published formulation. The rest is
here, the same for every layer, and knows none of them:

* :class:`Case`: one (shape, dtype, device) of a layer: random leaves, the providers built for it
  (:class:`Impl`), a fixed random gradient per output shape and the float32 expected result
  (obtained once, through the case's layer).
* Providers: every layer has ``published``, the official STN formulation run eagerly, against
  which every ratio is taken; most also have ``floor`` (what no implementation can beat by
  much), ``published+compile`` (the same under ``torch.compile``) and ``stn:<backend>``
  (stn_kernels under ``use_backend(backend)``). Providers named ``*+compile`` share the compile
  budget and the per-case reset of compiled code (:func:`is_compiled`). A provider with a
  backend runs only where :func:`backend_unavailable` finds that backend working: one forward of
  the layer's ``stn:<backend>`` provider on the layer's tiny probe shape (cached).
* Modes (:data:`MODES`): ``fwd`` (the forward, with autograd recording), ``bwd`` (the backward
  alone: forward once outside the timed region, then ``torch.autograd.grad(...,
  retain_graph=True)``) and ``fwd+bwd``. Gradients are taken w.r.t. every leaf the provider
  names as its inputs (x, λ and every parameter).
* Timing: CUDA uses ``triton.testing.do_bench`` (median), CPU a median of ``time.perf_counter``
  samples with an adaptive count (:data:`FULL`, or :data:`QUICK` for smoke tests). Providers of
  one case run interleaved in rounds. On CUDA the fwd+bwd peak memory above what is already held
  (inputs, parameters) and a wall-clock time per call of back-to-back calls are reported too.
  Each provider's output and gradients are checked against the float32 evaluation of the
  published formulation once per case; a mismatch is noted, not fatal.

Other code (the pytest-benchmark files, tests) builds a case with a layer's ``make_case`` and
times :func:`provider_fn`. Nothing heavy is imported here: Triton only when timing on CUDA.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from stn_kernels import BackendUnavailableError, use_backend

from .report import MODES, Report, Row, Shape, one_line

__all__ = [
    "DTYPES", "FULL", "MODES", "QUICK", "TOLERANCE", "Case", "Impl", "Layer", "Options", "ProviderSpec", "Shape",
    "TimingConfig", "as_dtype", "backend_unavailable", "backend_with", "build_impl", "compiled_impl",
    "default_providers", "dtype_name", "grads_by_name", "is_compiled", "provider_fn", "provider_unavailable",
    "random_factory", "run_case", "run_mode", "uses_cudagraphs",
]

Tensor = torch.Tensor

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# Normalised max error (max |a - ref| / max |ref|) against the float32 evaluation
# above which a provider's result is noted as a mismatch (TF32 dots pass in fp32).
TOLERANCE = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def as_dtype(dtype) -> torch.dtype:
    """A torch dtype from a dtype or one of the names in :data:`DTYPES`."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def random_factory(device: torch.device, dtype: torch.dtype, seed: int) -> Callable:
    """``rand(*size, scale=1.0)``: seeded standard-normal data (never zeros) times ``scale``, in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    return rand


# ----------------------------------------------------------------------------- layers and cases

@dataclass(frozen=True, eq=False)
class Layer:
    """A layer as the harness sees it: one per ``--layer`` value (the table is the CLI's ``LAYERS``).

    ``shapes`` maps the layer's shape names (what ``--shapes`` takes) to shapes of the layer's own
    type, which ``parse_shape`` also returns (from a name, such a shape, or the ``shape_format``
    text of ``--shape``; ValueError otherwise) and ``make_case(shape, dtype=torch.float32,
    device="cpu", seed=0)`` takes. ``ground_truth(case, t32)`` evaluates the published formulation
    on the case's leaves ``t32`` (float32 copies, by name) and returns its output and the names of
    the leaves whose gradients every provider's are checked against. ``summary(rows)`` (optional)
    gives extra markdown lines after the report's legend.
    """

    name: str  # the --layer value
    op: str  # the op named in the report's title and the plot
    shapes: Dict[str, Any]
    cpu_shapes: Tuple[str, ...]  # default shapes on the CPU
    gpu_shapes: Tuple[str, ...]  # default shapes with --gpu
    parse_shape: Callable[[Any], Any]
    make_case: Callable[..., "Case"]
    providers: Dict[str, "ProviderSpec"]
    shape_format: str  # e.g. "B,H,K,N"
    probe_shape: Any  # a tiny shape on which backend_unavailable runs the stn:<backend> provider once
    ground_truth: Callable[["Case", Dict[str, Tensor]], Tuple[Tensor, Sequence[str]]]
    summary: Optional[Callable[[Sequence[Row]], List[str]]] = None


@dataclass
class Case:
    """Random inputs and parameters of one layer for one (shape, dtype, device).

    ``shape`` is the Shape the report's rows carry (name, B, H, K, N); ``spec`` is the layer's own
    shape (conv geometry, LSTM steps and layers, ...) for its providers. ``tensors`` holds the
    leaves by name (the layer's ``make_case`` lists them); those that take a gradient require grad.
    """

    layer: Layer = field(repr=False)
    shape: Shape
    dtype: torch.dtype
    device: torch.device
    tensors: Dict[str, Tensor]
    spec: Any = None
    impls: Dict[str, "Impl"] = field(default_factory=dict)
    _grad_outs: Dict[tuple, Tensor] = field(default_factory=dict)
    _expected: Optional[Tuple[Tensor, Dict[str, Tensor]]] = None

    @property
    def label(self) -> str:
        return f"{self.shape.name}/{dtype_name(self.dtype)}"

    def leaves(self, *names: str) -> Tuple[Tensor, ...]:
        """The tensors named ``names``, in that order."""
        return tuple(self.tensors[n] for n in names)

    def grad_out(self, shape) -> Tensor:
        """A fixed random gradient for an output of ``shape``."""
        shape = tuple(shape)
        if shape not in self._grad_outs:
            gen = torch.Generator(device=self.device).manual_seed(1234 + len(shape) + shape[-1])
            self._grad_outs[shape] = torch.randn(shape, generator=gen, device=self.device).to(self.dtype)
        return self._grad_outs[shape]

    def expected(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Output and gradients (by leaf name) of the layer's published formulation evaluated in
        float32 (computed once)."""
        if self._expected is None:
            t32 = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
                   for k, v in self.tensors.items()}
            with torch.enable_grad():
                out, names = self.layer.ground_truth(self, t32)
                names = tuple(names)
                grads = torch.autograd.grad(out, [t32[k] for k in names], self.grad_out(out.shape).float())
            self._expected = (out.detach(), dict(zip(names, grads)))
        return self._expected


# ----------------------------------------------------------------------------- providers

@dataclass
class Impl:
    """A provider built for one case: a forward over fixed leaves plus what the modes need."""

    name: str
    forward: Callable[[], Tensor]
    inputs: Tuple[Tensor, ...]
    canonical: Optional[Callable[[Sequence[Tensor]], Dict[str, Tensor]]]  # grads -> by name; None: no check
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    pre_call: Optional[Callable[[], None]] = None  # e.g. cudagraph_mark_step_begin before each iteration
    grad: Optional[Tensor] = None
    build_s: float = 0.0
    notes: List[str] = field(default_factory=list)
    recheck: bool = False  # re-check the result after timing (CUDA-graph replays)
    backward_error: Optional[str] = None  # set when the probe's backward failed: bwd modes are error rows


@dataclass
class Options:
    compile_mode: str = "default"


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    build: Callable[[Case, Options], Impl]
    description: str
    devices: Tuple[str, ...] = ("cpu", "cuda")
    cpu_default: bool = False
    gpu_default: bool = False
    backend: Optional[str] = None  # the stn_kernels backend, for stn:* providers


def grads_by_name(names: Sequence[str]) -> Callable[[Sequence[Tensor]], Dict[str, Tensor]]:
    """An :attr:`Impl.canonical` for a provider whose inputs are the leaves ``names``."""
    return lambda grads: dict(zip(names, grads))


def uses_cudagraphs(mode: str) -> bool:
    """Whether torch.compile's ``mode`` runs the compiled graphs as CUDA graphs (on CUDA)."""
    return mode in ("reduce-overhead", "max-autotune")


def is_compiled(provider: str) -> bool:
    """Providers named ``*+compile`` run under torch.compile: they share the compile budget and
    the per-case reset of compiled code."""
    return provider.endswith("+compile")


def compiled_impl(name: str, fn: Callable, args: Tuple[Tensor, ...], canonical, case: Case, opts: Options,
                  inputs: Optional[Tuple[Tensor, ...]] = None,
                  scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Impl:
    """An Impl running ``torch.compile(fn, mode=opts.compile_mode)`` on ``args`` (built inside ``scope``).

    ``inputs`` (default ``args``) are the leaves the gradients are taken for. torch.compile traces
    on the first call, which :func:`build_impl` makes inside the impl's scope.
    """
    import torch._dynamo
    import torch._functorch.config

    # A fresh compile per case (static shapes): no recompile limit, no automatic dynamic shapes.
    # Only the case's first compiled provider resets: a reset would drop the others' compiled code.
    if not any(is_compiled(p) for p in case.impls):
        torch._dynamo.reset()
    # The bwd mode calls the compiled backward with retain_graph=True, which a backward compiled
    # with donated buffers refuses; donation only saves memory, so it is switched off here.
    if hasattr(torch._functorch.config, "donated_buffer"):
        torch._functorch.config.donated_buffer = False
    compiled = torch.compile(fn, mode=opts.compile_mode, dynamic=False)
    impl = Impl(name, lambda: compiled(*args), args if inputs is None else inputs, canonical, scope=scope)
    if case.device.type == "cuda" and uses_cudagraphs(opts.compile_mode):
        impl.pre_call = torch.compiler.cudagraph_mark_step_begin
        impl.recheck = True
    return impl


def backend_scope(backend: str) -> Callable[[], contextlib.AbstractContextManager]:
    """The scope of an ``stn:<backend>`` provider: ``use_backend(backend)``."""
    return lambda: use_backend(backend)


@contextlib.contextmanager
def backend_with(backend: str, module: ModuleType, **settings):
    """``use_backend(backend)`` with attributes of ``module`` (a kernel module) set for the block:
    the scope of a provider that times a variant of a backend (restored afterwards)."""
    old = {k: getattr(module, k) for k in settings}
    with use_backend(backend):
        for k, v in settings.items():
            setattr(module, k, v)
        try:
            yield
        finally:
            for k, v in old.items():
                setattr(module, k, v)


_probe_cache: Dict[tuple, Optional[str]] = {}


def _probe_provider(layer: Layer, backend: str) -> Optional[ProviderSpec]:
    """The layer's ``stn:<backend>`` provider (else its first eager provider on that backend)."""
    spec = layer.providers.get(f"stn:{backend}")
    if spec is None:
        spec = next((p for p in layer.providers.values() if p.backend == backend and not is_compiled(p.name)), None)
    return spec


def backend_unavailable(layer: Layer, backend: str, device, dtype=torch.float32) -> Optional[str]:
    """None if one forward of the layer's ``stn:<backend>`` provider on its tiny probe shape runs
    here, else the reason it does not (BackendUnavailableError, ImportError or another error).
    Cached per (layer, backend, device, dtype)."""
    device = torch.device(device)
    key = (layer.name, backend, str(device), dtype)
    if key not in _probe_cache:
        spec = _probe_provider(layer, backend)
        reason = None
        if spec is None:
            reason = f"the {layer.name} layer has no stn:{backend} provider"
        else:
            try:
                case = layer.make_case(layer.probe_shape, dtype, device, seed=1)
                impl = spec.build(case, Options())
                with impl.scope(), torch.enable_grad():
                    impl.forward()  # a failing backward is reported per case, with the forward timed
            except (BackendUnavailableError, ImportError) as exc:
                reason = f"unavailable: {one_line(exc)}"
            except Exception as exc:  # a broken backend must not stop the other providers
                reason = f"failed a small call: {type(exc).__name__}: {one_line(exc)}"
        _probe_cache[key] = reason
    return _probe_cache[key]


def provider_unavailable(name: str, case: Case) -> Optional[str]:
    """None if provider ``name`` of the case's layer can run on the case's device and dtype here,
    else why not."""
    spec = case.layer.providers[name]
    if case.device.type not in spec.devices:
        return f"runs on {', '.join(spec.devices)} only"
    if spec.backend is not None:
        return backend_unavailable(case.layer, spec.backend, case.device, case.dtype)
    return None


def default_providers(layer: Layer, device) -> List[str]:
    """The layer's providers run by default on ``device`` (CPU or GPU defaults)."""
    gpu = torch.device(device).type == "cuda"
    return [p.name for p in layer.providers.values() if (p.gpu_default if gpu else p.cpu_default)]


def build_impl(provider: str, case: Case, opts: Optional[Options] = None) -> Impl:
    """Build ``provider`` for ``case`` (cached on the case) and run one checked forward and backward.

    The first call is where torch.compile compiles (and autotunes) both graphs.
    """
    if provider in case.impls:
        return case.impls[provider]
    registry = case.layer.providers
    if provider not in registry:
        raise ValueError(f"provider: expected one of {sorted(registry)}, got {provider!r}")
    opts = opts or Options()
    t0 = time.perf_counter()
    impl = registry[provider].build(case, opts)
    grads = None
    with impl.scope(), torch.enable_grad():
        if impl.pre_call:
            impl.pre_call()
        out = impl.forward()
        impl.grad = case.grad_out(out.shape)
        try:
            grads = torch.autograd.grad(out, impl.inputs, impl.grad)
        except Exception as exc:  # keep the forward timings of a provider whose backward fails
            impl.backward_error = f"backward failed: {type(exc).__name__}: {one_line(exc)}"
    _synchronize(case.device)
    impl.build_s = time.perf_counter() - t0
    if impl.canonical is not None:
        err = _mismatch(case, out, None if grads is None else impl.canonical(grads))
        if err:
            impl.notes.append(err)
    case.impls[provider] = impl
    return impl


def _max_err(a: Tensor, ref: Tensor) -> float:
    scale = ref.abs().max().item()
    return (a.float() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def _mismatch(case: Case, out: Optional[Tensor], grads: Optional[Dict[str, Tensor]]) -> Optional[str]:
    """A note naming the results that differ from the float32 evaluation, or None."""
    ref_out, ref_grads = case.expected()
    tol = TOLERANCE.get(case.dtype, 1e-2)
    bad = []
    if out is not None:
        err = _max_err(out.detach(), ref_out)
        if not err <= tol:
            bad.append(f"out {err:.1e}")
    for name, g in (grads or {}).items():
        err = _max_err(g, ref_grads[name])
        if not err <= tol:
            bad.append(f"d{name} {err:.1e}")
    return f"MISMATCH vs float32 (max abs err / max abs ref > {tol:g}): {', '.join(bad)}" if bad else None


def _mode_closure(impl: Impl, mode: str) -> Callable[[], object]:
    """The callable timed for ``mode``; it must run inside ``impl.scope()``."""
    forward, inputs, grad, pre = impl.forward, impl.inputs, impl.grad, impl.pre_call
    if mode != "fwd" and impl.backward_error:
        raise RuntimeError(impl.backward_error)
    if mode == "fwd":
        if pre is None:
            return forward

        def run_fwd():
            pre()
            return forward()

        return run_fwd
    if mode == "fwd+bwd":
        def run_fwd_bwd():
            if pre is not None:
                pre()
            return torch.autograd.grad(forward(), inputs, grad)

        return run_fwd_bwd
    if mode == "bwd":
        with torch.enable_grad():
            if pre is not None:
                pre()
            out = forward()

        def run_bwd():
            return torch.autograd.grad(out, inputs, grad, retain_graph=True)

        return run_bwd
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def provider_fn(provider: str, case: Case, mode: str, compile_mode: str = "default") -> Callable[[], object]:
    """A self-contained callable running ``provider`` on ``case`` in ``mode`` ("fwd", "bwd", "fwd+bwd").

    Builds (and, for torch.compile, compiles) on first use; raises BackendUnavailableError (or
    ImportError) when an stn backend cannot run here.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    spec = case.layer.providers.get(provider)
    if spec is None:
        raise ValueError(f"provider: expected one of {sorted(case.layer.providers)}, got {provider!r}")
    if spec.backend is not None:
        why = provider_unavailable(provider, case)
        if why:
            raise BackendUnavailableError(f"{provider}: {why}")
    impl = build_impl(provider, case, Options(compile_mode))
    with impl.scope():
        fn = _mode_closure(impl, mode)
    if impl.scope is contextlib.nullcontext:
        return fn

    def scoped():
        with impl.scope():
            return fn()

    return scoped


# ----------------------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimingConfig:
    rounds: int
    # CPU: seconds per (case, mode) over all providers; minimum samples per round
    cpu_target_s: float
    cpu_min_per_round: int
    cpu_max_per_round: int
    # CUDA: do_bench warm-up and repetition time per round, in ms
    gpu_warmup_ms: int
    gpu_rep_ms: int
    gpu_wall_max_calls: int  # back-to-back calls for the CUDA wall-clock time (about gpu_rep_ms of work)


FULL = TimingConfig(rounds=3, cpu_target_s=1.0, cpu_min_per_round=1, cpu_max_per_round=50, gpu_warmup_ms=10,
                    gpu_rep_ms=40, gpu_wall_max_calls=200)
QUICK = TimingConfig(rounds=1, cpu_target_s=0.05, cpu_min_per_round=3, cpu_max_per_round=10, gpu_warmup_ms=5,
                     gpu_rep_ms=10, gpu_wall_max_calls=20)

_do_bench = None


def _get_do_bench():
    """triton.testing.do_bench returning the median (return_mode="median", else quantiles=[0.5])."""
    global _do_bench
    if _do_bench is None:
        import inspect

        from triton.testing import do_bench

        if "return_mode" in inspect.signature(do_bench).parameters:
            def bench(fn, warmup, rep):
                return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        else:
            def bench(fn, warmup, rep):
                r = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])
                return float(r[0] if isinstance(r, (list, tuple)) else r)
        _do_bench = bench
    return _do_bench


def _time_group(fns: Dict[str, Callable], impls: Dict[str, Impl], device: torch.device, cfg: TimingConfig
                ) -> Tuple[Dict[str, float], Dict[str, int], Dict[str, str], Dict[str, float], Dict[str, float]]:
    """Median ms per provider, timed interleaved: each round runs every provider once, in a
    rotated order. Returns (median ms, number of samples, errors, CUDA wall ms, spread: the
    interquartile range of the samples in % of their median, None with fewer than 4).

    On CUDA the median is do_bench's (device time between events, L2 flushed before each call;
    launch overhead shorter than the flush stays hidden), so a wall-clock time per call of
    back-to-back calls, host launch overhead included, is measured as well."""
    names = list(fns)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    errors: Dict[str, str] = {}
    per_round: Dict[str, int] = {}
    if device.type != "cuda":
        # Warm-up (two calls each), which also estimates the per-call time.
        for n in names:
            try:
                with impls[n].scope():
                    fns[n]()
                    t0 = time.perf_counter()
                    fns[n]()
                    est = time.perf_counter() - t0
            except Exception as exc:
                errors[n] = f"{type(exc).__name__}: {one_line(exc)}"
                continue
            share = cfg.cpu_target_s / (max(len(names), 1) * cfg.rounds)
            per_round[n] = int(min(cfg.cpu_max_per_round, max(cfg.cpu_min_per_round, share // max(est, 1e-7))))
    else:
        bench = _get_do_bench()
    for r in range(cfg.rounds):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        for n in order:
            if n in errors:
                continue
            fn = fns[n]
            try:
                with impls[n].scope():
                    if device.type == "cuda":
                        warm = cfg.gpu_warmup_ms * (3 if r == 0 else 1)
                        samples[n].append(bench(fn, warm, cfg.gpu_rep_ms))
                    else:
                        for _ in range(per_round[n]):
                            t0 = time.perf_counter()
                            fn()
                            samples[n].append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:
                errors[n] = f"{type(exc).__name__}: {one_line(exc)}"
    medians = {n: statistics.median(s) for n, s in samples.items() if s and n not in errors}
    counts = {n: len(s) for n, s in samples.items()}
    spreads = {n: _iqr_percent(s) for n, s in samples.items() if len(s) >= 4 and n in medians}
    walls: Dict[str, float] = {}
    if device.type == "cuda":
        for n, ms in medians.items():
            calls = int(min(cfg.gpu_wall_max_calls, max(3, cfg.gpu_rep_ms / max(ms, 1e-3))))
            try:
                with impls[n].scope():
                    fns[n]()
                    torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fns[n]()
                    torch.cuda.synchronize(device)
                    walls[n] = (time.perf_counter() - t0) * 1e3 / calls
            except Exception as exc:
                errors[n] = f"{type(exc).__name__}: {one_line(exc)}"
    return medians, counts, errors, walls, spreads


def _iqr_percent(samples: List[float]) -> float:
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return 100.0 * (q3 - q1) / statistics.median(samples)


def _peak_memory_mib(fn: Callable, impl: Impl, device: torch.device) -> float:
    """Peak CUDA memory of one call above what was allocated before it, in MiB."""
    gc.collect()
    with impl.scope():
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - before) / 2 ** 20


# ----------------------------------------------------------------------------- the run of one case

def run_case(case: Case, providers: Sequence[str], modes: Sequence[str], cfg: TimingConfig, opts: Options,
             report: Report, deadline: Optional[float] = None, compile_state: Optional[dict] = None) -> bool:
    """Time every provider for every mode of one case; False if the time budget ran out.

    Providers the case's layer does not have, or that cannot run here, are skipped with a note.
    ``deadline`` is a ``time.monotonic()`` value; ``compile_state`` ({"spent": s, "budget": s or
    None}) carries the compile time of ``*+compile`` providers across the cases of a run.
    """
    if compile_state is None:
        compile_state = {"spent": 0.0, "budget": None}
    device = case.device
    impls: Dict[str, Impl] = {}
    try:
        for p in providers:
            if p not in case.layer.providers:
                report.note(f"{p} skipped: not a provider of the {case.layer.name} layer")
                continue
            why = provider_unavailable(p, case)
            if why:
                report.note(f"{p} skipped ({device.type}, {dtype_name(case.dtype)}): {why}")
                continue
            if is_compiled(p) and compile_state.get("budget") is not None \
                    and compile_state["spent"] >= compile_state["budget"]:
                report.note(f"{p} skipped from {case.label} on: the compile budget of "
                            f"{compile_state['budget']:.0f} s is spent")
                continue
            try:
                impl = build_impl(p, case, opts)
            except Exception as exc:
                report.note(f"{p} failed at {case.label}: {type(exc).__name__}: {one_line(exc)}")
                continue
            if is_compiled(p):
                compile_state["spent"] += impl.build_s
                report.note(f"{p} ({opts.compile_mode}) compiled for {case.label} in {impl.build_s:.1f} s")
            impls[p] = impl
        for mode in modes:
            if deadline is not None and time.monotonic() > deadline:
                return False
            report.add(run_mode(case, impls, mode, cfg))
        return True
    finally:
        compiled = any(is_compiled(p) for p in case.impls)
        impls.clear()
        case.impls.clear()
        if compiled:
            _reset_compiled()


def _reset_compiled() -> None:
    """Drop compiled code and CUDA-graph pools of the finished case."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            from torch._inductor.cudagraph_trees import reset_cudagraph_trees

            reset_cudagraph_trees()
    except Exception as exc:  # cleanup only
        print(f"[bench] resetting torch.compile state failed: {exc}", file=sys.stderr)


def run_mode(case: Case, impls: Dict[str, Impl], mode: str, cfg: TimingConfig) -> List[Row]:
    """Time one mode of every built provider, interleaved; then peak memory and the rows."""
    device = case.device
    fns: Dict[str, Callable] = {}
    errors: Dict[str, str] = {}
    for p, impl in impls.items():
        try:
            with impl.scope():
                fns[p] = _mode_closure(impl, mode)
        except Exception as exc:
            errors[p] = f"{type(exc).__name__}: {one_line(exc)}"
    medians, counts, timing_errors, walls, spreads = _time_group(fns, impls, device, cfg)
    errors.update(timing_errors)
    peaks: Dict[str, float] = {}
    rechecks: Dict[str, str] = {}
    for p in list(fns):
        if p in errors:
            continue
        impl = impls[p]
        try:
            if mode == "fwd+bwd" and device.type == "cuda":
                peaks[p] = _peak_memory_mib(fns[p], impl, device)
            if impl.recheck and impl.canonical is not None:
                with impl.scope():
                    result = fns[p]()
                    if mode == "fwd":
                        bad = _mismatch(case, result, None)
                    else:
                        bad = _mismatch(case, None, impl.canonical(result))
                    del result
                if bad:
                    rechecks[p] = "after timing: " + bad
        except Exception as exc:
            errors[p] = f"{type(exc).__name__}: {one_line(exc)}"
    fns.clear()  # frees the graphs the bwd closures retain
    base, floor = medians.get("published"), medians.get("floor")
    base_mem = peaks.get("published")
    rows = []
    for p, impl in impls.items():
        if p not in medians and p not in errors:
            continue
        ms = medians.get(p)
        notes = list(impl.notes)
        if p in rechecks:
            notes.append(rechecks[p])
        if p in errors:
            notes.append("error: " + errors[p])
        rows.append(Row(
            case.shape, dtype_name(case.dtype), mode, p, ms, counts.get(p, 0), iqr_pct=spreads.get(p),
            wall_ms=walls.get(p),
            vs_published=(base / ms) if (base and ms) else None,
            vs_floor=(floor / ms) if (floor and ms) else None,
            peak_mib=peaks.get(p),
            mem_vs_published=(peaks[p] / base_mem) if (p in peaks and base_mem) else None,
            note="; ".join(notes)))
    return rows
