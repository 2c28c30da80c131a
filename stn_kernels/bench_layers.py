"""Benchmark cases and providers for the STN conv and embedding layers, for the harness in
:mod:`stn_kernels.bench` (``python -m stn_kernels.bench --layer conv2d|embedding``).

The harness times providers built from a ``Case``; this module adds, per layer, the shapes of
the published experiments, a case factory (:class:`LayerCase`, a ``bench.Case`` that carries its
own provider registry, backend probe and float32 ground truth) and the providers:

* ``floor``: one convolution of x with the packed [2·C_out, C_in, k, k] weight / one gather of a
  packed [num, 2·D] table: what no implementation can beat by much (GPU default).
* ``published``: the official STN formulation, eager (two F.conv2d calls, or two F.embedding calls,
  with s = λ·Mᵀ from one [2·C_out, H] / [D, H] parameter M).
* ``published+compile``: the same under ``torch.compile`` (GPU default).
* ``stn:reference``, ``stn:triton``: ``stn_kernels.hyper_conv2d`` / ``hyper_embedding`` under
  ``use_backend(name)``.
* ``stn:triton:two-conv`` (conv, GPU default) and ``stn:triton:no-pack-cache`` (conv, on request):
  the Triton backend with ``hyper_conv2d.PACKED = False`` (two convolutions) or
  ``CACHE_PACKED_WEIGHT = False`` (the backward packs the weight again), to decide by measurement.
* ``stn:triton:sorted`` (embedding, GPU default): table gradients by sorted segments (the
  deterministic path) instead of fp32 atomics, without deterministic mode.

Shapes (``Shape(name, B, H, K, N)`` as in the harness, so the report columns stay): conv K = C_in,
N = C_out with the image size, kernel, stride and padding in :data:`GEOMETRY`; embedding K = the
number of embeddings, N = D, with T (indices per example) in :data:`GEOMETRY`. Indices are
batch-major [B, T]; λ is [B, H]. Gradients are taken w.r.t. x (conv), λ and every parameter.

The harness reaches all of this through :data:`LAYERS` (``"linear"`` wraps its own shapes,
factory and registry).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import bench
from .backends import BackendUnavailableError, use_backend
from .bench import Case, ProviderSpec, Shape, _Impl

Tensor = torch.Tensor


class ConvGeometry(NamedTuple):
    size: int  # input height = width
    kernel: int
    stride: int
    padding: int


class EmbeddingGeometry(NamedTuple):
    T: int  # indices per example


def _conv_shape(prefix, B, H, c_in, c_out, size, kernel=3, stride=1, padding=1):
    name = f"{prefix}-{c_in}to{c_out}" + (f"s{stride}" if stride != 1 else "") + f"@{size}"
    GEOMETRY[name] = ConvGeometry(size, kernel, stride, padding)
    return Shape(name, B, H, c_in, c_out)


GEOMETRY: Dict[str, tuple] = {}

# AlexNet / CIFAR-10 (B=128, H=15): conv k=3 p=1.
ALEXNET_CONV = (
    _conv_shape("alexnet", 128, 15, 3, 64, 32, stride=2),
    _conv_shape("alexnet", 128, 15, 64, 192, 8),
    _conv_shape("alexnet", 128, 15, 192, 384, 4),
    _conv_shape("alexnet", 128, 15, 384, 256, 4),
    _conv_shape("alexnet", 128, 15, 256, 256, 4),
)
# VGG16 / CIFAR-10 (B=128, H=26): the distinct layers of 64,64 @32; 128,128 @16; 256x3 @8; 512x3 @4;
# 512x3 @2 (repeated layers appear once: 256to256@8 stands for two, 512to512@4 for two, @2 for three).
VGG16_CONV = tuple(_conv_shape("vgg16", 128, 26, ci, co, s) for ci, co, s in (
    (3, 64, 32), (64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4),
    (512, 512, 4), (512, 512, 2)))
CONV_SHAPES = ALEXNET_CONV + VGG16_CONV

EMBEDDING_SHAPES = (Shape("lstm-embedding", 40, 7, 10000, 650),)
GEOMETRY["lstm-embedding"] = EmbeddingGeometry(70)


def _ints(spec) -> List[int]:
    """The ints of "a,b,c" or a sequence; [] when any field is not an int."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError):
        return []


