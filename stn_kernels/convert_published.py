"""The published STN / Delta-STN layers that :func:`stn_kernels.convert` recognises, and the layers it makes of
them (recognition by parameter and submodule names: the classes live in other people's code). The table, and
what is kept of the published behaviour, are in :mod:`stn_kernels.convert`'s docstring."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import functional
from .modules import HyperConv2d, HyperEmbedding, HyperLinear
from .modules_lstm import HyperLSTMCell

__all__ = ["DropConnectHyperLinear", "TimeMajorHyperEmbedding", "published_layer_kind"]

def _check_rate(rate, what: str) -> float:
    """``rate`` (a float or a 0-dim tensor) as a float in [0, 1), else ValueError naming ``what``."""
    value = float(rate.detach() if isinstance(rate, Tensor) else rate)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what}: expected a dropout rate in [0, 1), got {value}")
    return value


def _keep_mask(shape, like: Tensor, rate, what: str) -> Optional[Tensor]:
    """The published layers' dropout mask: one Bernoulli(1 − rate) draw of ``shape`` in ``like``'s dtype, divided
    by 1 − rate; None when rate is 0 (the draw is still made: the published code consumes the RNG then too, and
    later same-seed masks match only if ours does). ``rate`` as the published model passes it: a float, or a
    0-dim tensor when tuned, which draws as the published code does (``bernoulli_`` with a tensor p) and keeps
    its gradient through 1/(1 − rate)."""
    value = _check_rate(rate, what)
    keep_prob = 1 - rate
    keep = torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(keep_prob)
    return None if value == 0.0 else keep / keep_prob


class DropConnectHyperLinear(HyperLinear):
    """HyperLinear with the official STN LSTM's DropConnect: ``mask_weights(p)`` draws one Bernoulli(1−p)
    mask over the weight matrix, scaled by 1/(1−p), shared by ``weight`` and ``hyper_weight`` and by the
    whole batch, and used by every forward until the next call (the published HyperLSTM calls it
    once per sequence). In training mode it draws as the published layer does, also for p = 0 (the same
    random numbers in the same order: same-seed masks match); in eval mode it draws nothing and masks nothing."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_mask: Optional[Tensor] = None

    def mask_weights(self, wdrop) -> None:
        if not self.training:
            _check_rate(wdrop, "wdrop")
            self.weight_mask = None
            return
        self.weight_mask = _keep_mask(self.weight.shape, self.weight, wdrop, "wdrop")

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None) -> Tensor:
        """:meth:`HyperLinear.forward` with both weights times the mask of the last ``mask_weights`` call (training
        mode), as the published layer."""
        if self.weight_mask is None:
            return super().forward(input, hparams)
        self._check_call("hyper_linear", input)
        weight_scale, bias_scale = self._scales()
        return functional.hyper_linear(input, hparams, self.weight * self.weight_mask,
                                       self.hyper_weight * self.weight_mask, self.bias, self.hyper_bias,
                                       weight_scale, bias_scale)


class TimeMajorHyperEmbedding(HyperEmbedding):
    """HyperEmbedding with the official STN LSTM's interface: ``forward(input [T, B], hnet_tensor [B, H],
    dropoute=0)``, where ``dropoute`` drops whole rows of both tables (one mask per call, shared by the
    batch) and scales the kept ones by 1/(1−p)."""

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None,  # type: ignore[override]
                dropoute=0.0) -> Tensor:
        """The published call: ``input`` token indices [T, B] (time-major; [B] for one step), ``hparams`` [B, H], [H]
        or None, ``dropoute`` the rate at which whole rows of both tables are dropped (one mask per call, kept rows
        scaled by 1/(1−p); a float, or a 0-dim tensor when tuned). Returns [T, B, embedding_dim]."""
        batch_dim = 1 if isinstance(input, Tensor) and input.dim() >= 2 else 0
        self._check_params()
        weight, hyper_weight = self.weight, self.hyper_weight
        # As the published layer: no draw for a rate of 0 (which its model passes in eval mode).
        if _check_rate(dropoute, "dropoute"):
            row_scale = _keep_mask((weight.shape[0], 1), weight, dropoute, "dropoute")
            weight, hyper_weight = weight * row_scale, hyper_weight * row_scale
        # The padding row's gradient is blocked after the mask, as the published F.embedding(..., padding_idx=-1)
        # of the masked tables: that row gives nothing to the tables nor to a tuned rate's 1/(1 − p).
        weight, hyper_weight = self._tables(weight, hyper_weight)
        if batch_dim == 1:
            out = functional.hyper_embedding(input.transpose(0, 1), hparams, weight, hyper_weight,
                                             self.hparam_weight)
            return out.transpose(0, 1)
        return functional.hyper_embedding(input, hparams, weight, hyper_weight, self.hparam_weight)




