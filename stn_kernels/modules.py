"""Drop-in ``torch.nn`` modules for the published STN layers: HyperLinear, HyperConv2d, HyperEmbedding,
HyperLSTMCell and HyperLSTM.

Parameters (for a layer with N outputs and H hyperparameters):
``weight`` and ``hyper_weight`` (W_elem, W_hyper), ``bias`` and ``hyper_bias``
(b_elem, b_hyper), and ``hparam_weight`` [2N, H], the bias-free linear map from
λ to the scales: rows 0..N-1 are V (hyper weight path), rows N..2N-1 are C
(hyper bias), stacked as in both published implementations. ``load_state_dict``
also accepts the official STN and the Delta-STN parameter names.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import functional, reference, reference_lstm
from ._validation import (
    REQUIRED,
    any_autocast,
    check_conv_geometry,
    check_ctor_bool,
    check_ctor_int,
    check_ctor_pair,
    check_groups,
    check_num_hparams,
    check_probability,
    check_shape,
    check_tensor,
    conv_padding,
    embedding_param_info,
    layer_param_info,
    lstm_param_info,
    misread_hint,
)
from .backends import kernels
from .hparams_context import current_hparams
from .ops import apply_hyper_conv2d_stacked, apply_hyper_linear_stacked, eager

# Published name -> ours. The official CNN layers also carry ``elem_scalar`` a, which multiplies the
# elementary path: loaded as ``elem_scalar`` into a layer that has one (convert() makes those), else folded
# into weight and bias.
_OFFICIAL_NAMES = {
    "elem_weight": "weight", "hnet_weight": "hyper_weight", "elem_bias": "bias", "hnet_bias": "hyper_bias",
    "htensor_to_scalars.weight": "hparam_weight",
    # official LSTM layers
    "elem_weight_raw": "weight", "hnet_weight_raw": "hyper_weight", "hnet_tensor_to_scalars.weight": "hparam_weight",
}
_DELTA_STN_NAMES = {
    "general_weight": "weight", "response_weight": "hyper_weight", "general_bias": "bias",
    "response_bias": "hyper_bias", "hyper_bottleneck.weight": "hparam_weight",
}
_EMBEDDING_NAMES = {
    "elem_embedding.weight": "weight", "hnet_embedding.weight": "hyper_weight",
    "hnet_tensor_to_scalars.weight": "hparam_weight",
}


def _rename_published(state_dict: dict, prefix: str, names: dict, fold_scalar: bool = True) -> None:
    """Rewrite published parameter names under ``prefix`` to ours, in place; ``elem_scalar`` is folded into
    weight and bias when ``fold_scalar`` (else left for the layer's own ``elem_scalar``)."""
    scalar = state_dict.pop(prefix + "elem_scalar", None) if fold_scalar else None
    for old, new in names.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    if scalar is not None:
        for name in ("weight", "bias"):
            if state_dict.get(prefix + name) is not None:
                state_dict[prefix + name] = state_dict[prefix + name] * scalar


# The parameters of a HyperLinear / HyperConv2d (and of an LSTM cell's i2h and h2h), read from
# ``_parameters`` directly: nn.Module.__getattr__ costs about a µs per name.
_LAYER_PARAMS = operator.itemgetter("weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")
_EMBEDDING_PARAMS = operator.itemgetter("weight", "hyper_weight", "hparam_weight")


def _cached(owner: nn.Module, params: tuple, extra, check: Callable[..., object], *check_args):
    """``check(*check_args)`` (what the checks of ``params`` and ``extra`` found), kept on ``owner`` and recomputed
    when a parameter object or ``extra`` changes, or after ``owner._apply`` (``.to()``, ``.half()``, ``.cuda()``,
    ``to_empty``, which change parameters in place: :class:`_ParamChecksCache`). Keyed on identity because
    reading dtype, device and shape of five parameters per call cost more (1.2 µs) than the rest of the checks.
    A ``p.data = ...`` of another dtype, device or shape outside ``_apply`` is seen at the next ``_apply``;
    until then torch's own op raises on the mismatch (the fast path only skips checks: it computes with the
    tensors as they are)."""
    key = (tuple(map(id, params)), extra)
    cached = owner.__dict__.get("_param_cache")
    if cached is None or cached[0] != key:
        cached = (key, check(*check_args))
        owner.__dict__["_param_cache"] = cached
    return cached[1]


class _ParamChecksCache(nn.Module):
    """Drops the cache of :func:`_cached` when ``_apply`` changes the parameters in place."""

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_param_cache", None)
        return super()._apply(fn, recurse)


def _fast_hparams_ok(hparams, batch: int, num_hparams: int, dtype: torch.dtype, device: torch.device) -> bool:
    """hparams None, or [batch, num_hparams] in ``dtype`` on ``device``: what the fast paths accept."""
    return hparams is None or (isinstance(hparams, Tensor) and hparams.dtype == dtype
                               and hparams.shape == (batch, num_hparams) and hparams.device == device)


class _HyperLayer(_ParamChecksCache):
    """Shared parts of the layers with an elementary and a hyper path plus biases."""

    # True for the layers convert() made from plain torch.nn ones: without hparams they take the λ of an
    # enclosing ``stn_kernels.hparams(...)`` block (stn_kernels/hparams_context.py).
    context_hparams = False

    out_features: int
    num_hparams: int

    def _init_hyper_params(self, weight_shape, num_outputs, num_hparams, bias, factory):
        self.num_hparams = num_hparams
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.hyper_weight = nn.Parameter(torch.empty(weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_outputs, **factory))
            self.hyper_bias = nn.Parameter(torch.empty(num_outputs, **factory))
        else:
            self.register_parameter("bias", None)
            self.register_parameter("hyper_bias", None)
        self.hparam_weight = nn.Parameter(torch.empty(2 * num_outputs, num_hparams, **factory))
        # The official CNN layers' trained scale a of the elementary path, out = a·(W x + b) + ...; None (a = 1)
        # except on the layers convert() makes from them, which keep training the published parameterisation.
        self.register_parameter("elem_scalar", None)

    def reset_parameters(self) -> None:
        """As the official STN code: weights and biases U(±1/√fan_in), hparam_weight N(0, 0.01²), elem_scalar 1."""
        # fan_in from hyper_weight (shaped as weight): a converted nn.LSTM's cells hold no weight of their own.
        fan_in = self.hyper_weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            for p in (self.weight, self.hyper_weight, self.bias, self.hyper_bias):
                if p is not None:
                    p.uniform_(-bound, bound)
            self.hparam_weight.normal_(0.0, 0.01)
            if self.elem_scalar is not None:
                self.elem_scalar.fill_(1.0)

    def _elementary(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """(a·W, a·b) with the layer's ``elem_scalar`` a, else (W, b) unchanged. a·(W x + b) = (a·W) x + a·b: the
        scale is one elementwise op on the weight (small next to the product) under autograd, so d/da and dW are
        exact and every backend's fused kernel runs unchanged."""
        scalar = self._parameters.get("elem_scalar")
        if scalar is None:
            return weight, bias
        return weight * scalar, None if bias is None else bias * scalar

    def _scalar_repr(self) -> str:
        return "" if self._parameters.get("elem_scalar") is None else ", elem_scalar=True"

    def fold_elem_scalar(self) -> "_HyperLayer":
        """For inference: replaces ``weight`` and ``bias`` with new Parameters a·W and a·b and drops ``elem_scalar``
        (the old Parameters, which a converted model shares with the original, are left as they are); the outputs
        stay the same. Returns the layer. A layer without ``elem_scalar`` is returned unchanged."""
        scalar = self._parameters.get("elem_scalar")
        if scalar is not None:
            with torch.no_grad():
                for name in ("weight", "bias"):
                    p = self._parameters[name]
                    if p is not None:
                        self._parameters[name] = nn.Parameter(p * scalar, requires_grad=p.requires_grad)
            self._parameters["elem_scalar"] = None
        return self

    def _fast_call(self, op: str, input, hparams, extra=()) -> Optional[tuple]:
        """(backend module, parameters, facts) when this call can take the fast path, else None.

        The fast path is for the common call: eager, no autocast, input in the parameters' dtype and on
        their device, hparams [B, H] in hparam_weight's dtype or None. What the checks of the parameters
        (and of ``extra``, the conv's geometry) find is cached (:func:`_cached`), so a right call costs a few
        attribute reads and comparisons here; every other call, and every wrong one, takes the full path
        (:mod:`stn_kernels.functional`), which raises the error naming the argument. The backend is resolved
        once, here, and kept for the backward."""
        if not eager():  # torch.compile traces the full path (the registered ops), torch.func the composite
            return None
        try:
            params = _LAYER_PARAMS(self._parameters)
        except KeyError:  # a parameter replaced by something else: the full path sorts it out
            return None
        info = _cached(self, params, extra, self._check_params, op, params, extra)
        if info is None or not isinstance(input, Tensor):
            return None
        dtype, device, hp_dtype, facts = info
        if (input.dtype != dtype or input.device != device or any_autocast()
                or not _fast_hparams_ok(hparams, input.shape[0], params[4].shape[1], hp_dtype, device)):
            return None
        return kernels(op, device, input.shape[0], dtype, input.numel() == 0), params, facts

    def _check_params(self, op: str, params: tuple, extra) -> Optional[tuple]:
        """(dtype, device, λ dtype, facts) when the parameters and ``extra`` pass every check, else None."""
        info = layer_param_info(*params, 2 if op == "hyper_linear" else 4)
        facts = None if info is None else self._facts(params[0], extra)
        return None if facts is None else info + (facts,)

    def _facts(self, weight: Tensor, extra) -> Optional[tuple]:
        """What the fast path checks each input against (a tuple), or None when ``extra`` is invalid."""
        return ()

    def _scales(self):
        # (V, C) as views of the stacked [2N, H] parameter; one chunk op costs half of two slices.
        return self.hparam_weight.chunk(2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fold = self._parameters.get("elem_scalar") is None
        _rename_published(state_dict, prefix, _OFFICIAL_NAMES, fold)
        _rename_published(state_dict, prefix, _DELTA_STN_NAMES, fold)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class HyperLinear(_HyperLayer):
    """out = W·x + (V·λ) ⊙ (W_hyper·x) + b + (C·λ) ⊙ b_hyper, with λ per example.

    ``forward(input, hparams=None)``: input [B, in_features] or [B, *, in_features];
    hparams [B, num_hparams] (one row per example), [num_hparams] (shared) or None
    (the elementary path only, i.e. a plain linear layer).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_hparams: int = REQUIRED,
                 device=None, dtype=None) -> None:
        super().__init__()
        name, leading = type(self).__name__, (in_features, out_features)
        check_ctor_int(in_features, "in_features")
        check_ctor_int(out_features, "out_features")
        check_ctor_bool(bias, "bias", misread_hint(num_hparams, name, leading, bias))
        num_hparams = check_num_hparams(num_hparams, name, leading)
        self.in_features = in_features
        self.out_features = out_features
        self._init_hyper_params((out_features, in_features), out_features, num_hparams, bias,
                                {"device": device, "dtype": dtype})
        self.reset_parameters()

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None) -> Tensor:
        if hparams is None and self.context_hparams:
            hparams = current_hparams()
        fast = self._fast_call("hyper_linear", input, hparams)
        if fast is not None and input.dim() == 2 and input.shape[1] == fast[1][0].shape[1]:
            weight, hyper_weight, bias, hyper_bias, hparam_weight = fast[1]
            if self._parameters.get("elem_scalar") is not None:
                weight, bias = self._elementary(weight, bias)
            return apply_hyper_linear_stacked(fast[0], input, hparams, weight, hyper_weight, bias, hyper_bias,
                                              hparam_weight)
        weight_scale, bias_scale = self._scales()
        weight, bias = self._elementary(self.weight, self.bias)
        return functional.hyper_linear(input, hparams, weight, self.hyper_weight, bias, self.hyper_bias,
                                       weight_scale, bias_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, num_hparams={self.num_hparams}{self._scalar_repr()}")


class HyperConv2d(_HyperLayer):
    """out[b,c] = conv(x, W)[b,c] + s[b,c]·conv(x, W_hyper)[b,c] + b[c] + t[b,c]·b_hyper[c], s = V·λ_b, t = C·λ_b."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, num_hparams: int = REQUIRED,
                 device=None, dtype=None) -> None:
        super().__init__()
        name, leading = type(self).__name__, (in_channels, out_channels, kernel_size)
        check_ctor_int(in_channels, "in_channels")
        check_ctor_int(out_channels, "out_channels")
        self.kernel_size = check_ctor_pair(kernel_size, "kernel_size", 1)
        self.stride = check_ctor_pair(stride, "stride", 1, misread_hint(num_hparams, name, leading, stride))
        self.dilation = check_ctor_pair(dilation, "dilation", 1)
        # nn.Conv2d's padding ("same", "valid" or ints) and padding_mode: what the op cannot take (a mode other
        # than zeros, the uneven split of "same" for even kernels) is an F.pad of the input before it.
        self.padding, self.padding_mode, self._op_padding, self._input_pad = conv_padding(
            padding, padding_mode, self.kernel_size, self.stride, self.dilation)
        check_ctor_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: expected a divisor of in_channels={in_channels} and "
                             f"out_channels={out_channels}, got {groups}")
        check_ctor_bool(bias, "bias")
        num_hparams = check_num_hparams(num_hparams, name, leading)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self._init_hyper_params((out_channels, in_channels // groups, *self.kernel_size), out_channels, num_hparams,
                                bias, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def _facts(self, weight: Tensor, extra) -> Optional[tuple]:
        """(in_channels, smallest input height and width, stride, padding, dilation as lists), None if invalid."""
        stride, padding, dilation, groups = extra
        try:
            check_groups(groups, weight.shape[0])
            stride, padding, dilation = check_conv_geometry(stride, padding, dilation)
        except ValueError:
            return None
        min_size = [dilation[i] * (weight.shape[2 + i] - 1) + 1 - 2 * padding[i] for i in (0, 1)]
        return weight.shape[1] * groups, min_size[0], min_size[1], stride, padding, dilation

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None) -> Tensor:
        if hparams is None and self.context_hparams:
            hparams = current_hparams()
        if self._input_pad is not None and isinstance(input, Tensor) and input.dim() == 4:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            input = F.pad(input, self._input_pad, mode=mode)
        geometry = (self.stride, self._op_padding, self.dilation, self.groups)
        fast = self._fast_call("hyper_conv2d", input, hparams, geometry)
        if fast is not None:
            in_channels, min_h, min_w, stride, padding, dilation = fast[2]
            shape = input.shape
            if len(shape) == 4 and shape[1] == in_channels and shape[2] >= min_h and shape[3] >= min_w:
                weight, hyper_weight, bias, hyper_bias, hparam_weight = fast[1]
                weight, bias = self._elementary(weight, bias)
                return apply_hyper_conv2d_stacked(fast[0], input, hparams, weight, hyper_weight, bias, hyper_bias,
                                                  hparam_weight, stride, padding, dilation, self.groups)
        weight_scale, bias_scale = self._scales()
        weight, bias = self._elementary(self.weight, self.bias)
        return functional.hyper_conv2d(input, hparams, weight, self.hyper_weight, bias, self.hyper_bias,
                                       weight_scale, bias_scale, self.stride, self._op_padding, self.dilation,
                                       self.groups)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", num_hparams={self.num_hparams}{self._scalar_repr()}"


class HyperEmbedding(_ParamChecksCache):
    """out[b, ...] = E[i] + (V·λ_b) ⊙ E_hyper[i] for indices i = input[b, ...].

    Parameters ``weight`` and ``hyper_weight`` [num_embeddings, embedding_dim] and
    ``hparam_weight`` V [embedding_dim, num_hparams]. ``forward(input, hparams=None)``:
    hparams [B, H] aligns with dim 0 of input (pass ``batch_dim=1`` for time-major
    [T, B] input as in the published LSTM code), [H] or None.

    ``padding_idx`` (nn.Embedding's meaning, negative counts from the end; stored non-negative):
    that row of ``weight`` and of ``hyper_weight`` gets no gradient (its value is still looked up,
    as ``F.embedding`` does); ``reset_parameters`` zeroes it in both tables. The official STN
    HyperEmbedding passes ``padding_idx=-1`` to both of its lookups, and ``convert`` keeps it.
    """

    context_hparams = False  # as _HyperLayer's: set by convert() for a converted nn.Embedding

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None, *,
                 num_hparams: int = REQUIRED, device=None, dtype=None) -> None:
        super().__init__()
        name, leading = type(self).__name__, (num_embeddings, embedding_dim)
        factory = {"device": device, "dtype": dtype}
        check_ctor_int(num_embeddings, "num_embeddings")
        check_ctor_int(embedding_dim, "embedding_dim")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_hparams = num_hparams
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) \
                    or not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx: expected None or an int in [-{num_embeddings}, {num_embeddings}) "
                                 f"(num_embeddings = {num_embeddings}), got {padding_idx!r}"
                                 + misread_hint(num_hparams, name, leading, padding_idx))
            padding_idx %= num_embeddings
        num_hparams = check_num_hparams(num_hparams, name, leading)
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        self.hyper_weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        self.hparam_weight = nn.Parameter(torch.empty(embedding_dim, num_hparams, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tables N(0, 1) as ``nn.Embedding``; hparam_weight N(0, 0.01²) as the official code."""
        with torch.no_grad():
            self.weight.normal_()
            self.hyper_weight.normal_()
            self.hparam_weight.normal_(0.0, 0.01)
            if self.padding_idx is not None:
                self.weight[self.padding_idx].zero_()
                self.hyper_weight[self.padding_idx].zero_()

    def _tables(self):
        """(weight, hyper_weight) as the forward uses them: with no gradient into row ``padding_idx``."""
        if self.padding_idx is None:
            return self.weight, self.hyper_weight
        return (_NoGradRow.apply(self.weight, self.padding_idx),
                _NoGradRow.apply(self.hyper_weight, self.padding_idx))

    def _fast(self, input, hparams, batch_dim: int) -> Optional[Tensor]:
        """The output on the fast path, or None for the full path (as :meth:`_HyperLayer._fast_call`): on the
        reference backend the module runs :func:`stn_kernels.reference.hyper_embedding_by_example`, plain torch
        ops that torch differentiates (λ·Vᵀ once per example, no reshapes of the input or λ)."""
        if not eager():
            return None
        try:
            params = _EMBEDDING_PARAMS(self._parameters)
        except KeyError:
            return None
        info = _cached(self, params, (), embedding_param_info, *params)
        if info is None or not isinstance(input, Tensor):
            return None
        dtype, device, hp_dtype = info
        if (input.dtype not in (torch.int64, torch.int32) or input.device != device or input.dim() <= batch_dim
                or not _fast_hparams_ok(hparams, input.shape[batch_dim], params[2].shape[1], hp_dtype, device)):
            return None
        if kernels("hyper_embedding", device, params[0].shape[0], dtype, params[0].numel() == 0) is not reference:
            return None
        try:
            # The index range is checked by F.embedding itself: an IndexError on the CPU (the full path then
            # raises the ValueError with the range found), a device assert on CUDA (as nn.Embedding's).
            return reference.hyper_embedding_by_example(input, hparams, *params, batch_dim)
        except IndexError:
            return None

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None, batch_dim: int = 0) -> Tensor:
        if batch_dim not in (0, 1):
            raise ValueError(f"batch_dim: expected 0 or 1, got {batch_dim!r}")
        if hparams is None and self.context_hparams:
            hparams = current_hparams()
        out = self._fast(input, hparams, batch_dim) if self.padding_idx is None else None
        if out is not None:
            return out
        weight, hyper_weight = self._tables()
        if batch_dim == 1:
            if input.dim() < 2:
                raise ValueError(f"input: expected shape [T, B, ...] with batch_dim=1, got {tuple(input.shape)}")
            out = functional.hyper_embedding(input.transpose(0, 1), hparams, weight, hyper_weight,
                                             self.hparam_weight)
            return out.transpose(0, 1)
        return functional.hyper_embedding(input, hparams, weight, hyper_weight, self.hparam_weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_published(state_dict, prefix, _EMBEDDING_NAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}, num_hparams={self.num_hparams}"


class _NoGradRow(torch.autograd.Function):
    """Identity on a table whose row ``row`` gets a zero gradient (``F.embedding``'s ``padding_idx``), without a
    copy of the table in the forward; the backward is differentiable again (index_fill)."""

    @staticmethod
    def forward(ctx, table, row):
        ctx.row = row
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad):
        row = torch.tensor([ctx.row], device=grad.device)
        return grad.index_fill(0, row, 0.0), None


# ----------------------------------------------------------------------------- HyperLSTM

def _set_mask(linear: nn.Module, weight: Tensor, hyper_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Both weights times the DropConnect mask that ``linear.mask_weights`` set, if any."""
    mask = getattr(linear, "weight_mask", None)
    return (weight, hyper_weight) if mask is None else (weight * mask, hyper_weight * mask)


def _check_lstm_args(module: nn.Module, leading: tuple, bias, batch_first, num_hparams) -> int:
    """The checks of the HyperLSTMCell / HyperLSTM constructor arguments; returns num_hparams. ``leading``:
    the positional arguments before ``bias`` (input_size, hidden_size and HyperLSTM's num_layers)."""
    name = type(module).__name__
    check_ctor_int(leading[0], "input_size")
    check_ctor_int(leading[1], "hidden_size")
    if len(leading) > 2:
        check_ctor_int(leading[2], "num_layers")
    check_ctor_bool(bias, "bias", misread_hint(num_hparams, name, leading, bias))
    check_ctor_bool(batch_first, "batch_first")
    return check_num_hparams(num_hparams, name, leading)


class HyperLSTMCell(_ParamChecksCache):
    """One HyperLSTM layer over a sequence: the official STN ``HyperLSTMCell``, fused.

    Submodules ``i2h`` (:class:`HyperLinear` input_size → 4·hidden_size) and ``h2h``
    (hidden_size → 4·hidden_size); their parameters load from the published names
    (``i2h.elem_weight_raw``, ``i2h.hnet_weight_raw``, ``i2h.elem_bias``, ``i2h.hnet_bias``,
    ``i2h.hnet_tensor_to_scalars.weight``, likewise ``h2h.*``). ``dropconnect`` is the
    published ``wdrop``: the DropConnect rate of the h2h weights in training mode.

    ``forward(input, hidden=None, hparams=None, dropconnect=None)``: input [T, B, input_size]
    ([B, T, input_size] with batch_first); hidden (h0, c0), each [B, N] or [1, B, N] (the
    published shape), zeros when None; hparams [B, H], [H] or None; dropconnect overrides
    the module's rate for this call (a float, or a one-element tensor as the published
    ``hparam_tensor[:, i][0]``). Returns ``(output, (h_T, c_T))`` with output [T, B, N]
    ([B, T, N] with batch_first) and h_T, c_T shaped like the given hidden ([1, B, N] when
    hidden is None, as the published cell).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, batch_first: bool = False, *,
                 num_hparams: int = REQUIRED, dropconnect: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        num_hparams = _check_lstm_args(self, (input_size, hidden_size), bias, batch_first, num_hparams)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_hparams = num_hparams
        self.dropconnect = check_probability(dropconnect, "dropconnect")
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        self.i2h = HyperLinear(input_size, 4 * hidden_size, bias, num_hparams=num_hparams, **factory)
        self.h2h = HyperLinear(hidden_size, 4 * hidden_size, bias, num_hparams=num_hparams, **factory)

    def reset_parameters(self) -> None:
        self.i2h.reset_parameters()
        self.h2h.reset_parameters()

    def _params(self, dropconnect, elementary: Optional[tuple] = None):
        """(i2h tuple, h2h tuple), the h2h weights DropConnect-masked in training mode.

        ``elementary``: (i2h weight, i2h bias, h2h weight, h2h bias) to use instead of the submodules' own
        (the nn.LSTM Parameters in our gate order, for an nn.LSTM that :func:`stn_kernels.convert` made
        into a HyperLSTM).

        A cell converted from the published one (:func:`stn_kernels.convert`) has DropConnectHyperLinear
        i2h / h2h, whose ``mask_weights(p)`` the published model calls before every forward: a mask
        set that way is used instead of this cell's own rate, in training mode only (a mask left from
        training is never applied in eval mode)."""
        n = 4 * self.hidden_size
        if elementary is None:
            elementary = (self.i2h.weight, self.i2h.bias, self.h2h.weight, self.h2h.bias)
        i2h_weight, i2h_bias, weight, bias = elementary
        i2h_hyper_weight = self.i2h.hyper_weight
        if self.training:
            i2h_weight, i2h_hyper_weight = _set_mask(self.i2h, i2h_weight, i2h_hyper_weight)
        i2h = (i2h_weight, i2h_hyper_weight, i2h_bias, self.i2h.hyper_bias,
               self.i2h.hparam_weight[:n], self.i2h.hparam_weight[n:])
        hyper_weight = self.h2h.hyper_weight
        p = self.dropconnect if dropconnect is None else dropconnect
        if self.training and getattr(self.h2h, "weight_mask", None) is not None:
            weight, hyper_weight = _set_mask(self.h2h, weight, hyper_weight)
        elif self.training:
            mask = functional.dropconnect_mask(weight, p)
            if mask is not None:
                weight, hyper_weight = weight * mask, hyper_weight * mask
        elif not isinstance(p, Tensor) and (isinstance(p, bool) or not isinstance(p, (int, float))
                                            or not 0.0 <= p < 1.0):
            raise ValueError(f"dropconnect: expected a probability in [0, 1), got {p!r}")
        h2h = (weight, hyper_weight, bias, self.h2h.hyper_bias, self.h2h.hparam_weight[:n],
               self.h2h.hparam_weight[n:])
        return i2h, h2h

    def _fast(self, input, hidden, hparams, dropconnect):
        """``(output, (h_T, c_T))`` on the fast path, or None for the full path (as
        :meth:`_HyperLayer._fast_call`) for one step (T = 1: the cell called per step, where the host's work
        per call is the cost): eager, no autocast, no DropConnect mask this call, both ops on the reference
        backend, hidden None or two tensors [B, N] or [1, B, N]. It runs
        :func:`stn_kernels.reference_lstm.hyper_lstm_cell_step`, plain torch ops that torch differentiates,
        without the two ops' boundaries, validation and reshapes. Over longer sequences the recurrence op
        (one GEMM for the weight gradients of all steps) is worth its overhead."""
        if not eager() or dropconnect is not None or (self.training and (
                self.dropconnect or getattr(self.i2h, "weight_mask", None) is not None
                or getattr(self.h2h, "weight_mask", None) is not None)):
            return None
        try:
            i2h, h2h = _LAYER_PARAMS(self.i2h._parameters), _LAYER_PARAMS(self.h2h._parameters)
        except (AttributeError, KeyError):
            return None
        info = _cached(self, i2h + h2h, (), lstm_param_info, i2h, h2h)
        if info is None or not isinstance(input, Tensor):
            return None
        dtype, device, hp_dtype = info
        shape = input.shape
        if (len(shape) != 3 or shape[2] != i2h[0].shape[1] or shape[self.batch_first] != 1  # one step
                or input.dtype != dtype or input.device != device or any_autocast()):
            return None
        batch, n = shape[1 - self.batch_first], h2h[0].shape[1]
        if not _fast_hparams_ok(hparams, batch, i2h[4].shape[1], hp_dtype, device):
            return None
        if hidden is None:
            h0 = c0 = input.new_zeros(batch, n)
            keep_dim = True
        else:
            if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
                return None
            h0, c0 = hidden
            if not (isinstance(h0, Tensor) and isinstance(c0, Tensor) and h0.shape == c0.shape
                    and h0.shape in ((batch, n), (1, batch, n)) and h0.dtype == dtype and c0.dtype == dtype
                    and h0.device == device and c0.device == device):
                return None
            keep_dim = h0.dim() == 3
            if keep_dim:
                h0, c0 = h0[0], c0[0]
        if (kernels("hyper_linear", device, batch, dtype, input.numel() == 0) is not reference
                or kernels("hyper_lstm_recurrence", device, empty=not batch) is not reference_lstm):
            return None
        h, c = reference_lstm.hyper_lstm_cell_step(input[:, 0] if self.batch_first else input[0], h0, c0, hparams,
                                                   i2h, h2h)
        out = h.unsqueeze(1 if self.batch_first else 0)
        return out, ((h.unsqueeze(0), c.unsqueeze(0)) if keep_dim else (h, c))

    def forward(self, input: Tensor, hidden: Optional[Tuple[Tensor, Tensor]] = None,
                hparams: Optional[Tensor] = None, dropconnect: Optional[Union[float, Tensor]] = None):
        fast = self._fast(input, hidden, hparams, dropconnect)
        if fast is not None:
            return fast
        keep_dim = True
        hx = None
        if hidden is not None:
            if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
                raise TypeError(f"hidden: expected a tuple (h0, c0) of tensors [B, {self.hidden_size}] or "
                                f"[1, B, {self.hidden_size}], got {type(hidden).__name__}")
            h0, c0 = hidden
            check_tensor(h0, "hidden[0]")
            check_tensor(c0, "hidden[1]")
            keep_dim = h0.dim() == 3
            for name, t in (("hidden[0]", h0), ("hidden[1]", c0)):
                if t.dim() == 3 and t.shape[0] != 1:
                    raise ValueError(f"{name}: expected shape [B, {self.hidden_size}] or [1, B, {self.hidden_size}], "
                                     f"got {tuple(t.shape)}")
            hx = (h0[0] if h0.dim() == 3 else h0, c0[0] if c0.dim() == 3 else c0)
        i2h, h2h = self._params(dropconnect)
        out, (h, c) = functional.hyper_lstm_layer(input, hparams, i2h, h2h, hx, self.batch_first)
        if keep_dim:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        return out, (h, c)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_hparams={self.num_hparams}"
        if self.dropconnect:
            s += f", dropconnect={self.dropconnect}"
        if self.batch_first:
            s += ", batch_first=True"
        return s


def _locked_dropout(x: Tensor, rates: Union[float, Tensor]) -> Tensor:
    """Per-example dropout of x [T, B, N] with one mask per (b, n) for all T (variational / locked):
    channel dropout of the [B, N, T] view."""
    return functional.per_example_channel_dropout(x.permute(1, 2, 0), rates).permute(2, 0, 1)


class HyperLSTM(nn.Module):
    """A stack of HyperLSTM layers, time-major like ``torch.nn.LSTM`` (``batch_first`` option).

    ``forward(input, hx=None, hparams=None, dropconnect=None)``: input [T, B, input_size]
    ([B, T, input_size] with batch_first); hx (h0, c0) each [num_layers, B, hidden_size],
    zeros when None; the same hparams [B, H] / [H] / None reach every layer (as in the
    published model). Returns ``(output, (h_n, c_n))``: output [T, B, hidden_size] (the last
    layer's h_t), h_n and c_n [num_layers, B, hidden_size]. Layers are ``cells[l]``
    (:class:`HyperLSTMCell`); ``load_state_dict`` also takes the published model's
    ``rnns.{l}.i2h.*`` / ``rnns.{l}.h2h.*`` entries with the ``rnns.`` prefix removed (or a
    model whose ``rnns`` attribute is this module). DropConnect draws one mask per layer.

    ``hidden_size`` may also be a list of ``num_layers`` ints, one per layer: the published language model with
    tied weights has ``[nhid, ..., nhid, emsize]`` (its last layer matches the embedding the decoder shares).
    Chosen over nn.LSTM's ``proj_size``, which would compute another function (a learned projection of h in
    every layer, not a full LSTM of another size). With sizes that differ the states cannot be stacked, so hx
    is then ``(h0, c0)`` with h0 and c0 sequences of ``num_layers`` tensors [B, N_l] (unbatched [N_l]), and
    ``(h_n, c_n)`` are tuples of them; ``hidden_sizes`` holds the per-layer sizes in either case.

    ``layer_dropout`` (a rate, or one per example [B]) drops units of each layer's output
    before the next layer, in training mode only, with one mask per (example, unit) for the
    whole sequence: the published model's ``LockedDropout`` with its per-example ``dropouth``
    (:func:`stn_kernels.stn.per_example_dropout` underneath; pass None in the validation steps).
    ``dropout`` (an attribute, 0 by default) is nn.LSTM's: plain dropout of each layer's output but
    the last's, in training mode.
    """

    # As _HyperLayer's: True for an nn.LSTM that convert() made into a HyperLSTM.
    context_hparams = False
    # nn.LSTM's dropout between layers; convert() takes it from the nn.LSTM (the same F.dropout draws).
    dropout = 0.0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, *, num_hparams: int = REQUIRED, dropconnect: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        per_layer = isinstance(hidden_size, (list, tuple))
        check_ctor_int(num_layers, "num_layers")
        if per_layer:
            if len(hidden_size) != num_layers:
                raise ValueError(f"hidden_size: expected an int or a list of num_layers={num_layers} ints, got "
                                 f"{len(hidden_size)} sizes {list(hidden_size)}")
            for layer, size in enumerate(hidden_size):
                check_ctor_int(size, f"hidden_size[{layer}]")
        sizes = tuple(hidden_size) if per_layer else (hidden_size,) * num_layers
        num_hparams = _check_lstm_args(self, (input_size, sizes[0], num_layers), bias, batch_first, num_hparams)
        check_probability(dropconnect, "dropconnect")
        self.input_size = input_size
        self.hidden_size = list(hidden_size) if per_layer else hidden_size
        self.hidden_sizes = sizes
        self.num_layers = num_layers
        self.num_hparams = num_hparams
        self.batch_first = batch_first
        self.cells = nn.ModuleList(
            HyperLSTMCell(input_size if layer == 0 else sizes[layer - 1], sizes[layer], bias,
                          num_hparams=num_hparams, dropconnect=dropconnect, device=device, dtype=dtype)
            for layer in range(num_layers))

    def reset_parameters(self) -> None:
        for cell in self.cells:
            cell.reset_parameters()

    @property
    def dropconnect(self) -> float:
        return self.cells[0].dropconnect

    @dropconnect.setter
    def dropconnect(self, p: float) -> None:
        for cell in self.cells:
            cell.dropconnect = float(p)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None, hparams: Optional[Tensor] = None,
                dropconnect: Optional[Union[float, Tensor]] = None,
                layer_dropout: Optional[Union[float, Tensor]] = None):
        L, N = self.num_layers, self.hidden_sizes[-1]
        uniform = len(set(self.hidden_sizes)) == 1
        if hparams is None and self.context_hparams:
            hparams = current_hparams()
        check_tensor(input, "input")
        if input.dim() not in (2, 3):
            raise ValueError(f"input: expected shape {'[B, T, ' if self.batch_first else '[T, B, '}"
                             f"{self.input_size}] or unbatched [T, {self.input_size}], got {tuple(input.shape)}")
        # Unbatched [T, K] as nn.LSTM takes it (whatever batch_first): a batch of one, then squeezed back.
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        B = input.shape[0 if self.batch_first else 1]
        if hx is None:
            h0 = c0 = None
        elif uniform:
            want = f"[{L}, {N}]" if unbatched else f"[{L}, B, {N}]"
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected a tuple (h0, c0) of tensors {want}, got {type(hx).__name__}")
            h0, c0 = hx
            for name, t in (("hx[0]", h0), ("hx[1]", c0)):
                check_tensor(t, name)
                check_shape(t, name, (L, N) if unbatched else (L, B, N))
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        else:
            h0, c0 = self._per_layer_states(hx, B, unbatched)
        x = input
        hs, cs = [], []
        for layer in range(L):
            i2h, h2h = self._layer_params(layer, dropconnect)
            state = None if h0 is None else (h0[layer], c0[layer])
            first = layer == 0 and self.batch_first
            x, (h, c) = functional.hyper_lstm_layer(x, hparams, i2h, h2h, state, batch_first=first)
            if first:
                x = x.transpose(0, 1)  # time-major between layers
            if layer_dropout is not None and self.training and layer < L - 1:
                x = _locked_dropout(x, layer_dropout)
            if self.dropout and self.training and layer < L - 1:
                x = F.dropout(x, self.dropout)
            hs.append(h)
            cs.append(c)
        out = x.transpose(0, 1) if self.batch_first else x
        if not uniform:  # one [B, N_l] (unbatched [N_l]) per layer: sizes that differ cannot be stacked
            states = tuple(tuple(t.squeeze(0) if unbatched else t for t in ts) for ts in (hs, cs))
            return (out.squeeze(0 if self.batch_first else 1) if unbatched else out), states
        h_n, c_n = torch.stack(hs), torch.stack(cs)
        if unbatched:
            return out.squeeze(0 if self.batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))
        return out, (h_n, c_n)

    def _layer_params(self, layer: int, dropconnect):
        """(i2h tuple, h2h tuple) of one layer for :func:`stn_kernels.hyper_lstm_layer`."""
        return self.cells[layer]._params(dropconnect)

    def _per_layer_states(self, hx, batch: int, unbatched: bool) -> Tuple[list, list]:
        """(h0, c0) for per-layer hidden sizes: two sequences of num_layers tensors [B, N_l] (unbatched [N_l]),
        checked and returned as lists of [B, N_l]."""
        sizes = list(self.hidden_sizes)
        want = f"sequences of {self.num_layers} tensors {'[N_l]' if unbatched else '[B, N_l]'}, N_l = {sizes}"
        if (not isinstance(hx, (tuple, list)) or len(hx) != 2
                or any(not isinstance(s, (tuple, list)) or len(s) != self.num_layers for s in hx)):
            raise TypeError(f"hx: expected (h0, c0), {want} (hidden_size is per layer), got {type(hx).__name__}")
        states = []
        for which, seq in zip("hc", hx):
            states.append([])
            for layer, t in enumerate(seq):
                name = f"hx[{'hc'.index(which)}][{layer}]"
                check_tensor(t, name)
                check_shape(t, name, (sizes[layer],) if unbatched else (batch, sizes[layer]))
                states[-1].append(t.unsqueeze(0) if unbatched else t)
        return states[0], states[1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Published model: rnns = ModuleList(HyperLSTMCell), so "{l}.i2h.*" under this module's prefix.
        for key in list(state_dict):
            rest = key[len(prefix):] if key.startswith(prefix) else None
            if rest is None:
                continue
            head, _, tail = rest.partition(".")
            if head.isdigit() and tail.split(".")[0] in ("i2h", "h2h"):
                state_dict[f"{prefix}cells.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size!r}, num_layers={self.num_layers}"
        if self.cells[0].i2h.hyper_bias is None:  # (hyper_bias: a converted nn.LSTM's cells hold no bias)
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.dropconnect:
            s += f", dropconnect={self.dropconnect}"
        return s + f", num_hparams={self.num_hparams}"
