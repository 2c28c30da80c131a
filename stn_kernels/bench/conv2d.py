"""The STN conv layer in the benchmark (``python -m stn_kernels.bench --layer conv2d``).

Providers (:data:`PROVIDERS`):

* ``floor``: one convolution of x with the packed [2·C_out, C_in, k, k] weight: what no
  implementation can beat by much (GPU default).
* ``published``: the official STN formulation, eager (two F.conv2d calls, with s = λ·Mᵀ from
  one [2·C_out, H] parameter M).
* ``published+compile``: the same under ``torch.compile`` (GPU default).
* ``stn:reference``, ``stn:triton``: ``stn_kernels.hyper_conv2d`` under ``use_backend(name)``.
* ``stn:triton:two-conv`` (GPU default) and ``stn:triton:no-pack-cache`` (on request): the
  Triton backend with its kernel module's ``PACKED = False`` (two convolutions) or
  ``CACHE_PACKED_WEIGHT = False`` (the backward packs the weight again), to decide by measurement.

Shapes (:class:`ConvShape`): the convolutions of the published AlexNet (the CPU default) and
VGG16 experiments on CIFAR-10, or ``B,H,C_in,C_out,size[,kernel[,stride[,padding]]]`` (kernel 3,
stride 1, padding 1 unless given). The report's rows show K = C_in and N = C_out; the image size,
kernel, stride and padding are in the case name. Gradients are taken w.r.t. x, λ and every
parameter.
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.nn.functional as F

from stn_kernels import hyper_conv2d

from . import harness
from .harness import Case, Impl, ProviderSpec, Shape, grads_by_name


class ConvShape(NamedTuple):
    name: str
    B: int  # examples
    H: int  # hyperparameters
    c_in: int
    c_out: int
    size: int  # input height = width
    kernel: int = 3
    stride: int = 1
    padding: int = 1

    @property
    def row(self) -> Shape:
        """The report's Shape: K = C_in, N = C_out."""
        return Shape(self.name, self.B, self.H, self.c_in, self.c_out)


def _conv_shape(prefix, B, H, c_in, c_out, size, kernel=3, stride=1, padding=1) -> ConvShape:
    name = f"{prefix}-{c_in}to{c_out}" + (f"s{stride}" if stride != 1 else "") + f"@{size}"
    return ConvShape(name, B, H, c_in, c_out, size, kernel, stride, padding)


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
SHAPES = {s.name: s for s in CONV_SHAPES}
SHAPE_FORMAT = "B,H,C_in,C_out,size[,kernel[,stride[,padding]]]"


