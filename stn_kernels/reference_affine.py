"""Reference of the per-example random affine transform (the "reference" backend of
``stn_kernels::affine``), and the draws every backend shares.

Per example b of images [B, C, H, W], with strengths r (rotation, degrees), t (translation, a fraction of
the size), s (scale) and sh (shear, degrees), torchvision's ``RandomAffine(degrees=r, translate=(t, t),
scale=(1 − s, 1 + s), shear=sh)`` (what the Delta-STN code builds per example from its perturbed
hyperparameters), on tensors:

* angle uniform in [−r, r]; shifts ``round(U(−t·W, t·W))`` and ``round(U(−t·H, t·H))`` pixels (integers,
  rounded half to even as torchvision's ``round``); scale factor uniform in [1 − s, 1 + s]; shear along x
  uniform in [−sh, sh] (a single shear number: no y shear);
* the image is resampled by ``torchvision.transforms.v2.functional.affine(image, angle, [tx, ty], scale,
  [shear, 0], interpolation, fill=None)``: the inverse matrix of torchvision's
  ``_get_inverse_affine_matrix`` about the image centre (float64), cast to the compute dtype, the
  sampling grid of its ``_affine_grid`` (output pixel centres ``j − (W − 1)/2``, ``i − (H − 1)/2``,
  normalised by W/2, H/2) and ``grid_sample(align_corners=False, padding_mode="zeros")``: nearest
  (torchvision's and RandomAffine's default; the published code's PIL path) or bilinear, zero outside.

Draws: u(seed, offset + b·SLOTS + slot) of the dropout hash (:func:`stn_kernels.reference_dropout.uniform_from`),
slots 0 angle, 1 x shift, 2 y shift, 3 scale, 4 shear (SLOTS = 8 counters per example, the rest unused),
each ``low + u·(high − low)`` in float32 (as :mod:`stn_kernels.reference_augment`). A call consumes the
counters offset … offset + SLOTS·B − 1. Compute dtype float32 (float64 for float64 images); no host
synchronisation (nothing reads a tensor's values).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference_augment import _autograd_dispatch as autograd_dispatch, _uniforms as uniforms, compute_dtype

SLOTS = 8
MODES = ("nearest", "bilinear")  # the op's integer mode indexes this


class AffineDraws(NamedTuple):
    """What one call draws per example (float32 [B] each, translate [B, 2]) and the op's operand."""

    angle: Tensor  # degrees
    translate: Tensor  # [B, 2] (x, y) whole pixels
    scale: Tensor
    shear: Tensor  # degrees, along x
    matrices: Tensor  # [B, 6] float64: torchvision's inverse affine matrix (pixel units, about the centre)


def _between(u: Tensor, low: Tensor, high: Tensor) -> Tensor:
    return low + u * (high - low)


def inverse_matrices(angle: Tensor, translate: Tensor, scale: Tensor, shear: Tensor) -> Tensor:
    """[B, 6] float64: torchvision's ``_get_inverse_affine_matrix(center=[0, 0], angle, translate, scale,
    [shear, 0])`` per example, with its operations in its order (the y shear is 0)."""
    to_rad = math.pi / 180.0  # math.radians
    rot = angle.double() * to_rad
    tan_sx = torch.tan(shear.double() * to_rad)
    tx, ty = translate.double().unbind(1)
    s = scale.double()
    a, c = torch.cos(rot), torch.sin(rot)  # cos(rot − 0) / cos(0), sin(rot − 0) / cos(0)
    b = -(a * tan_sx + torch.sin(rot))
    d = torch.cos(rot) - c * tan_sx
    m0, m1, m3, m4 = d / s, -b / s, -c / s, a / s
    m2 = 0.0 + ((0.0 - m0 * tx) - m1 * ty)
    m5 = 0.0 + ((0.0 - m3 * tx) - m4 * ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1)


def draw(batch: int, height: int, width: int, seed_offset: Tensor, *, rotation: Tensor, translation: Tensor,
         scale: Tensor, shear: Tensor) -> AffineDraws:
    """The draws of one call: strengths float32 [B] tensors on one device (validated by the caller)."""
    u = uniforms(seed_offset, batch, range(5), rotation.device, SLOTS)
    one = torch.ones((), dtype=torch.float32, device=rotation.device)
    angle = _between(u[:, 0], -rotation, rotation)
    max_dx, max_dy = translation * float(width), translation * float(height)
    translate = torch.stack([_between(u[:, 1], -max_dx, max_dx), _between(u[:, 2], -max_dy, max_dy)], 1).round()
    factor = _between(u[:, 3], one - scale, one + scale)
    shear_x = _between(u[:, 4], -shear, shear)
    return AffineDraws(angle, translate, factor, shear_x, inverse_matrices(angle, translate, factor, shear_x))


def grid(matrices: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """[B, H, W, 2] sampling grid of torchvision's ``_affine_grid`` for each example's matrix, elementwise:
    x·θ₀₀ + y·θ₀₁ + θ₀₂ (each θ divided by W/2) and the same for y (divided by H/2)."""
    theta = matrices.to(dtype)
    x = (torch.arange(width, dtype=dtype, device=matrices.device) + (1.0 - width) * 0.5).view(1, 1, width)
    y = (torch.arange(height, dtype=dtype, device=matrices.device) + (1.0 - height) * 0.5).view(1, height, 1)
    columns = []
    for row, half in ((0, 0.5 * width), (1, 0.5 * height)):
        t = [(theta[:, 3 * row + k] / half).view(-1, 1, 1) for k in range(3)]
        columns.append(x * t[0] + y * t[1] + t[2])
    return torch.stack(columns, dim=-1)


def affine_forward(images: Tensor, matrices: Tensor, mode: int) -> Tensor:
    """The reference backend on contiguous images [B, C, H, W] (differentiable in the images)."""
    x = images.to(compute_dtype(images.dtype))
    sampling = grid(matrices, x.shape[2], x.shape[3], x.dtype)
    out = F.grid_sample(x, sampling, mode=MODES[mode], padding_mode="zeros", align_corners=False)
    return out.to(images.dtype)


def affine_backward(grad_out: Tensor, images: Tensor, matrices: Tensor, mode: int) -> Tensor:
    """dL/dimages by autograd through :func:`affine_forward` (every backend's backward)."""
    with autograd_dispatch(), torch.enable_grad():
        leaf = images.detach().requires_grad_()
        (grad,) = torch.autograd.grad(affine_forward(leaf, matrices, mode), leaf, grad_out)
    return grad
