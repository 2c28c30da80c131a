"""``stn_kernels::hyper_embedding``: the STN embedding, ``out[m] = E_e[i_m] + (λ_m·Vᵀ) ⊙ E_h[i_m]``.

* ``stn_kernels::hyper_embedding(indices [M], hparams? [M, H], weight [num, D], hyper_weight [num, D],
  weight_scale? [D, H]) -> out [M, D]``.
* ``stn_kernels::hyper_embedding_backward(grad_out, indices, hparams?, weight, hyper_weight, weight_scale?,
  output_mask) -> 5 gradients`` (none for the indices).

Registration, eager path, entry branch and double backward as :mod:`stn_kernels.ops.hyper_linear`; the
public function is :func:`stn_kernels.functional.hyper_embedding`. The backend is resolved on the device
and dtype of the table.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..backends import kernels
from ._support import backward_backend, double_backward, empty_unless, fake_grads, grads_or_none, keep_backend, run_op

OP = "hyper_embedding"


def _kernels(weight: Tensor):
    return kernels(OP, weight.device, weight.shape[0], weight.dtype, weight.numel() == 0)


def _participating(mask: Sequence[bool], hparams_given: bool) -> list:
    """No gradient for the indices; without hparams none for the hyper table and V."""
    mask = [False] + list(mask[1:])
    if not hparams_given:
        mask[3] = mask[4] = False
    return mask


@torch.library.custom_op("stn_kernels::hyper_embedding", mutates_args=())
def hyper_embedding_op(indices: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                       weight_scale: Optional[Tensor]) -> Tensor:
    return _kernels(weight).hyper_embedding_forward(indices, hparams, weight, hyper_weight, weight_scale)


@hyper_embedding_op.register_fake
def _(indices, hparams, weight, hyper_weight, weight_scale):
    return weight.new_empty(indices.shape[0], weight.shape[1])


@torch.library.custom_op("stn_kernels::hyper_embedding_backward", mutates_args=())
def hyper_embedding_backward_op(grad_out: Tensor, indices: Tensor, hparams: Optional[Tensor], weight: Tensor,
                                hyper_weight: Tensor, weight_scale: Optional[Tensor],
                                output_mask: List[bool]) -> List[Tensor]:
    mask = _participating(output_mask, hparams is not None)
    grads = _kernels(weight).hyper_embedding_backward(grad_out, indices, hparams, weight, hyper_weight, weight_scale,
                                                      mask)
    return empty_unless(grads, weight)


@hyper_embedding_backward_op.register_fake
def _(grad_out, indices, hparams, weight, hyper_weight, weight_scale, output_mask):
    mask = _participating(output_mask, hparams is not None)
    return fake_grads(mask, [indices, hparams, weight, hyper_weight, weight_scale], weight)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grads(ctx, grad_out, backward):
    indices, hparams, weight, hyper_weight, weight_scale = ctx.saved_tensors
    mask = _participating(ctx.needs_input_grad[:5], hparams is not None)
    if torch.is_grad_enabled():
        return double_backward(reference.hyper_embedding, (indices, hparams, weight, hyper_weight, weight_scale),
                               mask, grad_out)
    grads = backward(grad_out, indices, hparams, weight, hyper_weight, weight_scale, mask)
    return grads_or_none(grads, mask)


hyper_embedding_op.register_autograd(lambda ctx, grad_out: _grads(ctx, grad_out, hyper_embedding_backward_op),
                                     setup_context=_setup_context)


class HyperEmbeddingFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_embedding (see HyperLinearFunction)."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return keep_backend(ctx, _kernels(inputs[2])).hyper_embedding_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        backend = backward_backend(ctx, lambda: _kernels(ctx.saved_tensors[2]))
        return _grads(ctx, grad_out, backend.hyper_embedding_backward)


def _kernel_forward(*args) -> Tensor:
    return _kernels(args[2]).hyper_embedding_forward(*args)


def apply_hyper_embedding(indices, hparams, weight, hyper_weight, weight_scale) -> Tensor:
    """out of stn_kernels::hyper_embedding with autograd (inputs already validated, indices flat int64)."""
    return run_op((indices, hparams, weight, hyper_weight, weight_scale), registered=hyper_embedding_op,
                  composite=reference.hyper_embedding, kernel=_kernel_forward, function=HyperEmbeddingFunction)