def _ints(spec) -> List[int]:
    """The ints of "a,b,c" or a sequence; [] when any field is not an int."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        return [int(p) for p in parts]
    except (TypeError, ValueError):
        return []


def parse_shape(spec) -> ConvShape:
    """A ConvShape from a ConvShape, a name, or "B,H,C_in,C_out,size[,kernel[,stride[,padding]]]"."""
    if isinstance(spec, ConvShape):
        return spec
    if isinstance(spec, str) and spec in SHAPES:
        return SHAPES[spec]
    values = _ints(spec)
    if not 5 <= len(values) <= 8 or min(values[:5]) < 1:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)} or '{SHAPE_FORMAT}' (positive ints), "
                         f"got {spec!r}")
    B, H, c_in, c_out, size = values[:5]
    kernel, stride, padding = (values[5:] + [3, 1, 1][len(values) - 5:])[:3]
    name = f"custom-{B}x{H}x{c_in}x{c_out}@{size}k{kernel}s{stride}p{padding}"
    return ConvShape(name, B, H, c_in, c_out, size, kernel, stride, padding)


def make_case(shape, dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    """Random data for a conv shape: x [B, C_in, size, size], λ [B, H], W, W_h [C_out, C_in, k, k],
    b, b_h [C_out], hparam_weight M = [V; C] [2·C_out, H] (and V, C as separate leaves), packed_weight."""
    shape = parse_shape(shape)
    dtype = harness.as_dtype(dtype)
    device = torch.device(device)
    B, H, c_in, c_out = shape.B, shape.H, shape.c_in, shape.c_out
    fan_in = c_in * shape.kernel ** 2
    rand = harness.random_factory(device, dtype, seed)
    t = {
        "x": rand(B, c_in, shape.size, shape.size),
        "hparams": rand(B, H),
        "weight": rand(c_out, c_in, shape.kernel, shape.kernel, scale=fan_in ** -0.5),
        "hyper_weight": rand(c_out, c_in, shape.kernel, shape.kernel, scale=fan_in ** -0.5),
        "bias": rand(c_out, scale=0.1),
        "hyper_bias": rand(c_out, scale=0.1),
        "hparam_weight": rand(2 * c_out, H, scale=H ** -0.5),
    }
    t["weight_scale"] = t["hparam_weight"][:c_out].clone()
    t["bias_scale"] = t["hparam_weight"][c_out:].clone()
    t["packed_weight"] = torch.cat([t["weight"], t["hyper_weight"]])
    for v in t.values():
        v.requires_grad_(True)
    return Case(LAYER, shape.row, dtype, device, t, spec=shape)


def _conv_args(case: Case) -> dict:
    return {"stride": case.spec.stride, "padding": case.spec.padding}


# ----------------------------------------------------------------------------- formulations

def published_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, stride=1, padding=0):
    """The official STN HyperConv2d: two F.conv2d calls, s = λ·Mᵀ, per-example per-channel scales."""
    n = weight.shape[0]
    out = F.conv2d(x, weight, bias, stride, padding)
    s = F.linear(hparams, hparam_weight)
    hyper = s[:, :n, None, None] * F.conv2d(x, hyper_weight, None, stride, padding)
    return out + hyper + (s[:, n:] * hyper_bias)[:, :, None, None]


def stn_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride=1, padding=0):
    """stn_kernels.hyper_conv2d on the separate leaves V (weight_scale) and C (bias_scale)."""
    return hyper_conv2d(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                        stride=stride, padding=padding)


PUBLISHED_ARGS = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")
STN_ARGS = ("x", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale", "bias_scale")


def ground_truth(case: Case, t32):
    """The published formulation on the float32 leaves; gradients checked for its seven arguments."""
    return published_forward(*(t32[k] for k in PUBLISHED_ARGS), **_conv_args(case)), PUBLISHED_ARGS


# ----------------------------------------------------------------------------- providers

def _build_floor(case, opts):
    x, w = case.tensors["x"], case.tensors["packed_weight"]
    kw = _conv_args(case)
    return Impl("floor", lambda: F.conv2d(x, w, None, **kw), (x, w), None)


def _build_published(case, opts):
    args = case.leaves(*PUBLISHED_ARGS)
    kw = _conv_args(case)
    return Impl("published", lambda: published_forward(*args, **kw), args, grads_by_name(PUBLISHED_ARGS))


def _build_compiled(case, opts):
    """published+compile (a fresh static-shape compile per case, as for every layer)."""
    kw = _conv_args(case)

    def fn(*a):
        return published_forward(*a, **kw)

    return harness.compiled_impl("published+compile", fn, case.leaves(*PUBLISHED_ARGS),
                                 grads_by_name(PUBLISHED_ARGS), case, opts)


def _stn_canonical(grads):
    d = dict(zip(STN_ARGS, grads))
    d["hparam_weight"] = torch.cat([d.pop("weight_scale"), d.pop("bias_scale")])
    return d


def _build_stn(name, scope):
    def build(case, opts):
        args = case.leaves(*STN_ARGS)
        kw = _conv_args(case)
        return Impl(name, lambda: stn_forward(*args, **kw), args, _stn_canonical, scope=scope)

    return build


def _triton_kernels_with(**settings):
    """use_backend("triton") with attributes of the Triton conv kernel module set (GPU-only variants)."""
    from stn_kernels.backends.triton import hyper_conv2d as kernels

    return harness.backend_with("triton", kernels, **settings)


PROVIDERS = {p.name: p for p in (
    ProviderSpec("floor", _build_floor, "one convolution of x with the packed [2·C_out, C_in, k, k] weight",
                 gpu_default=True),
    ProviderSpec("published", _build_published, "official STN formulation, eager (two F.conv2d + small ops)",
                 cpu_default=True, gpu_default=True),
    ProviderSpec("published+compile", _build_compiled, "published under torch.compile", gpu_default=True),
    ProviderSpec("stn:reference", _build_stn("stn:reference", harness.backend_scope("reference")),
                 "stn_kernels.hyper_conv2d, backend 'reference'", cpu_default=True, gpu_default=True,
                 backend="reference"),
    ProviderSpec("stn:triton", _build_stn("stn:triton", harness.backend_scope("triton")),
                 "stn_kernels.hyper_conv2d, backend 'triton' (packed weights)", gpu_default=True, backend="triton"),
    ProviderSpec("stn:triton:two-conv", _build_stn("stn:triton:two-conv",
                                                   lambda: _triton_kernels_with(PACKED=False)),
                 "backend 'triton' with two convolutions instead of the packed one", gpu_default=True,
                 backend="triton"),
    ProviderSpec("stn:triton:no-pack-cache", _build_stn("stn:triton:no-pack-cache",
                                                        lambda: _triton_kernels_with(CACHE_PACKED_WEIGHT=False)),
                 "backend 'triton', packed, the backward packing the weight again", backend="triton"),
)}

LAYER = harness.Layer(
    name="conv2d", op="hyper_conv2d", shapes=SHAPES, cpu_shapes=tuple(s.name for s in ALEXNET_CONV),
    gpu_shapes=tuple(s.name for s in CONV_SHAPES), parse_shape=parse_shape, make_case=make_case,
    providers=PROVIDERS, shape_format=SHAPE_FORMAT, probe_shape="2,3,4,6,5", ground_truth=ground_truth)
