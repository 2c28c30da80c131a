"""The STN linear layer in the benchmark (``python -m stn_kernels.bench``, the default layer):

    out[b] = W·x[b] + (V·λ_b) ⊙ (W_h·x[b]) + b + (C·λ_b) ⊙ b_h

Gradients are taken w.r.t. x, λ and every parameter. Providers (:data:`PROVIDERS`):

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

Shapes: the STN experiments' layers (:data:`STN_SHAPES`, the CPU default) and two large ones
(:data:`LARGE_SHAPES`, added with ``--gpu``), or ``B,H,K,N``. The markdown report of this layer
ends with the Targets table (:func:`targets_summary`).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from stn_kernels import hyper_linear

from . import harness
from .harness import Case, Impl, ProviderSpec, Shape, grads_by_name
from .report import Row

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
SHAPE_FORMAT = "B,H,K,N"


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


def make_case(shape, dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    """Random data (torch.randn, never zeros) for ``shape`` (name, Shape, tuple or "B,H,K,N").

    ``tensors``: x [B, K], hparams λ [B, H], weight W and hyper_weight W_h [N, K],
    bias b and hyper_bias b_h [N], hparam_weight M = [V; C] [2N, H] (the published
    parameter), weight_scale V and bias_scale C [N, H] (the same values, as the
    separate leaves stn_kernels takes), packed_weight [W; W_h] [2N, K]; all require grad.
    """
    shape = parse_shape(shape)
    dtype = harness.as_dtype(dtype)
    device = torch.device(device)
    B, H, K, N = shape.B, shape.H, shape.K, shape.N
    rand = harness.random_factory(device, dtype, seed)
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
    return Case(LAYER, shape, dtype, device, t, spec=shape)


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


def stn_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale):
    """stn_kernels.hyper_linear on the separate leaves V (weight_scale) and C (bias_scale)."""
    return hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)


PUBLISHED_ARGS = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")
STN_ARGS = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale", "bias_scale")


def ground_truth(case: Case, t32):
    """The published formulation on the float32 leaves; gradients checked for its seven arguments."""
    return published_forward(*(t32[k] for k in PUBLISHED_ARGS)), PUBLISHED_ARGS


# ----------------------------------------------------------------------------- providers

def _build_floor(case, opts):
    args = case.leaves("x", "packed_weight")
    return Impl("floor", lambda: floor_forward(*args), args, None)


def _build_published(case, opts):
    args = case.leaves(*PUBLISHED_ARGS)
    return Impl("published", lambda: published_forward(*args), args, grads_by_name(PUBLISHED_ARGS))


def _build_packed(case, opts):
    args = case.leaves(*PUBLISHED_ARGS)
    return Impl("packed-gemm", lambda: packed_forward(*args), args, grads_by_name(PUBLISHED_ARGS))


def _build_prepacked(case, opts):
    names = ("x", "hparams", "packed_weight", "bias", "hyper_bias", "hparam_weight")
    args = case.leaves(*names)
    n = case.shape.N

    def canonical(grads):
        d = dict(zip(names, grads))
        packed = d.pop("packed_weight")
        d["weight"], d["hyper_weight"] = packed[:n], packed[n:]
        return d

    return Impl("prepacked-gemm", lambda: prepacked_forward(*args), args, canonical)


def _build_compiled(case, opts):
    args = case.leaves(*PUBLISHED_ARGS)
    return harness.compiled_impl("published+compile", published_forward, args, grads_by_name(PUBLISHED_ARGS),
                                 case, opts)


def _stn_canonical(grads):
    d = dict(zip(STN_ARGS, grads))
    d["hparam_weight"] = torch.cat([d.pop("weight_scale"), d.pop("bias_scale")])
    return d


def _build_stn(backend):
    def build(case, opts):
        args = case.leaves(*STN_ARGS)
        return Impl(f"stn:{backend}", lambda: stn_forward(*args), args, _stn_canonical,
                    scope=harness.backend_scope(backend))

    return build


def _build_stn_compiled(backend):
    """stn_kernels.hyper_linear under torch.compile: the registered op inside the compiled graph, and
    with a CUDA-graph mode (max-autotune) the same launch-overhead removal published+compile gets."""
    def build(case, opts):
        # torch.compile traces on the first call, which build_impl makes inside the impl's scope.
        return harness.compiled_impl(f"stn:{backend}+compile", stn_forward, case.leaves(*STN_ARGS), _stn_canonical,
                                     case, opts, scope=harness.backend_scope(backend))

    return build


PROVIDERS = {p.name: p for p in (
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


# ----------------------------------------------------------------------------- the Targets summary

# The fused providers whose rows the targets summary checks, and issue 3's targets for them.
FUSED = ("stn:triton", "stn:cuda", "stn:triton+compile")
_STN_NAMES = frozenset(s.name for s in STN_SHAPES)
TARGETS_LEGEND = (
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
    """Markdown lines checking each fused provider's rows against the targets (empty without such rows).

    The report summary hook of this layer: only rows of hyper_linear cases (its named or custom shapes) count.
    """
    by = {(r.case.name, r.dtype, r.mode, r.provider): r for r in rows}
    linear = [r for r in rows if r.case.name in ALL_SHAPES or r.case.name.startswith("custom-")]
    keys = list(dict.fromkeys((r.case, r.dtype, r.provider) for r in linear if r.provider in FUSED))
    if not keys:
        return []

    def ratio(num: Optional[Row], den: Optional[Row], wall: bool) -> Optional[float]:
        a = None if num is None else (num.wall_ms if wall else num.median_ms)
        b = None if den is None else (den.wall_ms if wall else den.median_ms)
        return a / b if a and b else None

    lines = ["## Targets", "", TARGETS_LEGEND, "",
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


LAYER = harness.Layer(
    name="linear", op="hyper_linear", shapes=ALL_SHAPES, cpu_shapes=tuple(s.name for s in STN_SHAPES),
    gpu_shapes=tuple(s.name for s in STN_SHAPES + LARGE_SHAPES), parse_shape=parse_shape, make_case=make_case,
    providers=PROVIDERS, shape_format=SHAPE_FORMAT, probe_shape=Shape("probe", 4, 3, 16, 8),
    ground_truth=ground_truth, summary=targets_summary)
