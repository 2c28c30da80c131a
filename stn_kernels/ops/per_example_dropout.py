"""``stn_kernels::per_example_dropout``: dropout with one rate per example, no stored mask.

    y[b, i] = x[b, i] / (1 − p_b)   if  u(seed, offset + unit(b, i)) ≥ p_b,   else 0

* ``stn_kernels::per_example_dropout(x, rates [B] float32 or wider, seed_offset [2] int64, unit_size) -> y``
  (contiguous), with ``unit(b, i)`` the element's flat index divided by ``unit_size`` (1 for
  elementwise dropout, the spatial size for whole channels). The random numbers u are a
  counter-based hash of (seed, counter), documented in :mod:`stn_kernels.reference_dropout`,
  the same bits in every backend.

Backward is the same op applied to the incoming gradient with the same seed and offset (dropout is
linear in x), so the mask is regenerated, never saved, and the op is differentiable to any order.
The rates get no gradient. Entry branch as the other ops (:func:`stn_kernels.ops._support.run_op`);
the public function is :func:`stn_kernels.functional.per_example_dropout`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference_dropout
from ..backends import kernels
from ..backends.host import dropout_ops
from ._support import run_op

OP = "per_example_dropout"


def _dropout(x: Tensor, rates: Tensor, seed_offset: Tensor, unit_size: int, forward=None) -> Tensor:
    """Prepares the operands and runs ``forward`` (default: the chosen backend's kernel)."""
    x = x.contiguous()
    # 1/(1 − p) is formed once, here, for both backends: the kernel then only multiplies, so the
    # Triton and reference outputs agree bit for bit (a division inside the kernel could round
    # differently on the GPU). It is formed from the rates as given, before they are rounded to
    # float32 for the mask comparison, so float64 input with float64 rates keeps a float64 scale
    # (exactly 10.0 at p = 0.9).
    scales = 1.0 / (1.0 - rates.to(reference_dropout.compute_dtype(x.dtype)))
    rates = rates.to(torch.float32).contiguous()
    if forward is None:
        backend = kernels(OP, x.device, empty=x.numel() == 0)
        forward = backend.per_example_dropout_forward
        if backend is reference_dropout:
            # On the CPU the reference's ~30 passes of int64 tensor ops (the hash) as one pass in C++, the same bits.
            host = dropout_ops(x)
            if host is not None:
                forward, scales = host.per_example_dropout_forward, scales.contiguous()
    return forward(x, rates, scales, seed_offset.to(device=x.device, dtype=torch.int64), unit_size)


@torch.library.custom_op("stn_kernels::per_example_dropout", mutates_args=())
def per_example_dropout_op(x: Tensor, rates: Tensor, seed_offset: Tensor, unit_size: int) -> Tensor:
    return _dropout(x, rates, seed_offset, unit_size)


@per_example_dropout_op.register_fake
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
    grad_x = per_example_dropout_op(grad_out, rates, seed_offset, ctx.unit_size)
    return grad_x, None, None, None


per_example_dropout_op.register_autograd(_backward, setup_context=_setup_context)


class PerExampleDropoutFunction(torch.autograd.Function):
    """Eager path over the same kernels, without the custom-op dispatcher's Python overhead."""

    @staticmethod
    def forward(ctx, x, rates, seed_offset, unit_size):
        ctx.save_for_backward(rates, seed_offset)
        ctx.unit_size = unit_size
        return _dropout(x, rates, seed_offset, unit_size)

    @staticmethod
    def backward(ctx, grad_out):
        rates, seed_offset = ctx.saved_tensors
        return apply_per_example_dropout(grad_out, rates, seed_offset, ctx.unit_size), None, None, None


def _composite(x: Tensor, rates: Tensor, seed_offset: Tensor, unit_size: int) -> Tensor:
    return _dropout(x, rates, seed_offset, unit_size, forward=reference_dropout.per_example_dropout_forward)


def apply_per_example_dropout(x: Tensor, rates: Tensor, seed_offset: Tensor, unit_size: int) -> Tensor:
    """y of stn_kernels::per_example_dropout with autograd (inputs already validated)."""
    return run_op((x, rates, seed_offset, unit_size), registered=per_example_dropout_op, composite=_composite,
                  kernel=_dropout, function=PerExampleDropoutFunction)
