"""The benchmark harness of stn_kernels: ``python -m stn_kernels.bench``.

Times the STN linear layer

    out[b] = W·x[b] + (V·λ_b) ⊙ (W_h·x[b]) + b + (C·λ_b) ⊙ b_h

under several providers, side by side in one process, for the forward (``fwd``),
the backward alone (``bwd``: forward once outside the timed region, then
``torch.autograd.grad(..., retain_graph=True)``) and both (``fwd+bwd``).
Gradients are taken w.r.t. x, λ and every parameter.

Providers (one registry, :data:`PROVIDERS`):

* ``floor``: one GEMM of x against a pre-packed [2N, K] weight; what no
  implementation can beat by much (GPU default; on the CPU only on request).
* ``published``: the official STN formulation, eager:
  ``out = F.linear(x, W, b); s = F.linear(λ, M); out + s[:, :N]·F.linear(x, W_h) + s[:, N:]·b_h``
  with M = [V; C] of shape [2N, H] (one parameter, as in the official code).
* ``published+compile``: the same function under ``torch.compile(mode=--compile-mode)``
  (GPU default, mode max-autotune; on the CPU only with ``--compile``).
* ``packed-gemm`` / ``prepacked-gemm`` (CPU study): one GEMM of x against
  ``torch.cat([W, W_h])``, packed inside the timed region or once beforehand,
  then the same epilogue. Answers "does one packed GEMM beat two GEMMs here".
* ``stn:reference``, ``stn:triton``, ``stn:cuda``: ``stn_kernels.hyper_linear``
  under ``use_backend(name)``, each included when a small call succeeds on the
  device (on the CPU only ``stn:reference`` by default).
* ``stn:triton+compile``: ``stn:triton`` under ``torch.compile(mode=--compile-mode)`` (GPU
  default): the registered op inside a compiled graph; with max-autotune also CUDA graphs, so
  that it is compared with ``published+compile`` without the launch overhead either side.

Timing: CUDA uses ``triton.testing.do_bench`` (median), CPU a median of
``time.perf_counter`` samples with an adaptive count. Providers of one case run
interleaved in rounds. On CUDA the fwd+bwd peak memory above what is already
held (inputs, parameters) is reported too. Each provider's output and gradients
are checked against a float32 evaluation of the published formulation once per
case; a mismatch is noted, not fatal.

Other code (the pytest-benchmark files) uses :func:`make_case` and
:func:`provider_fn`. Nothing heavy is imported here: Triton only when timing on
CUDA, matplotlib only to draw the plot.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .backends import BackendUnavailableError, use_backend

Tensor = torch.Tensor
MODES = ("fwd", "bwd", "fwd+bwd")


# ----------------------------------------------------------------------------- shapes and cases

class Shape(NamedTuple):
    name: str
    B: int  # examples
    H: int  # hyperparameters
    K: int  # input features
    N: int  # output features


STN_SHAPES = (
    Shape("alexnet-fc1", 128, 15, 1024, 4096),
    Shape("alexnet-fc2", 128, 15, 4096, 4096),
    Shape("mlp-fc1", 128, 3, 784, 1200),
    Shape("lstm-i2h", 40, 7, 650, 2600),
)
LARGE_SHAPES = (
    Shape("large-4k", 4096, 16, 4096, 4096),
    Shape("large-16k", 16384, 16, 4096, 4096),
)
ALL_SHAPES = {s.name: s for s in STN_SHAPES + LARGE_SHAPES}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
# Normalised max error (max |a - ref| / max |ref|) against the float32 evaluation
# above which a provider's result is noted as a mismatch (TF32 dots pass in fp32).
_TOLERANCE = {torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_GRAD_NAMES = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_shape(spec) -> Shape:
    """A Shape from a Shape, a default shape's name, a (B, H, K, N) tuple or "B,H,K,N"."""
    if isinstance(spec, Shape):
        return spec
    if isinstance(spec, str):
        if spec in ALL_SHAPES:
            return ALL_SHAPES[spec]
        parts = spec.replace("x", ",").split(",")
    else:
        parts = list(spec)
    try:
        b, h, k, n = (int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"shape: expected one of {sorted(ALL_SHAPES)} or 'B,H,K,N' (four positive ints), "
                         f"got {spec!r}") from None
    if min(b, h, k, n) < 1:
        raise ValueError(f"shape: expected four positive ints B,H,K,N, got {spec!r}")
    return Shape(f"custom-{b}x{h}x{k}x{n}", b, h, k, n)


