"""Triton kernels for the HyperEmbedding op (indices [M], hparams [M, H] one row per index).

    out[m] = E_e[i_m] + s_m ⊙ E_h[i_m],    s_m = λ_m·Vᵀ  (V [D, H], formed inside the kernels)

Same contract as :func:`stn_kernels.reference.hyper_embedding_forward` and
:func:`stn_kernels.reference.hyper_embedding_backward`.

``_fwd_kernel``
    Program = [BLOCK_M, BLOCK_D] tile of out: gathers the rows of both tables, s from the
    λ tile and the V tile (an fp32 dot, input_precision="ieee"), one store.
``_rows_kernel`` (backward, grid (row chunks, D blocks))
    One pass over g and E_h[i]: dλ = (g ⊙ E_h[i])·V (fp32 partial sums, one slot per D block)
    and dV = Σ_m (g ⊙ E_h[i])ᵀ·λ_m (one slot per row chunk); both slot sets summed by torch.sum
    in a fixed order. When not deterministic it also scatters the table gradients with fp32
    atomics: dE_e[i] += g, dE_h[i] += g ⊙ s (into zeroed fp32 buffers).
``_segment_kernel`` (backward table gradients without float atomics)
    Used when ``torch.are_deterministic_algorithms_enabled()`` (or ``TABLE_GRAD = "sorted"``):
    the indices are sorted stably (torch.sort) and torch.searchsorted gives each table row its
    segment [start, end) of sorted positions. Program = (table row, D block): sums its segment
    in sorted order (for equal indices, the order of m) in BLOCK_K chunks and writes the row of
    dE_e and dE_h once, in the table's dtype; rows that no index hits are written as zeros.
    Nothing depends on scheduling: results are bitwise repeatable. No host synchronisation.

Buffers the kernels write in full come from :func:`_alloc` (tests replace it to NaN-fill).
Other dtypes (float64) and empty problems run the reference. ``TABLE_GRAD`` ("auto", "atomic"
or "sorted"; from STN_KERNELS_EMBEDDING_TABLE_GRAD at import) picks the table-gradient path;
"auto" is atomics unless deterministic algorithms are on, and deterministic mode always sorts.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..fallback import needs_reference

# Helpers are called through these module globals: tests patch ``_alloc`` (NaN-fill) on this module.
from ._common import (
    INTERPRET as _INTERPRET,
    alloc as _alloc,
    block_h as _block_h,
    cdiv as _cdiv,
    inner as _inner,
    next_pow2 as _next_pow2,
    num_sms as _num_sms,
    reduce_slots as _reduce,
    reference as _reference,
    row as _row,
)

Tensor = torch.Tensor

TABLE_GRAD = os.environ.get("STN_KERNELS_EMBEDDING_TABLE_GRAD", "auto")

_FWD_BLOCKS = (32, 128)     # (BLOCK_M, BLOCK_D) of _fwd_kernel
_ROWS_BLOCKS = (32, 64)     # of _rows_kernel
_SEG_BLOCKS = (16, 128)     # (BLOCK_K, BLOCK_D) of _segment_kernel
if _INTERPRET:
    _FWD_BLOCKS = _ROWS_BLOCKS = (32, 128)
    _SEG_BLOCKS = (16, 128)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(
    idx_ptr, lam_ptr, e_ptr, eh_ptr, v_ptr, out_ptr,
    M, D, H,
    s_e, s_eh, s_l, s_v,
    HAS_HP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    mask = m_ok[:, None] & d_ok[None, :]
    om = offs_m.to(tl.int64)
    od = offs_d.to(tl.int64)
    row = tl.load(idx_ptr + om, mask=m_ok, other=0).to(tl.int64)
    acc = tl.load(e_ptr + row[:, None] * s_e + od[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_HP:
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        lam = tl.load(lam_ptr + om[:, None] * s_l + rh[None, :], mask=m_ok[:, None] & h_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + od[None, :] * s_v + rh[:, None], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(lam.to(tl.float32), vt.to(tl.float32), input_precision="ieee")
        eh = tl.load(eh_ptr + row[:, None] * s_eh + od[None, :], mask=mask, other=0.0)
        acc += s * eh.to(tl.float32)
    tl.store(out_ptr + om[:, None] * D + od[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_kernel(
    g_ptr, idx_ptr, lam_ptr, eh_ptr, v_ptr,
    dlam_ptr, dv_ptr, de_ptr, dh_ptr,
    M, D, H, rows_per_prog,
    s_g, s_eh, s_l, s_v,
    NEED_DLAM: tl.constexpr, NEED_DV: tl.constexpr, ATOMIC_E: tl.constexpr, ATOMIC_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (row chunk pid_m, D block pid_d). dλ partial rows go to slot pid_d of dlam [n_dblocks, M, H],
    this D block's dV to slot pid_m of dv [chunks, D, H]; atomics into de / dh [N, D] fp32."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    od = offs_d.to(tl.int64)
    rh = tl.arange(0, BLOCK_H)
    h_ok = rh < H
    if NEED_DLAM:
        vb = tl.load(v_ptr + od[:, None] * s_v + rh[None, :], mask=d_ok[:, None] & h_ok[None, :], other=0.0)
        vb = vb.to(tl.float32)
    if ATOMIC_H:
        vt = tl.load(v_ptr + od[None, :] * s_v + rh[:, None], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        vt = vt.to(tl.float32)
    acc_v = tl.zeros((BLOCK_D, BLOCK_H), dtype=tl.float32)
    m_begin = pid_m * rows_per_prog
    m_end = tl.minimum(m_begin + rows_per_prog, M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        om = offs_m.to(tl.int64)
        mask = m_ok[:, None] & d_ok[None, :]
        row = tl.load(idx_ptr + om, mask=m_ok, other=0).to(tl.int64)
        g = tl.load(g_ptr + om[:, None] * s_g + od[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_DV or ATOMIC_H:
            lam = tl.load(lam_ptr + om[:, None] * s_l + rh[None, :], mask=m_ok[:, None] & h_ok[None, :], other=0.0)
            lam = lam.to(tl.float32)
        if ATOMIC_E:
            tl.atomic_add(de_ptr + row[:, None] * D + od[None, :], g, mask=mask, sem="relaxed")
        if ATOMIC_H:
            s = tl.dot(lam, vt, input_precision="ieee")
            tl.atomic_add(dh_ptr + row[:, None] * D + od[None, :], g * s, mask=mask, sem="relaxed")
        if NEED_DLAM or NEED_DV:
            eh = tl.load(eh_ptr + row[:, None] * s_eh + od[None, :], mask=mask, other=0.0)
            q = g * eh.to(tl.float32)
            if NEED_DLAM:
                dl = tl.dot(q, vb, input_precision="ieee")
                lp = dlam_ptr + (pid_d.to(tl.int64) * M + om[:, None]) * H + rh[None, :]
                tl.store(lp, dl, mask=m_ok[:, None] & h_ok[None, :])
            if NEED_DV:
                acc_v = tl.dot(tl.trans(q), lam, acc_v, input_precision="ieee")
    if NEED_DV:
        vp = dv_ptr + (pid_m.to(tl.int64) * D + od[:, None]) * H + rh[None, :]
        tl.store(vp, acc_v, mask=d_ok[:, None] & h_ok[None, :])


@triton.jit
def _segment_kernel(
    g_ptr, perm_ptr, starts_ptr, lam_ptr, v_ptr, de_ptr, dh_ptr,
    D, H,
    s_g, s_l, s_v,
    NEED_E: tl.constexpr, NEED_H: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (table row n, D block): dE_e[n] = Σ_k g[perm[k]], dE_h[n] = Σ_k g[perm[k]] ⊙ s[perm[k]]
    over the sorted positions k in [starts[n], starts[n+1]), in order."""
    n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    od = offs_d.to(tl.int64)
    start = tl.load(starts_ptr + n)
    end = tl.load(starts_ptr + n + 1)
    if NEED_H:
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        vt = tl.load(v_ptr + od[None, :] * s_v + rh[:, None], mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        vt = vt.to(tl.float32)
    acc_e = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < end
        m = tl.load(perm_ptr + offs_k, mask=k_ok, other=0).to(tl.int64)
        g = tl.load(g_ptr + m[:, None] * s_g + od[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        if NEED_E:
            acc_e += tl.sum(g, axis=0)
        if NEED_H:
            lam = tl.load(lam_ptr + m[:, None] * s_l + rh[None, :], mask=k_ok[:, None] & h_ok[None, :], other=0.0)
            s = tl.dot(lam.to(tl.float32), vt, input_precision="ieee")
            acc_h += tl.sum(g * s, axis=0)
    if NEED_E:
        tl.store(de_ptr + n * D + od, acc_e.to(de_ptr.dtype.element_ty), mask=d_ok)
    if NEED_H:
        tl.store(dh_ptr + n * D + od, acc_h.to(dh_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------- helpers


def _fallback(indices: Tensor, weight: Tensor, *ts: Optional[Tensor]) -> bool:
    """No indices, an empty table, or a dtype of the table or ``ts`` the kernels do not take."""
    return needs_reference(indices.numel() == 0 or weight.numel() == 0, weight, *ts)


def _table_grad_mode() -> str:
    if torch.are_deterministic_algorithms_enabled():
        return "sorted"
    if TABLE_GRAD not in ("auto", "atomic", "sorted"):
        raise ValueError(f"hyper_embedding.TABLE_GRAD: expected 'auto', 'atomic' or 'sorted', got {TABLE_GRAD!r}")
    return "atomic" if TABLE_GRAD == "auto" else TABLE_GRAD


# --------------------------------------------------------------------------- forward


def hyper_embedding_forward(indices, hparams, weight, hyper_weight, weight_scale):
    """out [M, D] in the tables' dtype."""
    if _fallback(indices, weight, hparams, weight_scale):
        return _reference().hyper_embedding_forward(indices, hparams, weight, hyper_weight, weight_scale)
    M = indices.shape[0]
    D = weight.shape[1]
    has_hp = hparams is not None
    idx = indices.contiguous()
    E = _inner(weight)
    Eh = _inner(hyper_weight) if has_hp else None
    lam = _inner(hparams) if has_hp else None
    V = _inner(weight_scale) if has_hp else None
    H = lam.shape[1] if has_hp else 1
    out = _alloc((M, D), weight.dtype, weight.device)
    bm, bd = _FWD_BLOCKS
    bd = min(bd, max(16, _next_pow2(D)))
    _fwd_kernel[(_cdiv(M, bm), _cdiv(D, bd))](
        idx, lam if has_hp else E, E, Eh if has_hp else E, V if has_hp else E, out,
        M, D, H,
        E.stride(0), _row(Eh), _row(lam), _row(V),
        HAS_HP=has_hp, BLOCK_M=bm, BLOCK_D=bd, BLOCK_H=_block_h(H), num_warps=4,
    )
    return out


# --------------------------------------------------------------------------- backward


def hyper_embedding_backward(grad_out, indices, hparams, weight, hyper_weight, weight_scale,
                             output_mask=(True,) * 5) -> List[Optional[Tensor]]:
    """Gradients for (indices, hparams, weight, hyper_weight, weight_scale); indices never get one."""
    need = [bool(v) for v in output_mask]
    if _fallback(indices, weight, hparams, weight_scale):
        ref = _reference().hyper_embedding_backward(grad_out, indices, hparams, weight, hyper_weight, weight_scale,
                                                    output_mask)
        srcs = (indices, hparams, weight, hyper_weight, weight_scale)
        return [None if r is None or i == 0 else r.to(src.dtype) for i, (r, src) in enumerate(zip(ref, srcs))]
    has_hp = hparams is not None
    need_de = need[2]
    need_dh = has_hp and need[3]
    need_dlam = has_hp and need[1]
    need_dv = has_hp and need[4]
    grads: List[Optional[Tensor]] = [None] * 5
    if not (need_de or need_dh or need_dlam or need_dv):
        return grads

    M = indices.shape[0]
    N, D = weight.shape
    dev = weight.device
    dtype = weight.dtype
    f32 = torch.float32
    idx = indices.contiguous()
    g = _inner(grad_out if grad_out.dtype == dtype else grad_out.to(dtype))
    Eh = _inner(hyper_weight) if has_hp else None
    lam = _inner(hparams) if has_hp else None
    V = _inner(weight_scale) if has_hp else None
    H = lam.shape[1] if has_hp else 1
    block_h = _block_h(H)
    d = g  # stands in for absent pointer arguments (never read)
    mode = _table_grad_mode()
    atomic_e = need_de and mode == "atomic"
    atomic_h = need_dh and mode == "atomic"

    # (a) dλ and dV, plus the table gradients by atomics: one pass over g and E_h[i].
    if need_dlam or need_dv or atomic_e or atomic_h:
        bm, bd = _ROWS_BLOCKS
        bd = min(bd, max(16, _next_pow2(D)))
        d_blocks = _cdiv(D, bd)
        m_blocks = _cdiv(M, bm)
        chunks = min(m_blocks, max(1, _cdiv(4 * _num_sms(dev), d_blocks)))
        rows_per_prog = _cdiv(m_blocks, chunks) * bm
        chunks = _cdiv(M, rows_per_prog)
        dlam = _alloc((d_blocks, M, H), f32, dev) if need_dlam else None
        dv = _alloc((chunks, D, H), f32, dev) if need_dv else None
        de = dh = None
        if atomic_e:
            de = torch.zeros((N, D), dtype=f32, device=dev)
        if atomic_h:
            dh = torch.zeros((N, D), dtype=f32, device=dev)
        _rows_kernel[(chunks, d_blocks)](
            g, idx, lam if has_hp else d, Eh if has_hp else d, V if has_hp else d,
            dlam if need_dlam else d, dv if need_dv else d, de if atomic_e else d, dh if atomic_h else d,
            M, D, H, rows_per_prog,
            g.stride(0), _row(Eh), _row(lam), _row(V),
            NEED_DLAM=need_dlam, NEED_DV=need_dv, ATOMIC_E=atomic_e, ATOMIC_H=atomic_h,
            BLOCK_M=bm, BLOCK_D=bd, BLOCK_H=block_h, num_warps=4,
        )
        if need_dlam:
            grads[1] = _reduce(dlam, hparams.dtype, copy=True)
        if need_dv:
            grads[4] = _reduce(dv, weight_scale.dtype, copy=True)
        if atomic_e:
            grads[2] = de.to(weight.dtype)
        if atomic_h:
            grads[3] = dh.to(hyper_weight.dtype)

    # (b) Table gradients without float atomics: segments of the stably sorted indices.
    seg_e = need_de and not atomic_e
    seg_h = need_dh and not atomic_h
    if seg_e or seg_h:
        sorted_idx, perm = torch.sort(idx.long(), stable=True)
        starts = torch.searchsorted(sorted_idx, torch.arange(N + 1, device=dev, dtype=sorted_idx.dtype))
        de = _alloc((N, D), weight.dtype, dev) if seg_e else None
        dh = _alloc((N, D), hyper_weight.dtype, dev) if seg_h else None
        bk, bd = _SEG_BLOCKS
        bd = min(bd, max(16, _next_pow2(D)))
        _segment_kernel[(N, _cdiv(D, bd))](
            g, perm, starts, lam if seg_h else d, V if seg_h else d, de if seg_e else d, dh if seg_h else d,
            D, H,
            g.stride(0), _row(lam), _row(V),
            NEED_E=seg_e, NEED_H=seg_h, BLOCK_K=bk, BLOCK_D=bd, BLOCK_H=block_h, num_warps=4,
        )
        if seg_e:
            grads[2] = de
        if seg_h:
            grads[3] = dh
    return grads
