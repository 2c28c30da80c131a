"""Public functional API: validate, normalise layout and dtype once, then call the ops.

``hparams`` is [B, H] (one row per example, shared across any middle dims of the
input), [H] (shared by the whole batch) or None (the elementary path only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import ops
from ._validation import (autocast_dtype, check_dtype, check_hparams, check_same_device, check_shape,
                          check_tensor, rows_of_hparams)


def _check_hyper_params(hparams, weight_scale, bias_scale, hyper_bias, out_features):
    """weight_scale (and bias_scale with a hyper bias) must come with hparams; returns H."""
    if hparams is None:
        return weight_scale.shape[-1] if isinstance(weight_scale, Tensor) else 0
    if weight_scale is None:
        raise ValueError("weight_scale: required when hparams is given, got None")
    check_tensor(weight_scale, "weight_scale")
    if weight_scale.dim() != 2 or weight_scale.shape[0] != out_features:
        raise ValueError(f"weight_scale: expected shape [{out_features}, H], got {tuple(weight_scale.shape)}")
    if hyper_bias is not None and bias_scale is None:
        raise ValueError("bias_scale: required when hparams and hyper_bias are given, got None")
    if bias_scale is not None:
        check_tensor(bias_scale, "bias_scale")
        check_shape(bias_scale, "bias_scale", weight_scale.shape)
    return weight_scale.shape[1]


def _autocast(device_type, tensors, hyper_tensors):
    """Under torch.autocast: input, weights and biases in the autocast dtype, λ, V, C in float32."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors, hyper_tensors
    cast = [None if t is None else t.to(dtype) for t in tensors]
    cast_hyper = [None if t is None else t.float() for t in hyper_tensors]
    return cast, cast_hyper


def hyper_linear(input: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                 bias: Optional[Tensor] = None, hyper_bias: Optional[Tensor] = None,
                 weight_scale: Optional[Tensor] = None, bias_scale: Optional[Tensor] = None) -> Tensor:
    """out[b] = W·x[b] + (V·λ_b) ⊙ (W_hyper·x[b]) + bias + (C·λ_b) ⊙ hyper_bias.

    input [B, K] or [B, *, K] (or [K] with hparams [H] or None); weight and
    hyper_weight [N, K]; bias and hyper_bias [N]; weight_scale V and bias_scale C
    [N, H]. Returns [..., N] in the input's dtype.
    """
    check_tensor(input, "input")
    check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [out_features, in_features], got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_tensor(hyper_weight, "hyper_weight")
    check_shape(hyper_weight, "hyper_weight", weight.shape)
    for name, b in (("bias", bias), ("hyper_bias", hyper_bias)):
        if b is not None:
            check_tensor(b, name)
            check_shape(b, name, (out_features,))
    if input.dim() == 0 or input.shape[-1] != in_features:
        raise ValueError(f"input: expected shape [B, {in_features}] or [B, *, {in_features}], "
                         f"got {tuple(input.shape)}")
    if input.dim() == 1:
        if hparams is not None and check_tensor(hparams, "hparams").dim() == 2:
            raise ValueError(f"input: expected shape [B, {in_features}] to go with per-example hparams of shape "
                             f"{tuple(hparams.shape)}, got {tuple(input.shape)}")
        return hyper_linear(input.unsqueeze(0), hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                            bias_scale).squeeze(0)
    num_hparams = _check_hyper_params(hparams, weight_scale, bias_scale, hyper_bias, out_features)
    (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale) = _autocast(
        input.device.type, (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale))
    check_dtype(input.dtype, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias)
    check_same_device(input, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias,
                      weight_scale=weight_scale, bias_scale=bias_scale)
    batch = input.shape[0]
    check_hparams(hparams, input, "input", num_hparams, batch, weight_scale, bias_scale)
    if hparams is None:
        weight_scale = bias_scale = None
    elif hyper_bias is None:
        bias_scale = None
    rows = rows_of_hparams(hparams, batch, math.prod(input.shape[1:-1]))
    if input.dim() == 2:  # no reshape: each one is an autograd node, a few µs of Python per call
        return ops.apply_hyper_linear(input, rows, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)
    x = input.reshape(-1, in_features)
    out = ops.apply_hyper_linear(x, rows, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)
    return out.reshape(*input.shape[:-1], out_features)


