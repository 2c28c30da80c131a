"""``stn_kernels::hyper_conv2d``: the STN conv layer, per example b and output channel c,

    out[b,c] = conv(x, W_e)[b,c] + s[b,c]·conv(x, W_h)[b,c] + b_e[c] + t[b,c]·b_h[c],   s = λ·Vᵀ, t = λ·Cᵀ

* ``stn_kernels::hyper_conv2d(x, hparams?, weight, hyper_weight, bias?, hyper_bias?, weight_scale?, bias_scale?,
  stride, padding, dilation, groups) -> (out, z_hyper)`` with x [B, C_in, H, W] in any memory format;
  z_hyper = conv(x, W_h) is saved for backward (empty without hparams).
* ``stn_kernels::hyper_conv2d_backward(grad_out, x, hparams?, weight, hyper_weight, hyper_bias?, weight_scale?,
  bias_scale?, z_hyper, stride, padding, dilation, groups, output_mask) -> 8 gradients``.

Registration, eager path, entry branch and double backward as :mod:`stn_kernels.ops.hyper_linear`; the
public function is :func:`stn_kernels.functional.hyper_conv2d`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels
from ..reference import dense_format
from ._support import (
    backward_backend,
    double_backward,
    empty_unless,
    fake_grads,
    grads_or_none,
    keep_backend,
    participating,
    run_op,
    run_stacked,
)

OP = "hyper_conv2d"


def _kernels(x: Tensor):
    return kernels(OP, x.device, x.shape[0], x.dtype, x.numel() == 0)


def conv2d_output_shape(x_shape, weight_shape, stride, padding, dilation):
    (batch, _, height, width), (channels, _, kh, kw) = x_shape, weight_shape
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return batch, channels, out_h, out_w


@torch.library.custom_op("stn_kernels::hyper_conv2d", mutates_args=())
def hyper_conv2d_op(x: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                    bias: Optional[Tensor], hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                    bias_scale: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int],
                    groups: int) -> tuple[Tensor, Tensor]:
    return _kernels(x).hyper_conv2d_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                            bias_scale, stride, padding, dilation, groups)


@hyper_conv2d_op.register_fake
def _(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride, padding, dilation, groups):
    shape = conv2d_output_shape(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))
    return out, (x.new_empty(0) if hparams is None else torch.empty_like(out))


@torch.library.custom_op("stn_kernels::hyper_conv2d_backward", mutates_args=())
def hyper_conv2d_backward_op(grad_out: Tensor, x: Tensor, hparams: Optional[Tensor], weight: Tensor,
                             hyper_weight: Tensor, hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                             bias_scale: Optional[Tensor], z_hyper: Tensor, stride: List[int], padding: List[int],
                             dilation: List[int], groups: int, output_mask: List[bool]) -> List[Tensor]:
    mask = participating(output_mask, hparams is not None, True, hyper_bias is not None)
    grads = _kernels(x).hyper_conv2d_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                              bias_scale, z_hyper, stride, padding, dilation, groups, mask)
    return empty_unless(grads, x)


@hyper_conv2d_backward_op.register_fake
def _(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, z_hyper, stride, padding,
      dilation, groups, output_mask):
    mask = participating(output_mask, hparams is not None, True, hyper_bias is not None)
    bias_like = weight.new_empty(weight.shape[0])
    return fake_grads(mask, [x, hparams, weight, hyper_weight, bias_like, hyper_bias, weight_scale, bias_scale], x)


def _setup_context(ctx, inputs, output):
    ctx.conv_args = tuple(inputs[8:])
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs[:8], output[1])


def _grads(ctx, grad_out, backward):
    x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, z_hyper = ctx.saved_tensors
    mask = participating(ctx.needs_input_grad[:8], hparams is not None, bias is not None, hyper_bias is not None)
    if torch.is_grad_enabled():
        grads = double_backward(lambda *t: reference.hyper_conv2d(*t, *ctx.conv_args),
                                (x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale),
                                mask, grad_out)
    else:
        grads = grads_or_none(backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                       bias_scale, z_hyper, *ctx.conv_args, mask), mask)
    return grads + (None,) * 4


hyper_conv2d_op.register_autograd(lambda ctx, grad_out, _grad_z: _grads(ctx, grad_out, hyper_conv2d_backward_op),
                                  setup_context=_setup_context)


class HyperConv2dFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_conv2d (see HyperLinearFunction)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, z_hyper = keep_backend(ctx, _kernels(inputs[0])).hyper_conv2d_forward(*inputs)
        ctx.conv_args = tuple(inputs[8:])
        ctx.save_for_backward(*inputs[:8], z_hyper)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backend = backward_backend(ctx, lambda: _kernels(ctx.saved_tensors[0]))
        return _grads(ctx, grad_out, backend.hyper_conv2d_backward)


def _registered(*args) -> Tensor:
    return hyper_conv2d_op(*args)[0]


def _kernel_forward(*args) -> Tensor:
    return _kernels(args[0]).hyper_conv2d_forward(*args)[0]


def apply_hyper_conv2d(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride,
                       padding, dilation, groups) -> Tensor:
    """out of stn_kernels::hyper_conv2d with autograd (inputs already validated)."""
    return run_op((x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride, padding,
                   dilation, groups), registered=_registered, composite=reference.hyper_conv2d,
                  kernel=_kernel_forward, function=HyperConv2dFunction)


STACKED = SimpleNamespace(name="hyper_conv2d", forward="hyper_conv2d_forward", backward="hyper_conv2d_backward",
                          stacked_forward="hyper_conv2d_stacked_forward",
                          stacked_backward="hyper_conv2d_stacked_backward", reference=reference.hyper_conv2d,
                          plain_torch=reference)


def apply_hyper_conv2d_stacked(backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, stride,
                               padding, dilation, groups) -> Tensor:
    """out of the op for :class:`stn_kernels.HyperConv2d`'s fast path (see
    :func:`stn_kernels.ops.hyper_linear.apply_hyper_linear_stacked`)."""
    return run_stacked(STACKED, backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, stride,
                       padding, dilation, groups)
