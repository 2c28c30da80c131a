"""Drop-in ``torch.nn`` modules for the published STN layers: HyperLinear, HyperConv2d and HyperEmbedding
(HyperLSTMCell and HyperLSTM: :mod:`stn_kernels.modules_lstm`).

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
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import functional, reference
from ._param_checks import embedding_param_error, embedding_param_info, layer_param_error, layer_param_info
from ._validation import (
    REQUIRED,
    any_autocast,
    check_conv_geometry,
    check_ctor_bool,
    check_ctor_int,
    check_ctor_pair,
    check_data_like,
    check_groups,
    check_num_hparams,
    conv_padding,
    hparams_side,
    misread_hint,
)
from .backends import kernels
from .backends.host import host_ops
from .hparams_context import check_rows, context_layout, current_hparams, hparams_rows
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


def _checked_with_host(check: Callable[..., Optional[tuple]], *args) -> Optional[tuple]:
    """``check(*args)``, a (dtype, device, λ map dtype, allowed λ dtypes) or None, plus the compiled host path for
    those (or None: :mod:`stn_kernels.backends.host`); for :func:`_cached`."""
    info = check(*args)
    return None if info is None else info + (host_ops(info[1], info[0], info[2]),)


def _raise_if_invalid(owner: nn.Module, params: tuple, extra, error: Callable[[], Optional[Exception]],
                      check: Callable[..., object], *check_args) -> None:
    """For a call that left the fast path: raises ``error()`` (the parameters' problem, naming each by its public
    name) unless the cached checks of :func:`_cached` passed (under torch.compile and torch.func, which trace this
    path, the checks run every call: nothing is cached there)."""
    if not eager() or _cached(owner, params, extra, check, *check_args) is None:
        found = error()
        if found is not None:
            raise found


class _ParamChecksCache(nn.Module):
    """Drops the cache of :func:`_cached` when ``_apply`` changes the parameters in place, and leaves it out of
    pickles and deep copies (``torch.save(model)``, ``copy.deepcopy``): it is keyed on the identity of these
    parameters and may hold the compiled host module, neither of which a copy can use."""

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_param_cache", None)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_param_cache", None)
        return state


def _fast_hparams_ok(hparams, batch: int, num_hparams: int, dtypes: tuple, device: torch.device) -> bool:
    """hparams None, or [batch, num_hparams] in one of ``dtypes`` on ``device``: what the fast paths accept."""
    return hparams is None or (isinstance(hparams, Tensor) and hparams.dtype in dtypes
                               and hparams.shape == (batch, num_hparams) and hparams.device == device)


def _one_hparams_dtype(hparams: Optional[Tensor], *maps: Tensor) -> tuple:
    """(λ, *maps) for the fast paths: as they are when λ has the maps' dtype (the common call, one comparison),
    else in the wider dtype (:func:`stn_kernels._validation.hparams_side`: a float32 λ with a half layer)."""
    if hparams is None or all(m.dtype == hparams.dtype for m in maps):
        return (hparams, *maps)
    return tuple(hparams_side(hparams, *maps))


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
        if info is None or not isinstance(input, Tensor) or not input.dim():  # (0-dim: the full path raises)
            return None
        dtype, device, _, hparams_dtypes, facts = info
        if (input.dtype != dtype or input.device != device or any_autocast()
                or not _fast_hparams_ok(hparams, input.shape[0], params[4].shape[1], hparams_dtypes, device)):
            return None
        if hparams is not None and hparams.dtype != params[4].dtype:
            hparams, hparam_weight = _one_hparams_dtype(hparams, params[4])
            params = params[:4] + (hparam_weight,)
        return kernels(op, device, input.shape[0], dtype, input.numel() == 0), params, facts, hparams

    def _check_call(self, op: str, input, extra=()) -> None:
        """The module's own checks of a call that left the fast path, in its caller's terms, before the public
        function's: the parameters by their public names, then the input's dtype and device against theirs
        (the public function's errors for the input's shape and for hparams name those already)."""
        params = (self.weight, self.hyper_weight, self.bias, self.hyper_bias, self.hparam_weight)
        weight_dim = 2 if op == "hyper_linear" else 4
        _raise_if_invalid(self, params, extra, lambda: layer_param_error(*params, weight_dim), self._check_params, op,
                          params, extra)
        check_data_like(input, "input", self.weight, "the layer's parameters")

    def _check_params(self, op: str, params: tuple, extra) -> Optional[tuple]:
        """(dtype, device, λ map dtype, allowed λ dtypes, facts) when the parameters and ``extra`` pass every
        check, else None."""
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

    def _folded(self, hparams: Tensor) -> dict:
        """{"weight": (W', weight), "bias": (b', bias)} at the shared λ ``hparams`` [H]: W' = a·W + diag(V·λ)·W_hyper
        and b' = a·b + (C·λ) ⊙ b_hyper along the output rows / channels (a: ``elem_scalar``, else 1), in float64
        rounded once to the dtype of weight and bias (:mod:`stn_kernels.freeze`); for the ``fold`` methods."""
        from .freeze import check_shared_hparams, fold_scaled, refuse_dropconnect

        name = type(self).__name__
        check_shared_hparams(hparams, self.num_hparams, f"this {name}")
        if self.weight is None:
            raise TypeError(f"{name}: holds only the hyper path (its weights are those of an nn.LSTM converted by "
                            f"stn_kernels.convert): fold the whole TorchLayoutHyperLSTM")
        refuse_dropconnect(self, (getattr(self, "weight_mask", None),), None, name)
        weight_scale, bias_scale = self._scales()
        scalar = self._parameters.get("elem_scalar")
        return {"weight": (fold_scaled(self.weight, self.hyper_weight, weight_scale, hparams, 0, scalar), self.weight),
                "bias": (fold_scaled(self.bias, self.hyper_bias, bias_scale, hparams, 0, scalar), self.bias)}


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

    # The dim of a sequence input [T, B, K] that holds the examples when λ comes from an hparams block: 0, or 1
    # for time-major input (set by convert(..., batch_first=False); the block's batch_dim overrides it).
    hparams_batch_dim = 0

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None) -> Tensor:
        """``input`` [B, in_features] or [B, *, in_features]; ``hparams`` [B, num_hparams] (row b for example b),
        [num_hparams] (shared) or None. A layer made by :func:`stn_kernels.convert` takes λ from an enclosing
        ``stn_kernels.hparams`` block when ``hparams`` is None, its rows along dim 1 of a time-major [T, B, K]
        input when the layer's ``hparams_batch_dim`` or the block's ``batch_dim`` is 1."""
        from_context = hparams is None and self.context_hparams
        if from_context:
            hparams, dim = context_layout(input, self.hparams_batch_dim, 3)
            if dim:
                return self._time_major(input, hparams)
        fast = self._fast_call("hyper_linear", input, hparams)
        if fast is not None and input.dim() == 2 and input.shape[1] == fast[1][0].shape[1]:
            weight, hyper_weight, bias, hyper_bias, hparam_weight = fast[1]
            if self._parameters.get("elem_scalar") is not None:
                weight, bias = self._elementary(weight, bias)
            host, hparams = fast[2][0], fast[3]
            if host is not None and fast[0] is reference:  # the reference's ops, issued from C++
                return host.hyper_linear(input, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight)
            return apply_hyper_linear_stacked(fast[0], input, hparams, weight, hyper_weight, bias, hyper_bias,
                                              hparam_weight)
        self._check_call("hyper_linear", input)
        if from_context and hparams is not None and hparams.dim() == 2:
            check_rows(hparams, input, 0, type(self).__name__)  # names hparams, with the layout hint
        weight_scale, bias_scale = self._scales()
        weight, bias = self._elementary(self.weight, self.bias)
        return functional.hyper_linear(input, hparams, weight, self.hyper_weight, bias, self.hyper_bias,
                                       weight_scale, bias_scale)

    def _time_major(self, input: Tensor, lam: Tensor) -> Tensor:
        """The forward of a time-major input [T, B, ..., K] with λ [B, H] from the block: λ's rows repeated over T,
        aligned with ``input.flatten(0, 1)`` (as the batch-first [B, T, K] path repeats them over T)."""
        rows = hparams_rows(lam, input, 1, 3, type(self).__name__)
        if input.shape[-1] != self.in_features:  # the error with the input's own shape, not the flattened one
            return functional.hyper_linear(input, None, self.weight, self.hyper_weight)
        if rows is not lam:  # per-example λ along dim 1: the host path forms the scales once per example
            self._check_call("hyper_linear", input)
            weight, bias = self._elementary(self.weight, self.bias)
            out = functional.hyper_linear_by_example(input, lam, weight, self.hyper_weight, bias, self.hyper_bias,
                                                     *self._scales(), 1)
            if out is not None:
                return out
        return self.forward(input.flatten(0, 1), rows).unflatten(0, input.shape[:2])

    def _facts(self, weight: Tensor, extra) -> Optional[tuple]:
        # (the compiled host path for these parameters, or None: stn_kernels/backends/host.py)
        return (host_ops(weight.device, weight.dtype, self.hparam_weight.dtype),)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, num_hparams={self.num_hparams}{self._scalar_repr()}"
                + (f", hparams_batch_dim={self.hparams_batch_dim}" if self.hparams_batch_dim else ""))

    def fold(self, hparams: Tensor, rates=None) -> nn.Linear:
        """The torch.nn layer this layer computes at the shared λ ``hparams`` [H] (as fed to the layer): an
        ``nn.Linear`` with weight a·W + diag(V·λ)·W_hyper and bias a·b + (C·λ) ⊙ b_hyper (none without bias; a:
        ``elem_scalar``, else 1), computed in float64 and rounded once to the weight's dtype. New Parameters
        (``requires_grad`` as ``weight``'s and ``bias``'s), in this layer's train/eval mode; this layer is left
        as it is. A DropConnect layer converted from the published LSTM folds in eval mode only (no torch.nn layer
        has DropConnect). ``rates`` is ignored (for :func:`stn_kernels.freeze`, which passes it to every layer)."""
        from .freeze import plain_layer

        values = self._folded(hparams)
        layer = plain_layer(nn.Linear, self.in_features, self.out_features, self.bias is not None, values=values)
        return layer.train(self.training)


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
        """``input`` [B, in_channels, H, W] (any memory format); ``hparams`` [B, num_hparams] (row b for image b),
        [num_hparams] (shared) or None (the plain convolution). A layer made by :func:`stn_kernels.convert` takes λ
        from an enclosing ``stn_kernels.hparams`` block when ``hparams`` is None (images are always batch first).
        Returns [B, out_channels, H_out, W_out] as ``nn.Conv2d`` with the same arguments."""
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
                host = None if fast[3] is None or self.groups != 1 or fast[0] is not reference \
                    or not input.is_contiguous() else host_ops(input.device, input.dtype, fast[3].dtype)
                if host is not None:  # the packed convolution and one pass each way, in C++ (csrc/host/conv.cpp)
                    return host.hyper_conv2d(input, fast[3], weight, hyper_weight, bias, hyper_bias, hparam_weight,
                                             stride, padding, dilation)
                return apply_hyper_conv2d_stacked(fast[0], input, fast[3], weight, hyper_weight, bias, hyper_bias,
                                                  hparam_weight, stride, padding, dilation, self.groups)
        self._check_call("hyper_conv2d", input, geometry)
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

    def fold(self, hparams: Tensor, rates=None) -> nn.Conv2d:
        """The torch.nn layer this layer computes at the shared λ ``hparams`` [H] (as fed to the layer): an
        ``nn.Conv2d`` with the same kernel_size, stride, padding ("same"/"valid" included), dilation, groups and
        padding_mode, weight a·W + (V·λ)[c]·W_hyper[c] and bias a·b + (C·λ) ⊙ b_hyper per output channel c (none
        without bias; a: ``elem_scalar``, else 1), computed in float64 and rounded once to the weight's dtype. New
        Parameters (``requires_grad`` as ``weight``'s and ``bias``'s), in this layer's train/eval mode; this layer
        is left as it is. ``rates`` is ignored (for :func:`stn_kernels.freeze`)."""
        from .freeze import plain_layer

        layer = plain_layer(nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                            padding=self.padding, dilation=self.dilation, groups=self.groups,
                            bias=self.bias is not None, padding_mode=self.padding_mode, values=self._folded(hparams))
        return layer.train(self.training)


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
    hparams_batch_dim = 0  # as HyperLinear's: 1 for time-major [T, B] indices (convert(..., batch_first=False))

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

    def _tables(self, weight: Optional[Tensor] = None, hyper_weight: Optional[Tensor] = None):
        """(weight, hyper_weight) as the forward uses them (the layer's own, or tables derived from them, such as
        the published layer's ``dropoute``-masked ones): with no gradient through row ``padding_idx``, as
        ``F.embedding(..., padding_idx)`` on those tables gives."""
        weight = self.weight if weight is None else weight
        hyper_weight = self.hyper_weight if hyper_weight is None else hyper_weight
        if self.padding_idx is None:
            return weight, hyper_weight
        return _NoGradRow.apply(weight, self.padding_idx), _NoGradRow.apply(hyper_weight, self.padding_idx)

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
        info = _cached(self, params, (), _checked_with_host, embedding_param_info, *params)
        if info is None or not isinstance(input, Tensor):
            return None
        dtype, device, _, hparams_dtypes, host = info
        if (input.dtype not in (torch.int64, torch.int32) or input.device != device or input.dim() <= batch_dim
                or not _fast_hparams_ok(hparams, input.shape[batch_dim], params[2].shape[1], hparams_dtypes, device)):
            return None
        if kernels("hyper_embedding", device, params[0].shape[0], dtype, params[0].numel() == 0) is not reference:
            return None
        if hparams is not None and hparams.dtype != params[2].dtype:
            hparams, hparam_weight = _one_hparams_dtype(hparams, params[2])
            params = params[:2] + (hparam_weight,)
        try:
            # The index range is checked by F.embedding itself: an IndexError on the CPU (the full path then
            # raises the ValueError with the range found), a device assert on CUDA (as nn.Embedding's).
            if host is not None:  # the same ops, issued from C++
                return host.hyper_embedding_by_example(input, hparams, *params, batch_dim)
            return reference.hyper_embedding_by_example(input, hparams, *params, batch_dim)
        except IndexError:
            return None

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None, batch_dim: Optional[int] = None) -> Tensor:
        """``input`` integer indices [B, *]; ``hparams`` [B, num_hparams] (row b for the indices of example b),
        [num_hparams] (shared) or None. ``batch_dim``: the dim of ``input`` that holds the examples, 0 (None: the
        default) or 1 for time-major [T, B] indices. A layer made by :func:`stn_kernels.convert` takes λ from an
        enclosing ``stn_kernels.hparams`` block when ``hparams`` is None, along its ``hparams_batch_dim`` (or the
        block's ``batch_dim``) for indices of 2 or more dims, unless ``batch_dim`` is given."""
        from_context = hparams is None and self.context_hparams
        if from_context:
            hparams, dim = context_layout(input, self.hparams_batch_dim, 2)
            if batch_dim is None:
                batch_dim = dim
        if batch_dim is None:
            batch_dim = 0
        elif batch_dim is True or batch_dim is False or batch_dim not in (0, 1):
            raise ValueError(f"batch_dim: expected None, 0 or 1, got {batch_dim!r}")
        out = self._fast(input, hparams, batch_dim) if self.padding_idx is None else None
        if out is not None:
            return out
        self._check_params()
        if from_context and hparams is not None and hparams.dim() == 2:
            check_rows(hparams, input, batch_dim, type(self).__name__)  # names hparams, with the layout hint
        weight, hyper_weight = self._tables()
        if batch_dim == 1:
            if input.dim() < 2:
                raise ValueError(f"input: expected shape [T, B, ...] with batch_dim=1, got {tuple(input.shape)}")
            out = functional.hyper_embedding(input.transpose(0, 1), hparams, weight, hyper_weight,
                                             self.hparam_weight)
            return out.transpose(0, 1)
        return functional.hyper_embedding(input, hparams, weight, hyper_weight, self.hparam_weight)

    def _check_params(self) -> None:
        """For a call that left the fast path: the parameters' problem, naming each by its public name, before the
        public function's checks (which call V ``weight_scale``)."""
        params = (self.weight, self.hyper_weight, self.hparam_weight)
        _raise_if_invalid(self, params, (), lambda: embedding_param_error(*params), _checked_with_host,
                          embedding_param_info, *params)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_published(state_dict, prefix, _EMBEDDING_NAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        padding = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        layout = f", hparams_batch_dim={self.hparams_batch_dim}" if self.hparams_batch_dim else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}, num_hparams={self.num_hparams}{layout}"

    def fold(self, hparams: Tensor, rates=None) -> nn.Embedding:
        """The torch.nn layer this layer computes at the shared λ ``hparams`` [H] (as fed to the layer): an
        ``nn.Embedding`` with the same ``padding_idx`` and table E + E_hyper·diag(V·λ) (column d scaled by
        (V·λ)[d]), computed in float64 and rounded once to the table's dtype. A new Parameter (``requires_grad`` as
        ``weight``'s), in this layer's train/eval mode; this layer is left as it is. The row ``padding_idx`` keeps
        its folded value (looked up as here) and gets no gradient, as nn.Embedding's. ``rates`` is ignored (for
        :func:`stn_kernels.freeze`); a published layer's ``dropoute`` (a forward argument) has no nn.Embedding
        form."""
        from .freeze import check_shared_hparams, fold_scaled, plain_layer

        check_shared_hparams(hparams, self.num_hparams, f"this {type(self).__name__}")
        table = fold_scaled(self.weight, self.hyper_weight, self.hparam_weight, hparams, dim=1)
        layer = plain_layer(nn.Embedding, self.num_embeddings, self.embedding_dim, self.padding_idx,
                            values={"weight": (table, self.weight)})
        return layer.train(self.training)


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