def random_factory(device: torch.device, dtype: torch.dtype, seed: int) -> Callable:
    """``rand(*size, scale=1.0)``: seeded standard-normal data (never zeros) times ``scale``, in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*size, scale=1.0):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    return rand


@dataclass
class Case:
    """Random inputs and parameters for one (shape, dtype, device); all leaves require grad.

    ``tensors``: x [B, K], hparams λ [B, H], weight W and hyper_weight W_h [N, K],
    bias b and hyper_bias b_h [N], hparam_weight M = [V; C] [2N, H] (the published
    parameter), weight_scale V and bias_scale C [N, H] (the same values, as the
    separate leaves stn_kernels takes), packed_weight [W; W_h] [2N, K].
    """

    shape: Shape
    dtype: torch.dtype
    device: torch.device
    tensors: Dict[str, Tensor]
    impls: Dict[str, "_Impl"] = field(default_factory=dict)
    _grad_outs: Dict[tuple, Tensor] = field(default_factory=dict)
    _expected: Optional[Tuple[Tensor, Dict[str, Tensor]]] = None

    @property
    def label(self) -> str:
        return f"{self.shape.name}/{dtype_name(self.dtype)}"

    def grad_out(self, shape) -> Tensor:
        """A fixed random gradient for an output of ``shape``."""
        shape = tuple(shape)
        if shape not in self._grad_outs:
            gen = torch.Generator(device=self.device).manual_seed(1234 + len(shape) + shape[-1])
            self._grad_outs[shape] = torch.randn(shape, generator=gen, device=self.device).to(self.dtype)
        return self._grad_outs[shape]

    def expected(self) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Output and gradients of the published formulation evaluated in float32 (computed once)."""
        if self._expected is None:
            t32 = {k: v.detach().float().requires_grad_() for k, v in self.tensors.items()}
            names = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")
            with torch.enable_grad():
                out = published_forward(*(t32[k] for k in names))
                grads = torch.autograd.grad(out, [t32[k] for k in names], self.grad_out(out.shape).float())
            self._expected = (out.detach(), dict(zip(names, grads)))
        return self._expected


def make_case(shape, dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    """Random data (torch.randn, never zeros) for ``shape`` (name, Shape, tuple or "B,H,K,N")."""
    shape = parse_shape(shape)
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    device = torch.device(device)
    B, H, K, N = shape.B, shape.H, shape.K, shape.N
    rand = random_factory(device, dtype, seed)
    t = {
        "x": rand(B, K),
        "hparams": rand(B, H),
        "weight": rand(N, K, scale=K ** -0.5),
        "hyper_weight": rand(N, K, scale=K ** -0.5),
        "bias": rand(N, scale=0.1),
        "hyper_bias": rand(N, scale=0.1),
        "hparam_weight": rand(2 * N, H, scale=H ** -0.5),
    }
    t["weight_scale"] = t["hparam_weight"][:N].clone()
    t["bias_scale"] = t["hparam_weight"][N:].clone()
    t["packed_weight"] = torch.cat([t["weight"], t["hyper_weight"]])
    for v in t.values():
        v.requires_grad_(True)
    return Case(shape, dtype, device, t)


# ----------------------------------------------------------------------------- formulations

def published_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
    """The official STN code: two GEMMs (x·Wᵀ with the bias, x·W_hᵀ), λ·Mᵀ and an eager epilogue."""
    n = weight.shape[0]
    out = F.linear(x, weight, bias)
    s = F.linear(hparams, hparam_weight)
    return out + s[:, :n] * F.linear(x, hyper_weight) + s[:, n:] * hyper_bias


def _packed_epilogue(z, s, bias, hyper_bias, n):
    # z = x·[W; W_h]ᵀ [B, 2N], s = λ·Mᵀ [B, 2N]. The bias is not fused into the GEMM
    # here, so this has one [B, N] add more than the published epilogue.
    return z[:, :n] + bias + s[:, :n] * z[:, n:] + s[:, n:] * hyper_bias


def packed_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
    """One GEMM against torch.cat([W, W_h]) (packed on every call), then the epilogue."""
    z = F.linear(x, torch.cat([weight, hyper_weight]))
    return _packed_epilogue(z, F.linear(hparams, hparam_weight), bias, hyper_bias, weight.shape[0])


def prepacked_forward(x, hparams, packed_weight, bias, hyper_bias, hparam_weight):
    """One GEMM against a weight kept packed as [W; W_h] (one [2N, K] parameter), then the epilogue."""
    z = F.linear(x, packed_weight)
    return _packed_epilogue(z, F.linear(hparams, hparam_weight), bias, hyper_bias, bias.shape[0])


def floor_forward(x, packed_weight):
    """One GEMM, nothing else: the floor for any implementation of the layer."""
    return F.linear(x, packed_weight)


# ----------------------------------------------------------------------------- providers

@dataclass
class _Impl:
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
class _Options:
    compile_mode: str = "default"


@dataclass(frozen=True)
class ProviderSpec:
    name: str
    build: Callable[[Case, _Options], _Impl]
    description: str
    devices: Tuple[str, ...] = ("cpu", "cuda")
    cpu_default: bool = False
    gpu_default: bool = False
    backend: Optional[str] = None  # the stn_kernels backend, for stn:* providers


def _names(case, *names):
    return tuple(case.tensors[n] for n in names)


_PUBLISHED_ARGS = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")


def _by_name(names):
    return lambda grads: dict(zip(names, grads))


def _build_floor(case, opts):
    args = _names(case, "x", "packed_weight")
    return _Impl("floor", lambda: floor_forward(*args), args, None)


def _build_published(case, opts):
    args = _names(case, *_PUBLISHED_ARGS)
    return _Impl("published", lambda: published_forward(*args), args, _by_name(_PUBLISHED_ARGS))


def _build_packed(case, opts):
    args = _names(case, *_PUBLISHED_ARGS)
    return _Impl("packed-gemm", lambda: packed_forward(*args), args, _by_name(_PUBLISHED_ARGS))


def _build_prepacked(case, opts):
    names = ("x", "hparams", "packed_weight", "bias", "hyper_bias", "hparam_weight")
    args = _names(case, *names)
    n = case.shape.N

    def canonical(grads):
        d = dict(zip(names, grads))
        packed = d.pop("packed_weight")
        d["weight"], d["hyper_weight"] = packed[:n], packed[n:]
        return d

    return _Impl("prepacked-gemm", lambda: prepacked_forward(*args), args, canonical)


def _uses_cudagraphs(mode: str) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def is_compiled(provider: str) -> bool:
    """Providers named ``*+compile`` run under torch.compile: they share the compile budget and
    the per-case reset of compiled code."""
    return provider.endswith("+compile")


def compiled_impl(name: str, fn: Callable, args: Tuple[Tensor, ...], canonical, case, opts: _Options,
                  inputs: Optional[Tuple[Tensor, ...]] = None,
                  scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> _Impl:
    """An _Impl running ``torch.compile(fn, mode=opts.compile_mode)`` on ``args`` (built inside ``scope``)."""
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
    impl = _Impl(name, lambda: compiled(*args), args if inputs is None else inputs, canonical, scope=scope)
    if case.device.type == "cuda" and _uses_cudagraphs(opts.compile_mode):
        impl.pre_call = torch.compiler.cudagraph_mark_step_begin
        impl.recheck = True
    return impl


def _build_compiled(case, opts):
    args = _names(case, *_PUBLISHED_ARGS)
    return compiled_impl("published+compile", published_forward, args, _by_name(_PUBLISHED_ARGS), case, opts)


def stn_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale):
    import stn_kernels

    return stn_kernels.hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)