# --------------------------------------------------------------------------- recognition

# kind -> (direct parameter names that must all be present, submodule holding the λ map)
_PUBLISHED = {
    "stn": (("elem_weight", "hnet_weight"), "htensor_to_scalars"),
    "stn_lstm": (("elem_weight_raw", "hnet_weight_raw"), "hnet_tensor_to_scalars"),
    "delta_stn": (("general_weight", "response_weight"), "hyper_bottleneck"),
}
_EMBEDDING = (("elem_embedding", "hnet_embedding"), "hnet_tensor_to_scalars")
_BIAS_NAMES = {"stn": ("elem_bias", "hnet_bias"), "stn_lstm": ("elem_bias", "hnet_bias"),
               "delta_stn": ("general_bias", "response_bias")}
# Any of these hyper-path weights marks a module as "meant to be a published STN layer": a partial match is an
# error. The elementary names alone (``elem_weight_raw``, ``elem_bias``, ...) are not: the published non-STN
# baselines use them too (the official ``lstm/model_basic.py``'s ``DropconnectLinear``), and are left alone.
_MARKERS = {"hnet_weight", "hnet_weight_raw", "response_weight"}


def published_layer_kind(module: nn.Module) -> Optional[str]:
    """"stn", "stn_lstm", "stn_embedding" or "delta_stn" for a published STN layer, else None.

    None also for a layer with only the elementary names and no hyper path (the official non-STN
    baseline's ``DropconnectLinear``: ``elem_weight_raw`` and ``elem_bias`` only). Raises ValueError
    for a module that has a hyper path of the published names but not all of its parts.
    """
    params = module._parameters
    children = module._modules
    if all(name in children for name in _EMBEDDING[0]):
        if _EMBEDDING[1] not in children:
            raise ValueError(f"module {type(module).__name__}: has elem_embedding and hnet_embedding like the "
                             f"published HyperEmbedding but no {_EMBEDDING[1]!r} submodule")
        return "stn_embedding"
    for kind, (weights, scales) in _PUBLISHED.items():
        present = [name for name in weights if params.get(name) is not None]
        if not present or (params.get(weights[1]) is None and scales not in children):
            continue  # no hyper path at all: not an STN layer (a baseline's elementary-only layer)
        missing = [name for name in weights if params.get(name) is None]
        if scales not in children or not hasattr(children[scales], "weight"):
            missing.append(f"{scales}.weight")
        if missing:
            raise ValueError(f"module {type(module).__name__}: looks like a published {kind} layer (has "
                             f"{present}) but lacks {missing}")
        return kind
    stray = _MARKERS.intersection(k for k, v in params.items() if v is not None)
    if stray:
        raise ValueError(f"module {type(module).__name__}: has published STN parameter names {sorted(stray)} "
                         f"but does not match any published layer")
    return None


def _pair_attr(module: nn.Module, name: str, default):
    value = getattr(module, name, default)
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _meta_like(cls, *args, **kwargs):
    # Built on the meta device: the parameters are replaced right away, so no memory is spent on an init.
    return cls(*args, device="meta", **kwargs)


