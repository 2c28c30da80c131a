"""``stn_kernels::hyper_linear``: the STN linear layer, on 2-D tensors as the kernels see them.

    out = x·W_eᵀ + (λ·Vᵀ) ⊙ (x·W_hᵀ) + b_e + (λ·Cᵀ) ⊙ b_h

* ``stn_kernels::hyper_linear(x, hparams?, weight, hyper_weight, bias?, hyper_bias?, weight_scale?, bias_scale?)
  -> (out, z_hyper)`` with x [M, K], hparams [M, H]; z_hyper = x·W_hyperᵀ is saved for backward
  (not differentiable; empty when hparams is None).
* ``stn_kernels::hyper_linear_backward(grad_out, x, hparams?, weight, hyper_weight, hyper_bias?, weight_scale?,
  bias_scale?, z_hyper, output_mask) -> 8 gradients`` (an empty tensor where output_mask is False).
* ``stn_kernels::_cuda_hyper_linear_epilogue`` and ``stn_kernels::_cuda_hyper_linear_backward_reduce``: the
  private pieces of the ``cuda`` backend (:mod:`stn_kernels.backends.cuda`); their schemas and fake kernels
  are defined here, their CUDA kernels registered by the compiled extension (``TORCH_LIBRARY_IMPL`` in
  csrc/hyper_linear_ops.cpp) when it loads.

Each op has a fake (meta) kernel and autograd registration, so it runs under
``torch.compile(fullgraph=True)``; eager calls go through :class:`HyperLinearFunction` over the same
kernels (see :func:`stn_kernels.ops._support.run_op` for the entry branch). The backend (reference,
triton, cuda) is chosen inside the op when it runs (:mod:`stn_kernels.backends.registry`). Double
backward (create_graph=True) differentiates the reference formulation instead of calling the backward
op, so Jacobian-vector products through the layer (Delta-STN) are exact too. The public function,
which validates and reshapes user input, is :func:`stn_kernels.functional.hyper_linear`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels
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

OP = "hyper_linear"


def _kernels(x: Tensor):
    return kernels(OP, x.device, x.shape[0], x.dtype, x.numel() == 0)


@torch.library.custom_op("stn_kernels::hyper_linear", mutates_args=())
def hyper_linear_op(x: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                    bias: Optional[Tensor], hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                    bias_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _kernels(x).hyper_linear_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                            bias_scale)


@hyper_linear_op.register_fake
def _(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale):
    out = x.new_empty(x.shape[0], weight.shape[0])
    z_hyper = x.new_empty(0) if hparams is None else x.new_empty(x.shape[0], weight.shape[0])
    return out, z_hyper


@torch.library.custom_op("stn_kernels::hyper_linear_backward", mutates_args=())
def hyper_linear_backward_op(grad_out: Tensor, x: Tensor, hparams: Optional[Tensor], weight: Tensor,
                             hyper_weight: Tensor, hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                             bias_scale: Optional[Tensor], z_hyper: Tensor, output_mask: List[bool]) -> List[Tensor]:
    mask = participating(output_mask, hparams is not None, True, hyper_bias is not None)
    grads = _kernels(x).hyper_linear_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                              bias_scale, z_hyper, mask)
    return empty_unless(grads, x)


@hyper_linear_backward_op.register_fake
def _(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, z_hyper, output_mask):
    mask = participating(output_mask, hparams is not None, True, hyper_bias is not None)
    bias_like = weight.new_empty(weight.shape[0])
    return fake_grads(mask, [x, hparams, weight, hyper_weight, bias_like, hyper_bias, weight_scale, bias_scale], x)


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs, output[1])


def _grads(ctx, grad_out, backward):
    """Gradients for the 8 inputs from the saved tensors; ``backward`` is the backward op or a kernel."""
    x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, z_hyper = ctx.saved_tensors
    mask = participating(ctx.needs_input_grad[:8], hparams is not None, bias is not None, hyper_bias is not None)
    if torch.is_grad_enabled():  # create_graph=True: stay differentiable
        return double_backward(reference.hyper_linear,
                               (x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale),
                               mask, grad_out)
    grads = backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, z_hyper, mask)
    return grads_or_none(grads, mask)


hyper_linear_op.register_autograd(lambda ctx, grad_out, _grad_z: _grads(ctx, grad_out, hyper_linear_backward_op),
                                  setup_context=_setup_context)


class HyperLinearFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_linear: the same kernels without the dispatcher's overhead."""

    @staticmethod
    def forward(ctx, *inputs):
        out, z_hyper = keep_backend(ctx, _kernels(inputs[0])).hyper_linear_forward(*inputs)
        ctx.save_for_backward(*inputs, z_hyper)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        backend = backward_backend(ctx, lambda: _kernels(ctx.saved_tensors[0]))
        return _grads(ctx, grad_out, backend.hyper_linear_backward)


