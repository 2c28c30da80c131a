"""Host-side helpers shared by the Triton kernel modules (hyper_linear, hyper_conv2d,
hyper_embedding, hyper_lstm).

The kernel modules import these under their own private names (``from ._common import
alloc as _alloc``, ...) and call them through those module globals, so that tests can
still patch one module's helper (``monkeypatch.setattr(module, "_alloc", ...)``).
Constants fixed at import: ``INTERPRET`` (TRITON_INTERPRET=1) and ``AUTOTUNE`` (off under
the interpreter or when STN_KERNELS_TRITON_AUTOTUNE=0). Nothing queries the GPU at import.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton

from ..fallback import needs_reference

Tensor = torch.Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = (not INTERPRET) and os.environ.get("STN_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def alloc(shape, dtype, device, memory_format=torch.contiguous_format) -> Tensor:
    """Allocates a buffer that a kernel writes in full (tests replace this to NaN-fill)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def configs(names, tuples, **meta):
    """triton.Config list from (a, b, c, num_warps, num_stages) tuples: names[i] = the i-th block
    size, plus the constant meta-parameters ``meta`` (e.g. GROUP)."""
    return [triton.Config({names[0]: a, names[1]: b, names[2]: c, **meta}, num_warps=w, num_stages=s)
            for (a, b, c, w, s) in tuples]


def tile_configs(names, tiles_by_class, **meta):
    """(triton.Config list, where) from {dot class: [(a, b, c, num_warps, num_stages[, where]), ...]}: one config
    per distinct tile (in first-seen order) and ``where[(a, b, c, num_warps, num_stages)]`` = [(dot class,
    restriction tokens)], for :func:`fitting`."""
    where, order = {}, []
    for cls, tiles in tiles_by_class.items():
        for tile in tiles:
            key = tuple(tile[:5])
            if key not in where:
                where[key] = []
                order.append(key)
            where[key].append((cls, frozenset(tile[5].split()) if len(tile) > 5 else frozenset()))
    return configs(names, order, **meta), where


def fitting(cfgs, where, cls: str, arch: Optional[int], one_acc: bool):
    """The configs of ``cfgs`` listed in ``where`` (:func:`tile_configs`) for dot class ``cls`` on sm_<arch>
    (sm_90's rules on sm_90, sm_80's on any other GPU; no target restriction when ``arch`` is None), with one
    accumulator or more: the tiles whose accumulators fit the registers there. Never empty: all of ``cfgs``
    if none is listed."""
    rules = None if arch is None else ("sm90" if arch == 90 else "sm80")

    def ok(c):
        names = [k for k in c.kwargs if k.startswith("BLOCK")]
        key = (*(c.kwargs[k] for k in names), c.num_warps, c.num_stages)
        for tile_cls, tokens in where.get(key, ()):
            targets = tokens & {"sm90", "sm80"}
            if tile_cls == cls and (rules is None or not targets or rules in targets) and (
                    one_acc or "one-acc" not in tokens):
                return True
        return False

    kept = [c for c in cfgs if ok(c)]
    return kept or cfgs


def dot_class(dtype: torch.dtype, prec: str) -> str:
    """The register budget class of a kernel's dots: "ieee" (fp32 with TF32 off: FMA dots), "tf32" or "half"."""
    if dtype == torch.float32:
        return "ieee" if prec == "ieee" else "tf32"
    return "half"


def device_arch(t: Tensor) -> Optional[int]:
    """Compute capability of t's GPU as 10·major + minor (90 for sm_90), None off the GPU. Asked by the prunes
    on the first autotuning, never at import (the AOT compile patches it per target)."""
    if t.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(t.device)
    return 10 * major + minor


def inner(t: Optional[Tensor]) -> Optional[Tensor]:
    """The kernels take one stride per 2-D operand (rows) and assume unit stride along the
    last dim: keep views that have it (or whose last dim has size ≤ 1), copy the others."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def vec(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def row(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.stride(0)


def dot_prec(dtype: torch.dtype) -> str:
    """input_precision of fp32 tl.dot: TF32 only where torch allows it for fp32 matmuls.

    Half inputs: the big dots ignore it, and the small λ dots (fp32 operands) use TF32, whose
    rounding is that of the half-precision s and t the reference forms."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host code. (``triton.cdiv`` is a constexpr function that costs ~3 µs per host call,
    and a launch computes several of these.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1), for host code, like ``cdiv``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def block_h(h: int, floor: int = 16) -> int:
    """Block over the H hyperparameters: a power of two ≥ h and ≥ ``floor`` (tl.dot needs 16)."""
    return max(floor, next_pow2(h))


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def reduce_slots(slots: Tensor, dtype: torch.dtype, copy: bool = False) -> Tensor:
    """Sum of the fp32 per-program partial sums over dim 0, in a fixed order (one launch).

    With one slot: ``slots[0]`` in ``dtype`` (a copy even when no cast is needed if ``copy``)."""
    if slots.shape[0] == 1:
        return slots[0].to(dtype, copy=copy)
    return torch.sum(slots, 0, dtype=dtype)


def fallback(x: Tensor, *ts: Optional[Tensor]) -> bool:
    """An empty x, or a dtype of x or ``ts`` the kernels do not take: run the reference."""
    return needs_reference(x.numel() == 0, x, *ts)


def reference():
    """The module :mod:`stn_kernels.reference` (imported on first use)."""
    from ... import reference as ref

    return ref
