"""The STN embedding layer in the benchmark (``python -m stn_kernels.bench --layer embedding``).

Providers (:data:`PROVIDERS`):

* ``floor``: one gather of a packed [num, 2·D] table: what no implementation can beat by much
  (GPU default).
* ``published``: the official STN formulation, eager (two F.embedding calls, with s = λ·Mᵀ from
  one [D, H] parameter M).
* ``published+compile``: the same under ``torch.compile`` (GPU default).
* ``stn:reference``, ``stn:triton``: ``stn_kernels.hyper_embedding`` under ``use_backend(name)``
  (the Triton backend's table gradients by fp32 atomics).
* ``stn:triton:sorted`` (GPU default): table gradients by sorted segments (the deterministic
  path, the Triton kernel module's ``TABLE_GRAD = "sorted"``) instead of fp32 atomics, without
  deterministic mode.

Shapes (:class:`EmbeddingShape`): the published LSTM language model's embedding (PTB: 10000
words of D = 650, B = 40, T = 70 indices per example, H = 7), or ``B,H,num_embeddings,D,T``. The
report's rows show K = the number of embeddings and N = D, with T in the case name. Indices are
batch-major [B, T]; λ is [B, H]. Gradients are taken w.r.t. λ and every parameter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from stn_kernels import hyper_embedding

from . import harness
from .harness import Case, Impl, ProviderSpec, Shape, grads_by_name


class EmbeddingShape(NamedTuple):
    name: str
    B: int  # examples
    H: int  # hyperparameters
    num: int  # number of embeddings
    D: int  # embedding size
    T: int  # indices per example

    @property
    def row(self) -> Shape:
        """The report's Shape: K = the number of embeddings, N = D."""
        return Shape(self.name, self.B, self.H, self.num, self.D)


EMBEDDING_SHAPES = (EmbeddingShape("lstm-embedding", 40, 7, 10000, 650, 70),)
SHAPES = {s.name: s for s in EMBEDDING_SHAPES}
SHAPE_FORMAT = "B,H,num_embeddings,D,T"


def parse_shape(spec) -> EmbeddingShape:
    """An EmbeddingShape from an EmbeddingShape, a name, or "B,H,num_embeddings,D,T"."""
    if isinstance(spec, EmbeddingShape):
        return spec
    if isinstance(spec, str) and spec in SHAPES:
        return SHAPES[spec]
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        values = [int(p) for p in parts]
    except (TypeError, ValueError):
        values = []
    if len(values) != 5 or min(values) < 1:
        raise ValueError(f"shape: expected one of {sorted(SHAPES)} or '{SHAPE_FORMAT}' "
                         f"(five positive ints), got {spec!r}")
    B, H, num, D, T = values
    return EmbeddingShape(f"custom-{B}x{H}x{num}x{D}xT{T}", B, H, num, D, T)


def make_case(shape, dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    """Random data for an embedding shape: indices [B, T] (int64, uniform over the table), λ [B, H],
    tables E, E_h [num, D] (N(0, 1)), hparam_weight V [D, H], packed_table [num, 2·D]."""
    shape = parse_shape(shape)
    dtype = harness.as_dtype(dtype)
    device = torch.device(device)
    B, H, num, D = shape.B, shape.H, shape.num, shape.D
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
    t["indices"] = torch.randint(0, num, (B, shape.T), generator=gen, device=device)
    return Case(LAYER, shape.row, dtype, device, t, spec=shape)


# ----------------------------------------------------------------------------- formulations

def published_forward(indices, hparams, weight, hyper_weight, hparam_weight):
    """The official STN HyperEmbedding (batch-major): E_e[i] + (λ_b·Mᵀ) ⊙ E_h[i]."""
    s = F.linear(hparams, hparam_weight)
    return F.embedding(indices, weight) + s[:, None, :] * F.embedding(indices, hyper_weight)


def stn_forward(indices, hparams, weight, hyper_weight, hparam_weight):
    """stn_kernels.hyper_embedding on the published leaves."""
    return hyper_embedding(indices, hparams, weight, hyper_weight, hparam_weight)


PUBLISHED_ARGS = ("indices", "hparams", "weight", "hyper_weight", "hparam_weight")
GRAD_NAMES = PUBLISHED_ARGS[1:]  # every argument but the indices


def ground_truth(case: Case, t32):
    """The published formulation on the float32 leaves; gradients checked for λ and the parameters."""
    return published_forward(*(t32[k] for k in PUBLISHED_ARGS)), GRAD_NAMES


# ----------------------------------------------------------------------------- providers

def _build_floor(case, opts):
    idx, table = case.tensors["indices"], case.tensors["packed_table"]
    return Impl("floor", lambda: F.embedding(idx, table), (table,), None)


def _build_published(case, opts):
    args = case.leaves(*PUBLISHED_ARGS)
    return Impl("published", lambda: published_forward(*args), args[1:], grads_by_name(GRAD_NAMES))


def _build_compiled(case, opts):
    """published+compile (a fresh static-shape compile per case, as for every layer)."""
    args = case.leaves(*PUBLISHED_ARGS)
    return harness.compiled_impl("published+compile", published_forward, args, grads_by_name(GRAD_NAMES), case,
                                 opts, inputs=args[1:])


def _build_stn(name, scope):
    def build(case, opts):
        args = case.leaves(*PUBLISHED_ARGS)
        return Impl(name, lambda: stn_forward(*args), args[1:], grads_by_name(GRAD_NAMES), scope=scope)

    return build


def _triton_kernels_with(**settings):
    """use_backend("triton") with attributes of the Triton embedding kernel module set (GPU-only variant)."""
    from stn_kernels.backends.triton import hyper_embedding as kernels

    return harness.backend_with("triton", kernels, **settings)


PROVIDERS = {p.name: p for p in (
    ProviderSpec("floor", _build_floor, "one gather of a packed [num, 2·D] table", gpu_default=True),
    ProviderSpec("published", _build_published, "official STN formulation, eager (two F.embedding + scale)",
                 cpu_default=True, gpu_default=True),
    ProviderSpec("published+compile", _build_compiled, "published under torch.compile", gpu_default=True),
    ProviderSpec("stn:reference", _build_stn("stn:reference", harness.backend_scope("reference")),
                 "stn_kernels.hyper_embedding, backend 'reference'", cpu_default=True, gpu_default=True,
                 backend="reference"),
    ProviderSpec("stn:triton", _build_stn("stn:triton", harness.backend_scope("triton")),
                 "stn_kernels.hyper_embedding, backend 'triton' (atomic table gradients)", gpu_default=True,
                 backend="triton"),
    ProviderSpec("stn:triton:sorted", _build_stn("stn:triton:sorted",
                                                 lambda: _triton_kernels_with(TABLE_GRAD="sorted")),
                 "backend 'triton' with the sorted-segment (deterministic) table gradients", gpu_default=True,
                 backend="triton"),
)}

LAYER = harness.Layer(
    name="embedding", op="hyper_embedding", shapes=SHAPES, cpu_shapes=tuple(SHAPES), gpu_shapes=tuple(SHAPES),
    parse_shape=parse_shape, make_case=make_case, providers=PROVIDERS, shape_format=SHAPE_FORMAT,
    probe_shape="2,3,10,8,3", ground_truth=ground_truth)
