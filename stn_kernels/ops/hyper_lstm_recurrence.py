"""``stn_kernels::hyper_lstm_recurrence``: the recurrence of one HyperLSTM layer over a whole sequence.

One layer of the published STN language model, with λ per example [B, H] (or None for the elementary
path), given its input projection ``x_proj = i2h(x)`` (one HyperLinear call over all T·B rows, outside
this op: it has no sequential dependence):

    pre_t  = x_proj[t] + h2h(h_{t-1}) = x_proj[t] + h·W_eᵀ + s ⊙ (h·W_hᵀ) + b + t ⊙ b_h
    f, i, o = σ(pre[:, :N]), σ(pre[:, N:2N]), σ(pre[:, 2N:3N]);   g = tanh(pre[:, 3N:])
    c_t = f ⊙ c_{t-1} + i ⊙ g,   h_t = o ⊙ tanh(c_t)

Gate order (forget, input, output, cell candidate) is the official STN code's, not torch.nn.LSTM's
(i, f, g, o). s = λ·V_hᵀ and t = λ·C_hᵀ are formed once per sequence, not once per step as in the
published loop.

Why one op per layer (not per step): the op boundary costs ~70-110 µs of Python per call (see
:func:`stn_kernels.ops._support.run_op`), more than a whole fused step takes on a GPU at the PTB
shapes, so the recurrence over all T steps is one op.

``stn_kernels::hyper_lstm_recurrence(x_proj [T,B,4N], h0 [B,N], c0 [B,N], hparams? [B,H],
weight [4N,N], hyper_weight [4N,N], bias? [4N], hyper_bias? [4N], weight_scale? [4N,H],
bias_scale? [4N,H]) -> (out [T,B,N], c_T [B,N], gates [T,B,4N], cells [T,B,N], z [T,B,4N])``
    out holds h_1..h_T (h_T = out[-1]); gates (the activations), cells and z = h_{t-1}·W_hᵀ
    (empty without hparams) are saved for backward and not differentiable.
``stn_kernels::hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight,
hyper_bias, weight_scale, bias_scale, out, gates, cells, z, output_mask) -> 10 gradients``
    Backward through time per step (d_pre_t, which is also the x_proj gradient, and
    dh_{t-1}), then λ and the parameter gradients as one HyperLinear backward over the
    stacked T·B rows.

Saved for backward: x_proj (only for double backward), h0, c0, λ and the parameters
(references), out, gates, cells, z: 2·T·B·4N + 2·T·B·N values beyond the inputs.

Registration, eager path, entry branch and double backward as :mod:`stn_kernels.ops.hyper_linear`; the
public functions are :func:`stn_kernels.functional.hyper_lstm_recurrence` and
:func:`stn_kernels.functional.hyper_lstm_layer`, the modules :class:`stn_kernels.HyperLSTMCell` and
:class:`stn_kernels.HyperLSTM`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import reference_lstm
from ..backends import kernels
from ._support import (
    backward_backend,
    double_backward,
    empty_in_format_of,
    empty_unless,
    grads_or_none,
    keep_backend,
    run_op,
)

OP = "hyper_lstm_recurrence"
INPUT_NAMES = ("x_proj", "h0", "c0", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale",
               "bias_scale")


def _kernels(x: Tensor):
    return kernels(OP, x.device, empty=x.numel() == 0)


def _participating(mask: Sequence[bool], hparams_given: bool, hyper_bias_used: bool) -> list:
    """The output mask less the inputs that take no part (the hyper path without hparams)."""
    mask = list(mask)
    if not hparams_given:
        mask[3] = mask[5] = mask[7] = mask[8] = mask[9] = False
    if not hyper_bias_used:
        mask[7] = mask[9] = False
    return mask


@torch.library.custom_op("stn_kernels::hyper_lstm_recurrence", mutates_args=())
def hyper_lstm_recurrence_op(x_proj: Tensor, h0: Tensor, c0: Tensor, hparams: Optional[Tensor], weight: Tensor,
                             hyper_weight: Tensor, bias: Optional[Tensor], hyper_bias: Optional[Tensor],
                             weight_scale: Optional[Tensor], bias_scale: Optional[Tensor]
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels(x_proj).hyper_lstm_recurrence_forward(x_proj, h0, c0, hparams, weight, hyper_weight, bias,
                                                          hyper_bias, weight_scale, bias_scale)


@hyper_lstm_recurrence_op.register_fake
def _(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale):
    T, B, G = x_proj.shape
    N = G // 4
    z = x_proj.new_empty(T, B, G) if hparams is not None else x_proj.new_empty(0)
    return (x_proj.new_empty(T, B, N), x_proj.new_empty(B, N), x_proj.new_empty(T, B, G),
            x_proj.new_empty(T, B, N), z)


@torch.library.custom_op("stn_kernels::hyper_lstm_recurrence_backward", mutates_args=())
def hyper_lstm_recurrence_backward_op(grad_out: Tensor, grad_cT: Tensor, h0: Tensor, c0: Tensor,
                                      hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                                      hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                                      bias_scale: Optional[Tensor], out: Tensor, gates: Tensor, cells: Tensor,
                                      z: Tensor, output_mask: List[bool]) -> List[Tensor]:
    mask = _participating(output_mask, hparams is not None, hyper_bias is not None and bias_scale is not None)
    grads = _kernels(gates).hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight,
                                                           hyper_bias, weight_scale, bias_scale, out, gates, cells,
                                                           z, mask)
    return empty_unless(grads, gates)


@hyper_lstm_recurrence_backward_op.register_fake
def _(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, out, gates,
      cells, z, output_mask):
    mask = _participating(output_mask, hparams is not None, hyper_bias is not None and bias_scale is not None)
    like = [gates, h0, c0, hparams, weight, hyper_weight, weight.new_empty(weight.shape[0]), hyper_bias,
            weight_scale, bias_scale]
    return [empty_in_format_of(t) if (need and t is not None) else gates.new_empty(0)
            for t, need in zip(like, mask)]


def _setup_context(ctx, inputs, output):
    out, _c_T, gates, cells, z = output
    ctx.mark_non_differentiable(gates, cells, z)
    ctx.save_for_backward(*inputs, out, gates, cells, z)


def _composite(*inputs) -> Tuple[Tensor, Tensor]:
    return reference_lstm.hyper_lstm_recurrence(*inputs)


def _grads(ctx, grad_out, grad_cT, backward) -> tuple:
    """Gradients for the 10 inputs; ``backward`` is the backward op or a kernel module's function."""
    saved = ctx.saved_tensors
    inputs, (out, gates, cells, z) = saved[:10], saved[10:]
    x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale = inputs
    mask = _participating(ctx.needs_input_grad[:10], hparams is not None,
                          hyper_bias is not None and bias_scale is not None)
    mask[6] = mask[6] and bias is not None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_cT is None:
        grad_cT = torch.zeros_like(c0)
    if torch.is_grad_enabled():
        return double_backward(_composite, inputs, mask, (grad_out, grad_cT))
    grads = backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale,
                     out, gates, cells, z, mask)
    return grads_or_none(grads, mask)