_STN_ARGS = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale", "bias_scale")


def _stn_canonical(grads):
    d = dict(zip(_STN_ARGS, grads))
    d["hparam_weight"] = torch.cat([d.pop("weight_scale"), d.pop("bias_scale")])
    return d


def _build_stn(backend):
    def build(case, opts):
        args = _names(case, *_STN_ARGS)
        return _Impl(f"stn:{backend}", lambda: stn_forward(*args), args, _stn_canonical,
                     scope=lambda: use_backend(backend))

    return build


def _build_stn_compiled(backend):
    """stn_kernels.hyper_linear under torch.compile: the registered op inside the compiled graph, and
    with a CUDA-graph mode (max-autotune) the same launch-overhead removal published+compile gets."""
    def build(case, opts):
        # torch.compile traces on the first call, which build_impl makes inside the impl's scope.
        return compiled_impl(f"stn:{backend}+compile", stn_forward, _names(case, *_STN_ARGS), _stn_canonical, case,
                             opts, scope=lambda: use_backend(backend))

    return build


PROVIDERS: Dict[str, ProviderSpec] = {p.name: p for p in (
    ProviderSpec("floor", _build_floor, "one GEMM of x against a pre-packed [2N, K] weight", gpu_default=True),
    ProviderSpec("published", _build_published, "official STN formulation, eager (two GEMMs + small ops)",
                 cpu_default=True, gpu_default=True),
    ProviderSpec("published+compile", _build_compiled, "published under torch.compile", gpu_default=True),
    ProviderSpec("packed-gemm", _build_packed, "one GEMM against cat([W, W_h]) packed per call, then epilogue",
                 cpu_default=True),
    ProviderSpec("prepacked-gemm", _build_prepacked, "one GEMM against a weight kept packed, then epilogue",
                 cpu_default=True),
    ProviderSpec("stn:reference", _build_stn("reference"), "stn_kernels.hyper_linear, backend 'reference'",
                 cpu_default=True, gpu_default=True, backend="reference"),
    ProviderSpec("stn:triton", _build_stn("triton"), "stn_kernels.hyper_linear, backend 'triton'",
                 gpu_default=True, backend="triton"),
    ProviderSpec("stn:cuda", _build_stn("cuda"), "stn_kernels.hyper_linear, backend 'cuda'", devices=("cuda",),
                 gpu_default=True, backend="cuda"),
    ProviderSpec("stn:triton+compile", _build_stn_compiled("triton"),
                 "stn_kernels.hyper_linear, backend 'triton', under torch.compile", gpu_default=True, backend="triton"),
)}

_backend_probe_cache: Dict[tuple, Optional[str]] = {}


