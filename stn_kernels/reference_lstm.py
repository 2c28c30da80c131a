"""Pure-PyTorch reference of the HyperLSTM recurrence (the "reference" backend, the CPU path).

One layer of the published STN ``HyperLSTMCell``: with the input projection
``x_proj[t] = i2h(x[t])`` computed beforehand for all steps (one HyperLinear call),

    pre_t = x_proj[t] + h2h(h_{t-1})                        [B, 4N]
          = x_proj[t] + h·W_eᵀ + s ⊙ (h·W_hᵀ) + b + t ⊙ b_h,   s = λ·Vᵀ, t = λ·Cᵀ
    f, i, o = σ(pre[:, 0:N]), σ(pre[:, N:2N]), σ(pre[:, 2N:3N])   (forget, input, output)
    g       = tanh(pre[:, 3N:4N])                                (cell candidate)
    c_t = f ⊙ c_{t-1} + i ⊙ g,    h_t = o ⊙ tanh(c_t)

Gate order as in the official STN code (``lstm/hyperlstm.py``: sigmoid on [0:3N] split
forget, input, output; tanh on [3N:4N]) — not torch.nn.LSTM's (i, f, g, o).

The op contract shared with :mod:`stn_kernels.backends.triton.hyper_lstm_recurrence`:

``hyper_lstm_recurrence_forward(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias,
weight_scale, bias_scale) -> (out, c_T, gates, cells, z)``
    x_proj [T, B, 4N], h0 and c0 [B, N], hparams [B, H] or None, weight and hyper_weight
    [4N, N], bias and hyper_bias [4N], weight_scale V and bias_scale C [4N, H]. out [T, B, N]
    holds h_1..h_T (h_T = out[-1]); saved for backward: gates [T, B, 4N] (the activations
    f, i, o, g), cells [T, B, N] (c_1..c_T) and z [T, B, 4N] = h_{t-1}·W_hᵀ (empty without
    hparams). The scales s and t are formed once per sequence.
``hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight, hyper_bias,
weight_scale, bias_scale, out, gates, cells, z, output_mask) -> 10 gradients``
    in the order (x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias,
    weight_scale, bias_scale), None where not needed. Backward through time computes
    d_pre_t per step (which is the gradient of x_proj[t]) and dh_{t-1} = d_pre·W_e +
    (d_pre ⊙ s)·W_h; the parameter and λ gradients are then ONE HyperLinear backward over
    the stacked T·B rows (d_pre against h_{t-1}), not a per-step accumulation.

:func:`hyper_lstm_recurrence` is the differentiable composite (unrolled cells on
:func:`stn_kernels.reference.hyper_linear`): double backward and torch.func use it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import reference

Tensor = torch.Tensor

GATES = ("forget", "input", "output", "cell")  # blocks of the 4N pre-activations, in order


def lstm_pointwise(pre: Tensor, c_prev: Tensor, activations: bool = True) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(h, c, activations or None) from the pre-activations [B, 4N] in the published gate order."""
    n = c_prev.shape[-1]
    sig = torch.sigmoid(pre[..., :3 * n])
    g = torch.tanh(pre[..., 3 * n:])
    f, i, o = sig[..., :n], sig[..., n:2 * n], sig[..., 2 * n:]
    c = torch.addcmul(f * c_prev, i, g)
    h = o * torch.tanh(c)
    return h, c, (torch.cat([sig, g], -1) if activations else None)