def parse_conv_shape(spec) -> Shape:
    """A conv Shape from a Shape, a name, or "B,H,C_in,C_out,size[,kernel[,stride[,padding]]]"."""
    if isinstance(spec, Shape):
        return spec
    if isinstance(spec, str) and spec in _CONV_BY_NAME:
        return _CONV_BY_NAME[spec]
    values = _ints(spec)
    if not 5 <= len(values) <= 8 or min(values[:5]) < 1:
        raise ValueError(f"shape: expected one of {sorted(_CONV_BY_NAME)} or "
                         f"'B,H,C_in,C_out,size[,kernel[,stride[,padding]]]' (positive ints), got {spec!r}")
    B, H, c_in, c_out, size = values[:5]
    kernel, stride, padding = (values[5:] + [3, 1, 1][len(values) - 5:])[:3]
    name = f"custom-{B}x{H}x{c_in}x{c_out}@{size}k{kernel}s{stride}p{padding}"
    GEOMETRY[name] = ConvGeometry(size, kernel, stride, padding)
    return Shape(name, B, H, c_in, c_out)


def parse_embedding_shape(spec) -> Shape:
    """An embedding Shape from a Shape, a name, or "B,H,num_embeddings,D,T"."""
    if isinstance(spec, Shape):
        return spec
    if isinstance(spec, str) and spec in _EMBEDDING_BY_NAME:
        return _EMBEDDING_BY_NAME[spec]
    values = _ints(spec)
    if len(values) != 5 or min(values) < 1:
        raise ValueError(f"shape: expected one of {sorted(_EMBEDDING_BY_NAME)} or 'B,H,num_embeddings,D,T' "
                         f"(five positive ints), got {spec!r}")
    B, H, num, D, T = values
    name = f"custom-{B}x{H}x{num}x{D}xT{T}"
    GEOMETRY[name] = EmbeddingGeometry(T)
    return Shape(name, B, H, num, D)


_CONV_BY_NAME = {s.name: s for s in CONV_SHAPES}
_EMBEDDING_BY_NAME = {s.name: s for s in EMBEDDING_SHAPES}


# ----------------------------------------------------------------------------- formulations

def published_conv_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, stride=1, padding=0):
    """The official STN HyperConv2d: two F.conv2d calls, s = λ·Mᵀ, per-example per-channel scales."""
    n = weight.shape[0]
    out = F.conv2d(x, weight, bias, stride, padding)
    s = F.linear(hparams, hparam_weight)
    hyper = s[:, :n, None, None] * F.conv2d(x, hyper_weight, None, stride, padding)
    return out + hyper + (s[:, n:] * hyper_bias)[:, :, None, None]


def published_embedding_forward(indices, hparams, weight, hyper_weight, hparam_weight):
    """The official STN HyperEmbedding (batch-major): E_e[i] + (λ_b·Mᵀ) ⊙ E_h[i]."""
    s = F.linear(hparams, hparam_weight)
    return F.embedding(indices, weight) + s[:, None, :] * F.embedding(indices, hyper_weight)


def stn_conv_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride=1,
                     padding=0):
    import stn_kernels

    return stn_kernels.hyper_conv2d(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                                    stride=stride, padding=padding)


def stn_embedding_forward(indices, hparams, weight, hyper_weight, hparam_weight):
    import stn_kernels

    return stn_kernels.hyper_embedding(indices, hparams, weight, hyper_weight, hparam_weight)


_CONV_PUBLISHED = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")
_CONV_STN = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale", "bias_scale")
_EMB_PUBLISHED = ("indices", "hparams", "weight", "hyper_weight", "hparam_weight")
_EMB_GRADS = _EMB_PUBLISHED[1:]


# ----------------------------------------------------------------------------- cases

