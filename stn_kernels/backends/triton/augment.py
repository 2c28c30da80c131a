"""Triton kernel of per-example data augmentation (the ``triton`` backend of ``stn_kernels::augment``).

One program per example, looping over blocks of pixels: each jitter stage of the example's order is
one pass over its image (contrast adds a reduction pass for the grayscale mean first), the last pass
applies cutout and the input scale. Stage k reads the images (k = 0) or the output (later stages)
and writes the output, so nothing but the output is allocated; for CIFAR-sized images one example is
a few KB and stays in cache between the passes. The per-example parameters (factors, order, boxes,
scales) were drawn before the op by the same counter-based hash on every backend
(:mod:`stn_kernels.reference_augment`), which is also where the semantics are documented. The
formulas follow the reference stage for stage; float32 math (float64 for float64 images); half
precision intermediate stages are stored in the image dtype (the reference rounds once, at the end).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import alloc as _alloc  # called through this module global: tests patch it (NaN-fill)

Tensor = torch.Tensor

MAX_BLOCK = 1024


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _hue(r, g, b, shift):
    # RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB: the reference's (torchvision's) formulas.
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    flat = maxc == minc
    spread = maxc - minc
    sat = spread / tl.where(flat, 1.0, maxc)
    divisor = tl.where(flat, 1.0, spread)
    rc = (maxc - r) / divisor
    gc = (maxc - g) / divisor
    bc = (maxc - b) / divisor
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    h = h * (1.0 / 6.0) + 1.0
    h = h - tl.floor(h)  # fmod(h, 1) for h > 0
    h = h + shift
    h = h - tl.floor(h)  # remainder(h, 1)
    h6 = h * 6.0
    sector_f = tl.floor(h6)
    f = h6 - sector_f
    sector = sector_f.to(tl.int32) % 6
    sf = sat * f
    p = _clamp01((1.0 - sat) * maxc)
    q = _clamp01((1.0 - sf) * maxc)
    t = _clamp01((sf + (1.0 - sat)) * maxc)
    v = maxc
    nr = tl.where(sector == 0, v, tl.where(sector == 1, q, tl.where(sector == 2, p,
                  tl.where(sector == 3, p, tl.where(sector == 4, t, v)))))
    ng = tl.where(sector == 0, t, tl.where(sector == 1, v, tl.where(sector == 2, v,
                  tl.where(sector == 3, q, p))))
    nb = tl.where(sector == 0, p, tl.where(sector == 1, p, tl.where(sector == 2, t,
                  tl.where(sector == 3, v, tl.where(sector == 4, v, q)))))
    return nr, ng, nb


@triton.jit
def _gray(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114


@triton.jit
def _load_rgb(image, pix, m, HW, CDT: tl.constexpr):
    r = tl.load(image + pix, mask=m, other=0.0).to(CDT)
    g = tl.load(image + HW + pix, mask=m, other=0.0).to(CDT)
    b = tl.load(image + 2 * HW + pix, mask=m, other=0.0).to(CDT)
    return r, g, b


@triton.jit
def _augment_kernel(img_ptr, out_ptr, order_ptr, factor_ptr, box_ptr, scale_ptr,
                    C, HW, W, num_boxes,
                    POSITIONS: tl.constexpr, JITTER: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * C * HW
    offs = tl.arange(0, BLOCK)
    first = tl.full((), -1, tl.int64)
    if JITTER:
        first = tl.load(order_ptr + b * POSITIONS)
        for position in tl.static_range(POSITIONS):
            # The stage at position p reads the images (p = 0) or the output of the stage before. (Its own
            # name: a loop variable reused later as a tensor would change a loop-carried type, which the GPU
            # compiler rejects and the interpreter does not notice.)
            src = img_ptr if position == 0 else out_ptr
            stage = tl.load(order_ptr + b * POSITIONS + position)
            if stage >= 0:
                factor = tl.load(factor_ptr + b * 4 + stage).to(CDT)
                mean = tl.zeros((), CDT)
                if stage == 1:  # contrast: the grayscale mean of the current image first
                    acc = tl.zeros((BLOCK,), CDT)
                    for start in range(0, HW, BLOCK):
                        pix = start + offs
                        m = pix < HW
                        r, g, bl = _load_rgb(src + base, pix, m, HW, CDT)
                        acc += tl.where(m, _gray(r, g, bl), 0.0)
                    mean = tl.sum(acc, axis=0) / HW
                for start in range(0, HW, BLOCK):
                    pix = start + offs
                    m = pix < HW
                    r, g, bl = _load_rgb(src + base, pix, m, HW, CDT)
                    if stage == 3:
                        r, g, bl = _hue(r, g, bl, factor)
                    elif stage == 0:
                        r = _clamp01(r * factor)
                        g = _clamp01(g * factor)
                        bl = _clamp01(bl * factor)
                    else:
                        other = tl.where(stage == 1, mean, _gray(r, g, bl))
                        r = _clamp01(r * factor + other * (1.0 - factor))
                        g = _clamp01(g * factor + other * (1.0 - factor))
                        bl = _clamp01(bl * factor + other * (1.0 - factor))
                    ty = out_ptr.dtype.element_ty
                    tl.store(out_ptr + base + pix, r.to(ty), mask=m)
                    tl.store(out_ptr + base + HW + pix, g.to(ty), mask=m)
                    tl.store(out_ptr + base + 2 * HW + pix, bl.to(ty), mask=m)
    # Cutout and the input scale, over every channel.
    scale = tl.load(scale_ptr + b).to(CDT)
    for start in range(0, HW, BLOCK):
        pix = start + offs
        m = pix < HW
        y = pix // W
        x = pix % W
        hole = pix < 0
        for box_index in range(num_boxes):
            box = box_ptr + (b * num_boxes + box_index) * 4
            y0 = tl.load(box)
            y1 = tl.load(box + 1)
            x0 = tl.load(box + 2)
            x1 = tl.load(box + 3)
            hole = hole | ((y >= y0) & (y < y1) & (x >= x0) & (x < x1))
        for c in range(C):
            if first >= 0:
                v = tl.load(out_ptr + base + c * HW + pix, mask=m, other=0.0).to(CDT)
            else:
                v = tl.load(img_ptr + base + c * HW + pix, mask=m, other=0.0).to(CDT)
            v = tl.where(hole, 0.0, v) * scale
            tl.store(out_ptr + base + c * HW + pix, v.to(out_ptr.dtype.element_ty), mask=m)


def augment_forward(images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor, scales: Tensor) -> Tensor:
    """Kernel entry: images contiguous [B, C, H, W]; order [B, P] int64 (P ≤ 4 positions); factors [B, 4] float32;
    boxes [B, K, 4] int64; scales [B] float32, all contiguous on the images' device."""
    B, C, H, W = images.shape
    out = _alloc(images.shape, images.dtype, images.device)
    if images.numel() == 0:
        return out
    HW = H * W
    if C == 1 and order.shape[1]:
        # Brightness and contrast of single-channel images: the reference's (the kernel reads RGB triples).
        from ... import reference_augment

        return reference_augment.augment_forward(images, order, factors, boxes, scales)
    jitter = bool(order.shape[1]) and C == 3
    cdt = tl.float64 if images.dtype == torch.float64 else tl.float32
    block = min(triton.next_power_of_2(HW), MAX_BLOCK)
    _augment_kernel[(B,)](images, out, order, factors, boxes, scales, C, HW, W, boxes.shape[1],
                          POSITIONS=max(order.shape[1], 1), JITTER=jitter, CDT=cdt, BLOCK=block)
    return out