def hyper_lstm_recurrence(x_proj: Tensor, h0: Tensor, c0: Tensor, hparams: Optional[Tensor], weight: Tensor,
                          hyper_weight: Tensor, bias: Optional[Tensor] = None, hyper_bias: Optional[Tensor] = None,
                          weight_scale: Optional[Tensor] = None,
                          bias_scale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable composite: (out [T, B, N], c_T), one reference HyperLinear call per step."""
    T, B = x_proj.shape[:2]
    h, c = h0, c0
    outs = []
    for t in range(T):
        pre = x_proj[t] + reference.hyper_linear(h, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                                 bias_scale)
        h, c, _ = lstm_pointwise(pre, c, activations=False)
        outs.append(h)
    out = torch.stack(outs) if outs else x_proj.new_empty(0, B, h0.shape[-1])
    return out, c


def hyper_lstm_cell_step(x: Tensor, h: Tensor, c: Tensor, hparams: Optional[Tensor], i2h: Sequence,
                         h2h: Sequence) -> Tuple[Tensor, Tensor]:
    """One HyperLSTM step in plain torch ops that torch differentiates: ``(h, c)``, each [B, N].

    x [B, K], h and c [B, N], hparams [B, H] or None; i2h and h2h are (weight, hyper_weight, bias,
    hyper_bias, hparam_weight) with the modules' stacked hparam_weight [V; C]. The cell modules' path on
    the reference backend for a single step, where the number of ops (and of autograd nodes: ``split``
    is one node where slices are one each) is the cost: λ·[V; C]ᵀ is one GEMM per layer."""
    weight, hyper_weight, bias, hyper_bias, hparam_weight = i2h
    h_weight, h_hyper_weight, h_bias, h_hyper_bias, h_hparam_weight = h2h
    pre = F.linear(x, weight, bias)
    h_pre = F.linear(h, h_weight, h_bias)
    if hparams is not None:
        # In λ's dtype, cast to x's (a float32 λ side with half data) before they touch the [B, 4N] tensors.
        s, t = reference.stacked_scales(hparams, hparam_weight, x.dtype)
        pre = reference.add_product(pre, s, F.linear(x, hyper_weight))
        if hyper_bias is not None:
            pre = reference.add_product(pre, t, hyper_bias)
        s, t = reference.stacked_scales(hparams, h_hparam_weight, x.dtype)
        h_pre = reference.add_product(h_pre, s, F.linear(h, h_hyper_weight))
        if h_hyper_bias is not None:
            h_pre = reference.add_product(h_pre, t, h_hyper_bias)
    n = c.shape[-1]
    sig, g = (pre + h_pre).split_with_sizes([3 * n, n], 1)
    f, i, o = torch.sigmoid(sig).chunk(3, 1)
    c = reference.add_product(f * c, i, torch.tanh(g))
    return o * torch.tanh(c), c


def sequence_terms(hparams, bias, hyper_bias, weight_scale, bias_scale, dtype):
    """s = λ·Vᵀ and β = b + (λ·Cᵀ) ⊙ b_h for the whole sequence (None where absent)."""
    s = beta = None
    if hparams is not None:
        s, t = reference.hparam_scales(hparams, weight_scale, bias_scale if hyper_bias is not None else None, dtype)
        if t is not None:
            beta = t * hyper_bias
    if bias is not None:
        beta = bias if beta is None else beta + bias
    return s, beta


def hyper_lstm_recurrence_forward(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                  bias_scale):
    """(out, c_T, gates, cells, z); see the module docstring."""
    T, B, G = x_proj.shape
    N = G // 4
    s, beta = sequence_terms(hparams, bias, hyper_bias, weight_scale, bias_scale, x_proj.dtype)
    out = x_proj.new_empty(T, B, N)
    cells = x_proj.new_empty(T, B, N)
    gates = x_proj.new_empty(T, B, G)
    z = x_proj.new_empty(T, B, G) if hparams is not None else x_proj.new_empty(0)
    h, c = h0, c0
    for t in range(T):
        pre = torch.addmm(x_proj[t], h, weight.t())
        if s is not None:
            pre.addcmul_(s, torch.mm(h, hyper_weight.t(), out=z[t]))
        if beta is not None:
            pre += beta
        h, c, acts = lstm_pointwise(pre, c)
        gates[t] = acts
        cells[t] = c
        out[t] = h
    c_T = cells[T - 1].clone() if T else c0.clone()
    return out, c_T, gates, cells, z


def stacked_hyper_linear_backward(backward, D, h0, out, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                   bias_scale, z, need: Sequence[bool]) -> List[Optional[Tensor]]:
    """Gradients 3..9 (λ, W_e, W_h, b, b_h, V, C) as one HyperLinear backward over the T·B stacked rows."""
    T, B, G = D.shape
    N = G // 4
    mask = [False, need[3], need[4], need[5], need[6], need[7], need[8], need[9]]
    if not any(mask):
        return [None] * 7
    h_prev = torch.cat([h0.unsqueeze(0), out[:T - 1]])[:T].reshape(T * B, N)  # h_0 .. h_{T-1}
    lam_rows = None
    if hparams is not None:
        lam_rows = hparams.unsqueeze(0).expand(T, B, hparams.shape[1]).reshape(T * B, hparams.shape[1])
    grads = backward(D.reshape(T * B, G), h_prev, lam_rows, weight, hyper_weight, hyper_bias, weight_scale,
                     bias_scale, None if hparams is None else z.reshape(T * B, G), mask)
    if grads[1] is not None:
        grads[1] = grads[1].reshape(T, B, -1).sum(0)
    return list(grads[1:])


def hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight, hyper_bias,
                                   weight_scale, bias_scale, out, gates, cells, z,
                                   output_mask: Sequence[bool] = (True,) * 10) -> List[Optional[Tensor]]:
    """Backward through time; 10 gradients (see the module docstring)."""
    need = [bool(v) for v in output_mask]
    T, B, G = gates.shape
    N = G // 4
    s = None
    if hparams is not None:
        s = reference.hparam_scales(hparams, weight_scale, None, gates.dtype)[0]
    D = gates.new_empty(T, B, G)
    dh = None
    dc = grad_cT
    for t in reversed(range(T)):
        a = gates[t]
        f, i, o, g = a[:, :N], a[:, N:2 * N], a[:, 2 * N:3 * N], a[:, 3 * N:]
        c_prev = cells[t - 1] if t else c0
        dh_t = grad_out[t] if dh is None else grad_out[t] + dh
        tc = torch.tanh(cells[t])
        dc = dc + dh_t * o * (1 - tc * tc)
        Dt = D[t]
        Dt[:, :N] = dc * c_prev * f * (1 - f)
        Dt[:, N:2 * N] = dc * g * i * (1 - i)
        Dt[:, 2 * N:3 * N] = dh_t * tc * o * (1 - o)
        Dt[:, 3 * N:] = dc * i * (1 - g * g)
        dc = dc * f
        if t or need[1]:
            dh = Dt @ weight
            if s is not None:
                dh.addmm_(Dt * s, hyper_weight)
    grads: List[Optional[Tensor]] = [None] * 10
    if need[0]:
        grads[0] = D
    if need[1]:
        grads[1] = torch.zeros_like(h0) if dh is None else dh
    if need[2]:
        grads[2] = dc.clone() if dc is grad_cT else dc
    grads[3:] = stacked_hyper_linear_backward(reference.hyper_linear_backward, D, h0, out, hparams, weight,
                                               hyper_weight, hyper_bias, weight_scale, bias_scale, z, need)
    return grads