hyper_lstm_recurrence_op.register_autograd(
    lambda ctx, grad_out, grad_cT, _g, _c, _z: _grads(ctx, grad_out, grad_cT, hyper_lstm_recurrence_backward_op),
    setup_context=_setup_context)


class HyperLSTMRecurrenceFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_lstm_recurrence: the same kernels without the dispatcher."""

    @staticmethod
    def forward(ctx, *inputs):
        out, c_T, gates, cells, z = keep_backend(ctx, _kernels(inputs[0])).hyper_lstm_recurrence_forward(*inputs)
        ctx.save_for_backward(*inputs, out, gates, cells, z)
        return out, c_T

    @staticmethod
    def backward(ctx, grad_out, grad_cT):
        backend = backward_backend(ctx, lambda: _kernels(ctx.saved_tensors[0]))
        return _grads(ctx, grad_out, grad_cT, backend.hyper_lstm_recurrence_backward)


def _registered(*args) -> Tuple[Tensor, Tensor]:
    out, c_T = hyper_lstm_recurrence_op(*args)[:2]
    return out, c_T


def _kernel_forward(*args) -> Tuple[Tensor, Tensor]:
    out, c_T = _kernels(args[0]).hyper_lstm_recurrence_forward(*args)[:2]
    return out, c_T


def apply_hyper_lstm_recurrence(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                bias_scale) -> Tuple[Tensor, Tensor]:
    """(out, c_T) of stn_kernels::hyper_lstm_recurrence with autograd (inputs already validated)."""
    return run_op((x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale),
                  registered=_registered, composite=_composite, kernel=_kernel_forward,
                  function=HyperLSTMRecurrenceFunction)