def _take(new: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
    if param is None:
        new.register_parameter(name, None)
    elif isinstance(param, nn.Parameter):
        setattr(new, name, param)
    else:
        setattr(new, name, nn.Parameter(param))


def _convert_published(module: nn.Module, kind: str, num_hparams: Optional[int], where: str) -> nn.Module:
    if kind == "stn_embedding":
        elem, hnet = module.elem_embedding.weight, module.hnet_embedding.weight
        scales = module.hnet_tensor_to_scalars.weight
        _check_num_hparams(scales.shape[1], num_hparams, where)
        # The official layer passes its tables' padding_idx to F.embedding, -1 (the last row) when None.
        pads = {getattr(module._modules[name], "padding_idx", None) for name in _EMBEDDING[0]}
        pads = {(-1 if pad is None else pad) % elem.shape[0] for pad in pads}
        if len(pads) != 1:
            raise ValueError(f"{where}: expected elem_embedding and hnet_embedding with the same padding_idx, got "
                             f"rows {sorted(pads)}")
        new = _meta_like(TimeMajorHyperEmbedding, elem.shape[0], elem.shape[1], pads.pop(),
                         num_hparams=scales.shape[1])
        _take(new, "weight", elem)
        _take(new, "hyper_weight", hnet)
        _take(new, "hparam_weight", scales)
        return new

    weights, scales_name = _PUBLISHED[kind]
    weight, hyper_weight = (module._parameters[name] for name in weights)
    bias_name, hyper_bias_name = _BIAS_NAMES[kind]
    bias, hyper_bias = module._parameters.get(bias_name), module._parameters.get(hyper_bias_name)
    scales = module._modules[scales_name].weight
    if getattr(module._modules[scales_name], "bias", None) is not None:
        raise ValueError(f"{where}.{scales_name}: expected a bias-free linear map from λ, got one with a bias")
    if (bias is None) != (hyper_bias is None):
        raise ValueError(f"{where}: expected both {bias_name} and {hyper_bias_name} or neither, got "
                         f"{bias_name}={'set' if bias is not None else None}, "
                         f"{hyper_bias_name}={'set' if hyper_bias is not None else None}")
    num_outputs, hparams_count = weight.shape[0], scales.shape[1]
    if tuple(scales.shape) != (2 * num_outputs, hparams_count):
        raise ValueError(f"{where}.{scales_name}.weight: expected shape [2·{num_outputs}, H], "
                         f"got {tuple(scales.shape)}")
    _check_num_hparams(hparams_count, num_hparams, where)

    elem_scalar = module._parameters.get("elem_scalar")
    if elem_scalar is not None and elem_scalar.numel() != 1:
        raise ValueError(f"{where}.elem_scalar: expected one value (shape [1]), got shape {tuple(elem_scalar.shape)}")

    factory = {"dtype": weight.dtype}
    if weight.dim() == 2:
        cls = DropConnectHyperLinear if kind == "stn_lstm" else HyperLinear
        new = _meta_like(cls, weight.shape[1], num_outputs, bias is not None, num_hparams=hparams_count, **factory)
    elif weight.dim() == 4:
        if kind == "stn_lstm":
            raise ValueError(f"{where}: expected a 2-D elem_weight_raw for the LSTM layer, got {tuple(weight.shape)}")
        groups = int(getattr(module, "groups", 1))
        new = _meta_like(HyperConv2d, weight.shape[1] * groups, num_outputs, tuple(weight.shape[2:]),
                         stride=_pair_attr(module, "stride", 1), padding=_pair_attr(module, "padding", 0),
                         dilation=_pair_attr(module, "dilation", 1), groups=groups, bias=bias is not None,
                         num_hparams=hparams_count, **factory)
    else:
        raise ValueError(f"{where}.{weights[0]}: expected a 2-D (linear) or 4-D (conv) weight, got "
                         f"{tuple(weight.shape)}")
    _take(new, "weight", weight)
    _take(new, "hyper_weight", hyper_weight)
    _take(new, "bias", bias)
    _take(new, "hyper_bias", hyper_bias)
    _take(new, "hparam_weight", scales)
    # The official CNN layers' trained scale stays a Parameter of its own (out = a·(W x + b) + ...): the published
    # script's optimiser, built before convert, keeps training it and W, b in the same parameterisation.
    _take(new, "elem_scalar", elem_scalar)
    if kind == "delta_stn":
        # The published Delta-STN trainers build their two optimisers from these lists.
        new.general_parameters = [p for p in (new.weight, new.bias) if p is not None]
        new.response_parameters = [p for p in (new.hyper_weight, new.hyper_bias, new.hparam_weight) if p is not None]
        new.__class__ = _also_instance_of(type(new), type(module))
    return new


_COMBINED: Dict[tuple, type] = {}


def _also_instance_of(ours: type, published: type) -> type:
    """A subclass of ``ours`` that also has the published class among its bases (after ours, so every method and
    attribute is ours), made once per pair.

    Why: Delta-STN's ``StnModel.get_general_parameters()`` / ``get_response_parameters()`` pick layers with
    ``isinstance(layer, (StnLinear, StnConv2d))``, and a layer that fails the test has all its parameters put in
    the general list (the response optimiser then gets none). Of the ways to keep those lists right, this is the
    least surprising: the converted layer *is* an instance of the published class for every ``isinstance`` in the
    published code (not only those two methods, and without patching the model's methods, which would break for a
    model that builds its lists elsewhere), while it stays an instance of our HyperLinear / HyperConv2d with our
    forward. The published class's ``__init__`` is never run (the instance is built as ours, then re-classed); a
    whole model pickled with ``torch.save(model)`` cannot be unpickled (the class is made at run time): save the
    ``state_dict``, as the published scripts do."""
    key = (ours, published)
    if key not in _COMBINED:
        _COMBINED[key] = type(f"{ours.__name__}As{published.__name__}", (ours, published),
                              {"__module__": __name__, "__doc__": ours.__doc__})
    return _COMBINED[key]


def _is_published_lstm_cell(module: nn.Module) -> bool:
    """The official ``HyperLSTMCell``: that class name, no parameters of its own, and exactly the
    children i2h [4N, K] and h2h [4N, N], both published STN-LSTM linears. (The class name is part of
    the test: a cell of another codebase with i2h / h2h may order its gates differently.)"""
    children = module._modules
    if (type(module).__name__ != "HyperLSTMCell" or set(children) != {"i2h", "h2h"} or module._parameters
            or any(published_layer_kind(children[name]) != "stn_lstm" for name in ("i2h", "h2h"))):
        return False
    w_in, w_hid = children["i2h"].elem_weight_raw, children["h2h"].elem_weight_raw
    n = w_hid.shape[1]
    return w_in.dim() == w_hid.dim() == 2 and w_in.shape[0] == w_hid.shape[0] == 4 * n


def _convert_published_cell(module: nn.Module, num_hparams: Optional[int], where: str) -> nn.Module:
    i2h = _convert_published(module.i2h, "stn_lstm", num_hparams, f"{where}.i2h")
    h2h = _convert_published(module.h2h, "stn_lstm", num_hparams, f"{where}.h2h")
    if i2h.num_hparams != h2h.num_hparams or (i2h.bias is None) != (h2h.bias is None):
        raise ValueError(f"{where}: expected i2h and h2h with the same number of hyperparameters and both with or "
                         f"without biases, got H = {i2h.num_hparams}, {h2h.num_hparams} and biases "
                         f"{i2h.bias is not None}, {h2h.bias is not None}")
    # DropConnect stays with the model: the published one calls h2h.mask_weights(wdrop) before each forward.
    new = _meta_like(HyperLSTMCell, i2h.weight.shape[1], h2h.weight.shape[1], i2h.bias is not None,
                     num_hparams=i2h.num_hparams, dtype=i2h.weight.dtype)
    new.i2h, new.h2h = i2h, h2h
    return new


def _check_num_hparams(found: int, expected: Optional[int], where: str) -> None:
    if expected is not None and found != expected:
        raise ValueError(f"num_hparams: expected {expected} to match the published layer {where}, "
                         f"which takes {found} hyperparameters")
