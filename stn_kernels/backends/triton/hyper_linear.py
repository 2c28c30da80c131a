"""Fused Triton kernels for the HyperLinear op (2-D: x [M, K], hparams [M, H]).

    out = x·W_eᵀ + (λ·Vᵀ) ⊙ (x·W_hᵀ) + b_e + (λ·Cᵀ) ⊙ b_h,    z_hyper = x·W_hᵀ

Same contract as :func:`stn_kernels.reference.hyper_linear_forward` and
:func:`stn_kernels.reference.hyper_linear_backward`. Kernels (all accumulate in fp32):

``_fwd_kernel``
    One launch. Program = one [BLOCK_M, BLOCK_N] tile of out (grouped ordering, GROUP
    row tiles per band, for L2 reuse of the weights). The K loop loads the x tile once
    and dots it with the W_e tile and the W_h tile into two fp32 accumulators (only the
    first when hparams is None). Epilogue in registers: s = λ·Vᵀ and t·b_h = λ·(C⊙b_h)ᵀ
    as small dots over H padded to BLOCK_H ≥ 16, biases, stores of out and z_hyper.
``_dx_kernel``
    dx = g·W_e + (g⊙s)·W_h. Program = one [BLOCK_M, BLOCK_K] tile of dx; loop over N
    in BLOCK_N chunks, s for the chunk formed in registers (λ tile · V chunkᵀ), g⊙s cast
    to the input dtype in registers (never stored), two dots into one accumulator. Grid
    axis 1 splits N (split-K) when the dx tiles alone cannot fill the GPU (small M): each
    split writes an fp32 partial [S, M, K] slot, summed in fixed order by ``torch.sum``.
``_dw_kernel``
    dW_e = gᵀ·x and dW_h = (g⊙s)ᵀ·x. Program = one [BLOCK_N, BLOCK_K] tile of both,
    loop over M sharing the loads of g and x (s from V tile · λ chunkᵀ); optional split
    of M like ``_dx_kernel``.
``_small_kernel``
    dλ = (g⊙z)·V + (g⊙b_h)·C, dV = (g⊙z)ᵀ·λ, dC = (g⊙b_h)ᵀ·λ, db_e = Σ_m g and
    db_h = Σ_m g⊙t in one pass over g and z. Grid (M chunks, N blocks of 64): each program
    loops over the rows of its chunk; dλ partials go to one slot per N block and the
    [N]-side partials to one slot per M chunk, summed by ``torch.sum`` (for M ≤ 256 a single
    chunk, whose [N]-side results are final).

No float atomics anywhere, so results are bitwise repeatable whether or not
``torch.use_deterministic_algorithms`` is on. (Measured on an H200, M=N=K=4096, H=15:
with fp32 atomics for dλ, 64-way contended, ``_small_kernel`` took 178 µs; with slots it
takes 107 µs plus 23 µs of ``torch.sum`` for all slot reductions.) Every buffer that the kernels write in
full is allocated through :func:`_alloc` (tests patch it to NaN-fill). Constants fixed
at import: the autotune config lists (a single small config under ``TRITON_INTERPRET=1``,
or when ``STN_KERNELS_TRITON_AUTOTUNE=0``). Nothing queries the GPU at import.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..fallback import hyper_linear_needs_reference, reference_fallback_backward

# Helpers are called through these module globals: tests patch ``_alloc`` (NaN-fill) on this module.
from ._common import (
    AUTOTUNE as _AUTOTUNE,
    INTERPRET as _INTERPRET,
    alloc as _alloc,
    block_h as _block_h,
    cdiv as _cdiv,
    configs as _configs,
    device_arch as _device_arch,
    dot_class as _dot_class,
    dot_prec as _dot_prec,
    fitting as _fitting,
    inner as _inner,
    next_pow2 as _next_pow2,
    num_sms as _num_sms,
    reduce_slots as _reduce,
    row as _row,
    tile_configs as _tile_configs,
    vec as _vec,
)

Tensor = torch.Tensor

# --------------------------------------------------------------------------- configs


# Tiles per kernel and dot precision: (rows of the output tile, cols of the output tile, reduction chunk,
# num_warps, num_stages[, where]). "half": fp16 / bf16 dots; "tf32": fp32 with TF32 (both on tensor cores);
# "ieee": fp32 with TF32 off (PyTorch's default for matmuls), dots of FMAs whose operand slices sit in
# registers beside the accumulators: 8 warps and short reduction chunks (16 at least: Triton 3.6 takes no
# tl.dot with K < 16). ``where`` limits a tile to one
# target's rules ("sm90", "sm80": any other GPU takes sm_80's) or to one accumulator ("one-acc": the forward
# without hparams, dW_e or dW_h alone). Every tile kept this way holds its accumulators in registers (at most
# 1 KB of spill stores per thread): tests/test_triton_aot.py compiles each one for sm_90 and sm_80 from the
# recorded launches and checks ptxas's report; the tiles it found spilling are gone or limited here.
_FWD_TILES = dict(
    half=[(128, 256, 64, 8, 3, "one-acc"), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4),
          (64, 256, 32, 8, 4, "sm80"), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 32, 4, 4),
          (64, 64, 64, 4, 4)],
    ieee=[(64, 128, 16, 8, 3), (64, 64, 32, 8, 3), (128, 32, 32, 8, 3), (32, 128, 16, 8, 3), (128, 32, 16, 8, 3),
          (64, 64, 16, 8, 3)],
)
_FWD_TILES["tf32"] = _FWD_TILES["half"]
_DX_TILES = dict(
    half=[(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 256, 32, 8, 3),
          (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4)],
    tf32=[(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 256, 32, 8, 3, "sm80"),
          (128, 64, 64, 4, 4, "sm80"), (64, 128, 64, 4, 4, "sm80"), (64, 64, 64, 4, 4), (64, 64, 32, 4, 4)],
    ieee=[(128, 128, 16, 8, 3), (128, 64, 32, 8, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3), (64, 64, 32, 8, 3),
          (64, 64, 32, 4, 3)],
)
_DW_TILES = dict(
    half=[(128, 256, 64, 8, 3, "one-acc"), (128, 128, 64, 8, 3, "sm90"), (128, 128, 64, 8, 4, "sm90"),
          (128, 128, 32, 8, 4), (64, 256, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 128, 32, 4, 4),
          (64, 64, 64, 4, 4)],
    tf32=[(128, 256, 64, 8, 3, "one-acc"), (128, 128, 64, 8, 3, "sm80"), (128, 128, 64, 8, 4, "sm80"),
          (128, 128, 32, 8, 4), (64, 256, 32, 8, 4), (128, 64, 64, 4, 4, "sm80"), (64, 128, 64, 4, 4, "sm80"),
          (64, 128, 32, 4, 4), (64, 64, 64, 4, 4)],
    ieee=[(64, 128, 16, 8, 3), (128, 64, 16, 8, 3), (32, 128, 16, 8, 3), (128, 32, 16, 8, 3), (64, 64, 16, 8, 3)],
)
# Without autotuning: one tile per kernel that fits the registers in every precision and the shared memory of
# Ampere and Hopper for fp32 too (the AOT test compiles it for every recorded launch).
_DEFAULT_FWD = [(64, 64, 32, 8, 3)]
_DEFAULT_DX = [(64, 64, 32, 8, 3)]
_DEFAULT_DW = [(64, 64, 16, 8, 3)]
_SMALL_BLOCKS = (64, 64)  # (BLOCK_M, BLOCK_N) of _small_kernel on a GPU, 4 warps
# _small_kernel in fp32 with TF32 off: its FMA dots hold operand slices in registers, so 16 rows per step over 8
# warps (64 rows over 4 warps spill 3-9 KB per thread); the row chunks of the grid stay those of _SMALL_BLOCKS.
_SMALL_IEEE = (16, 8)  # (BLOCK_M, num_warps)
# Up to this many BLOCK_M row blocks (M ≤ 256 on a GPU: the STN batch sizes), one program per N
# block loops over all rows, so dV, dC, db_e and db_h are stored final: four fewer launches
# (reductions of per-chunk partial sums, casts) in a backward that is launch-bound at these sizes.
_DIRECT_ROW_BLOCKS = 4

if _INTERPRET:
    # Autotune with several configs fails in the interpreter, and every op costs Python time.
    _FWD_TILES = _DX_TILES = _DW_TILES = None
    _DEFAULT_FWD = _DEFAULT_DX = _DEFAULT_DW = [(32, 32, 32, 4, 1)]
    _SMALL_BLOCKS = (32, 32)
    _GROUP = 2
else:
    _GROUP = 8

_FWD_NAMES, _DX_NAMES, _DW_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K"), ("BLOCK_M", "BLOCK_K", "BLOCK_N"), \
    ("BLOCK_N", "BLOCK_K", "BLOCK_M")
if _AUTOTUNE:
    _FWD_CONFIGS, _FWD_WHERE = _tile_configs(_FWD_NAMES, _FWD_TILES, GROUP=_GROUP)
    _DX_CONFIGS, _DX_WHERE = _tile_configs(_DX_NAMES, _DX_TILES, GROUP=_GROUP)
    _DW_CONFIGS, _DW_WHERE = _tile_configs(_DW_NAMES, _DW_TILES, GROUP=_GROUP)
else:
    _FWD_CONFIGS, _DX_CONFIGS, _DW_CONFIGS = (_configs(names, tiles, GROUP=_GROUP) for names, tiles in (
        (_FWD_NAMES, _DEFAULT_FWD), (_DX_NAMES, _DEFAULT_DX), (_DW_NAMES, _DEFAULT_DW)))
    _FWD_WHERE = _DX_WHERE = _DW_WHERE = None


def _prune_rows(configs, nargs, **kwargs):
    """Drop configs whose BLOCK_M is far larger than M (small batches)."""
    cap = max(64, _next_pow2(int(nargs["M"])))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap]
    return kept or configs


@functools.lru_cache(maxsize=None)
def _max_shared(index: int) -> Optional[int]:
    try:
        return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except (AttributeError, KeyError):  # another Triton's driver API: no pruning, autotune skips misfits
        return None


def _smem_limit(t: Tensor) -> Optional[int]:
    """Shared memory per block (opt-in maximum) of t's GPU; None off the GPU (no pruning).
    Queried on the first autotuning, never at import (tests patch this helper)."""
    if t.device.type != "cuda":
        return None
    return _max_shared(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _prune_smem(configs, t, rows, cols, red, n_b, small):
    """Drop configs whose pipelined tiles cannot fit the shared memory of t's GPU.

    The K loop keeps num_stages copies of its operand tiles in shared memory: the [rows, red]
    tile plus ``n_b`` [red, cols] tiles in t's dtype, plus ``small`` fp32 elements per unit of
    red (a λ tile). With fp32 inputs (4-byte tiles) several configs exceed even sm_90's 227 KB
    (e.g. 128x128x64 with two accumulators: 288 KB at 3 stages); the autotuner would compile
    each of them only to skip it (OutOfResources). This estimate matches what Triton allocates
    for the tf32 / half-precision tiles and bounds the rest (tests/test_triton_aot.py checks
    the kept configs' compiled shared memory). Keeps the smallest config if none fits."""
    limit = _smem_limit(t)
    if limit is None:
        return configs
    es = t.dtype.itemsize

    def need(c):
        k = c.kwargs
        per_stage = (k[rows] * k[red] + n_b * k[red] * k[cols]) * es + small * k[red] * 4
        return c.num_stages * per_stage

    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


def _in_registers(configs, where, t: Tensor, prec: str, one_acc: bool):
    """The configs whose tiles fit the registers for t's dtype, the dot precision and t's GPU (all off the GPU,
    where nothing is compiled for a target)."""
    if where is None:
        return configs
    return _fitting(configs, where, _dot_class(t.dtype, prec), _device_arch(t), one_acc)


def _prune_fwd(configs, nargs, **kwargs):
    hp = bool(kwargs.get("HAS_HP"))
    configs = _in_registers(configs, _FWD_WHERE, nargs["x_ptr"], kwargs.get("PREC", ""), not hp)
    configs = _prune_rows(configs, nargs)
    return _prune_smem(configs, nargs["x_ptr"], "BLOCK_M", "BLOCK_N", "BLOCK_K", 1 + hp, 0)


def _prune_dx(configs, nargs, **kwargs):
    configs = _in_registers(configs, _DX_WHERE, nargs["g_ptr"], kwargs.get("PREC", ""), True)
    configs = _prune_rows(configs, nargs)
    hp = bool(kwargs.get("HAS_HP"))
    return _prune_smem(configs, nargs["g_ptr"], "BLOCK_M", "BLOCK_K", "BLOCK_N", 1 + hp,
                       kwargs.get("BLOCK_H", 16) if hp else 0)


def _prune_dw(configs, nargs, **kwargs):
    one_acc = not (kwargs.get("NEED_E") and kwargs.get("NEED_H"))
    configs = _in_registers(configs, _DW_WHERE, nargs["g_ptr"], kwargs.get("PREC", ""), one_acc)
    # One g tile [BLOCK_N, BLOCK_M] and one x tile [BLOCK_M, BLOCK_K] feed both accumulators.
    return _prune_smem(configs, nargs["g_ptr"], "BLOCK_N", "BLOCK_K", "BLOCK_M", 1,
                       kwargs.get("BLOCK_H", 16) if kwargs.get("NEED_H") else 0)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _swizzle(pid, num_rows, num_cols, GROUP: tl.constexpr):
    """Grouped program order: GROUP row tiles share a band of column tiles (L2 reuse)."""
    width = GROUP * num_cols
    group = pid // width
    first = group * GROUP
    size = tl.minimum(num_rows - first, GROUP)
    row = first + (pid % width) % size
    col = (pid % width) // size
    return row, col


@triton.autotune(configs=_FWD_CONFIGS, key=["M", "N", "K", "HAS_HP", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _fwd_kernel(
    x_ptr, we_ptr, wh_ptr, be_ptr, bh_ptr, lam_ptr, v_ptr, c_ptr, out_ptr, z_ptr,
    M, N, K, H,
    s_xm, s_wen, s_whn, s_lm, s_vn, s_cn,
    HAS_HP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_HB: tl.constexpr,
    PREC: tl.constexpr, LAM_PREC: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = _swizzle(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/cols past the edge wrap onto valid ones: the main loop needs masks on K only.
    rm = (offs_m % M).to(tl.int64)
    rn = (offs_n % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :]
    we_ptrs = we_ptr + rk[:, None] + rn[None, :] * s_wen
    wh_ptrs = wh_ptr + rk[:, None] + rn[None, :] * s_whn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
        b = tl.load(we_ptrs, mask=rk[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PREC)
        if HAS_HP:
            bh = tl.load(wh_ptrs, mask=rk[:, None] < k_left, other=0.0)
            acc_h = tl.dot(a, bh.to(a.dtype), acc_h, input_precision=PREC)
            wh_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        we_ptrs += BLOCK_K

    om = offs_m.to(tl.int64)
    on = offs_n.to(tl.int64)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if HAS_HP:
        tl.store(z_ptr + om[:, None] * N + on[None, :], acc_h.to(z_ptr.dtype.element_ty), mask=mask)
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        lam = tl.load(lam_ptr + rm[:, None] * s_lm + rh[None, :], mask=h_ok[None, :], other=0.0)
        lam = lam.to(tl.float32)
        vt = tl.load(v_ptr + rh[:, None] + rn[None, :] * s_vn, mask=h_ok[:, None], other=0.0)
        s = tl.dot(lam, vt.to(tl.float32), input_precision=LAM_PREC)
        acc += s * acc_h
        if HAS_HB:
            ct = tl.load(c_ptr + rh[:, None] + rn[None, :] * s_cn, mask=h_ok[:, None], other=0.0)
            bhv = tl.load(bh_ptr + rn).to(tl.float32)
            # (λ·Cᵀ) ⊙ b_h == λ·(C ⊙ b_h)ᵀ: one more small dot into the accumulator.
            acc = tl.dot(lam, ct.to(tl.float32) * bhv[None, :], acc, input_precision=LAM_PREC)
    if HAS_BIAS:
        acc += tl.load(be_ptr + rn).to(tl.float32)[None, :]
    tl.store(out_ptr + om[:, None] * N + on[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_DX_CONFIGS, key=["M", "N", "K", "HAS_HP", "SPLIT_OUT", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_dx})
@triton.jit
def _dx_kernel(
    g_ptr, we_ptr, wh_ptr, lam_ptr, v_ptr, out_ptr,
    M, N, K, H,
    s_gm, s_wen, s_whn, s_lm, s_vn,
    HAS_HP: tl.constexpr, SPLIT_OUT: tl.constexpr,
    PREC: tl.constexpr, LAM_PREC: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dx tile [BLOCK_M, BLOCK_K]; program_id(1) picks this program's share of N.

    out is contiguous: [M, K] in its dtype, or with SPLIT_OUT fp32 [S, M, K] written at slot pid_s.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    pid_m, pid_k = _swizzle(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = (offs_m % M).to(tl.int64)
    rk = (offs_k % K).to(tl.int64)
    n_tiles = tl.cdiv(N, BLOCK_N)
    per = tl.cdiv(n_tiles, n_split)
    t_begin = pid_s * per
    t_end = tl.minimum(t_begin + per, n_tiles)
    rn = (t_begin * BLOCK_N).to(tl.int64) + tl.arange(0, BLOCK_N)
    jn = tl.arange(0, BLOCK_N)
    g_ptrs = g_ptr + rm[:, None] * s_gm + rn[None, :]
    we_ptrs = we_ptr + rn[:, None] * s_wen + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_HP:
        wh_ptrs = wh_ptr + rn[:, None] * s_whn + rk[None, :]
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        lam = tl.load(lam_ptr + rm[:, None] * s_lm + rh[None, :], mask=h_ok[None, :], other=0.0)
        lam = lam.to(tl.float32)
        vt_ptrs = v_ptr + rh[:, None] + rn[None, :] * s_vn
    for t in range(t_begin, t_end):
        n_ok = jn < N - t * BLOCK_N
        gt = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
        w = tl.load(we_ptrs, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(gt, w.to(gt.dtype), acc, input_precision=PREC)
        if HAS_HP:
            vt = tl.load(vt_ptrs, mask=h_ok[:, None] & n_ok[None, :], other=0.0)
            s = tl.dot(lam, vt.to(tl.float32), input_precision=LAM_PREC)
            gs = (gt.to(tl.float32) * s).to(gt.dtype)
            w2 = tl.load(wh_ptrs, mask=n_ok[:, None], other=0.0)
            acc = tl.dot(gs, w2.to(gt.dtype), acc, input_precision=PREC)
            wh_ptrs += BLOCK_N * s_whn
            vt_ptrs += BLOCK_N * s_vn
        g_ptrs += BLOCK_N
        we_ptrs += BLOCK_N * s_wen

    om = offs_m.to(tl.int64)
    ok = offs_k.to(tl.int64)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    ptrs = out_ptr + om[:, None] * K + ok[None, :]
    if SPLIT_OUT:
        tl.store(ptrs + pid_s.to(tl.int64) * M * K, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_DW_CONFIGS, key=["M", "N", "K", "NEED_E", "NEED_H", "SPLIT_OUT", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_dw})
@triton.jit
def _dw_kernel(
    g_ptr, x_ptr, lam_ptr, v_ptr, dwe_ptr, dwh_ptr,
    M, N, K, H,
    s_gm, s_xm, s_lm, s_vn,
    NEED_E: tl.constexpr, NEED_H: tl.constexpr, SPLIT_OUT: tl.constexpr,
    PREC: tl.constexpr, LAM_PREC: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dW_e / dW_h tile [BLOCK_N, BLOCK_K]; program_id(1) picks this program's share of M.

    Outputs contiguous, as in _dx_kernel (fp32 slots [S, N, K] with SPLIT_OUT).
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    m_split = tl.num_programs(1)
    pid_n, pid_k = _swizzle(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(K, BLOCK_K), GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = (offs_n % N).to(tl.int64)
    rk = (offs_k % K).to(tl.int64)
    m_tiles = tl.cdiv(M, BLOCK_M)
    per = tl.cdiv(m_tiles, m_split)
    t_begin = pid_s * per
    t_end = tl.minimum(t_begin + per, m_tiles)
    rm = (t_begin * BLOCK_M).to(tl.int64) + tl.arange(0, BLOCK_M)
    jm = tl.arange(0, BLOCK_M)
    gt_ptrs = g_ptr + rn[:, None] + rm[None, :] * s_gm
    x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :]
    acc_e = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if NEED_H:
        rh = tl.arange(0, BLOCK_H)
        h_ok = rh < H
        v = tl.load(v_ptr + rn[:, None] * s_vn + rh[None, :], mask=h_ok[None, :], other=0.0)
        v = v.to(tl.float32)
        lt_ptrs = lam_ptr + rh[:, None] + rm[None, :] * s_lm
    for t in range(t_begin, t_end):
        m_ok = jm < M - t * BLOCK_M
        gt = tl.load(gt_ptrs, mask=m_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0).to(gt.dtype)
        if NEED_E:
            acc_e = tl.dot(gt, xt, acc_e, input_precision=PREC)
        if NEED_H:
            lt = tl.load(lt_ptrs, mask=h_ok[:, None] & m_ok[None, :], other=0.0)
            st = tl.dot(v, lt.to(tl.float32), input_precision=LAM_PREC)
            gs = (gt.to(tl.float32) * st).to(gt.dtype)
            acc_h = tl.dot(gs, xt, acc_h, input_precision=PREC)
            lt_ptrs += BLOCK_M * s_lm
        gt_ptrs += BLOCK_M * s_gm
        x_ptrs += BLOCK_M * s_xm

    on = offs_n.to(tl.int64)
    ok = offs_k.to(tl.int64)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    offs = on[:, None] * K + ok[None, :]
    if SPLIT_OUT:
        offs += pid_s.to(tl.int64) * N * K
    if NEED_E:
        tl.store(dwe_ptr + offs, acc_e.to(dwe_ptr.dtype.element_ty), mask=mask)
    if NEED_H:
        tl.store(dwh_ptr + offs, acc_h.to(dwh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _small_kernel(
    g_ptr, z_ptr, lam_ptr, v_ptr, c_ptr, bh_ptr,
    dlam_ptr, dv_ptr, dc_ptr, dbe_ptr, dbh_ptr,
    M, N, H, rows_per_prog,
    s_gm, s_zm, s_lm, s_vn, s_cn,
    NEED_DLAM: tl.constexpr, NEED_DV: tl.constexpr, NEED_DC: tl.constexpr,
    NEED_DBE: tl.constexpr, NEED_DBH: tl.constexpr, HAS_HB: tl.constexpr,
    NEED_Z: tl.constexpr, NEED_LAM: tl.constexpr, NEED_DT: tl.constexpr,
    LAM_PREC: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (pid_m, pid_n): rows [pid_m·rows_per_prog, +rows_per_prog) × one BLOCK_N block.

    Writes fp32 partial sums, no atomics: dλ rows into slot pid_n of dlam [n_blocks, M, H], and
    the rows of this N block of dV / dC [chunks, N, H] and db_e / db_h [chunks, N] into slot pid_m
    (with one chunk, [N, H] / [N] in their own dtypes: the store casts).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    on = offs_n.to(tl.int64)
    rh = tl.arange(0, BLOCK_H)
    h_ok = rh < H
    nh_mask = n_ok[:, None] & h_ok[None, :]
    if NEED_DLAM:
        vb = tl.load(v_ptr + on[:, None] * s_vn + rh[None, :], mask=nh_mask, other=0.0).to(tl.float32)
        if HAS_HB:
            cb = tl.load(c_ptr + on[:, None] * s_cn + rh[None, :], mask=nh_mask, other=0.0).to(tl.float32)
    if NEED_DT:
        bhv = tl.load(bh_ptr + on, mask=n_ok, other=0.0).to(tl.float32)
    if NEED_DBH:
        ct = tl.load(c_ptr + on[None, :] * s_cn + rh[:, None], mask=h_ok[:, None] & n_ok[None, :], other=0.0)
        ct = ct.to(tl.float32)
    acc_v = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    acc_be = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_bh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_begin = pid_m * rows_per_prog
    m_end = tl.minimum(m_begin + rows_per_prog, M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        om = offs_m.to(tl.int64)
        g = tl.load(g_ptr + om[:, None] * s_gm + on[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        if NEED_DBE:
            acc_be += tl.sum(g, axis=0)
        if NEED_LAM:
            lam = tl.load(lam_ptr + om[:, None] * s_lm + rh[None, :], mask=m_ok[:, None] & h_ok[None, :],
                          other=0.0).to(tl.float32)
        if NEED_Z:
            zt = tl.load(z_ptr + om[:, None] * s_zm + on[None, :], mask=m_ok[:, None] & n_ok[None, :],
                         other=0.0)
            ds = g * zt.to(tl.float32)
        if NEED_DT:
            dt = g * bhv[None, :]
        if NEED_DLAM:
            dl = tl.dot(ds, vb, input_precision=LAM_PREC)
            if HAS_HB:
                dl = tl.dot(dt, cb, dl, input_precision=LAM_PREC)
            lp = dlam_ptr + pid_n.to(tl.int64) * M * H + om[:, None] * H + rh[None, :]
            tl.store(lp, dl, mask=m_ok[:, None] & h_ok[None, :])
        if NEED_DV:
            acc_v = tl.dot(tl.trans(ds), lam, acc_v, input_precision=LAM_PREC)
        if NEED_DC:
            acc_c = tl.dot(tl.trans(dt), lam, acc_c, input_precision=LAM_PREC)
        if NEED_DBH:
            t_tile = tl.dot(lam, ct, input_precision=LAM_PREC)
            acc_bh += tl.sum(g * t_tile, axis=0)

    slot = pid_m.to(tl.int64)
    if NEED_DV:
        tl.store(dv_ptr + slot * N * H + on[:, None] * H + rh[None, :], acc_v, mask=nh_mask)
    if NEED_DC:
        tl.store(dc_ptr + slot * N * H + on[:, None] * H + rh[None, :], acc_c, mask=nh_mask)
    if NEED_DBE:
        tl.store(dbe_ptr + slot * N + on, acc_be, mask=n_ok)
    if NEED_DBH:
        tl.store(dbh_ptr + slot * N + on, acc_bh, mask=n_ok)


# --------------------------------------------------------------------------- helpers


def _num_splits(rows: int, cols: int, red: int, sms: int) -> int:
    """How many programs share one output tile's reduction (split-K) in a GEMM rows×cols over red.

    Only when the output has fewer 128×128 tiles than the GPU has SMs (small batches), and
    with at least 256 reduction elements per split.
    """
    tiles = _cdiv(rows, 128) * _cdiv(cols, 128)
    if tiles >= sms:
        return 1
    return max(1, min(_cdiv(sms, tiles), red // 256, 16))


# --------------------------------------------------------------------------- forward


def hyper_linear_forward(
    x: Tensor,
    hparams: Optional[Tensor],
    weight: Tensor,
    hyper_weight: Tensor,
    bias: Optional[Tensor],
    hyper_bias: Optional[Tensor],
    weight_scale: Optional[Tensor],
    bias_scale: Optional[Tensor],
):
    """Fused forward; returns ``(out, z_hyper)`` like the reference (z_hyper empty without hparams)."""
    if hyper_linear_needs_reference(x, weight, hparams, weight_scale, bias_scale):
        from ... import reference
        return reference.hyper_linear_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                              bias_scale)
    M, K = x.shape
    N = weight.shape[0]
    has_hp = hparams is not None
    has_hb = has_hp and hyper_bias is not None
    x, weight = _inner(x), _inner(weight)
    wh = _inner(hyper_weight) if has_hp else None
    lam = _inner(hparams) if has_hp else None
    V = _inner(weight_scale) if has_hp else None
    C = _inner(bias_scale) if has_hb else None
    be = _vec(bias)
    bh = _vec(hyper_bias) if has_hb else None
    H = lam.shape[1] if has_hp else 1

    out = _alloc((M, N), x.dtype, x.device)
    z = _alloc((M, N), x.dtype, x.device) if has_hp else x.new_empty(0)
    d = x  # stands in for absent pointer arguments (never read)

    def grid(meta):
        return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]),)

    prec = _dot_prec(x.dtype)
    _fwd_kernel[grid](
        x, weight, wh if has_hp else d, be if be is not None else d, bh if has_hb else d,
        lam if has_hp else d, V if has_hp else d, C if has_hb else d, out, z if has_hp else d,
        M, N, K, H,
        x.stride(0), weight.stride(0), _row(wh), _row(lam), _row(V), _row(C),
        HAS_HP=has_hp, HAS_BIAS=be is not None, HAS_HB=has_hb,
        PREC=prec, LAM_PREC=prec, BLOCK_H=_block_h(H),
    )
    return out, z


# --------------------------------------------------------------------------- backward


def hyper_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    hparams: Optional[Tensor],
    weight: Tensor,
    hyper_weight: Tensor,
    hyper_bias: Optional[Tensor],
    weight_scale: Optional[Tensor],
    bias_scale: Optional[Tensor],
    z_hyper: Optional[Tensor],
    output_mask: Sequence[bool] = (True,) * 8,
) -> List[Optional[Tensor]]:
    """Gradients in argument order (x, hparams, weight, hyper_weight, bias, hyper_bias,
    weight_scale, bias_scale); None where the input is None or ``output_mask`` is False
    (the bias gradient Σ_m g is returned whenever asked for, as in the reference).
    """
    need = [bool(v) for v in output_mask]
    if hyper_linear_needs_reference(x, weight, hparams, weight_scale, bias_scale):
        return reference_fallback_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                           bias_scale, z_hyper, output_mask)
    M, K = x.shape
    N = weight.shape[0]

    has_hp = hparams is not None
    has_hb = has_hp and hyper_bias is not None and bias_scale is not None
    need_dx = need[0]
    need_dlam = has_hp and need[1]
    need_dwe = need[2]
    need_dwh = has_hp and need[3]
    need_dbe = need[4]
    need_dbh = has_hb and need[5]
    need_dv = has_hp and need[6]
    need_dc = has_hb and need[7]

    dtype = x.dtype
    dev = x.device
    g = _inner(grad_out if grad_out.dtype == dtype else grad_out.to(dtype))
    x = _inner(x)
    lam = _inner(hparams) if has_hp else None
    V = _inner(weight_scale) if has_hp else None
    C = _inner(bias_scale) if has_hb else None
    bh = _vec(hyper_bias) if has_hb else None
    H = lam.shape[1] if has_hp else 1
    block_h = _block_h(H)
    prec = _dot_prec(dtype)
    sms = _num_sms(dev)
    grads: List[Optional[Tensor]] = [None] * 8
    d = g  # stands in for absent pointer arguments (never read)

    # (a) dx = g·W_e + (g⊙s)·W_h
    if need_dx:
        we = _inner(weight)
        wh = _inner(hyper_weight) if has_hp else None
        split = _num_splits(M, K, N, sms)
        buf = _alloc((M, K), dtype, dev) if split == 1 else _alloc((split, M, K), torch.float32, dev)

        def grid_dx(meta):
            return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(K, meta["BLOCK_K"]), split)

        _dx_kernel[grid_dx](
            g, we, wh if has_hp else d, lam if has_hp else d, V if has_hp else d, buf,
            M, N, K, H,
            g.stride(0), we.stride(0), _row(wh), _row(lam), _row(V),
            HAS_HP=has_hp, SPLIT_OUT=split > 1, PREC=prec, LAM_PREC=prec, BLOCK_H=block_h,
        )
        grads[0] = buf if split == 1 else _reduce(buf, dtype)

    # (b) dW_e = gᵀ·x, dW_h = (g⊙s)ᵀ·x
    if need_dwe or need_dwh:
        split = _num_splits(N, K, M, sms)
        if split == 1:
            dwe = _alloc((N, K), weight.dtype, dev) if need_dwe else None
            dwh = _alloc((N, K), hyper_weight.dtype, dev) if need_dwh else None
        else:
            dwe = _alloc((split, N, K), torch.float32, dev) if need_dwe else None
            dwh = _alloc((split, N, K), torch.float32, dev) if need_dwh else None
        any_w = dwe if dwe is not None else dwh

        def grid_dw(meta):
            return (_cdiv(N, meta["BLOCK_N"]) * _cdiv(K, meta["BLOCK_K"]), split)

        _dw_kernel[grid_dw](
            g, x, lam if need_dwh else d, V if need_dwh else d,
            dwe if dwe is not None else any_w, dwh if dwh is not None else any_w,
            M, N, K, H,
            g.stride(0), x.stride(0), _row(lam), _row(V),
            NEED_E=need_dwe, NEED_H=need_dwh, SPLIT_OUT=split > 1, PREC=prec, LAM_PREC=prec, BLOCK_H=block_h,
        )
        if need_dwe:
            grads[2] = dwe if split == 1 else _reduce(dwe, weight.dtype)
        if need_dwh:
            grads[3] = dwh if split == 1 else _reduce(dwh, hyper_weight.dtype)

    # (c) dλ, dV, dC, db_e, db_h in one pass over g (and z)
    if need_dlam or need_dv or need_dc or need_dbe or need_dbh:
        need_z = need_dlam or need_dv
        z = None
        if need_z:
            z = z_hyper
            if z is None or z.numel() == 0:
                z = torch.nn.functional.linear(x, hyper_weight)
            z = _inner(z)
        bm, bn = _SMALL_BLOCKS
        n_blocks = _cdiv(N, bn)
        m_blocks = _cdiv(M, bm)
        if m_blocks <= _DIRECT_ROW_BLOCKS:
            chunks = 1
        else:
            chunks = min(m_blocks, max(1, _cdiv(4 * sms, n_blocks)))
        rows_per_prog = _cdiv(m_blocks, chunks) * bm
        chunks = _cdiv(M, rows_per_prog)
        f32 = torch.float32
        # dλ: partial sums per N block. The [N]-side gradients: partial sums per M chunk, or with a
        # single chunk the final values, stored in their own dtypes (no reduction, no cast launched).
        direct = chunks == 1

        def n_side(shape, out_dtype):
            return _alloc(shape, out_dtype, dev) if direct else _alloc((chunks, *shape), f32, dev)

        dlam = _alloc((n_blocks, M, H), f32, dev) if need_dlam else None
        dv = n_side((N, H), weight_scale.dtype) if need_dv else None
        dc = n_side((N, H), bias_scale.dtype) if need_dc else None
        dbe = n_side((N,), dtype) if need_dbe else None
        dbh = n_side((N,), hyper_bias.dtype) if need_dbh else None
        _small_kernel[(chunks, n_blocks)](
            g, z if need_z else d, lam if has_hp else d, V if has_hp else d, C if has_hb else d, bh if has_hb else d,
            dlam if need_dlam else d, dv if need_dv else d, dc if need_dc else d,
            dbe if need_dbe else d, dbh if need_dbh else d,
            M, N, H, rows_per_prog,
            g.stride(0), _row(z), _row(lam), _row(V), _row(C),
            NEED_DLAM=need_dlam, NEED_DV=need_dv, NEED_DC=need_dc, NEED_DBE=need_dbe, NEED_DBH=need_dbh,
            HAS_HB=has_hb, NEED_Z=need_z, NEED_LAM=need_dv or need_dc or need_dbh,
            NEED_DT=has_hb and (need_dlam or need_dc),
            LAM_PREC=prec,
            BLOCK_H=block_h, BLOCK_M=_SMALL_IEEE[0] if prec == "ieee" else bm, BLOCK_N=bn,
            num_warps=_SMALL_IEEE[1] if prec == "ieee" else 4,
        )
        if need_dlam:
            grads[1] = _reduce(dlam, hparams.dtype)
        for i, buf, out_dtype in ((6, dv, weight_scale.dtype if has_hp else None),
                                  (7, dc, bias_scale.dtype if has_hb else None),
                                  (4, dbe, dtype), (5, dbh, hyper_bias.dtype if has_hb else None)):
            if buf is not None:
                grads[i] = buf if direct else _reduce(buf, out_dtype)
    return grads
