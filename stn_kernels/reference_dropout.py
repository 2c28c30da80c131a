"""Reference of per-example dropout (the "reference" backend of ``stn_kernels::per_example_dropout``):
one rate per example, hard Bernoulli masks, no stored mask.

    y[b, i] = x[b, i] / (1 − p_b)   if  u(seed, offset + unit(b, i)) ≥ p_b,   else 0

with unit(b, i) the element's flat index (``per_channel=False``) or its channel's
index b·C + c (``per_channel=True``, whole feature maps dropped, for conv layers).
The rates get no gradient through the mask (they are treated as constants, as
in the published STN code); their hypergradient comes from the layers'
dependence on λ.

Random numbers
--------------
u is a counter-based hash, not a stateful generator: a pure function of the
seed, the counter offset + unit and nothing else. Three rounds of a 32-bit
xor-shift-multiply mixer (“lowbias32”) keyed by the seed:

    k0 = mix(seed_lo ^ 0x9E3779B9),  k1 = mix(seed_hi ^ 0x85EBCA6B),  k2 = mix(k0 ^ k1 ^ 0xC2B2AE35)
    h  = mix(mix(mix(ctr_lo ^ k0) ^ ctr_hi ^ k1) ^ k2),   u = (h >> 8) · 2⁻²⁴

(seed and counter are split into 32-bit words). The Triton kernel and the
pure-torch reference below implement exactly this, so the two backends produce
the same mask bit for bit for the same (seed, offset): the reference *is* the
deterministic reference mode, on every device, with no mask tensor in memory.
We chose this over ``tl.rand`` because reproducing Triton's Philox and its
integer-to-float mapping in torch would need 32×32→64-bit multiplies that torch
has no integer dtype for, and would tie the reference to a Triton
implementation detail. The hash is not cryptographic; the tests check its
uniformity, the independence of neighbouring units and of different seeds.

Backward is the same op applied to the incoming gradient with the same seed and
offset (dropout is linear in x), so the mask is regenerated, never saved, and
the op is differentiable to any order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 24


# --------------------------------------------------------------------------- the hash, in torch


def _mul32(x: Tensor, constant: int) -> Tensor:
    """x·constant mod 2³² for int64 x in [0, 2³²), without int64 overflow: a constant ≥ 2³¹ is replaced
    by constant − 2³² (the same residue mod 2³²), so |x·c| < 2⁶³; masking the two's-complement
    product with 2³² − 1 then gives the residue."""
    signed = constant - 2**32 if constant >= 2**31 else constant
    return (x * signed).bitwise_and_(_MASK32)


def mix32(x: Tensor) -> Tensor:
    """The 32-bit mixer on int64 tensors holding uint32 values (same as ``_mix32`` in the kernel)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def mix32_int(x: int) -> int:
    """The same mixer on a Python int (for keys derived from a seed that is already on the host)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def hash_keys(seed):
    """(k0, k1, k2) from a seed: Python ints for an int seed, else int64 tensors."""
    if isinstance(seed, int):
        key0 = mix32_int((seed & _MASK32) ^ 0x9E3779B9)
        key1 = mix32_int(((seed >> 32) & _MASK32) ^ 0x85EBCA6B)
        return key0, key1, mix32_int(key0 ^ key1 ^ 0xC2B2AE35)
    seed = seed.to(torch.int64)
    key0 = mix32((seed & _MASK32) ^ 0x9E3779B9)
    key1 = mix32(((seed >> 32) & _MASK32) ^ 0x85EBCA6B)
    return key0, key1, mix32(key0 ^ key1 ^ 0xC2B2AE35)


def hash_uniform(seed, counters: Tensor, *, counters_below_2_32: bool = False) -> Tensor:
    """u ∈ [0, 1) (float32, multiples of 2⁻²⁴) for int64 ``counters`` under ``seed`` (an int or a 0-d
    int64 tensor). ``counters_below_2_32`` skips the high counter word, which is then 0."""
    key0, key1, key2 = hash_keys(seed)
    h = mix32((counters & _MASK32) ^ key0)
    if counters_below_2_32:
        h.bitwise_xor_(key1)
    else:
        h.bitwise_xor_(((counters >> 32) & _MASK32) ^ key1)
    h = mix32(h)
    h = mix32(h.bitwise_xor_(key2))
    return h.bitwise_right_shift_(32 - _UNIFORM_BITS).to(torch.float32).mul_(2.0 ** -_UNIFORM_BITS)


def uniform_from(seed_offset: Tensor, index: Tensor, index_end: int) -> Tensor:
    """u(seed, offset + index) for int64 ``index`` in [0, index_end) (on the device of the result) and the
    op's int64 [seed, offset] tensor: the draws of every op that uses this hash (dropout masks,
    augmentation)."""
    if seed_offset.device.type == "cpu" and not torch.compiler.is_compiling():
        # Seed and offset are on the host already: keys as Python ints, and no high counter word
        # to hash when every counter fits in 32 bits (the usual case).
        seed, offset = seed_offset.tolist()
        return hash_uniform(seed, index + offset, counters_below_2_32=offset + index_end <= 2**32)
    # No host synchronisation: everything stays on the device.
    return hash_uniform(seed_offset[0], index + seed_offset[1].to(index.device))


# --------------------------------------------------------------------------- the reference kernel


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scaling happens in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_mask(shape, rates: Tensor, seed_offset: Tensor, unit_size: int) -> Tensor:
    """The boolean keep mask of an x of ``shape`` (contiguous index order)."""
    numel = math.prod(shape)
    num_units = numel // unit_size
    uniform = uniform_from(seed_offset, torch.arange(num_units, device=rates.device, dtype=torch.int64), num_units)
    per_unit = (numel // shape[0]) // unit_size
    keep = uniform.view(shape[0], per_unit, 1) >= rates.to(torch.float32).view(-1, 1, 1)
    return keep.expand(shape[0], per_unit, unit_size).reshape(shape)


def per_example_dropout_forward(x: Tensor, rates: Tensor, scales: Tensor, seed_offset: Tensor,
                                unit_size: int) -> Tensor:
    """The reference backend: same contract and same bits as the Triton kernel."""
    if x.numel() == 0:
        return torch.empty_like(x)
    keep = keep_mask(x.shape, rates, seed_offset, unit_size)
    scale = scales.view(-1, *([1] * (x.dim() - 1)))
    scaled = (x.to(scales.dtype) * scale).to(x.dtype)
    return torch.where(keep, scaled, torch.zeros((), dtype=x.dtype, device=x.device))