def _registered(*args) -> Tensor:
    return hyper_linear_op(*args)[0]


def _kernel_forward(*args) -> Tensor:
    return _kernels(args[0]).hyper_linear_forward(*args)[0]


def apply_hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale) -> Tensor:
    """out of stn_kernels::hyper_linear with autograd (inputs already validated, 2-D)."""
    return run_op((x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale),
                  registered=_registered, composite=reference.hyper_linear, kernel=_kernel_forward,
                  function=HyperLinearFunction)


STACKED = SimpleNamespace(name="hyper_linear", forward="hyper_linear_forward", backward="hyper_linear_backward",
                          stacked_forward="hyper_linear_stacked_forward",
                          stacked_backward="hyper_linear_stacked_backward", reference=reference.hyper_linear,
                          plain_torch=None)  # the Function's written-out backward is faster here


def apply_hyper_linear_stacked(backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight) -> Tensor:
    """out of the op for :class:`stn_kernels.HyperLinear`'s fast path: V and C stacked as ``hparam_weight``
    [2N, H], ``backend`` the kernels module resolved for this call; inputs validated, 2-D, eager only."""
    return run_stacked(STACKED, backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight)


# ----------------------------------------------------------------------------- the cuda backend's private ops

CUDA_EPILOGUE_OP = "stn_kernels::_cuda_hyper_linear_epilogue"
CUDA_REDUCE_OP = "stn_kernels::_cuda_hyper_linear_backward_reduce"
CUDA_SCHEMAS = {
    CUDA_EPILOGUE_OP: "_cuda_hyper_linear_epilogue(Tensor? acc, Tensor z, Tensor hparams, Tensor weight_scale, "
                      "Tensor? bias, Tensor? hyper_bias, Tensor? bias_scale) -> Tensor",
    CUDA_REDUCE_OP: "_cuda_hyper_linear_backward_reduce(Tensor grad_out, Tensor? z_hyper, Tensor hparams, "
                    "Tensor weight_scale, Tensor? hyper_bias, Tensor? bias_scale, bool grad_scaled, "
                    "bool need_hparams, bool need_weight_scale, bool need_bias_scale, bool need_bias, "
                    "bool need_hyper_bias, bool deterministic) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}

_cuda_lib = torch.library.Library("stn_kernels", "FRAGMENT")
for _schema in CUDA_SCHEMAS.values():
    _cuda_lib.define(_schema)


@torch.library.register_fake(CUDA_EPILOGUE_OP, lib=_cuda_lib)
def _(acc, z, hparams, weight_scale, bias, hyper_bias, bias_scale):
    return z.new_empty(z.shape)


@torch.library.register_fake(CUDA_REDUCE_OP, lib=_cuda_lib)
def _(grad_out, z_hyper, hparams, weight_scale, hyper_bias, bias_scale, grad_scaled, need_hparams,
      need_weight_scale, need_bias_scale, need_bias, need_hyper_bias, deterministic):
    M, N = grad_out.shape
    H = hparams.shape[1]
    has_hb = hyper_bias is not None and bias_scale is not None

    def none():
        return grad_out.new_empty(0)

    return (grad_out.new_empty(M, N) if grad_scaled else none(),
            hparams.new_empty(M, H) if need_hparams else none(),
            weight_scale.new_empty(N, H) if need_weight_scale else none(),
            bias_scale.new_empty(N, H) if (need_bias_scale and has_hb) else none(),
            grad_out.new_empty(N) if need_bias else none(),
            hyper_bias.new_empty(N) if (need_hyper_bias and has_hb) else none())
