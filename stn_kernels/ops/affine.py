"""``stn_kernels::affine``: a random affine transform per example of images [B, C, H, W] (torchvision's
``RandomAffine`` with per-example strengths), the parameters drawn by the counter-based hash before the op.

* ``stn_kernels::affine(images, matrices [B, 6] float64, mode) -> out`` in the images' dtype and memory
  format; ``mode`` 0 nearest, 1 bilinear; semantics and draws in :mod:`stn_kernels.reference_affine`.
* ``stn_kernels::affine_backward(grad_out, images, matrices, mode) -> grad_images``: autograd through
  the reference on every backend (the Triton kernel is forward only). Not differentiable again.

A separate op from ``stn_kernels::augment``: a resampling (each output pixel gathers from elsewhere in
the image), first in the published order (affine, then jitter, then cutout), where ``augment`` is a
chain of pointwise passes over each example. The matrices get no gradient. Public function:
:func:`stn_kernels.functional.affine` (draws: :func:`stn_kernels.functional.affine_draws`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference_affine
from ..backends import kernels, load
from ..reference import dense_format
from ._support import run_op

OP = "affine"


def _affine(images: Tensor, matrices: Tensor, mode: int, forward=None) -> Tensor:
    layout = dense_format(images)
    if forward is None:
        forward = kernels(OP, images.device, empty=images.numel() == 0).affine_forward
    return forward(images.contiguous(), matrices.contiguous(), mode).contiguous(memory_format=layout)


def _like_images(images: Tensor) -> Tensor:
    return torch.empty(images.shape, dtype=images.dtype, device=images.device, memory_format=dense_format(images))


@torch.library.custom_op("stn_kernels::affine", mutates_args=())
def affine_op(images: Tensor, matrices: Tensor, mode: int) -> Tensor:
    return _affine(images, matrices, mode)


@affine_op.register_fake
def _(images, matrices, mode):
    return _like_images(images)


@torch.library.custom_op("stn_kernels::affine_backward", mutates_args=())
def affine_backward_op(grad_out: Tensor, images: Tensor, matrices: Tensor, mode: int) -> Tensor:
    grad = load(OP, "reference").affine_backward(grad_out.contiguous(), images.contiguous(), matrices, mode)
    return grad.contiguous(memory_format=dense_format(images))


@affine_backward_op.register_fake
def _(grad_out, images, matrices, mode):
    return _like_images(images)


def _setup_context(ctx, inputs, output):
    images, matrices, mode = inputs
    ctx.save_for_backward(images, matrices)
    ctx.mode = mode


def _backward(ctx, grad_out):
    return affine_backward_op(grad_out, *ctx.saved_tensors, ctx.mode), None, None


affine_op.register_autograd(_backward, setup_context=_setup_context)


class AffineFunction(torch.autograd.Function):
    """Eager path over the same kernels, without the custom-op dispatcher's Python overhead."""

    @staticmethod
    def forward(ctx, images, matrices, mode):
        ctx.save_for_backward(images, matrices)
        ctx.mode = mode
        return _affine(images, matrices, mode)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


def _composite(images: Tensor, matrices: Tensor, mode: int) -> Tensor:
    return _affine(images, matrices, mode, forward=reference_affine.affine_forward)


def apply_affine(images: Tensor, matrices: Tensor, mode: int) -> Tensor:
    """out of stn_kernels::affine with autograd (inputs already validated and drawn)."""
    return run_op((images, matrices, mode), registered=affine_op, composite=_composite, kernel=_affine,
                  function=AffineFunction)
