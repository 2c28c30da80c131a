"""Reference of per-example data augmentation (the "reference" backend of ``stn_kernels::augment``), and
the random draws every backend shares.

Per example b of images [B, C, H, W] (float, values in [0, 1] for the colour stages), in this order:

1. colour jitter (C = 3; C = 1 for brightness and contrast, whose grayscale is the image itself, as
   torchvision's), the stages of torchvision's ``ColorJitter`` with the factors drawn below,
   applied in the order ``order[b]`` (a permutation of a subset of 0 = brightness, 1 = contrast,
   2 = saturation, 3 = hue; −1 pads it): with g = 0.2989·r + 0.587·g + 0.114·b (grayscale),
   brightness x·f; contrast x·f + mean(g)·(1 − f); saturation x·f + g·(1 − f); each clamped to
   [0, 1]; hue: RGB → HSV, h ← (h + shift) mod 1, HSV → RGB (torchvision's formulas);
2. cutout: pixels inside any of the example's boxes [y0, y1) × [x0, x1) (every channel) set to 0;
3. input scale: x · scale_b.

Random draws
------------
Every draw is u(seed, offset + b·SLOTS + slot) of the dropout hash
(:func:`stn_kernels.reference_dropout.uniform_from`), u ∈ [0, 1) a multiple of 2⁻²⁴, so any backend and
any device get the same bits and nothing random is stored. Slots per example: 0–3 the jitter factors,
4 the jitter order, 5 the input scale, 6 + 2k and 7 + 2k the centre (y, x) of hole k (k < MAX_HOLES).
A call consumes the counters offset … offset + SLOTS·B − 1, whatever it applies, so the same seed
gives the same draws to :func:`draw` whichever stages are on.

* brightness, contrast, saturation strength s: factor lo + u·(hi − lo), lo = max(0, 1 − s), hi = 1 + s;
  hue strength s: shift −s + u·2s (torchvision ColorJitter's ranges); a strength of 0 skips its stage
  (ColorJitter skips it too: no clamp, no HSV round trip);
* order: ``random_order=True`` takes permutation ⌊24·u⌋ of the 24 in lexicographic order (ColorJitter
  draws a random permutation per call, i.e. per example in the published code), the skipped stages
  then removed; ``False`` keeps brightness, contrast, saturation, hue; the order keeps as many
  positions as stages may be on (a strength given as the number 0 is known off: no position for it);
* hole k < ⌊holes_b⌋ of side L = ⌊length_b⌋: centre y = ⌊u·H⌋, x = ⌊u'·W⌋, box rows
  [clip(y − ⌊L/2⌋), clip(y + ⌊L/2⌋)) and the same for columns, clipped to the image (the published
  Cutout: a square of side 2·⌊L/2⌋ before clipping);
* input scale strength s: factor lo + u·(hi − lo), lo = 1/(1 + s), hi = 1 + s.

Factors are float32 (what the ops take); the image math is float32 (float64 for float64 images).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .reference_dropout import uniform_from

SLOTS = 64  # counters per example
MAX_HOLES = (SLOTS - 6) // 2
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
STAGES = ("brightness", "contrast", "saturation", "hue")
PERMUTATIONS = tuple(itertools.permutations(range(4)))  # 24, lexicographic

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


class AugmentDraws(NamedTuple):
    """What one call draws, per example (the op's operands, plus the raw draws for inspection)."""

    factors: Tensor  # [B, 4] float32: brightness, contrast, saturation factors and the hue shift
    order: Tensor  # [B, P] int64: the stages applied, in order, −1 padded; P ≤ 4 stages may be on
    centres: Tensor  # [B, K, 2] int64: hole centres (y, x); K = max_holes
    boxes: Tensor  # [B, K, 4] int64: (y0, y1, x0, x1) per hole, (0, 0, 0, 0) for holes not made
    scales: Tensor  # [B] float32: the input scale factors


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _uniforms(seed_offset: Tensor, batch: int, slots: range, device, per_example: int = SLOTS) -> Tensor:
    """[B, len(slots)] draws u(seed, offset + b·per_example + slot)."""
    slots_t = torch.arange(slots.start, slots.stop, dtype=torch.int64, device=device)
    index = torch.arange(batch, dtype=torch.int64, device=device).unsqueeze(1) * per_example + slots_t
    return uniform_from(seed_offset.to(device), index, batch * per_example)


def permutation(index: Tensor) -> Tensor:
    """[B, 4] rows ``PERMUTATIONS[index]`` (index int64 [B] in [0, 24)), decoded from the factorial
    number system on the device (no table copied from the host)."""
    remaining = torch.arange(4, dtype=torch.int64, device=index.device).expand(index.shape[0], 4)
    picked = []
    for n, radix in ((4, 6), (3, 2), (2, 1), (1, 1)):
        digit = (index // radix) % n
        index = index % radix
        picked.append(remaining.gather(1, digit.unsqueeze(1)))
        # Drop the picked element: columns at or after the digit shift left by one.
        after = torch.arange(n - 1, device=index.device) >= digit.unsqueeze(1)
        remaining = torch.where(after, remaining[:, 1:], remaining[:, : n - 1])
    return torch.cat(picked, dim=1)


def _between(u: Tensor, low: Tensor, high: Tensor) -> Tensor:
    return low + u * (high - low)


def draw(batch: int, height: int, width: int, seed_offset: Tensor, *, brightness: Tensor, contrast: Tensor,
         saturation: Tensor, hue: Tensor, holes: Tensor, length: Tensor, scale: Tensor, max_holes: int,
         random_order: bool = True, positions: int = 4) -> AugmentDraws:
    """The draws of one call: strengths are float32 [B] tensors on one device (validated by the caller).
    ``positions`` (≤ 4) keeps that many columns of the order: the number of stages that may be on,
    which the caller knows without reading the strengths (a stage whose strength is the number 0 is
    off), so the op skips the jitter positions no example can use, without a host synchronisation."""
    device = brightness.device
    u = _uniforms(seed_offset, batch, range(6), device)
    one = torch.ones((), dtype=torch.float32, device=device)
    factors = torch.stack([
        _between(u[:, 0], (one - brightness).clamp(min=0), one + brightness),
        _between(u[:, 1], (one - contrast).clamp(min=0), one + contrast),
        _between(u[:, 2], (one - saturation).clamp(min=0), one + saturation),
        _between(u[:, 3], -hue, hue),
    ], dim=1)
    if random_order:
        order = permutation((u[:, 4].double() * len(PERMUTATIONS)).long())
    else:
        order = torch.arange(4, dtype=torch.int64, device=device).expand(batch, 4)
    enabled = torch.stack([brightness, contrast, saturation, hue], dim=1) > 0
    on = enabled.gather(1, order)
    # Enabled stages first, keeping their order; the skipped ones become −1.
    position = torch.arange(4, device=device) + 4 * (~on).long()
    packed = order.gather(1, position.argsort(dim=1))
    order = torch.where(on.gather(1, position.argsort(dim=1)), packed, torch.full_like(packed, -1))
    scales = _between(u[:, 5], one / (one + scale), one + scale)

    centre_u = _uniforms(seed_offset, batch, range(6, 6 + 2 * max_holes), device).double().view(batch, max_holes, 2)
    # u·H in float64 is exact (24-bit u), so the floor never rounds up to H.
    centres = torch.stack([(centre_u[..., 0] * height).floor(), (centre_u[..., 1] * width).floor()], dim=-1).long()
    half = (length.double().floor().long() // 2).view(batch, 1)
    count = holes.double().floor().long().view(batch, 1)
    made = torch.arange(max_holes, device=device).view(1, max_holes) < count
    sides = []
    for axis, size in ((0, height), (1, width)):
        for edge in (centres[..., axis] - half, centres[..., axis] + half):
            sides.append(torch.where(made, edge.clamp(0, size), 0))
    boxes = torch.stack(sides, dim=-1)  # y0, y1, x0, x1
    return AugmentDraws(factors, order[:, :positions], centres, boxes, scales)


# --------------------------------------------------------------------------- the stages, batched


def grayscale(x: Tensor) -> Tensor:
    """[n, 1, H, W] luma of [n, 3, H, W] RGB (torchvision's weights and summation order); a
    single-channel image is its own (torchvision's rgb_to_grayscale)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    flat = maxc == minc  # grey pixels: hue and saturation 0 (no 0/0)
    spread = maxc - minc
    sat = spread / torch.where(flat, torch.ones_like(maxc), maxc)
    divisor = torch.where(flat, torch.ones_like(spread), spread)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    hue = torch.fmod(hue * (1.0 / 6.0) + 1.0, 1.0)
    return torch.stack([hue, sat, maxc], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = torch.remainder(sector.long(), 6).unsqueeze(1)
    sf = s * f
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - sf) * v).clamp(0.0, 1.0)
    t = ((sf + (1.0 - s)) * v).clamp(0.0, 1.0)
    vpqt = (v, p, q, t)
    # Which of (v, p, q, t) each of r, g, b takes in each of the six hue sectors (a selection: no arithmetic).
    sector = sector.squeeze(1)
    channels = []
    for picks in ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2)):
        out = vpqt[picks[5]]
        for k in range(4, -1, -1):
            out = torch.where(sector == k, vpqt[picks[k]], out)
        channels.append(out)
    return torch.stack(channels, dim=1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.cat([hue.unsqueeze(1), hsv[:, 1:]], dim=1))


def apply_stage(x: Tensor, stage: int, factor: Tensor) -> Tensor:
    """One jitter stage on [n, 3, H, W] with per-example factors [n] (in x's dtype)."""
    if stage == HUE:
        return adjust_hue(x, factor)
    f = factor.view(-1, 1, 1, 1)
    if stage == BRIGHTNESS:
        return (x * f).clamp(0.0, 1.0)
    gray = grayscale(x)
    other = gray.mean(dim=(1, 2, 3), keepdim=True) if stage == CONTRAST else gray
    return (x * f + other * (1.0 - f)).clamp(0.0, 1.0)


def color_jitter(x: Tensor, order: Tensor, factors: Tensor, *, by_subset: Optional[bool] = None) -> Tensor:
    """The jitter stages in each example's order (x in the compute dtype); two ways to the same bits:

    * ``by_subset`` (the default on the CPU, outside torch.compile): each stage runs on the examples that
      have it at the position (``nonzero``, ``index_select``: reading the order, free on the host);
    * otherwise (accelerators, torch.compile): no host synchronisation; at each position every stage is
      computed for the whole batch with each example's factor of the stage it has there, and each example
      keeps its own stage's result (``torch.where``, a selection: the same bits as applying the stage
      to the example alone, :func:`apply_stage`), four times the arithmetic of the subsets.
    """
    factors = factors.to(x.dtype)
    if by_subset is None:
        by_subset = x.device.type == "cpu" and not torch.compiler.is_compiling()
    if by_subset:
        for position in range(order.shape[1]):
            stages = order[:, position]
            for stage in range(4):
                rows = (stages == stage).nonzero().squeeze(1)
                if rows.numel():
                    x = x.index_copy(0, rows, apply_stage(x.index_select(0, rows), stage, factors[rows, stage]))
        return x
    for position in range(order.shape[1]):
        stage = order[:, position]
        factor = factors.gather(1, stage.clamp(min=0).unsqueeze(1)).squeeze(1)
        f = factor.view(-1, 1, 1, 1)
        stage = stage.view(-1, 1, 1, 1)
        scaled = x * f
        gray = grayscale(x)
        other = torch.where(stage == SATURATION, gray, gray.mean(dim=(1, 2, 3), keepdim=True))
        blended = (scaled + other * (1.0 - f)).clamp(0.0, 1.0)  # contrast, saturation
        out = torch.where(stage == BRIGHTNESS, scaled.clamp(0.0, 1.0), blended)
        if x.shape[1] == 3:  # one channel: brightness and contrast only (validated)
            out = torch.where(stage == HUE, adjust_hue(x, factor), out)
        x = torch.where(stage < 0, x, out)
    return x


def hole_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """[B, 1, H, W] bool: inside any box of the example."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = (rows >= boxes[..., 0:1]) & (rows < boxes[..., 1:2])  # [B, K, H]
    in_cols = (cols >= boxes[..., 2:3]) & (cols < boxes[..., 3:4])  # [B, K, W]
    return (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).any(1).unsqueeze(1)


def augment_forward(images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor, scales: Tensor) -> Tensor:
    """The reference backend on contiguous images [B, C, H, W]: jitter, cutout, scale (differentiable
    in the images by autograd: the backward op differentiates this)."""
    x = images.to(compute_dtype(images.dtype))
    # Only shapes decide what runs (no host synchronisation): order has a column per stage that may be on.
    if order.shape[1] and x.shape[1] in (1, 3):
        x = color_jitter(x, order, factors)
    if boxes.shape[1]:
        x = torch.where(hole_mask(boxes, x.shape[2], x.shape[3]), torch.zeros((), dtype=x.dtype, device=x.device), x)
    x = x * scales.to(x.dtype).view(-1, 1, 1, 1)
    return x.to(images.dtype)


def augment_backward(grad_out: Tensor, images: Tensor, order: Tensor, factors: Tensor, boxes: Tensor,
                     scales: Tensor) -> Tensor:
    """dL/dimages by autograd through :func:`augment_forward` (every backend's backward)."""
    with _autograd_dispatch(), torch.enable_grad():
        leaf = images.detach().requires_grad_()
        out = augment_forward(leaf, order, factors, boxes, scales)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return grad


def _autograd_dispatch():
    """Autograd back on inside a custom op's implementation: the dispatcher runs it with the autograd keys
    excluded, where nothing records a graph (torch.func.vjp would, but its wrapper tensors break
    opcheck's schema test). Only the autograd keys are taken out of the thread's exclude set."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradOther, keys.AutogradCPU, keys.AutogradCUDA, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