@dataclass
class LayerCase(Case):
    """A ``bench.Case`` for a conv or embedding layer: its providers, backend probe and ground truth."""

    layer: str = "conv2d"
    geometry: tuple = field(default=())

    @property
    def providers(self) -> Dict[str, ProviderSpec]:
        return LAYER_PROVIDERS[self.layer]

    def backend_unavailable(self, backend: str, device, dtype=torch.float32) -> Optional[str]:
        return layer_backend_unavailable(self.layer, backend, device, dtype)

    def conv_args(self) -> dict:
        return {"stride": self.geometry.stride, "padding": self.geometry.padding}

    def expected(self):
        """Output and gradients of the published formulation evaluated in float32 (computed once)."""
        if self._expected is None:
            t32 = {k: (v.detach().float().requires_grad_() if v.is_floating_point() else v)
                   for k, v in self.tensors.items()}
            with torch.enable_grad():
                if self.layer == "conv2d":
                    names = _CONV_PUBLISHED
                    out = published_conv_forward(*(t32[k] for k in names), **self.conv_args())
                else:
                    names = _EMB_GRADS
                    out = published_embedding_forward(*(t32[k] for k in _EMB_PUBLISHED))
                grads = torch.autograd.grad(out, [t32[k] for k in names], self.grad_out(out.shape).float())
            self._expected = (out.detach(), dict(zip(names, grads)))
        return self._expected


def make_conv_case(shape, dtype=torch.float32, device="cpu", seed: int = 0) -> LayerCase:
    """Random data for a conv shape: x [B, C_in, size, size], λ [B, H], W, W_h [C_out, C_in, k, k],
    b, b_h [C_out], hparam_weight M = [V; C] [2·C_out, H] (and V, C as separate leaves), packed_weight."""
    shape = parse_conv_shape(shape)
    dtype = bench._DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    geo = GEOMETRY[shape.name]
    B, H, c_in, c_out = shape.B, shape.H, shape.K, shape.N
    fan_in = c_in * geo.kernel ** 2
    rand = bench.random_factory(device, dtype, seed)
    t = {
        "x": rand(B, c_in, geo.size, geo.size),
        "hparams": rand(B, H),
        "weight": rand(c_out, c_in, geo.kernel, geo.kernel, scale=fan_in ** -0.5),
        "hyper_weight": rand(c_out, c_in, geo.kernel, geo.kernel, scale=fan_in ** -0.5),
        "bias": rand(c_out, scale=0.1),
        "hyper_bias": rand(c_out, scale=0.1),
        "hparam_weight": rand(2 * c_out, H, scale=H ** -0.5),
    }
    t["weight_scale"] = t["hparam_weight"][:c_out].clone()
    t["bias_scale"] = t["hparam_weight"][c_out:].clone()
    t["packed_weight"] = torch.cat([t["weight"], t["hyper_weight"]])
    for v in t.values():
        v.requires_grad_(True)
    return LayerCase(shape, dtype, device, t, layer="conv2d", geometry=geo)


def make_embedding_case(shape, dtype=torch.float32, device="cpu", seed: int = 0) -> LayerCase:
    """Random data for an embedding shape: indices [B, T] (int64, uniform over the table), λ [B, H],
    tables E, E_h [num, D] (N(0, 1)), hparam_weight V [D, H], packed_table [num, 2·D]."""
    shape = parse_embedding_shape(shape)
    dtype = bench._DTYPES[dtype] if isinstance(dtype, str) else dtype
    device = torch.device(device)
    geo = GEOMETRY[shape.name]
    B, H, num, D = shape.B, shape.H, shape.K, shape.N
    gen = torch.Generator(device=device).manual_seed(seed)  # also draws the indices below

    def rand(*size, scale=1.0):
        return (torch.randn(size, generator=gen, device=device) * scale).to(dtype)

    t = {
        "hparams": rand(B, H),
        "weight": rand(num, D),
        "hyper_weight": rand(num, D),
        "hparam_weight": rand(D, H, scale=H ** -0.5),
    }
    t["packed_table"] = torch.cat([t["weight"], t["hyper_weight"]], 1)
    for v in t.values():
        v.requires_grad_(True)
    t["indices"] = torch.randint(0, num, (B, geo.T), generator=gen, device=device)
    return LayerCase(shape, dtype, device, t, layer="embedding", geometry=geo)


# ----------------------------------------------------------------------------- providers

def _by_name(names):
    return lambda grads: dict(zip(names, grads))


def _conv_floor(case, opts):
    x, w = case.tensors["x"], case.tensors["packed_weight"]
    kw = case.conv_args()
    return _Impl("floor", lambda: F.conv2d(x, w, None, **kw), (x, w), None)


