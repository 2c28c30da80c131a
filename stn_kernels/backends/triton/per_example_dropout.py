"""Fused Triton kernel for per-example dropout (the ``triton`` backend of
``stn_kernels::per_example_dropout``).

One pass over x: every element finds its example's rate and scale, draws its
keep decision from a counter-based hash of (seed, offset + mask unit) and writes
``x·1/(1−p_b)`` or 0. Nothing is stored for backward: the backward is the same
kernel applied to the incoming gradient with the same seed and offset, which
regenerates the same mask.

The random numbers come from the keyed integer hash documented in
:mod:`stn_kernels.reference_dropout` (three rounds of a 32-bit mixer), not from
``tl.rand``: the reference backend implements the same hash with torch integer
ops, so for the same (seed, offset) both backends produce the same mask bit for
bit on any device. Keep the two implementations identical; the tests compare them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv as _cdiv

Tensor = torch.Tensor

BLOCK = 1024


@triton.jit
def _mix32(x):
    # A 32-bit integer mixer (xor-shift / multiply, constants from Chris Wellons' hash search).
    # x is uint32; the multiplications wrap modulo 2**32 and the shifts are logical.
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def _low_word(v):
    return (v & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _high_word(v):
    return ((v >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _per_example_dropout_kernel(
    x_ptr, out_ptr, rate_ptr, scale_ptr, seed_offset_ptr,
    numel, per_example, unit_size,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_bounds = idx < numel
    example = idx // per_example
    rate = tl.load(rate_ptr + example, mask=in_bounds, other=0.0)
    scale = tl.load(scale_ptr + example, mask=in_bounds, other=0.0)

    seed = tl.load(seed_offset_ptr)
    offset = tl.load(seed_offset_ptr + 1)
    # Keys from the seed: scalars, computed once per program.
    key0 = _mix32(_low_word(seed) ^ tl.full((), 0x9E3779B9, tl.uint32))
    key1 = _mix32(_high_word(seed) ^ tl.full((), 0x85EBCA6B, tl.uint32))
    key2 = _mix32(key0 ^ key1 ^ tl.full((), 0xC2B2AE35, tl.uint32))
    # One counter per mask unit (an element, or a whole channel of one example).
    counter = offset + idx // unit_size
    h = _mix32(_low_word(counter) ^ key0)
    h = _mix32(h ^ _high_word(counter) ^ key1)
    h = _mix32(h ^ key2)
    # The top 24 bits as a float in [0, 1): exact in float32, so the comparison with the rate is exact.
    uniform = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    keep = uniform >= rate

    x = tl.load(x_ptr + idx, mask=in_bounds, other=0.0)
    y = x.to(scale.dtype) * scale
    y = tl.where(keep, y, tl.zeros_like(y))
    tl.store(out_ptr + idx, y.to(out_ptr.dtype.element_ty), mask=in_bounds)


def per_example_dropout_forward(x: Tensor, rates: Tensor, scales: Tensor, seed_offset: Tensor,
                                unit_size: int) -> Tensor:
    """Kernel entry: x contiguous [B, ...]; rates float32 [B]; scales [B] in the compute dtype
    (float32, or float64 for float64 x); seed_offset int64 [2] on x's device."""
    out = torch.empty_like(x)
    numel = x.numel()
    if numel == 0:
        return out
    per_example = numel // x.shape[0]
    grid = (_cdiv(numel, BLOCK),)
    _per_example_dropout_kernel[grid](x, out, rates, scales, seed_offset, numel, per_example, unit_size,
                                      BLOCK=BLOCK)
    return out