def backend_unavailable(backend: str, device, dtype=torch.float32) -> Optional[str]:
    """None if one small call of stn_kernels.hyper_linear runs on ``backend`` here, else the
    reason it does not (BackendUnavailableError, ImportError or another error)."""
    device = torch.device(device)
    key = (backend, str(device), dtype)
    if key not in _backend_probe_cache:
        case = make_case(Shape("probe", 4, 3, 16, 8), dtype, device, seed=1)
        args = _names(case, "x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale",
                      "bias_scale")
        reason = None
        try:
            with use_backend(backend), torch.enable_grad():
                stn_forward(*args)  # a failing backward is reported per case, with the forward timed
        except (BackendUnavailableError, ImportError) as exc:
            reason = f"unavailable: {_one_line(exc)}"
        except Exception as exc:  # a broken backend must not stop the other providers
            reason = f"failed a small call: {type(exc).__name__}: {_one_line(exc)}"
        _backend_probe_cache[key] = reason
    return _backend_probe_cache[key]


def providers_of(case=None) -> Dict[str, ProviderSpec]:
    """The provider registry of ``case`` (conv / embedding cases of stn_kernels.bench_layers carry
    their own), else :data:`PROVIDERS`."""
    return getattr(case, "providers", None) or PROVIDERS


def provider_unavailable(name: str, device, dtype=torch.float32, case=None) -> Optional[str]:
    """None if provider ``name`` can run on ``device`` here, else why not."""
    spec = providers_of(case)[name]
    device = torch.device(device)
    if device.type not in spec.devices:
        return f"runs on {', '.join(spec.devices)} only"
    if spec.backend is not None:
        probe = getattr(case, "backend_unavailable", None) or backend_unavailable
        return probe(spec.backend, device, dtype)
    return None


def default_providers(device, registry=None) -> List[str]:
    device = torch.device(device)
    gpu = device.type == "cuda"
    return [p.name for p in (registry or PROVIDERS).values() if (p.gpu_default if gpu else p.cpu_default)]


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def build_impl(provider: str, case: Case, opts: Optional[_Options] = None) -> _Impl:
    """Build ``provider`` for ``case`` (cached on the case) and run one checked forward and backward.

    The first call is where torch.compile compiles (and autotunes) both graphs.
    """
    if provider in case.impls:
        return case.impls[provider]
    registry = providers_of(case)
    if provider not in registry:
        raise ValueError(f"provider: expected one of {sorted(registry)}, got {provider!r}")
    opts = opts or _Options()
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
            impl.backward_error = f"backward failed: {type(exc).__name__}: {_one_line(exc)}"
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
    tol = _TOLERANCE.get(case.dtype, 1e-2)
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


def _mode_closure(impl: _Impl, mode: str) -> Callable[[], object]:
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
    spec = providers_of(case).get(provider)
    if spec is None:
        raise ValueError(f"provider: expected one of {sorted(providers_of(case))}, got {provider!r}")
    if spec.backend is not None:
        why = provider_unavailable(provider, case.device, case.dtype, case)
        if why:
            raise BackendUnavailableError(f"{provider}: {why}")
    impl = build_impl(provider, case, _Options(compile_mode))
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
class _TimingConfig:
    rounds: int
    # CPU: seconds per (case, mode) over all providers; minimum samples per round
    cpu_target_s: float
    cpu_min_per_round: int
    cpu_max_per_round: int
    # CUDA: do_bench warm-up and repetition time per round, in ms
    gpu_warmup_ms: int
    gpu_rep_ms: int
    gpu_wall_max_calls: int  # back-to-back calls for the CUDA wall-clock time (about gpu_rep_ms of work)


_FULL = _TimingConfig(rounds=3, cpu_target_s=1.0, cpu_min_per_round=1, cpu_max_per_round=50, gpu_warmup_ms=10,
                      gpu_rep_ms=40, gpu_wall_max_calls=200)
