"""Triton kernel of the per-example affine transform (the ``triton`` backend of ``stn_kernels::affine``).

One program per (example, block of output pixels): the sampling position of each output pixel from the
example's inverse matrix (the reference's grid formula, float32; float64 for float64 images), then
nearest (round half to even, as ``grid_sample``) or bilinear sampling of every channel, zero outside
the image. The matrices were drawn before the op (:mod:`stn_kernels.reference_affine`, where the
semantics are documented), the same on every backend. Forward only: the backward is the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import alloc as _alloc  # called through this module global: tests patch it (NaN-fill)

Tensor = torch.Tensor

BLOCK = 256


@triton.jit
def _tap(src, yi, xi, H, W, m):
    inside = m & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
    return tl.load(src + yi * W + xi, mask=inside, other=0.0)


@triton.jit
def _affine_kernel(img_ptr, out_ptr, mat_ptr, C, H, W,
                   BILINEAR: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < H * W
    i = offs // W
    j = offs % W
    half_w = W * 0.5
    half_h = H * 0.5
    t0 = tl.load(mat_ptr + b * 6).to(CDT) / half_w
    t1 = tl.load(mat_ptr + b * 6 + 1).to(CDT) / half_w
    t2 = tl.load(mat_ptr + b * 6 + 2).to(CDT) / half_w
    t3 = tl.load(mat_ptr + b * 6 + 3).to(CDT) / half_h
    t4 = tl.load(mat_ptr + b * 6 + 4).to(CDT) / half_h
    t5 = tl.load(mat_ptr + b * 6 + 5).to(CDT) / half_h
    x = j.to(CDT) + (1.0 - W) * 0.5
    y = i.to(CDT) + (1.0 - H) * 0.5
    gx = x * t0 + y * t1 + t2
    gy = x * t3 + y * t4 + t5
    # grid_sample's unnormalisation with align_corners=False.
    ix = ((gx + 1.0) * W - 1.0) / 2.0
    iy = ((gy + 1.0) * H - 1.0) / 2.0
    base = b * C * H * W
    ty = out_ptr.dtype.element_ty
    if BILINEAR:
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        fx = ix - x0f
        fy = iy - y0f
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        for c in range(C):
            src = img_ptr + base + c * H * W
            v = (_tap(src, y0, x0, H, W, m).to(CDT) * ((1.0 - fx) * (1.0 - fy))
                 + _tap(src, y0, x0 + 1, H, W, m).to(CDT) * (fx * (1.0 - fy))
                 + _tap(src, y0 + 1, x0, H, W, m).to(CDT) * ((1.0 - fx) * fy)
                 + _tap(src, y0 + 1, x0 + 1, H, W, m).to(CDT) * (fx * fy))
            tl.store(out_ptr + base + c * H * W + offs, v.to(ty), mask=m)
    else:
        # Round half to even (nearbyint): floor(v + 0.5), one down where v + 0.5 was an odd integer.
        rx = tl.floor(ix + 0.5)
        rx = tl.where((rx - ix == 0.5) & (rx.to(tl.int32) % 2 != 0), rx - 1.0, rx)
        ry = tl.floor(iy + 0.5)
        ry = tl.where((ry - iy == 0.5) & (ry.to(tl.int32) % 2 != 0), ry - 1.0, ry)
        xn = rx.to(tl.int32)
        yn = ry.to(tl.int32)
        for c in range(C):
            v = _tap(img_ptr + base + c * H * W, yn, xn, H, W, m)
            tl.store(out_ptr + base + c * H * W + offs, v.to(ty), mask=m)


def affine_forward(images: Tensor, matrices: Tensor, mode: int) -> Tensor:
    """Kernel entry: images contiguous [B, C, H, W]; matrices [B, 6] float64; mode 0 nearest, 1 bilinear."""
    B, C, H, W = images.shape
    out = _alloc(images.shape, images.dtype, images.device)
    if images.numel() == 0:
        return out
    cdt = tl.float64 if images.dtype == torch.float64 else tl.float32
    _affine_kernel[(B, triton.cdiv(H * W, BLOCK))](images, out, matrices, C, H, W, BILINEAR=mode == 1, CDT=cdt,
                                                  BLOCK=BLOCK)
    return out