def hyper_conv2d(input: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                 bias: Optional[Tensor] = None, hyper_bias: Optional[Tensor] = None,
                 weight_scale: Optional[Tensor] = None, bias_scale: Optional[Tensor] = None,
                 stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """out[b,c] = conv(x, W)[b,c] + s[b,c]·conv(x, W_hyper)[b,c] + bias[c] + t[b,c]·hyper_bias[c], s = λ·Vᵀ, t = λ·Cᵀ.

    input [B, C_in, H, W] (any memory format); weight and hyper_weight
    [C_out, C_in/groups, kh, kw]; hparams [B, H], [H] or None.
    """
    check_tensor(input, "input")
    check_tensor(weight, "weight")
    if weight.dim() != 4:
        raise ValueError(f"weight: expected shape [out_channels, in_channels/groups, kh, kw], "
                         f"got {tuple(weight.shape)}")
    check_tensor(hyper_weight, "hyper_weight")
    check_shape(hyper_weight, "hyper_weight", weight.shape)
    out_channels = weight.shape[0]
    for name, b in (("bias", bias), ("hyper_bias", hyper_bias)):
        if b is not None:
            check_tensor(b, name)
            check_shape(b, name, (out_channels,))
    if not isinstance(groups, int) or groups < 1 or out_channels % groups:
        raise ValueError(f"groups: expected a positive int dividing out_channels={out_channels}, got {groups!r}")
    in_channels = weight.shape[1] * groups
    if input.dim() != 4 or input.shape[1] != in_channels:
        raise ValueError(f"input: expected shape [B, {in_channels}, H, W], got {tuple(input.shape)}")
    stride, padding, dilation = (list(_pair(v)) for v in (stride, padding, dilation))
    for name, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if any(not isinstance(v, int) or v < low for v in values):
            raise ValueError(f"{name}: expected ints >= {low}, got {values}")
    _, _, out_h, out_w = ops.conv2d_output_shape(input.shape, weight.shape, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input: spatial size {tuple(input.shape[2:])} is smaller than the dilated kernel "
                         f"{tuple(weight.shape[2:])} with padding {padding}")
    num_hparams = _check_hyper_params(hparams, weight_scale, bias_scale, hyper_bias, out_channels)
    (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale) = _autocast(
        input.device.type, (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale))
    check_dtype(input.dtype, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias)
    check_same_device(input, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias,
                      weight_scale=weight_scale, bias_scale=bias_scale)
    check_hparams(hparams, input, "input", num_hparams, input.shape[0], weight_scale, bias_scale)
    if hparams is None:
        weight_scale = bias_scale = None
    elif hyper_bias is None:
        bias_scale = None
    rows = rows_of_hparams(hparams, input.shape[0], 1)
    out = ops.apply_hyper_conv2d(input, rows, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                                 stride, padding, dilation, groups)
    return out


def hyper_embedding(input: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                    weight_scale: Optional[Tensor] = None) -> Tensor:
    """out[b, ...] = weight[i] + (V·λ_b) ⊙ hyper_weight[i] for the indices i = input[b, ...].

    input: integer indices [B, *] (or [B]); weight and hyper_weight [num_embeddings, D];
    weight_scale V [D, H]; hparams [B, H], [H] or None. Returns [*input.shape, D].
    """
    check_tensor(input, "input", floating=False)
    if input.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input: expected integer indices (torch.int64 or torch.int32), got dtype {input.dtype}")
    check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [num_embeddings, embedding_dim], got {tuple(weight.shape)}")
    check_tensor(hyper_weight, "hyper_weight")
    check_shape(hyper_weight, "hyper_weight", weight.shape)
    num_embeddings, dim = weight.shape
    if input.dim() == 0:
        raise ValueError(f"input: expected indices of shape [B] or [B, *], got shape {tuple(input.shape)}")
    num_hparams = _check_hyper_params(hparams, weight_scale, None, None, dim)
    check_dtype(weight.dtype, "weight", hyper_weight=hyper_weight)
    check_same_device(weight, "weight", input=input, hyper_weight=hyper_weight, weight_scale=weight_scale)
    check_hparams(hparams, weight, "weight", num_hparams, input.shape[0], weight_scale, None)
    if not torch.compiler.is_compiling() and input.numel():
        low, high = int(input.min()), int(input.max())
        if low < 0 or high >= num_embeddings:
            raise ValueError(f"input: expected indices in [0, {num_embeddings - 1}], got values in [{low}, {high}]")
    if hparams is None:
        weight_scale = None
    rows = rows_of_hparams(hparams, input.shape[0], math.prod(input.shape[1:]))
    out = ops.apply_hyper_embedding(input.reshape(-1).long(), rows, weight, hyper_weight, weight_scale)
    return out.reshape(*input.shape, dim)
