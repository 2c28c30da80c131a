"""Public functional API: validate (:mod:`stn_kernels._validation`), normalise layout and dtype once,
then call the op (:mod:`stn_kernels.ops`).

``hparams`` is [B, H] (one row per example, shared across any middle dims of the
input), [H] (shared by the whole batch) or None (the elementary path only).

==============================  =======================================================
function                        op
==============================  =======================================================
:func:`hyper_linear`            ``stn_kernels::hyper_linear``
:func:`hyper_conv2d`            ``stn_kernels::hyper_conv2d``
:func:`hyper_embedding`         ``stn_kernels::hyper_embedding``
:func:`hyper_lstm_recurrence`   ``stn_kernels::hyper_lstm_recurrence``
:func:`hyper_lstm_layer`        ``hyper_linear`` (i2h over all steps) + ``hyper_lstm_recurrence``
:func:`per_example_dropout`     ``stn_kernels::per_example_dropout``
:func:`augment_images`          ``stn_kernels::augment`` (also :func:`color_jitter`, :func:`cutout`,
                                :func:`input_scale`; the draws: :func:`augment_draws`)
:func:`affine`                  ``stn_kernels::affine`` (the draws: :func:`affine_draws`)
==============================  =======================================================
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference
from ._validation import (
    any_autocast,
    autocast_operands,
    check_conv_geometry,
    check_dtype,
    check_groups,
    check_hidden_params,
    check_holes_fit,
    check_hparams,
    check_hyper_params,
    check_images,
    check_indices,
    check_lstm_hparams,
    check_max_holes,
    check_rates,
    check_same_device,
    check_scales_dtype,
    check_shape,
    check_strength,
    check_tensor,
    hparams_side,
    rows_of_hparams,
    seed_offset_tensor,
)
from .backends import kernels
from .backends.host import host_ops
from .ops import (
    apply_affine,
    apply_augment,
    apply_hyper_conv2d,
    apply_hyper_embedding,
    apply_hyper_linear,
    apply_hyper_lstm_recurrence,
    apply_per_example_dropout,
    eager,
)
from .ops.hyper_conv2d import conv2d_output_shape


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
    num_hparams = check_hyper_params(hparams, weight_scale, bias_scale, hyper_bias, out_features)
    (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale) = autocast_operands(
        input.device.type, (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale))
    check_dtype(input.dtype, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias)
    check_same_device(input, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias,
                      weight_scale=weight_scale, bias_scale=bias_scale)
    batch = input.shape[0]
    check_hparams(hparams, input, "input", num_hparams, batch)
    hparams, weight_scale, bias_scale = _hparams_side(hparams, input, weight_scale, bias_scale, hyper_bias)
    if input.dim() >= 3:
        out = hyper_linear_by_example(input, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                                      0)
        if out is not None:
            return out
    rows = rows_of_hparams(hparams, batch, math.prod(input.shape[1:-1]))
    if input.dim() == 2:  # no reshape: each one is an autograd node, a few µs of Python per call
        return apply_hyper_linear(input, rows, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)
    x = input.reshape(-1, in_features)
    out = apply_hyper_linear(x, rows, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)
    return out.reshape(*input.shape[:-1], out_features)


def hyper_linear_by_example(input: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                            bias: Optional[Tensor], hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                            bias_scale: Optional[Tensor], batch_dim: int) -> Optional[Tensor]:
    """The output of a sequence ``input`` [..., B, ..., K] whose examples lie along ``batch_dim`` (0 or 1) with λ
    [B, H] through the compiled host path (csrc/host/hyper_linear_seq.cpp: the scales formed once per example, one
    elementwise pass each way, no λ rows repeated over the sequence), or None where it does not run: not eager,
    autocast, no per-example λ, not CPU tensors of one float dtype, not the reference backend. Arguments checked by
    the caller (:func:`hyper_linear`, or a module)."""
    if hparams is None or hparams.dim() != 2 or weight_scale is None or not eager() or any_autocast() \
            or hparams.shape[1] != weight_scale.shape[1]:
        return None
    host = host_ops(input.device, input.dtype, hparams.dtype)
    if host is None or any(t is not None and (t.dtype != input.dtype or t.device != input.device)
                           for t in (weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)):
        return None
    rows = input.numel() // max(input.shape[-1], 1)
    if input.numel() == 0 or kernels("hyper_linear", input.device, rows, input.dtype) is not reference:
        return None
    return host.hyper_linear_seq(input, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                 bias_scale if hyper_bias is not None else None, batch_dim)


def _hparams_side(hparams, data: Tensor, weight_scale, bias_scale, hyper_bias, data_name: str = "input") -> list:
    """(λ, V, C) as the op takes them: None where unused (no λ; C without a hyper bias), else in one dtype
    (:func:`stn_kernels._validation.hparams_side`: V and C may be float32 or data's half dtype, as λ)."""
    if hparams is None:
        return [None, None, None]
    if hyper_bias is None:
        bias_scale = None
    check_scales_dtype(data, data_name, weight_scale=weight_scale, bias_scale=bias_scale)
    return hparams_side(hparams, weight_scale, bias_scale)


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
    check_groups(groups, out_channels)
    in_channels = weight.shape[1] * groups
    if input.dim() != 4 or input.shape[1] != in_channels:
        raise ValueError(f"input: expected shape [B, {in_channels}, H, W], got {tuple(input.shape)}")
    stride, padding, dilation = check_conv_geometry(stride, padding, dilation)
    _, _, out_h, out_w = conv2d_output_shape(input.shape, weight.shape, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"input: spatial size {tuple(input.shape[2:])} is smaller than the dilated kernel "
                         f"{tuple(weight.shape[2:])} with padding {padding}")
    num_hparams = check_hyper_params(hparams, weight_scale, bias_scale, hyper_bias, out_channels)
    (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale) = autocast_operands(
        input.device.type, (input, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale))
    check_dtype(input.dtype, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias)
    check_same_device(input, "input", weight=weight, hyper_weight=hyper_weight, bias=bias, hyper_bias=hyper_bias,
                      weight_scale=weight_scale, bias_scale=bias_scale)
    check_hparams(hparams, input, "input", num_hparams, input.shape[0])
    hparams, weight_scale, bias_scale = _hparams_side(hparams, input, weight_scale, bias_scale, hyper_bias)
    rows = rows_of_hparams(hparams, input.shape[0], 1)
    out = apply_hyper_conv2d(input, rows, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
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
    num_hparams = check_hyper_params(hparams, weight_scale, None, None, dim)
    check_dtype(weight.dtype, "weight", hyper_weight=hyper_weight)
    check_same_device(weight, "weight", input=input, hyper_weight=hyper_weight, weight_scale=weight_scale)
    check_hparams(hparams, weight, "weight", num_hparams, input.shape[0])
    check_indices(input, num_embeddings)
    hparams, weight_scale, _ = _hparams_side(hparams, weight, weight_scale, None, None, "weight")
    rows = rows_of_hparams(hparams, input.shape[0], math.prod(input.shape[1:]))
    out = apply_hyper_embedding(input.reshape(-1).long(), rows, weight, hyper_weight, weight_scale)
    return out.reshape(*input.shape, dim)


# ----------------------------------------------------------------------------- HyperLSTM

def hyper_lstm_recurrence(x_proj: Tensor, h0: Tensor, c0: Tensor, hparams: Optional[Tensor], weight: Tensor,
                          hyper_weight: Tensor, bias: Optional[Tensor] = None, hyper_bias: Optional[Tensor] = None,
                          weight_scale: Optional[Tensor] = None, bias_scale: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """The recurrence of one layer given its input projection: ``(out, (h_T, c_T))``.

    x_proj [T, B, 4N] (time-major; any strides, e.g. the transpose of a batch-first
    projection), h0 and c0 [B, N], hparams [B, H], [H] or None, weight and hyper_weight
    (the h2h W_e, W_h) [4N, N], bias and hyper_bias [4N], weight_scale V and bias_scale C
    [4N, H]. out [T, B, N] holds h_1..h_T; h_T is ``out[-1]`` (h0 when T = 0).
    """
    check_tensor(x_proj, "x_proj")
    N = check_hidden_params(weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                             None if hparams is None else check_tensor(hparams, "hparams"))
    if x_proj.dim() != 3 or x_proj.shape[2] != 4 * N:
        raise ValueError(f"x_proj: expected shape [T, B, {4 * N}] (4·hidden_size = 4·{N}), got "
                         f"{tuple(x_proj.shape)}")
    T, B = x_proj.shape[:2]
    for name, t in (("h0", h0), ("c0", c0)):
        check_tensor(t, name)
        check_shape(t, name, (B, N))
    (x_proj, h0, c0, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale) = \
        autocast_operands(x_proj.device.type, (x_proj, h0, c0, weight, hyper_weight, bias, hyper_bias),
                          (hparams, weight_scale, bias_scale))
    check_dtype(x_proj.dtype, "x_proj", h0=h0, c0=c0, weight=weight, hyper_weight=hyper_weight, bias=bias,
                hyper_bias=hyper_bias)
    check_same_device(x_proj, "x_proj", h0=h0, c0=c0, weight=weight, hyper_weight=hyper_weight, bias=bias,
                      hyper_bias=hyper_bias, weight_scale=weight_scale, bias_scale=bias_scale)
    hparams = check_lstm_hparams(hparams, B, x_proj, "x_proj")
    hparams, weight_scale, bias_scale = _hparams_side(hparams, x_proj, weight_scale, bias_scale, hyper_bias, "x_proj")
    out, c_T = apply_hyper_lstm_recurrence(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias,
                                           weight_scale, bias_scale)
    h_T = out[-1] if T else h0
    return out, (h_T, c_T)


HyperParams = Sequence[Optional[Tensor]]


def _unpack(params: HyperParams, name: str) -> list:
    """(weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale), missing trailing entries None."""
    if isinstance(params, Tensor) or not isinstance(params, (tuple, list)) or not 2 <= len(params) <= 6:
        raise TypeError(f"{name}: expected a tuple (weight, hyper_weight[, bias, hyper_bias, weight_scale, "
                        f"bias_scale]), got {type(params).__name__}"
                        + (f" of length {len(params)}" if isinstance(params, (tuple, list)) else ""))
    return list(params) + [None] * (6 - len(params))


def _check_hidden_state(hx, batch: int, hidden: int, like: Tensor):
    if hx is None:
        z = like.new_zeros(batch, hidden)
        return z, z
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"hx: expected a tuple (h0, c0) of tensors [B, hidden_size], got {type(hx).__name__}")
    return hx[0], hx[1]


def hyper_lstm_layer(input: Tensor, hparams: Optional[Tensor], i2h: HyperParams, h2h: HyperParams,
                     hx: Optional[Tuple[Tensor, Tensor]] = None, batch_first: bool = False
                     ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One HyperLSTM layer over a sequence: ``(output, (h_T, c_T))``.

    input [T, B, K] ([B, T, K] with batch_first); hparams [B, H], [H] or None; i2h and h2h
    tuples (weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale) with weights
    [4N, K] and [4N, N], biases [4N], scales [4N, H] (trailing entries may be left out);
    hx (h0, c0) [B, N] each, zeros when None. output [T, B, N] ([B, T, N] with batch_first).

    The i2h projection of all T·B rows is one ``stn_kernels.hyper_linear`` call (λ repeated
    per time step); the recurrence is one ``stn_kernels::hyper_lstm_recurrence`` op.
    DropConnect: pass masked h2h weights (see :class:`HyperLSTMCell`).
    """
    check_tensor(input, "input")
    wi, whi, bi, hbi, vi, ci = _unpack(i2h, "i2h")
    wh, whh, bh, hbh, vh, ch = _unpack(h2h, "h2h")
    check_tensor(wi, "i2h weight")
    N = check_hidden_params(wh, whh, bh, hbh, vh, ch, None if hparams is None else check_tensor(hparams, "hparams"),
                             "h2h ")
    if wi.dim() != 2 or wi.shape[0] != 4 * N:
        raise ValueError(f"i2h weight: expected shape [{4 * N}, input_size] (4·hidden_size rows, as the h2h "
                         f"weight), got {tuple(wi.shape)}")
    K = wi.shape[1]
    if input.dim() != 3 or input.shape[2] != K:
        layout = "[B, T, " if batch_first else "[T, B, "
        raise ValueError(f"input: expected shape {layout}{K}] ({'batch_first' if batch_first else 'time-major'}), "
                         f"got {tuple(input.shape)}")
    T, B = (input.shape[1], input.shape[0]) if batch_first else (input.shape[0], input.shape[1])
    h0, c0 = _check_hidden_state(hx, B, N, input)
    if hparams is not None and hparams.dim() == 2 and hparams.shape[0] != B:
        raise ValueError(f"hparams: expected shape [B, H] with B = {B} (the batch size) or [H], "
                         f"got {tuple(hparams.shape)}")
    if batch_first:
        x_proj = hyper_linear(input, hparams, wi, whi, bi, hbi, vi, ci).transpose(0, 1)
    else:
        rows = hparams
        if hparams is not None and hparams.dim() == 2:
            rows = hparams.unsqueeze(0).expand(T, B, hparams.shape[1]).reshape(T * B, hparams.shape[1])
        x_proj = hyper_linear(input.reshape(T * B, K), rows, wi, whi, bi, hbi, vi, ci).view(T, B, 4 * N)
    out, state = hyper_lstm_recurrence(x_proj, h0, c0, hparams, wh, whh, bh, hbh, vh, ch)
    return (out.transpose(0, 1) if batch_first else out), state


def dropconnect_mask(weight: Tensor, p: Union[float, Tensor], generator: Optional[torch.Generator] = None
                     ) -> Optional[Tensor]:
    """One Bernoulli(1 − p) keep-mask shaped like ``weight``, scaled by 1/(1 − p); None when p is 0.

    p: a float in [0, 1) or a one-element tensor (e.g. a column of the published hparam tensor);
    it gets no gradient.
    """
    if isinstance(p, Tensor):
        if p.numel() != 1:
            raise ValueError(f"dropconnect: expected a float or a one-element tensor, got shape {tuple(p.shape)}")
        keep = 1.0 - p.detach().reshape(()).to(device=weight.device, dtype=weight.dtype)
        u = torch.rand(weight.shape, device=weight.device, dtype=weight.dtype, generator=generator)
        return (u < keep).to(weight.dtype) / keep
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropconnect: expected a probability in [0, 1), got {p!r}")
    if p == 0:
        return None
    u = torch.rand(weight.shape, device=weight.device, dtype=weight.dtype, generator=generator)
    return (u < 1.0 - p).to(weight.dtype) / (1.0 - p)


# ----------------------------------------------------------------------------- per-example dropout

def per_example_dropout(x: Tensor, rates: Union[Tensor, float], *, training: bool = True, per_channel: bool = False,
                        seed: Union[int, Tensor, None] = None, offset: int = 0,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """Dropout with one rate per example: x [B, ...], rates [B] (or a float or 0-d tensor for all).

    Hard Bernoulli masks with keep probability 1 − p_b and inverted scaling 1/(1 − p_b); dropped
    elements are exactly 0. ``per_channel=True`` drops whole channels (x [B, C, *spatial]), as
    ``dropout2d`` does for conv feature maps. ``training=False`` returns x unchanged (validation
    and evaluation, as in the published code).

    The mask is a pure function of (seed, offset + unit index): pass ``seed`` (an int or int64
    tensor) and ``offset`` to reproduce one, or leave ``seed=None`` to draw a fresh seed from
    torch's generator (``generator`` or the default one; ``torch.manual_seed`` makes it
    reproducible). A call consumes the counters offset … offset + units − 1, with units the number
    of elements (or of B·C channels). The rates get no gradient. The output is contiguous.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or (per_channel and x.dim() < 2):
        expected = "[B, C, ...]" if per_channel else "[B, ...]"
        raise ValueError(f"x: expected shape {expected}, got {tuple(x.shape)}")
    rates = check_rates(rates, x)
    if not training:
        return x
    unit_size = math.prod(x.shape[2:]) if per_channel else 1
    seed_offset = seed_offset_tensor(seed, offset, x.device, generator)
    return apply_per_example_dropout(x, rates, seed_offset, max(unit_size, 1))


def per_example_channel_dropout(x: Tensor, rates: Union[Tensor, float], **kwargs) -> Tensor:
    """:func:`per_example_dropout` with ``per_channel=True``: whole feature maps of x [B, C, H, W]."""
    return per_example_dropout(x, rates, per_channel=True, **kwargs)


# ----------------------------------------------------------------------------- per-example data augmentation

def augment_draws(images: Tensor, *, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, holes=0, length=0,
                  scale=0.0, max_holes: Optional[int] = None, random_order: bool = True,
                  seed: Union[int, Tensor, None] = None, offset: int = 0,
                  generator: Optional[torch.Generator] = None):
    """The per-example parameters :func:`augment_images` applies with these arguments (an
    :class:`stn_kernels.reference_augment.AugmentDraws`: jitter factors and order, hole centres and
    boxes, scale factors); the same seed and offset give the same draws on every backend and device.
    Arguments as :func:`augment_images`."""
    from .reference_augment import MAX_HOLES, draw

    color = any(isinstance(v, Tensor) or v != 0 for v in (saturation, hue))
    check_images(images, color=color, allow_uint8=True)  # the draws depend on the shape alone
    if (not color and images.shape[1] not in (1, 3)
            and any(isinstance(v, Tensor) or v != 0 for v in (brightness, contrast))):
        raise ValueError(f"images: expected 1 or 3 channels for brightness and contrast (3 channels, RGB, for "
                         f"saturation and hue), got shape {tuple(images.shape)}")
    strengths = {name: check_strength(value, name, images, 0.0, high) for name, value, high in (
        ("brightness", brightness, math.inf), ("contrast", contrast, math.inf),
        ("saturation", saturation, math.inf), ("hue", hue, 0.5), ("holes", holes, math.inf),
        ("length", length, math.inf), ("scale", scale, math.inf))}
    if not isinstance(random_order, bool):
        raise TypeError(f"random_order: expected a bool, got {type(random_order).__name__}")
    max_holes = check_max_holes(max_holes, holes, MAX_HOLES)
    check_holes_fit(strengths["holes"], max_holes)
    seed_offset = seed_offset_tensor(seed, offset, images.device, generator)
    positions = sum(isinstance(v, Tensor) or v != 0 for v in (brightness, contrast, saturation, hue))
    return draw(images.shape[0], images.shape[2], images.shape[3], seed_offset, max_holes=max_holes,
                random_order=random_order, positions=positions, **strengths)


def augment_images(images: Tensor, *, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, holes=0, length=0,
                   scale=0.0, max_holes: Optional[int] = None, random_order: bool = True,
                   seed: Union[int, Tensor, None] = None, offset: int = 0,
                   generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-example data augmentation of images [B, C, H, W] (float, values in [0, 1] for the colour
    stages, or uint8; contiguous or channels_last, returned in the same format and dtype) in one op:
    colour jitter, then cutout, then input scale. uint8 images are augmented as x / 255 in float32 and
    rounded back (round half to even, clamped to [0, 255]): one rounding for the whole chain, where
    torchvision's uint8 kernels truncate after each stage (so they can differ by a level or two).

    Each strength is a number for the whole batch or a [B] tensor (one row of λ), and gets no gradient:

    * ``brightness``, ``contrast``, ``saturation`` (≥ 0): factor uniform in [max(0, 1 − s), 1 + s];
      ``hue`` (in [0, 0.5]): shift uniform in [−s, s]; torchvision's adjust_* formulas, a strength 0
      skips its stage; with ``random_order`` (default, as torchvision's ColorJitter) each example
      applies its stages in its own random order, else brightness, contrast, saturation, hue. Needs C = 3
      (C = 1 for brightness and contrast alone: the grayscale is the image, as in torchvision);
    * ``holes``, ``length`` (≥ 0, floored): ⌊holes⌋ squares of side 2·⌊length/2⌋ centred at uniform
      pixels, clipped at the borders, set to 0 in every channel (the published Cutout).
      ``max_holes`` bounds ⌊holes⌋ (default: ⌊holes⌋ for a number, the batch maximum for a tensor,
      which synchronises with the device; required under torch.compile with tensor holes);
    * ``scale`` (≥ 0): the image times a factor uniform in [1/(1 + s), 1 + s].

    Draws are a pure function of (seed, offset + counter) (see :mod:`stn_kernels.reference_augment`);
    ``seed=None`` draws a seed from torch's generator (``generator`` or the default one). The images
    get a gradient (by autograd through the reference on every backend).
    """
    draws = augment_draws(images, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                          holes=holes, length=length, scale=scale, max_holes=max_holes, random_order=random_order,
                          seed=seed, offset=offset, generator=generator)
    if images.dtype == torch.uint8:
        return _to_uint8(apply_augment(_from_uint8(images), draws.order, draws.factors, draws.boxes, draws.scales))
    return apply_augment(images, draws.order, draws.factors, draws.boxes, draws.scales)


def _from_uint8(images: Tensor) -> Tensor:
    return images.to(torch.float32).div_(255.0)  # keeps channels_last


def _to_uint8(images: Tensor) -> Tensor:
    return images.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)


def color_jitter(images: Tensor, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, *,
                 random_order: bool = True, seed: Union[int, Tensor, None] = None, offset: int = 0,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """torchvision's ColorJitter per example: :func:`augment_images` with the jitter stages only."""
    return augment_images(images, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                          random_order=random_order, seed=seed, offset=offset, generator=generator)


def cutout(images: Tensor, holes, length, *, max_holes: Optional[int] = None, seed: Union[int, Tensor, None] = None,
           offset: int = 0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Cutout per example (⌊holes_b⌋ squares of side 2·⌊length_b/2⌋ set to 0): :func:`augment_images`
    with cutout only."""
    return augment_images(images, holes=holes, length=length, max_holes=max_holes, seed=seed, offset=offset,
                          generator=generator)


def input_scale(images: Tensor, strength, *, seed: Union[int, Tensor, None] = None, offset: int = 0,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """The published ``inscale``: each image times a factor uniform in [1/(1 + s_b), 1 + s_b]."""
    check_images(images, color=False, allow_uint8=True)
    strength = check_strength(strength, "strength (input scale)", images, 0.0, math.inf)  # the caller's name
    return augment_images(images, scale=strength, seed=seed, offset=offset, generator=generator)


# ----------------------------------------------------------------------------- per-example affine transform

def affine_draws(images: Tensor, rotation=0.0, translation=0.0, scale=0.0, shear=0.0, *,
                 seed: Union[int, Tensor, None] = None, offset: int = 0, generator: Optional[torch.Generator] = None):
    """The per-example parameters :func:`affine` applies with these arguments (an
    :class:`stn_kernels.reference_affine.AffineDraws`: angle, integer shifts, scale factor, shear and the
    inverse matrices); the same seed and offset give the same draws on every backend and device."""
    from .reference_affine import draw

    check_images(images, color=False, allow_uint8=True)
    strengths = {name: check_strength(value, name, images, 0.0, high) for name, value, high in (
        ("rotation", rotation, 180.0), ("translation", translation, 1.0), ("scale", scale, 0.99),
        ("shear", shear, 89.0))}
    seed_offset = seed_offset_tensor(seed, offset, images.device, generator)
    return draw(images.shape[0], images.shape[2], images.shape[3], seed_offset, **strengths)


def affine(images: Tensor, rotation=0.0, translation=0.0, scale=0.0, shear=0.0, *, interpolation: str = "nearest",
           seed: Union[int, Tensor, None] = None, offset: int = 0,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """A random affine transform per example of images [B, C, H, W] (float or uint8, as
    :func:`augment_images` takes them; contiguous or channels_last, returned in the same format and dtype):
    torchvision's ``RandomAffine(degrees=r, translate=(t, t),
    scale=(1 − s, 1 + s), shear=sh)`` with each example's own strengths, as the Delta-STN code builds it.

    Each strength is a number or a [B] tensor (one row of λ), without gradient: ``rotation`` r in
    [0, 180] (angle uniform in [−r, r] degrees), ``translation`` t in [0, 1] (shifts of
    round(U(−t·W, t·W)) and round(U(−t·H, t·H)) pixels), ``scale`` s in [0, 0.99] (factor uniform in
    [1 − s, 1 + s]), ``shear`` sh in [0, 89] (x shear uniform in [−sh, sh] degrees). ``interpolation``
    "nearest" (RandomAffine's default) or "bilinear"; zero outside the image. The draws are a pure
    function of (seed, offset + counter) (:mod:`stn_kernels.reference_affine`; ``seed=None``: from torch's
    generator); the images get a gradient.
    """
    from .reference_affine import MODES

    if interpolation not in MODES:
        raise ValueError(f"interpolation: expected one of {list(MODES)}, got {interpolation!r}")
    draws = affine_draws(images, rotation, translation, scale, shear, seed=seed, offset=offset, generator=generator)
    if images.dtype == torch.uint8:
        return _to_uint8(apply_affine(_from_uint8(images), draws.matrices, MODES.index(interpolation)))
    return apply_affine(images, draws.matrices, MODES.index(interpolation))
