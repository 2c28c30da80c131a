"""Fused Triton kernels for the HyperLSTM recurrence (one layer, time-major).

Same contract as :func:`stn_kernels.reference_lstm.hyper_lstm_recurrence_forward` and
:func:`stn_kernels.reference_lstm.hyper_lstm_recurrence_backward` (read its docstring for the
formulas and the gate order f, i, o, g). Per sequence, once: s = λ·Vᵀ and
β = b + (λ·Cᵀ) ⊙ b_h as fp32 [B, 4N] (β a stride-0 broadcast of b without hparams). Then a
Python loop over time, one launch per step:

``_fwd_step_kernel``
    Program (pid_b, pid_j) owns rows b0..b0+BLOCK_B and hidden units j0..j0+BLOCK_J, i.e.
    the four gate column blocks g·N + j of the pre-activations, so the cell update is
    local. The loop over K (= N, the hidden size) loads the h_{t-1} tile once and dots it
    with the four W_e row blocks and the four W_h row blocks into 8 fp32 accumulators.
    Epilogue: pre = x_proj[t] + acc_e + s ⊙ acc_h + β, σ/tanh, c_t = f⊙c_{t-1} + i⊙g,
    h_t = o⊙tanh(c_t); stores h_t (into out[t]), c_t, the 4 activations and z = acc_h.
``_bwd_step_kernel``
    Program (pid_b, pid_k) owns one [BLOCK_B, BLOCK_K] tile of dh_{t-1}. Its loop over the
    hidden units j (chunks of BLOCK_J) forms d_pre for the four gate blocks in registers
    from dh_t = dout[t] + dh_rec, dc_t and the saved activations and cells, and dots them
    (and d_pre ⊙ s) with the W_e and W_h rows: dh_{t-1} = d_pre·W_e + (d_pre⊙s)·W_h. The
    programs with pid_k == 0 also store d_pre[t] and dc_{t-1} = dc⊙f. (Every pid_k
    recomputes the cheap pointwise part instead of a second launch per step.) dh and dc
    ping-pong between two fp32 buffers each.

After the time loop the parameter and λ gradients are one HyperLinear backward over the
stacked T·B rows (d_pre against h_{t-1}, with the saved z), by the kernels of
:mod:`stn_kernels.backends.triton.hyper_linear`. No atomics anywhere: results are bitwise
repeatable. Every buffer the kernels write in full comes from :func:`_alloc` (tests patch it
to NaN-fill). tanh is 2σ(2x) − 1 (no libdevice: runs under TRITON_INTERPRET=1 too).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import hyper_linear as hl

# Helpers are called through these module globals: tests patch ``_alloc`` (NaN-fill) on this module.
from ._common import (
    AUTOTUNE as _AUTOTUNE,
    INTERPRET as _INTERPRET,
    alloc as _alloc,
    cdiv as _cdiv,
    configs as _configs,
    dot_prec as _dot_prec,
    fallback as _fallback,
    inner as _inner,
    next_pow2 as _next_pow2,
    row as _row,
)

Tensor = torch.Tensor

# --------------------------------------------------------------------------- configs
# Forward (BLOCK_B, BLOCK_J, BLOCK_K, num_warps, num_stages): 8 fp32 accumulators of [BLOCK_B, BLOCK_J],
# BLOCK_K the chunk of h_{t-1}. Backward (BLOCK_B, BLOCK_K, BLOCK_J, num_warps, num_stages): one
# [BLOCK_B, BLOCK_K] accumulator of dh_{t-1}, BLOCK_J the chunk of hidden units (8 weight tiles each).
# tl.dot needs every block dim >= 16. Shared memory of every config, fp32, compiled ahead of time
# for sm_80 / sm_90 (no GPU needed): at most 92 KB / 123 KB.
_FWD = [
    (16, 16, 64, 4, 3), (16, 32, 64, 4, 2), (32, 16, 64, 4, 3), (32, 32, 32, 4, 3),
    (32, 32, 64, 4, 2), (64, 16, 64, 4, 2), (64, 32, 32, 4, 2), (64, 32, 32, 8, 2),
]
_BWD = [
    (16, 32, 32, 4, 2), (16, 64, 32, 4, 2), (32, 32, 32, 4, 2), (32, 64, 16, 4, 2),
    (64, 32, 16, 4, 2), (16, 32, 16, 4, 3), (32, 32, 16, 4, 3), (64, 64, 16, 8, 2),
]
# Without autotuning (tests, STN_KERNELS_TRITON_AUTOTUNE=0): ~37 / ~86 KB of shared memory in fp32.
_DEFAULT_FWD = [(32, 32, 32, 4, 2)]
_DEFAULT_BWD = [(32, 32, 16, 4, 2)]
if _INTERPRET:
    _FWD = _BWD = _DEFAULT_FWD = _DEFAULT_BWD = [(16, 16, 16, 4, 1)]
if not _AUTOTUNE:
    _FWD, _BWD = _DEFAULT_FWD, _DEFAULT_BWD

_FWD_CONFIGS = _configs(("BLOCK_B", "BLOCK_J", "BLOCK_K"), _FWD)
_BWD_CONFIGS = _configs(("BLOCK_B", "BLOCK_K", "BLOCK_J"), _BWD)


# fp32 with TF32 off (FMA dots, whose operand slices sit in registers beside the 8 accumulators): these forward
# tiles spill registers on sm_80 or sm_90 (compiled by tests/test_triton_aot.py), so the prune leaves them out.
_FWD_IEEE_SPILLS = {(32, 32, 64, 4, 2), (64, 16, 64, 4, 2), (64, 32, 32, 4, 2)}


def _prune(configs, nargs, **kwargs):
    """Drop configs whose row block is far larger than the batch."""
    cap = max(16, _next_pow2(int(nargs["B"])))
    kept = [c for c in configs if c.kwargs["BLOCK_B"] <= cap]
    return kept or configs


def _prune_fwd(configs, nargs, **kwargs):
    """:func:`_prune`, and in fp32 with TF32 off no tile of _FWD_IEEE_SPILLS."""
    if kwargs.get("PREC") == "ieee":
        configs = [c for c in configs if (c.kwargs["BLOCK_B"], c.kwargs["BLOCK_J"], c.kwargs["BLOCK_K"], c.num_warps,
                                          c.num_stages) not in _FWD_IEEE_SPILLS] or configs
    return _prune(configs, nargs, **kwargs)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.autotune(configs=_FWD_CONFIGS, key=["B", "N", "HAS_HP", "HAS_BETA", "PREC"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=["N"])
def _fwd_step_kernel(
    xp_ptr, h_ptr, c_ptr, we_ptr, wh_ptr, s_ptr, beta_ptr,
    out_ptr, cell_ptr, gate_ptr, z_ptr,
    B, N,
    s_xb, s_hb, s_cb, s_wen, s_whn, s_sb, s_bb,
    HAS_HP: tl.constexpr, HAS_BETA: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step. xp [B, 4N] (row stride s_xb), h/c [B, N]; out/cell [B, N], gate/z [B, 4N] contiguous."""
    pid_b = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    # Rows/units past the edge wrap onto valid ones: only the K loop and the stores need masks.
    rb = (offs_b % B).to(tl.int64)
    rj = (offs_j % N).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    n64 = N.to(tl.int64)
    h_ptrs = h_ptr + rb[:, None] * s_hb + rk[None, :]
    we_ptrs = we_ptr + rk[:, None] + rj[None, :] * s_wen  # gate block 0; block g at + g·N rows
    wh_ptrs = wh_ptr + rk[:, None] + rj[None, :] * s_whn
    ge = n64 * s_wen
    gh = n64 * s_whn
    acc_f = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    z_f = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    z_i = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    z_o = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    z_g = tl.zeros((BLOCK_B, BLOCK_J), dtype=tl.float32)
    for k in range(0, tl.cdiv(N, BLOCK_K)):
        k_left = N - k * BLOCK_K
        a = tl.load(h_ptrs, mask=rk[None, :] < k_left, other=0.0)
        wm = rk[:, None] < k_left
        acc_f = tl.dot(a, tl.load(we_ptrs, mask=wm, other=0.0).to(a.dtype), acc_f, input_precision=PREC)
        acc_i = tl.dot(a, tl.load(we_ptrs + ge, mask=wm, other=0.0).to(a.dtype), acc_i, input_precision=PREC)
        acc_o = tl.dot(a, tl.load(we_ptrs + 2 * ge, mask=wm, other=0.0).to(a.dtype), acc_o, input_precision=PREC)
        acc_g = tl.dot(a, tl.load(we_ptrs + 3 * ge, mask=wm, other=0.0).to(a.dtype), acc_g, input_precision=PREC)
        if HAS_HP:
            z_f = tl.dot(a, tl.load(wh_ptrs, mask=wm, other=0.0).to(a.dtype), z_f, input_precision=PREC)
            z_i = tl.dot(a, tl.load(wh_ptrs + gh, mask=wm, other=0.0).to(a.dtype), z_i, input_precision=PREC)
            z_o = tl.dot(a, tl.load(wh_ptrs + 2 * gh, mask=wm, other=0.0).to(a.dtype), z_o, input_precision=PREC)
            z_g = tl.dot(a, tl.load(wh_ptrs + 3 * gh, mask=wm, other=0.0).to(a.dtype), z_g, input_precision=PREC)
            wh_ptrs += BLOCK_K
        h_ptrs += BLOCK_K
        we_ptrs += BLOCK_K

    mask = (offs_b < B)[:, None] & (offs_j < N)[None, :]
    x_ptrs = xp_ptr + rb[:, None] * s_xb + rj[None, :]
    p_f = acc_f + tl.load(x_ptrs).to(tl.float32)
    p_i = acc_i + tl.load(x_ptrs + n64).to(tl.float32)
    p_o = acc_o + tl.load(x_ptrs + 2 * n64).to(tl.float32)
    p_g = acc_g + tl.load(x_ptrs + 3 * n64).to(tl.float32)
    g_offs = rb[:, None] * (4 * n64) + rj[None, :]  # rows of gate/z (stores use the mask)
    if HAS_HP:
        zt = z_ptr.dtype.element_ty
        tl.store(z_ptr + g_offs, z_f.to(zt), mask=mask)
        tl.store(z_ptr + g_offs + n64, z_i.to(zt), mask=mask)
        tl.store(z_ptr + g_offs + 2 * n64, z_o.to(zt), mask=mask)
        tl.store(z_ptr + g_offs + 3 * n64, z_g.to(zt), mask=mask)
        s_ptrs = s_ptr + rb[:, None] * s_sb + rj[None, :]
        p_f += tl.load(s_ptrs) * z_f
        p_i += tl.load(s_ptrs + n64) * z_i
        p_o += tl.load(s_ptrs + 2 * n64) * z_o
        p_g += tl.load(s_ptrs + 3 * n64) * z_g
    if HAS_BETA:
        b_ptrs = beta_ptr + rb[:, None] * s_bb + rj[None, :]
        p_f += tl.load(b_ptrs)
        p_i += tl.load(b_ptrs + n64)
        p_o += tl.load(b_ptrs + 2 * n64)
        p_g += tl.load(b_ptrs + 3 * n64)
    f = tl.sigmoid(p_f)
    i = tl.sigmoid(p_i)
    o = tl.sigmoid(p_o)
    g = _tanh(p_g)
    c_prev = tl.load(c_ptr + rb[:, None] * s_cb + rj[None, :]).to(tl.float32)
    c = f * c_prev + i * g
    h = o * _tanh(c)
    st = gate_ptr.dtype.element_ty
    tl.store(gate_ptr + g_offs, f.to(st), mask=mask)
    tl.store(gate_ptr + g_offs + n64, i.to(st), mask=mask)
    tl.store(gate_ptr + g_offs + 2 * n64, o.to(st), mask=mask)
    tl.store(gate_ptr + g_offs + 3 * n64, g.to(st), mask=mask)
    n_offs = rb[:, None] * n64 + rj[None, :]
    tl.store(cell_ptr + n_offs, c.to(st), mask=mask)
    tl.store(out_ptr + n_offs, h.to(st), mask=mask)