_QUICK = _TimingConfig(rounds=1, cpu_target_s=0.05, cpu_min_per_round=3, cpu_max_per_round=10, gpu_warmup_ms=5,
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


def _time_group(fns: Dict[str, Callable], impls: Dict[str, _Impl], device: torch.device, cfg: _TimingConfig
                ) -> Tuple[Dict[str, float], Dict[str, int], Dict[str, str], Dict[str, float]]:
    """Median ms per provider, timed interleaved: each round runs every provider once, in a
    rotated order. Returns (median ms, number of samples, errors, CUDA wall ms).

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
                errors[n] = f"{type(exc).__name__}: {_one_line(exc)}"
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
                errors[n] = f"{type(exc).__name__}: {_one_line(exc)}"
    medians = {n: statistics.median(s) for n, s in samples.items() if s and n not in errors}
    counts = {n: len(s) for n, s in samples.items()}
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
                errors[n] = f"{type(exc).__name__}: {_one_line(exc)}"
    return medians, counts, errors, walls


def _peak_memory_mib(fn: Callable, impl: _Impl, device: torch.device) -> float:
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


# ----------------------------------------------------------------------------- reporting

_COLUMNS = ("case", "dtype", "mode", "provider", "median ms", "vs published", "vs floor", "wall ms", "peak MiB",
            "mem vs published", "note")
_CSV_FIELDS = ("case", "B", "H", "K", "N", "dtype", "mode", "provider", "median_ms", "samples", "vs_published",
               "vs_floor", "wall_ms", "peak_mib", "mem_vs_published", "note")


@dataclass
class Row:
    case: Shape
    dtype: str
    mode: str
    provider: str
    median_ms: Optional[float]
    samples: int = 0
    wall_ms: Optional[float] = None
    vs_published: Optional[float] = None
    vs_floor: Optional[float] = None
    peak_mib: Optional[float] = None
    mem_vs_published: Optional[float] = None
    note: str = ""

    def cells(self) -> List[str]:
        def num(v, fmt):
            return "" if v is None else format(v, fmt)

        return [self.case.name, self.dtype, self.mode, self.provider,
                num(self.median_ms, ".4g") if self.median_ms is not None else "n/a",
                num(self.vs_published, ".2f"), num(self.vs_floor, ".2f"), num(self.wall_ms, ".4g"),
                num(self.peak_mib, ".1f"),
                num(self.mem_vs_published, ".2f"), self.note.replace("|", "/")]

    def csv_row(self) -> dict:
        def num(v):
            return "" if v is None else repr(round(v, 6))

        return {"case": self.case.name, "B": self.case.B, "H": self.case.H, "K": self.case.K, "N": self.case.N,
                "dtype": self.dtype, "mode": self.mode, "provider": self.provider,
                "median_ms": num(self.median_ms), "samples": self.samples, "vs_published": num(self.vs_published),
                "vs_floor": num(self.vs_floor), "wall_ms": num(self.wall_ms), "peak_mib": num(self.peak_mib),
                "mem_vs_published": num(self.mem_vs_published), "note": self.note}


def table_header() -> str:
    return "| " + " | ".join(_COLUMNS) + " |\n|" + "|".join("---" for _ in _COLUMNS) + "|"


def machine_info(device: torch.device) -> List[str]:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:
        triton_version = "not installed"
    try:
        load = ", load average %.2f" % os.getloadavg()[0]
    except (AttributeError, OSError):
        load = ""
    lines = [
        f"machine: {cpu} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}{load}), "
        f"{platform.system()} {platform.release()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton_version}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"gpu: {torch.cuda.get_device_name(device)} (sm_{props.major}{props.minor}, "
                     f"{props.total_memory / 2 ** 30:.0f} GiB), float32 matmul precision "
                     f"'{torch.get_float32_matmul_precision()}'")
    lines.append(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    return lines


_LEGEND = (
    "median ms: median time of one call (CUDA: triton do_bench, L2 flushed; CPU: perf_counter samples). "
    "vs published = published ms / provider ms (> 1: faster than the published formulation); "
    "vs floor = floor ms / provider ms (1: as fast as a single GEMM of x against the packed [2N, K] weight). "
    "wall ms (CUDA): wall-clock time per call of back-to-back calls, host launch overhead included "
    "(do_bench's median hides launch overhead shorter than its L2 flush). "
    "peak MiB (CUDA, fwd+bwd): peak allocated during one fwd+bwd above what inputs and parameters hold; "
    "mem vs published = provider peak / published peak. Modes: fwd (forward with autograd recording), "
    "bwd (torch.autograd.grad with retain_graph=True on a stored forward), fwd+bwd."
)


# The fused providers whose rows the targets summary checks, and issue 3's targets for them.
_FUSED = ("stn:triton", "stn:cuda", "stn:triton+compile")
_STN_NAMES = frozenset(s.name for s in STN_SHAPES)
_TARGETS_LEGEND = (
    "Targets (hyper_linear): forward ≤ 1.10× the floor GEMM's time where B ≥ 1024; forward+backward ≥ 2× "
    "faster than published and ≥ 1.3× faster than published+compile at the STN shapes; forward+backward peak "
    "memory ≤ 0.7× published's. Each cell: the ratio from the median times, then from the wall times, and ✓ "
    "only when both meet the target (✗ otherwise; no mark where the target does not apply to the shape)."
)


def _target_cell(median: Optional[float], wall: Optional[float], meets: Callable[[float], bool],
                 applies: bool) -> str:
    if median is None:
        return "–"
    text = f"{median:.2f}" + (f" / {wall:.2f}" if wall is not None else "")
    if not applies:
        return text
    ok = meets(median) and (wall is None or meets(wall))
    return text + (" ✓" if ok else " ✗")


def targets_summary(rows: Sequence[Row]) -> List[str]:
    """Markdown lines checking each fused provider's rows against the targets (empty without such rows)."""
    by = {(r.case.name, r.dtype, r.mode, r.provider): r for r in rows}
    linear = [r for r in rows if r.case.name in ALL_SHAPES or r.case.name.startswith("custom-")]  # not LSTM rows
    keys = list(dict.fromkeys((r.case, r.dtype, r.provider) for r in linear if r.provider in _FUSED))
    if not keys:
        return []

    def ratio(num: Optional[Row], den: Optional[Row], wall: bool) -> Optional[float]:
        a = None if num is None else (num.wall_ms if wall else num.median_ms)
        b = None if den is None else (den.wall_ms if wall else den.median_ms)
        return a / b if a and b else None

    lines = ["## Targets", "", _TARGETS_LEGEND, "",
             "| case | dtype | provider | fwd time / floor's (≤ 1.10, B ≥ 1024) | fwd+bwd speed-up vs published "
             "(≥ 2, STN) | fwd+bwd speed-up vs published+compile (≥ 1.3, STN) | fwd+bwd memory vs published "
             "(≤ 0.7) |",
             "|---|---|---|---|---|---|---|"]
    for case, dtype, p in keys:
        row = lambda mode, provider: by.get((case.name, dtype, mode, provider))  # noqa: E731
        ours_fb = row("fwd+bwd", p)
        stn = case.name in _STN_NAMES
        cells = [
            _target_cell(ratio(row("fwd", p), row("fwd", "floor"), False),
                         ratio(row("fwd", p), row("fwd", "floor"), True), lambda v: v <= 1.10, case.B >= 1024),
            _target_cell(ratio(row("fwd+bwd", "published"), ours_fb, False),
                         ratio(row("fwd+bwd", "published"), ours_fb, True), lambda v: v >= 2.0, stn),
            _target_cell(ratio(row("fwd+bwd", "published+compile"), ours_fb, False),
                         ratio(row("fwd+bwd", "published+compile"), ours_fb, True), lambda v: v >= 1.3, stn),
            _target_cell(None if ours_fb is None else ours_fb.mem_vs_published, None, lambda v: v <= 0.7, True),
        ]
        lines.append(f"| {case.name} | {dtype} | {p} | " + " | ".join(cells) + " |")
    return lines


class _Report:
    """Collects rows, writes CSV incrementally and rewrites the markdown after each case."""

    def __init__(self, out_dir: Optional[str], header: List[str], stream=None,
                 summary: Optional[Callable[[Sequence[Row]], List[str]]] = None):
        self.summary = summary  # extra markdown lines from the rows (the targets of hyper_linear)
        self.rows: List[Row] = []
        self.notes: List[str] = []
        self.header = header
        self.stream = stream or sys.stdout
        self.out_dir = out_dir
        self._csv = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self._csv_file = open(os.path.join(out_dir, "results.csv"), "w", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=_CSV_FIELDS)
            self._csv.writeheader()
            self._csv_file.flush()
        print("\n".join("# " + h if i == 0 else h for i, h in enumerate(header)), file=self.stream)
        print("", file=self.stream)
        print(table_header(), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def add(self, rows: List[Row]) -> None:
        self.rows.extend(rows)
        for row in rows:
            print("| " + " | ".join(row.cells()) + " |", file=self.stream)
            if self._csv is not None:
                self._csv.writerow(row.csv_row())
        self.stream.flush()
        if self._csv is not None:
            self._csv_file.flush()
            self.write_markdown()

    def markdown(self) -> str:
        lines = ["# " + self.header[0]] + self.header[1:] + [""]
        lines += [table_header()] + ["| " + " | ".join(r.cells()) + " |" for r in self.rows]
        lines += ["", _LEGEND]
        extra = self.summary(self.rows) if self.summary else []
        if extra:
            lines += [""] + extra
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write_markdown(self) -> None:
        if self.out_dir:
            path = os.path.join(self.out_dir, "results.md")
            with open(path + ".tmp", "w") as f:
                f.write(self.markdown())
            os.replace(path + ".tmp", path)

    def close(self) -> None:
        if self._csv is not None:
            self.write_markdown()
            self._csv_file.close()
            self._csv = None


def write_plot(rows: List[Row], path: str, op: str = "hyper_linear") -> Optional[str]:
    """A bar chart of the speed-up over published per case and provider; returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "speedup.png not written: matplotlib is not installed"
    modes = [m for m in MODES if any(r.mode == m and r.vs_published is not None for r in rows)]
    if not modes:
        return "speedup.png not written: no speed-ups measured"
    try:
        providers = [p for p in dict.fromkeys(r.provider for r in rows) if p != "published"]
        fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 1.6 + 0.9 * len(
            {(r.case.name, r.dtype) for r in rows})), 3.6 * len(modes)), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            groups = list(dict.fromkeys((r.case.name, r.dtype) for r in rows if r.mode == mode))
            width = 0.8 / max(len(providers), 1)
            for j, p in enumerate(providers):
                values = {(r.case.name, r.dtype): r.vs_published for r in rows
                          if r.mode == mode and r.provider == p and r.vs_published is not None}
                xs = [i + (j - (len(providers) - 1) / 2) * width for i, g in enumerate(groups) if g in values]
                ys = [values[g] for g in groups if g in values]
                if xs:
                    ax.bar(xs, ys, width, label=p)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{c}\n{d}" for c, d in groups], fontsize=7)
            ax.set_ylabel("speed-up over published")
            ax.set_title(f"{op}, {mode}")
            ax.legend(fontsize=7, ncol=min(len(providers), 4))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as exc:  # a plot must never lose the measurements
        return f"speedup.png not written: {type(exc).__name__}: {_one_line(exc)}"
    return None


# ----------------------------------------------------------------------------- the run

def _run_case(case: Case, providers: List[str], modes: List[str], cfg: _TimingConfig, opts: _Options,
              report: _Report, deadline: Optional[float], compile_state: dict, *,
              unavailable: Optional[Callable[[str, Case], Optional[str]]] = None,
              build: Callable[[str, Case, _Options], _Impl] = build_impl) -> bool:
    """Time every provider for every mode of one (shape, dtype); False if the time budget ran out.

    ``unavailable(provider, case)`` (default :func:`provider_unavailable`) and ``build`` (default
    :func:`build_impl`) let other harnesses (stn_kernels.bench_lstm) run their cases here."""
    device = case.device
    impls: Dict[str, _Impl] = {}
    try:
        for p in providers:
            why = (unavailable(p, case) if unavailable is not None
                   else provider_unavailable(p, device, case.dtype, case))
            if why:
                report.note(f"{p} skipped ({device.type}, {dtype_name(case.dtype)}): {why}")
                continue
            if is_compiled(p) and compile_state.get("budget") is not None \
                    and compile_state["spent"] >= compile_state["budget"]:
                report.note(f"{p} skipped from {case.label} on: the compile budget of "
                            f"{compile_state['budget']:.0f} s is spent")
                continue
            try:
                impl = build(p, case, opts)
            except Exception as exc:
                report.note(f"{p} failed at {case.label}: {type(exc).__name__}: {_one_line(exc)}")
                continue
            if is_compiled(p):
                compile_state["spent"] += impl.build_s
                report.note(f"{p} ({opts.compile_mode}) compiled for {case.label} in {impl.build_s:.1f} s")
            impls[p] = impl
        for mode in modes:
            if deadline is not None and time.monotonic() > deadline:
                return False
            report.add(_run_mode(case, impls, mode, cfg))
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


def _run_mode(case: Case, impls: Dict[str, _Impl], mode: str, cfg: _TimingConfig) -> List[Row]:
    """Time one mode of every built provider, interleaved; then peak memory and the rows."""
    device = case.device
    fns: Dict[str, Callable] = {}
    errors: Dict[str, str] = {}
    for p, impl in impls.items():
        try:
            with impl.scope():
                fns[p] = _mode_closure(impl, mode)
        except Exception as exc:
            errors[p] = f"{type(exc).__name__}: {_one_line(exc)}"
    medians, counts, timing_errors, walls = _time_group(fns, impls, device, cfg)
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
            errors[p] = f"{type(exc).__name__}: {_one_line(exc)}"
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
            case.shape, dtype_name(case.dtype), mode, p, ms, counts.get(p, 0), wall_ms=walls.get(p),
            vs_published=(base / ms) if (base and ms) else None,
            vs_floor=(floor / ms) if (floor and ms) else None,
            peak_mib=peaks.get(p),
            mem_vs_published=(peaks[p] / base_mem) if (p in peaks and base_mem) else None,
            note="; ".join(notes)))
    return rows


def _parse_list(text: Optional[str], allowed, what: str) -> Optional[List[str]]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        raise SystemExit(f"stn_kernels.bench: unknown {what} {', '.join(bad)}; expected some of "
                         f"{', '.join(allowed)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stn_kernels.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="providers:\n" + "\n".join(f"  {p.name:18s} {p.description}"
                                                                   for p in PROVIDERS.values()))
    ap.add_argument("--gpu", action="store_true", help="run the CUDA suite (errors without CUDA)")
    ap.add_argument("--layer", default="linear", choices=("linear", "conv2d", "embedding"),
                    help="the layer to time (default linear; conv2d and embedding: stn_kernels.bench_layers)")
    ap.add_argument("--shapes", help=f"comma list of shape names: {', '.join(ALL_SHAPES)}")
    ap.add_argument("--shape", action="append", default=[], metavar="B,H,K,N",
                    help="a custom shape (repeatable); replaces the default shapes unless --shapes is given too "
                         "(conv2d: B,H,C_in,C_out,size[,kernel[,stride[,padding]]]; embedding: B,H,num,D,T)")
    ap.add_argument("--dtypes", help="comma list (default: float32 on CPU; bfloat16,float16,float32 with --gpu)")
    ap.add_argument("--modes", help="comma list of fwd, bwd, fwd+bwd (default: fwd,fwd+bwd on CPU; all with --gpu)")
    ap.add_argument("--providers", help=f"comma list of {', '.join(PROVIDERS)} (default: per device)")
    ap.add_argument("--compile", action="store_true", help="on CPU, add published+compile")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode (default: max-autotune with --gpu, 'default' on CPU)")
    ap.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                    help="stop adding published+compile to new cases once its compile time exceeds this")
    ap.add_argument("--out", help="write results.csv, results.md and speedup.png into this folder")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first (CPU timings)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke tests)")
    ap.add_argument("--lstm", nargs="?", const="lstm-ptb", default=None, metavar="SHAPES",
                    help="also time the HyperLSTM stack (stn_kernels.bench_lstm): comma list of lstm-ptb "
                         "(B=40, T=70, 2x650, H=7; the default), lstm-tiny or B,T,K,N,L,H")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no new case after this many seconds; what was measured is still reported")
    return ap.parse_args(argv)


def main(argv=None) -> List[Row]:
    args = parse_args(argv)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit(f"stn_kernels.bench: --gpu needs a CUDA device, but torch.cuda.is_available() is "
                             f"False here (torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                             "Run without --gpu for the CPU suite.")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    from .bench_layers import LAYERS

    layer = LAYERS[args.layer]
    try:
        shapes = [layer.parse_shape(s) for s in (_parse_list(args.shapes, list(layer.shapes), "shape") or [])]
        shapes += [layer.parse_shape(s) for s in args.shape]
    except ValueError as exc:
        raise SystemExit(f"stn_kernels.bench: {exc}") from None
    if not shapes:
        shapes = [layer.shapes[n] for n in (layer.gpu_shapes if gpu else layer.cpu_shapes)]
    dtype_names = _parse_list(args.dtypes, list(_DTYPES), "dtype") or (
        ["bfloat16", "float16", "float32"] if gpu else ["float32"])
    dtypes = list(dict.fromkeys(_DTYPES[d] for d in dtype_names))
    modes = _parse_list(args.modes, list(MODES), "mode") or (list(MODES) if gpu else ["fwd", "fwd+bwd"])
    providers = _parse_list(args.providers, list(layer.providers), "provider")
    if providers is None:
        providers = default_providers(device, layer.providers)
        if args.compile and "published+compile" not in providers:
            providers.insert(providers.index("published") + 1, "published+compile")
    if "published" not in providers:
        providers.insert(0, "published")  # every ratio is taken against it
    cfg = _QUICK if args.quick else _FULL
    opts = _Options(compile_mode=args.compile_mode or ("max-autotune" if gpu else "default"))

    header = [f"stn_kernels benchmark: {layer.op}"] + machine_info(device) + [
        f"run: device {device}, providers {', '.join(providers)}; modes {', '.join(modes)}; "
        f"dtypes {', '.join(dtype_name(d) for d in dtypes)}; compile mode {opts.compile_mode}"
        + ("; quick" if args.quick else "")
        + (f"; time budget {args.time_budget:g} s" if args.time_budget else "")]
    report = _Report(args.out, header, summary=targets_summary if layer.op == "hyper_linear" else None)
    compiled = ", ".join(p for p in providers if is_compiled(p))
    if compiled and gpu and _uses_cudagraphs(opts.compile_mode):
        report.notes.append(f"{compiled} use CUDA graphs (mode {opts.compile_mode}): each fwd and "
                            "fwd+bwd call starts with torch.compiler.cudagraph_mark_step_begin(); their peak "
                            "memory counts only what the graphs allocate outside their recorded pool")
    if compiled:
        report.notes.append(f"{compiled}: torch._functorch.config.donated_buffer is off so that the "
                            "compiled backward can run with retain_graph=True (bwd mode)")

    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget else None
    compile_state = {"spent": 0.0, "budget": args.compile_budget}

    class _Stop(BaseException):
        pass

    def on_term(signum, frame):
        raise _Stop()

    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, on_term)
    completed = True
    try:
        # dtype outermost: every shape at the first dtype before any at the next one.
        for dtype in dtypes:
            for shape in shapes:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError
                case = layer.make_case(shape, dtype, device)
                t0 = time.monotonic()
                ok = _run_case(case, providers, modes, cfg, opts, report, deadline, compile_state)
                print(f"[bench] {case.label} done in {time.monotonic() - t0:.1f} s "
                      f"(total {time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
                del case
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
                if not ok:
                    raise TimeoutError
        if args.lstm:
            from . import bench_lstm
            for dtype in dtypes:
                for case in bench_lstm.lstm_benchmark_cases(args.lstm.split(","), dtype, device):
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError
                    if not bench_lstm.run_case(case, providers, modes, cfg, opts, report, deadline, compile_state):
                        raise TimeoutError
    except TimeoutError:
        completed = False
        report.note(f"time budget of {args.time_budget:g} s reached: later cases were not run")
    except (_Stop, KeyboardInterrupt):
        completed = False
        report.note("interrupted (SIGTERM or Ctrl-C): later cases were not run")
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        elapsed = time.monotonic() - start
        report.notes.append(f"wall time {elapsed:.0f} s" + ("" if completed else " (partial run)"))
        if args.out:
            why = write_plot(report.rows, os.path.join(args.out, "speedup.png"), layer.op)
            if why:
                report.notes.append(why)
        report.close()
        print("", flush=True)
        for n in report.notes:
            print(f"- {n}")
        print(f"[bench] finished in {elapsed:.0f} s" + (f"; results in {args.out}" if args.out else ""),
              file=sys.stderr, flush=True)
    return report.rows


if __name__ == "__main__":
    main()