def _embedding_floor(case, opts):
    idx, table = case.tensors["indices"], case.tensors["packed_table"]
    return _Impl("floor", lambda: F.embedding(idx, table), (table,), None)


def _conv_published(case, opts):
    args = bench._names(case, *_CONV_PUBLISHED)
    kw = case.conv_args()
    return _Impl("published", lambda: published_conv_forward(*args, **kw), args, _by_name(_CONV_PUBLISHED))


def _embedding_published(case, opts):
    args = bench._names(case, *_EMB_PUBLISHED)
    return _Impl("published", lambda: published_embedding_forward(*args), args[1:], _by_name(_EMB_GRADS))


def _compiled(case, opts):
    """published+compile for either layer (a fresh static-shape compile per case, as in the harness)."""
    if case.layer == "conv2d":
        kw = case.conv_args()

        def fn(*a):
            return published_conv_forward(*a, **kw)

        args = bench._names(case, *_CONV_PUBLISHED)
        inputs, canonical = args, _by_name(_CONV_PUBLISHED)
    else:
        fn = published_embedding_forward
        args = bench._names(case, *_EMB_PUBLISHED)
        inputs, canonical = args[1:], _by_name(_EMB_GRADS)
    return bench.compiled_impl("published+compile", fn, args, canonical, case, opts, inputs=inputs)


@contextlib.contextmanager
def _triton_with(module: str, **settings):
    """use_backend("triton") with attributes of a Triton kernel module set for the block."""
    import importlib

    mod = importlib.import_module(f"stn_kernels.backends.triton.{module}")
    old = {k: getattr(mod, k) for k in settings}
    with use_backend("triton"):
        for k, v in settings.items():
            setattr(mod, k, v)
        try:
            yield
        finally:
            for k, v in old.items():
                setattr(mod, k, v)


def _stn_conv(name, scope):
    def canonical(grads):
        d = dict(zip(_CONV_STN, grads))
        d["hparam_weight"] = torch.cat([d.pop("weight_scale"), d.pop("bias_scale")])
        return d

    def build(case, opts):
        args = bench._names(case, *_CONV_STN)
        kw = case.conv_args()
        return _Impl(name, lambda: stn_conv_forward(*args, **kw), args, canonical, scope=scope)

    return build


def _stn_embedding(name, scope):
    def build(case, opts):
        args = bench._names(case, *_EMB_PUBLISHED)
        return _Impl(name, lambda: stn_embedding_forward(*args), args[1:], _by_name(_EMB_GRADS), scope=scope)

    return build


def _backend_scope(backend):
    return lambda: use_backend(backend)


CONV_PROVIDERS: Dict[str, ProviderSpec] = {p.name: p for p in (
    ProviderSpec("floor", _conv_floor, "one convolution of x with the packed [2·C_out, C_in, k, k] weight",
                 gpu_default=True),
    ProviderSpec("published", _conv_published, "official STN formulation, eager (two F.conv2d + small ops)",
                 cpu_default=True, gpu_default=True),
    ProviderSpec("published+compile", _compiled, "published under torch.compile", gpu_default=True),
    ProviderSpec("stn:reference", _stn_conv("stn:reference", _backend_scope("reference")),
                 "stn_kernels.hyper_conv2d, backend 'reference'", cpu_default=True, gpu_default=True,
                 backend="reference"),
    ProviderSpec("stn:triton", _stn_conv("stn:triton", _backend_scope("triton")),
                 "stn_kernels.hyper_conv2d, backend 'triton' (packed weights)", gpu_default=True, backend="triton"),
    ProviderSpec("stn:triton:two-conv", _stn_conv("stn:triton:two-conv",
                                                  lambda: _triton_with("hyper_conv2d", PACKED=False)),
                 "backend 'triton' with two convolutions instead of the packed one", gpu_default=True,
                 backend="triton"),
    ProviderSpec("stn:triton:no-pack-cache", _stn_conv("stn:triton:no-pack-cache",
                                                       lambda: _triton_with("hyper_conv2d",
                                                                            CACHE_PACKED_WEIGHT=False)),
                 "backend 'triton', packed, the backward packing the weight again", backend="triton"),
)}

