"""Per-example dropout: one rate per example, hard Bernoulli masks, no stored mask.

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

import importlib
import math
from typing import Optional, Union

import torch
from torch import Tensor

from .._backend import resolve_backend

_MASK32 = 0xFFFFFFFF
_UNIFORM_BITS = 24
_KERNEL_MODULE = "stn_kernels.triton_kernels.dropout"
_MAX_SEED = 2**63 - 1


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


# --------------------------------------------------------------------------- reference kernel


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scaling happens in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_mask(shape, rates: Tensor, seed_offset: Tensor, unit_size: int) -> Tensor:
    """The boolean keep mask of an x of ``shape`` (contiguous index order)."""
    numel = math.prod(shape)
    num_units = numel // unit_size
    if seed_offset.device.type == "cpu":
        # Seed and offset are on the host already: keys as Python ints, and no high counter word
        # to hash when every counter fits in 32 bits (the usual case).
        seed, offset = seed_offset.tolist()
        counters = torch.arange(offset, offset + num_units, device=rates.device, dtype=torch.int64)
        uniform = hash_uniform(seed, counters, counters_below_2_32=offset + num_units <= 2**32)
    else:  # no host synchronisation: everything stays on the device
        counters = seed_offset[1] + torch.arange(num_units, device=rates.device, dtype=torch.int64)
        uniform = hash_uniform(seed_offset[0], counters)
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


# --------------------------------------------------------------------------- the op


def _kernel(x: Tensor):
    backend = resolve_backend(x.device, "stn_kernels::per_example_dropout", ("reference", "triton"))
    if backend == "reference" or x.numel() == 0:
        return per_example_dropout_forward
    return importlib.import_module(_KERNEL_MODULE).per_example_dropout_forward


def _dropout(x: Tensor, rates: Tensor, seed_offset: Tensor, unit_size: int, kernel=None) -> Tensor:
    x = x.contiguous()
    rates = rates.to(torch.float32).contiguous()
    # 1/(1 − p) is formed once, here, for both backends: the kernel then only multiplies, so the
    # Triton and reference outputs agree bit for bit (a division inside the kernel could round
    # differently on the GPU).
    scales = 1.0 / (1.0 - rates.to(compute_dtype(x.dtype)))
    kernel = kernel or _kernel(x)
    return kernel(x, rates, scales, seed_offset.to(device=x.device, dtype=torch.int64), unit_size)


@torch.library.custom_op("stn_kernels::per_example_dropout", mutates_args=())
def _per_example_dropout_op(x: Tensor, rates: Tensor, seed_offset: Tensor, unit_size: int) -> Tensor:
    return _dropout(x, rates, seed_offset, unit_size)


@_per_example_dropout_op.register_fake
def _(x, rates, seed_offset, unit_size):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, rates, seed_offset, unit_size = inputs
    ctx.save_for_backward(rates, seed_offset)
    ctx.unit_size = unit_size


def _backward(ctx, grad_out):
    rates, seed_offset = ctx.saved_tensors
    # The same mask, regenerated from (seed, offset); through the op itself so that this is
    # differentiable again (double backward, Delta-STN's Jacobian-vector products).
    grad_x = _per_example_dropout_op(grad_out, rates, seed_offset, ctx.unit_size)
    return grad_x, None, None, None


_per_example_dropout_op.register_autograd(_backward, setup_context=_setup_context)


class _DropoutFunction(torch.autograd.Function):
    """Eager path over the same kernels, without the custom-op dispatcher's Python overhead
    (as stn_kernels.ops does for the layers)."""

    @staticmethod
    def forward(ctx, x, rates, seed_offset, unit_size):
        ctx.save_for_backward(rates, seed_offset)
        ctx.unit_size = unit_size
        return _dropout(x, rates, seed_offset, unit_size)

    @staticmethod
    def backward(ctx, grad_out):
        rates, seed_offset = ctx.saved_tensors
        return _DropoutFunction.apply(grad_out, rates, seed_offset, ctx.unit_size), None, None, None


def _apply_dropout(x: Tensor, rates: Tensor, seed_offset: Tensor, unit_size: int) -> Tensor:
    """The registered op under torch.compile; the reference composition under torch.func transforms
    and forward-mode AD (custom ops have no forward-mode rule: their tangent would be silently
    zero); the autograd.Function otherwise."""
    if torch.compiler.is_compiling():
        return _per_example_dropout_op(x, rates, seed_offset, unit_size)
    if torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0:
        return _dropout(x, rates, seed_offset, unit_size, kernel=per_example_dropout_forward)
    return _DropoutFunction.apply(x, rates, seed_offset, unit_size)


# --------------------------------------------------------------------------- public API


def _rates_tensor(rates, x: Tensor) -> Tensor:
    batch = x.shape[0]
    if isinstance(rates, (int, float)) and not isinstance(rates, bool):
        if not 0.0 <= rates < 1.0:
            raise ValueError(f"rates: expected values in [0, 1), got {rates}")
        return torch.full((batch,), float(rates), dtype=torch.float32, device=x.device)
    if not isinstance(rates, Tensor):
        raise TypeError(f"rates: expected a float or a torch.Tensor of shape [{batch}], got {type(rates).__name__}")
    if not rates.is_floating_point():
        raise TypeError(f"rates: expected a floating-point tensor, got dtype {rates.dtype}")
    if rates.device != x.device:
        raise ValueError(f"rates: expected device {x.device} (the device of x), got {rates.device}")
    if rates.dim() == 0:
        rates = rates.expand(batch)
    elif tuple(rates.shape) != (batch,):
        raise ValueError(f"rates: expected shape [{batch}] (one rate per example, x's first dim) or [], "
                         f"got {tuple(rates.shape)}")
    rates = rates.detach()
    if not torch.compiler.is_compiling():
        in_range = (rates >= 0) & (rates < 1)
        if rates.device.type == "cpu":
            if not bool(in_range.all()):
                bad = rates[~in_range]
                raise ValueError(f"rates: expected values in [0, 1), got {bad.numel()} outside, e.g. {bad[0].item()}")
        else:  # no host synchronisation on accelerators: the check runs on the device
            torch._assert_async(in_range.all(), "rates: expected values in [0, 1)")
    return rates


def _seed_offset(seed, offset, device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
    if seed is None:
        # A fresh seed per call from torch's generator: torch.manual_seed makes runs reproducible.
        if generator is not None:
            drawn = torch.randint(_MAX_SEED, (1,), generator=generator, device=generator.device)
            drawn = drawn.to(device)
        else:
            drawn = torch.randint(_MAX_SEED, (1,), device=device)
        return torch.cat([drawn, torch.full((1,), offset, dtype=torch.int64, device=device)])
    if generator is not None:
        raise ValueError("generator: expected None when seed is given (the seed fixes the mask), got a Generator")
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed: expected an int or a one-element int64 tensor, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)}")
        return torch.cat([seed.reshape(1).to(device),
                          torch.full((1,), offset, dtype=torch.int64, device=device)])
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed: expected an int in [0, 2**63 - 1], got {seed!r}")
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def per_example_dropout(x: Tensor, rates: Union[Tensor, float], *, training: bool = True, per_channel: bool = False,
                        seed: Union[int, Tensor, None] = None, offset: int = 0,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """Dropout with one rate per example: x [B, ...], rates [B] (or a float or 0-d tensor for all).

    Hard Bernoulli masks with keep probability 1 − p_b and inverted scaling 1/(1 − p_b); dropped
    elements are exactly 0. ``per_channel=True`` drops whole channels (x [B, C, *spatial]), as
    ``dropout2d`` does for conv feature maps. ``training=False`` returns x unchanged (validation
    and evaluation, as in the published code).

    The mask is a pure function of (seed, offset + unit index): pass ``seed`` (an int or int64
    tensor) and ``offset`` to reproduce one, or leave ``seed=None`` to draw a fresh seed from
    torch's generator (``generator`` or the default one; ``torch.manual_seed`` makes it
    reproducible). A call consumes the counters offset … offset + units − 1, with units the number
    of elements (or of B·C channels). The rates get no gradient. The output is contiguous.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or (per_channel and x.dim() < 2):
        expected = "[B, C, ...]" if per_channel else "[B, ...]"
        raise ValueError(f"x: expected shape {expected}, got {tuple(x.shape)}")
    rates = _rates_tensor(rates, x)
    if not training:
        return x
    unit_size = math.prod(x.shape[2:]) if per_channel else 1
    seed_offset = _seed_offset(seed, offset, x.device, generator)
    return _apply_dropout(x, rates, seed_offset, max(unit_size, 1))


def per_example_channel_dropout(x: Tensor, rates: Union[Tensor, float], **kwargs) -> Tensor:
    """:func:`per_example_dropout` with ``per_channel=True``: whole feature maps of x [B, C, H, W]."""
    return per_example_dropout(x, rates, per_channel=True, **kwargs)
