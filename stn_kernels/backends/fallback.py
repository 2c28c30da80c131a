"""When the fused backends ("triton", "cuda") hand a call to :mod:`stn_kernels.reference`.

Shared by :mod:`stn_kernels.backends.cuda` and the Triton kernel modules (:mod:`stn_kernels.backends.triton`);
imports neither Triton
nor the compiled extension.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .. import reference

# The dtypes the fused kernels take; anything else (float64, ...) runs the reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def needs_reference(empty: bool, *ts: Optional[Tensor]) -> bool:
    """Empty problems and dtypes the kernels do not take go to the reference implementation."""
    return empty or any(t is not None and t.dtype not in KERNEL_DTYPES for t in ts)


def hyper_linear_needs_reference(x: Tensor, weight: Tensor, *ts: Optional[Tensor]) -> bool:
    """The rule of the HyperLinear kernels: an empty M, N or K, or a dtype of x or ``ts`` they do not take."""
    M, K = x.shape
    N = weight.shape[0]
    return needs_reference(M == 0 or N == 0 or K == 0, x, *ts)


def reference_fallback_backward(grad_out: Tensor, x: Tensor, hparams: Optional[Tensor], weight: Tensor,
                                hyper_weight: Tensor, hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                                bias_scale: Optional[Tensor], z_hyper: Optional[Tensor],
                                output_mask: Sequence[bool]) -> List[Optional[Tensor]]:
    """:func:`stn_kernels.reference.hyper_linear_backward` (same arguments) with each gradient cast to
    its input's dtype (the bias gradient to grad_out's)."""
    ref = reference.hyper_linear_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                          bias_scale, z_hyper, output_mask)
    srcs = (x, hparams, weight, hyper_weight, grad_out, hyper_bias, weight_scale, bias_scale)
    return [None if r is None else r.to(src.dtype) for r, src in zip(ref, srcs)]
