"""The ``"cuda"`` backend of ``stn_kernels::hyper_linear``: cuBLAS GEMMs around the
hand-written kernels of the compiled extension ``stn_kernels._C`` (csrc/).

Same contract as :func:`stn_kernels.reference.hyper_linear_forward` and
:func:`stn_kernels.reference.hyper_linear_backward` (2-D: x [M, K], hparams [M, H]).

Forward: acc = x·W_eᵀ and z = x·W_hᵀ by cuBLAS (``torch.mm``), then one kernel
(private op ``stn_kernels::_cuda_hyper_linear_epilogue``) forms s = λ·Vᵀ and
t = λ·Cᵀ in registers and writes out = acc + s⊙z + b_e + t⊙b_h in the input dtype.

Backward: one kernel pass over g and z (private op
``stn_kernels::_cuda_hyper_linear_backward_reduce``) writes g⊙s, the operand of
the dx and dW_h GEMMs, and reduces dλ = (g⊙z)·V + (g⊙b_h)·C, dV = (g⊙z)ᵀ·λ,
dC = (g⊙b_h)ᵀ·λ, db_e = Σ_m g and db_h = Σ_m g⊙t; then cuBLAS does
dx = g·W_e + (g⊙s)·W_h, dW_e = gᵀ·x and dW_h = (g⊙s)ᵀ·x. With
``torch.use_deterministic_algorithms(True)`` the reductions run their deterministic
variant (per-block partial sums added in a fixed order, no float atomics), and
results repeat bitwise; otherwise the partial sums are added with float atomics.

The private ops' schemas and fake kernels are defined with the op they serve, in
:mod:`stn_kernels.ops.hyper_linear`; their CUDA kernels are registered by the extension
(``TORCH_LIBRARY_IMPL(stn_kernels, CUDA, m)`` in csrc/hyper_linear_ops.cpp) when
``stn_kernels._C`` is loaded. Importing this module does not load the extension; calling
the functions on CUDA tensors needs it loaded.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from . import extension
from .fallback import hyper_linear_needs_reference, reference_fallback_backward
from .selection import BackendUnavailableError


def _epilogue(*args) -> Tensor:
    return torch.ops.stn_kernels._cuda_hyper_linear_epilogue(*args)


def _reduce(*args):
    return torch.ops.stn_kernels._cuda_hyper_linear_backward_reduce(*args)


def _require(x: Tensor) -> None:
    why = extension.unavailable_reason(x.device)
    if why:
        raise BackendUnavailableError(f"stn_kernels::hyper_linear: backend 'cuda' cannot run here: {why}")


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
    """Forward; returns ``(out, z_hyper)`` like the reference (z_hyper empty without hparams)."""
    if hyper_linear_needs_reference(x, weight, hparams, weight_scale, bias_scale):
        return reference.hyper_linear_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                              bias_scale)
    _require(x)
    if hparams is None:
        return F.linear(x, weight, bias), x.new_empty(0)
    has_hb = hyper_bias is not None and bias_scale is not None
    acc = torch.mm(x, weight.t())
    z = torch.mm(x, hyper_weight.t())
    out = _epilogue(acc, z, hparams, weight_scale, bias, hyper_bias if has_hb else None,
                    bias_scale if has_hb else None)
    return out, z


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
    _require(x)
    g = grad_out if grad_out.dtype == x.dtype else grad_out.to(x.dtype)
    grads: List[Optional[Tensor]] = [None] * 8
    if hparams is None:
        if need[0]:
            grads[0] = g.mm(weight)
        if need[2]:
            grads[2] = g.t().mm(x)
        if need[4]:
            grads[4] = g.sum(0)
        return grads

    has_hb = hyper_bias is not None and bias_scale is not None
    need_gs = need[0] or need[3]
    need_dc = has_hb and need[7]
    need_dbh = has_hb and need[5]
    gs = None
    if need_gs or need[1] or need[6] or need_dc or need[4] or need_dbh:
        z = None
        if need[1] or need[6]:
            z = z_hyper if (z_hyper is not None and z_hyper.numel() > 0) else F.linear(x, hyper_weight)
        gs, dlam, dv, dc, dbe, dbh = _reduce(
            g, z, hparams, weight_scale, hyper_bias if has_hb else None, bias_scale if has_hb else None,
            need_gs, need[1], need[6], need_dc, need[4], need_dbh, torch.are_deterministic_algorithms_enabled())
        grads[1] = dlam if need[1] else None
        grads[6] = dv if need[6] else None
        grads[7] = dc if need_dc else None
        grads[4] = dbe if need[4] else None
        grads[5] = dbh if need_dbh else None
    if need[0]:
        grads[0] = g.mm(weight).addmm_(gs, hyper_weight)
    if need[2]:
        grads[2] = g.t().mm(x)
    if need[3]:
        grads[3] = gs.t().mm(x)
    return grads
