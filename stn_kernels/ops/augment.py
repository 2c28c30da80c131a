"""``stn_kernels::augment``: per-example data augmentation of images [B, C, H, W] (colour jitter in a
per-example order, cutout, input scale), from per-example parameters drawn by a counter-based hash.

* ``stn_kernels::augment(images, order [B, 4] int64, factors [B, 4] float32, boxes [B, K, 4] int64,
  scales [B] float32) -> out`` in the images' dtype and memory format (contiguous or channels_last).
  The semantics and the draws are documented in :mod:`stn_kernels.reference_augment`; the draws
  happen before the op (:func:`stn_kernels.reference_augment.draw`), so every backend applies the
  same parameters.
* ``stn_kernels::augment_backward(grad_out, images, order, factors, boxes, scales) -> grad_images``:
  autograd through the reference composition on every backend (the backward of an augmentation is
  rarely on the critical path; the Triton kernel is forward only). Not differentiable again.

The parameters get no gradient (they are drawn from the strengths, which get none either, as in
the published code). Entry branch as the other ops (:func:`stn_kernels.ops._support.run_op`); the
public functions are :func:`stn_kernels.functional.color_jitter`, ``cutout``, ``input_scale`` and
``augment_images``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference_augment
from ..backends import kernels, load
from ..reference import dense_format
from ._support import run_op

OP = "augment"


def _augment(images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor, scales: Tensor, forward=None) -> Tensor:
    """Runs ``forward`` (default: the chosen backend's kernel) on contiguous images; the result comes
    back in the images' memory format, so both formats give the same values."""
    layout = dense_format(images)
    if forward is None:
        forward = kernels(OP, images.device, empty=images.numel() == 0).augment_forward
    out = forward(images.contiguous(), order.contiguous(), factors.contiguous(), boxes.contiguous(),
                  scales.contiguous())
    return out.contiguous(memory_format=layout)


@torch.library.custom_op("stn_kernels::augment", mutates_args=())
def augment_op(images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor, scales: Tensor) -> Tensor:
    return _augment(images, order, factors, boxes, scales)


@augment_op.register_fake
def _(images, order, factors, boxes, scales):
    return torch.empty(images.shape, dtype=images.dtype, device=images.device, memory_format=dense_format(images))


@torch.library.custom_op("stn_kernels::augment_backward", mutates_args=())
def augment_backward_op(grad_out: Tensor, images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor,
                        scales: Tensor) -> Tensor:
    # The reference's autograd on every backend, taken through the table like every kernel.
    grad = load(OP, "reference").augment_backward(grad_out.contiguous(), images.contiguous(), order, factors, boxes,
                                                  scales)
    return grad.contiguous(memory_format=dense_format(images))


@augment_backward_op.register_fake
def _(grad_out, images, order, factors, boxes, scales):
    return torch.empty(images.shape, dtype=images.dtype, device=images.device, memory_format=dense_format(images))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    return augment_backward_op(grad_out, *ctx.saved_tensors), None, None, None, None


augment_op.register_autograd(_backward, setup_context=_setup_context)


class AugmentFunction(torch.autograd.Function):
    """Eager path over the same kernels, without the custom-op dispatcher's Python overhead."""

    @staticmethod
    def forward(ctx, images, order, factors, boxes, scales):
        ctx.save_for_backward(images, order, factors, boxes, scales)
        return _augment(images, order, factors, boxes, scales)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return augment_backward_op(grad_out, *ctx.saved_tensors), None, None, None, None


def _composite(images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor, scales: Tensor) -> Tensor:
    return _augment(images, order, factors, boxes, scales, forward=reference_augment.augment_forward)


def apply_augment(images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor, scales: Tensor) -> Tensor:
    """out of stn_kernels::augment with autograd (inputs already validated and drawn)."""
    return run_op((images, order, factors, boxes, scales), registered=augment_op, composite=_composite,
                  kernel=_augment, function=AugmentFunction)