EMBEDDING_PROVIDERS: Dict[str, ProviderSpec] = {p.name: p for p in (
    ProviderSpec("floor", _embedding_floor, "one gather of a packed [num, 2·D] table", gpu_default=True),
    ProviderSpec("published", _embedding_published, "official STN formulation, eager (two F.embedding + scale)",
                 cpu_default=True, gpu_default=True),
    ProviderSpec("published+compile", _compiled, "published under torch.compile", gpu_default=True),
    ProviderSpec("stn:reference", _stn_embedding("stn:reference", _backend_scope("reference")),
                 "stn_kernels.hyper_embedding, backend 'reference'", cpu_default=True, gpu_default=True,
                 backend="reference"),
    ProviderSpec("stn:triton", _stn_embedding("stn:triton", _backend_scope("triton")),
                 "stn_kernels.hyper_embedding, backend 'triton' (atomic table gradients)", gpu_default=True,
                 backend="triton"),
    ProviderSpec("stn:triton:sorted", _stn_embedding("stn:triton:sorted",
                                                     lambda: _triton_with("hyper_embedding", TABLE_GRAD="sorted")),
                 "backend 'triton' with the sorted-segment (deterministic) table gradients", gpu_default=True,
                 backend="triton"),
)}

LAYER_PROVIDERS = {"conv2d": CONV_PROVIDERS, "embedding": EMBEDDING_PROVIDERS}

_probe_cache: Dict[tuple, Optional[str]] = {}


def layer_backend_unavailable(layer: str, backend: str, device, dtype=torch.float32) -> Optional[str]:
    """None if one small forward of the layer runs on ``backend`` here, else why not."""
    device = torch.device(device)
    key = (layer, backend, str(device), dtype)
    if key not in _probe_cache:
        reason = None
        try:
            with use_backend(backend), torch.enable_grad():
                if layer == "conv2d":
                    case = make_conv_case("2,3,4,6,5", dtype, device, seed=1)
                    stn_conv_forward(*bench._names(case, *_CONV_STN), **case.conv_args())
                else:
                    case = make_embedding_case("2,3,10,8,3", dtype, device, seed=1)
                    stn_embedding_forward(*bench._names(case, *_EMB_PUBLISHED))
        except (BackendUnavailableError, ImportError) as exc:
            reason = f"unavailable: {bench._one_line(exc)}"
        except Exception as exc:  # a broken backend must not stop the other providers
            reason = f"failed a small call: {type(exc).__name__}: {bench._one_line(exc)}"
        _probe_cache[key] = reason
    return _probe_cache[key]


# ----------------------------------------------------------------------------- the harness's view

@dataclass(frozen=True)
class Layer:
    """What ``bench.main`` needs per ``--layer``."""

    name: str
    op: str  # for the report title
    shapes: Dict[str, Shape]
    cpu_shapes: Tuple[str, ...]
    gpu_shapes: Tuple[str, ...]
    parse_shape: Callable[[object], Shape]
    make_case: Callable[..., Case]
    providers: Dict[str, ProviderSpec]
    shape_format: str


LAYERS: Dict[str, Layer] = {
    "linear": Layer("linear", "hyper_linear", bench.ALL_SHAPES, tuple(s.name for s in bench.STN_SHAPES),
                    tuple(s.name for s in bench.STN_SHAPES + bench.LARGE_SHAPES), bench.parse_shape,
                    bench.make_case, bench.PROVIDERS, "B,H,K,N"),
    "conv2d": Layer("conv2d", "hyper_conv2d", _CONV_BY_NAME, tuple(s.name for s in ALEXNET_CONV),
                    tuple(s.name for s in CONV_SHAPES), parse_conv_shape, make_conv_case, CONV_PROVIDERS,
                    "B,H,C_in,C_out,size[,kernel[,stride[,padding]]]"),
    "embedding": Layer("embedding", "hyper_embedding", _EMBEDDING_BY_NAME, tuple(_EMBEDDING_BY_NAME),
                       tuple(_EMBEDDING_BY_NAME), parse_embedding_shape, make_embedding_case, EMBEDDING_PROVIDERS,
                       "B,H,num_embeddings,D,T"),
}