@triton.autotune(configs=_BWD_CONFIGS, key=["B", "N", "HAS_HP", "HAS_DH", "NEED_DH", "PREC"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["N"])
def _bwd_step_kernel(
    gate_ptr, cell_ptr, cp_ptr, dout_ptr, dhin_ptr, dcin_ptr, s_ptr, we_ptr, wh_ptr,
    dpre_ptr, dcout_ptr, dhout_ptr,
    B, N,
    s_cpb, s_dob, s_dcb, s_sb, s_wen, s_whn,
    HAS_HP: tl.constexpr, HAS_DH: tl.constexpr, NEED_DH: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """One backward step. gate/dpre [B, 4N] and cell [B, N] contiguous; dhin/dcout/dhout fp32 [B, N]
    contiguous; c_{t-1}, dout and dc_in with row strides s_cpb, s_dob, s_dcb."""
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    b_ok = offs_b < B
    rb = (offs_b % B).to(tl.int64)
    rk = (offs_k % N).to(tl.int64)
    jj = tl.arange(0, BLOCK_J)
    n64 = N.to(tl.int64)
    ge = n64 * s_wen
    gh = n64 * s_whn
    first = pid_k == 0  # these programs store d_pre and dc_{t-1}
    dt = dpre_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_B, BLOCK_K), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_J):
        offs_j = j0 + jj
        j_ok = offs_j < N
        rj = offs_j.to(tl.int64)
        lm = (rb >= 0)[:, None] & j_ok[None, :]  # rows are wrapped (always valid); mask the units
        sm = b_ok[:, None] & j_ok[None, :] & first
        g_offs = rb[:, None] * (4 * n64) + rj[None, :]
        n_offs = rb[:, None] * n64 + rj[None, :]
        # Masked units load zeros, so every d_pre there is 0 (each is a product with a gate).
        f = tl.load(gate_ptr + g_offs, mask=lm, other=0.0).to(tl.float32)
        i = tl.load(gate_ptr + g_offs + n64, mask=lm, other=0.0).to(tl.float32)
        o = tl.load(gate_ptr + g_offs + 2 * n64, mask=lm, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + g_offs + 3 * n64, mask=lm, other=0.0).to(tl.float32)
        c = tl.load(cell_ptr + n_offs, mask=lm, other=0.0).to(tl.float32)
        cp = tl.load(cp_ptr + rb[:, None] * s_cpb + rj[None, :], mask=lm, other=0.0).to(tl.float32)
        dh = tl.load(dout_ptr + rb[:, None] * s_dob + rj[None, :], mask=lm, other=0.0).to(tl.float32)
        if HAS_DH:
            dh += tl.load(dhin_ptr + n_offs, mask=lm, other=0.0)
        dc = tl.load(dcin_ptr + rb[:, None] * s_dcb + rj[None, :], mask=lm, other=0.0).to(tl.float32)
        tc = _tanh(c)
        dc = dc + dh * o * (1.0 - tc * tc)
        d_f = (dc * cp * f * (1.0 - f)).to(dt)
        d_i = (dc * g * i * (1.0 - i)).to(dt)
        d_o = (dh * tc * o * (1.0 - o)).to(dt)
        d_g = (dc * i * (1.0 - g * g)).to(dt)
        tl.store(dpre_ptr + g_offs, d_f, mask=sm)
        tl.store(dpre_ptr + g_offs + n64, d_i, mask=sm)
        tl.store(dpre_ptr + g_offs + 2 * n64, d_o, mask=sm)
        tl.store(dpre_ptr + g_offs + 3 * n64, d_g, mask=sm)
        tl.store(dcout_ptr + n_offs, dc * f, mask=sm)
        if NEED_DH:
            w_ptrs = we_ptr + rj[:, None] * s_wen + rk[None, :]
            wm = j_ok[:, None]
            acc = tl.dot(d_f, tl.load(w_ptrs, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
            acc = tl.dot(d_i, tl.load(w_ptrs + ge, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
            acc = tl.dot(d_o, tl.load(w_ptrs + 2 * ge, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
            acc = tl.dot(d_g, tl.load(w_ptrs + 3 * ge, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
            if HAS_HP:
                s_ptrs = s_ptr + rb[:, None] * s_sb + rj[None, :]
                v_ptrs = wh_ptr + rj[:, None] * s_whn + rk[None, :]
                gs = (d_f.to(tl.float32) * tl.load(s_ptrs, mask=lm, other=0.0)).to(dt)
                acc = tl.dot(gs, tl.load(v_ptrs, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
                gs = (d_i.to(tl.float32) * tl.load(s_ptrs + n64, mask=lm, other=0.0)).to(dt)
                acc = tl.dot(gs, tl.load(v_ptrs + gh, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
                gs = (d_o.to(tl.float32) * tl.load(s_ptrs + 2 * n64, mask=lm, other=0.0)).to(dt)
                acc = tl.dot(gs, tl.load(v_ptrs + 2 * gh, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
                gs = (d_g.to(tl.float32) * tl.load(s_ptrs + 3 * n64, mask=lm, other=0.0)).to(dt)
                acc = tl.dot(gs, tl.load(v_ptrs + 3 * gh, mask=wm, other=0.0).to(dt), acc, input_precision=PREC)
    if NEED_DH:
        om = offs_b.to(tl.int64)
        ok = offs_k.to(tl.int64)
        tl.store(dhout_ptr + om[:, None] * n64 + ok[None, :], acc, mask=b_ok[:, None] & (offs_k < N)[None, :])


# --------------------------------------------------------------------------- helpers


def _sequence_terms(hparams, bias, hyper_bias, weight_scale, bias_scale, B: int, G: int):
    """fp32 s = λ·Vᵀ [B, 4N] and β = b + (λ·Cᵀ) ⊙ b_h (stride-0 rows for b alone), once per sequence."""
    s = beta = None
    if hparams is not None:
        lam = hparams.float()
        s = (lam @ weight_scale.float().t()).contiguous()
        if hyper_bias is not None and bias_scale is not None:
            beta = (lam @ bias_scale.float().t()) * hyper_bias.float()
    if bias is not None:
        b = bias.float().contiguous()
        beta = b.expand(B, G) if beta is None else (beta + b).contiguous()
    return s, beta


# --------------------------------------------------------------------------- forward


def hyper_lstm_recurrence_forward(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                  bias_scale):
    """(out, c_T, gates, cells, z) as the reference; one fused kernel launch per step."""
    if _fallback(x_proj, h0, c0, weight, hyper_weight, hparams, weight_scale, bias_scale):
        from ... import reference_lstm
        return reference_lstm.hyper_lstm_recurrence_forward(x_proj, h0, c0, hparams, weight, hyper_weight, bias,
                                                            hyper_bias, weight_scale, bias_scale)
    T, B, G = x_proj.shape
    N = G // 4
    dtype, dev = x_proj.dtype, x_proj.device
    has_hp = hparams is not None
    s, beta = _sequence_terms(hparams, bias, hyper_bias, weight_scale, bias_scale, B, G)
    x_proj, h0, c0 = _inner(x_proj), _inner(h0), _inner(c0)
    we = _inner(weight)
    wh = _inner(hyper_weight) if has_hp else None
    out = _alloc((T, B, N), dtype, dev)
    cells = _alloc((T, B, N), dtype, dev)
    gates = _alloc((T, B, G), dtype, dev)
    z = _alloc((T, B, G), dtype, dev) if has_hp else x_proj.new_empty(0)
    d = out  # stands in for absent pointer arguments (never read)
    prec = _dot_prec(dtype)

    def grid(meta):
        return (_cdiv(B, meta["BLOCK_B"]), _cdiv(N, meta["BLOCK_J"]))

    for t in range(T):
        h_prev = h0 if t == 0 else out[t - 1]
        c_prev = c0 if t == 0 else cells[t - 1]
        _fwd_step_kernel[grid](
            x_proj[t], h_prev, c_prev, we, wh if has_hp else d, s if has_hp else d,
            beta if beta is not None else d, out[t], cells[t], gates[t], z[t] if has_hp else d,
            B, N,
            x_proj.stride(1), h_prev.stride(0), c_prev.stride(0), we.stride(0), _row(wh), _row(s), _row(beta),
            HAS_HP=has_hp, HAS_BETA=beta is not None, PREC=prec,
        )
    return out, cells[T - 1].clone(), gates, cells, z


# --------------------------------------------------------------------------- backward


def hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight, hyper_bias,
                                   weight_scale, bias_scale, out, gates, cells, z,
                                   output_mask: Sequence[bool] = (True,) * 10) -> List[Optional[Tensor]]:
    """10 gradients as the reference: one fused launch per step backwards through time, then one
    HyperLinear backward (Triton) over the stacked T·B rows for λ and the parameters."""
    if _fallback(gates, h0, c0, weight, hyper_weight, hparams, weight_scale, bias_scale):
        from ... import reference_lstm
        return reference_lstm.hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight,
                                                             hyper_weight, hyper_bias, weight_scale, bias_scale,
                                                             out, gates, cells, z, output_mask)
    from ...reference_lstm import stacked_hyper_linear_backward

    need = [bool(v) for v in output_mask]
    T, B, G = gates.shape
    N = G // 4
    dtype, dev = gates.dtype, gates.device
    has_hp = hparams is not None
    s = (hparams.float() @ weight_scale.float().t()).contiguous() if has_hp else None
    grad_out = _inner(grad_out if grad_out.dtype == dtype else grad_out.to(dtype))
    grad_cT = _inner(grad_cT)
    c0 = _inner(c0)
    we = _inner(weight)
    wh = _inner(hyper_weight) if has_hp else None
    D = _alloc((T, B, G), dtype, dev)
    f32 = torch.float32
    dh_bufs = [_alloc((B, N), f32, dev), _alloc((B, N), f32, dev)]
    dc_bufs = [_alloc((B, N), f32, dev), _alloc((B, N), f32, dev)]
    d = D
    prec = _dot_prec(dtype)
    for t in reversed(range(T)):
        need_dh = t > 0 or need[1]
        dc_in = grad_cT if t == T - 1 else dc_bufs[(t + 1) % 2]
        c_prev = c0 if t == 0 else cells[t - 1]

        def grid(meta):  # without dh_{t-1} (t = 0, dh0 not needed) one column of programs does the rest
            return (_cdiv(B, meta["BLOCK_B"]), _cdiv(N, meta["BLOCK_K"]) if need_dh else 1)

        _bwd_step_kernel[grid](
            gates[t], cells[t], c_prev, grad_out[t], dh_bufs[(t + 1) % 2], dc_in, s if has_hp else d, we,
            wh if has_hp else d, D[t], dc_bufs[t % 2], dh_bufs[t % 2],
            B, N,
            c_prev.stride(0), grad_out.stride(1), dc_in.stride(0), _row(s), we.stride(0), _row(wh),
            HAS_HP=has_hp, HAS_DH=t < T - 1, NEED_DH=need_dh, PREC=prec,
        )
    grads: List[Optional[Tensor]] = [None] * 10
    if need[0]:
        grads[0] = D
    if need[1]:
        grads[1] = dh_bufs[0].to(h0.dtype)
    if need[2]:
        grads[2] = dc_bufs[0].to(c0.dtype)
    grads[3:] = stacked_hyper_linear_backward(hl.hyper_linear_backward, D, h0, out, hparams, weight, hyper_weight,
                                               hyper_bias, weight_scale, bias_scale, z, need)
    return grads
