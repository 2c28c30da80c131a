"""``convert(model)``: swap the layers of an existing STN codebase for stn_kernels layers, in place.

Recognised by parameter and submodule names (the classes themselves live in other people's code):

==========================  ===========================================================  =====================
published layer             names                                                        becomes
==========================  ===========================================================  =====================
STN (CNN) linear / conv     ``elem_weight`` [N,K] / [C,C',kh,kw], ``hnet_weight``,       HyperLinear / HyperConv2d
                            ``htensor_to_scalars.weight``, optional ``elem_bias``,
                            ``hnet_bias``, ``elem_scalar``
STN (LSTM) linear           ``elem_weight_raw``, ``hnet_weight_raw``,                    DropConnectHyperLinear
                            ``hnet_tensor_to_scalars.weight``, opt. biases
STN (LSTM) embedding        ``elem_embedding.weight``, ``hnet_embedding.weight``,        TimeMajorHyperEmbedding
                            ``hnet_tensor_to_scalars.weight``
STN ``HyperLSTMCell``       class name, children ``i2h`` [4N,K] and ``h2h`` [4N,N] (both   HyperLSTMCell (fused
                            STN-LSTM linears, as above)                                  recurrence)
Delta-STN linear / conv     ``general_weight``, ``response_weight``,                     HyperLinear / HyperConv2d
                            ``hyper_bottleneck.weight``, opt. biases
``nn.Linear``/``nn.Conv2d``  (only with ``num_hparams``)                                  HyperLinear / HyperConv2d
``nn.Embedding``            (only with ``num_hparams``)                                  HyperEmbedding
``nn.LSTM``                 (only with ``num_hparams``) not bidirectional, no proj_size  TorchLayoutHyperLSTM
==========================  ===========================================================  =====================

The new layers take over the *same* ``nn.Parameter`` objects (no copy), so shared and tied
weights stay shared (the LSTM's decoder tied to the embedding), memory does not double, and an
optimiser built before ``convert`` (as the published scripts build theirs) keeps training the
converted model along the same trajectory. That includes the official ``elem_scalar`` a, kept as the
layer's ``elem_scalar`` (out = a·(W x + b) + ...); ``layer.fold_elem_scalar()`` folds it into new
weight and bias Parameters for inference. Forward signatures stay those of the published layers
(``forward(input, htensor)``), so the model's own forward runs unchanged.

Converted Delta-STN layers are also instances of the published classes (see ``_also_instance_of``), so
Delta-STN's ``isinstance``-based parameter lists stay right. The official embedding's ``padding_idx=-1`` (no
gradient into the last row of either table) is kept as ``padding_idx``. Layers with the elementary names but no
hyper path (the official non-STN baseline's ``DropconnectLinear``) are left alone.

Plain ``nn.Linear``/``nn.Conv2d`` get a hyper path whose λ-map ``hparam_weight`` starts at zero
(outputs unchanged at conversion, as Delta-STN initialises its bottleneck) and whose
``hyper_weight``/``hyper_bias`` get the usual U(±1/√fan_in) init (so the gradient w.r.t.
``hparam_weight`` is not zero); your forward must then pass the hyperparameters as the second
argument to use it, or run it inside ``with stn_kernels.hparams(lam):``, which feeds ``lam`` to every layer
converted from a plain one whose forward got none; :func:`revert` puts the original modules back.

A plain ``nn.LSTM`` becomes a :class:`TorchLayoutHyperLSTM` (a :class:`~stn_kernels.HyperLSTM`): its weights and
biases stay the nn.LSTM's own Parameters under their names (``weight_ih_l0``, ...), reordered from torch's gate
order (i, f, g, o) to ours in each forward, so they too are shared, not copied (optimisers built before
converting keep working); outputs, states and gradients are nn.LSTM's without λ, train-mode ``dropout`` between
layers included.

A plain layer no Hyper layer can stand in for (a bidirectional ``nn.LSTM``, an ``nn.Embedding`` with ``max_norm``, a
subclass, a parametrized or hooked layer, ...: see :func:`convert`) is left as it is and reported with the reason,
the rest of the model converted; converting such a layer on its own (``convert(layer, num_hparams=H)``) raises
ValueError. ``exclude=`` leaves modules by name or type on purpose. Without ``report=True``, one UserWarning lists
the layers of a kind convert takes that it could not take, and every module left when nothing at all was
converted: nothing is skipped without a word (a BatchNorm, or a published model's plain decoder next to
converted layers, is only in the report).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from . import functional
from .modules import HyperConv2d, HyperEmbedding, HyperLinear
from .modules_lstm import HyperLSTM, HyperLSTMCell

__all__ = ["convert", "revert", "ConvertReport", "DropConnectHyperLinear", "TimeMajorHyperEmbedding",
           "TorchLayoutHyperLSTM", "published_layer_kind"]


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
        if self.weight_mask is None:
            return super().forward(input, hparams)
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
        batch_dim = 1 if input.dim() >= 2 else 0
        weight, hyper_weight = self._tables()
        # As the published layer: no draw for a rate of 0 (which its model passes in eval mode).
        if _check_rate(dropoute, "dropoute"):
            row_scale = _keep_mask((weight.shape[0], 1), weight, dropoute, "dropoute")
            weight, hyper_weight = weight * row_scale, hyper_weight * row_scale
        if batch_dim == 1:
            out = functional.hyper_embedding(input.transpose(0, 1), hparams, weight, hyper_weight,
                                             self.hparam_weight)
            return out.transpose(0, 1)
        return functional.hyper_embedding(input, hparams, weight, hyper_weight, self.hparam_weight)


def _in_our_gate_order(param: Optional[Tensor]) -> Optional[Tensor]:
    """nn.LSTM's gate blocks (i, f, g, o) along dim 0 in ours, the official STN's (f, i, o, g)."""
    if param is None:
        return None
    i, f, g, o = param.chunk(4)
    return torch.cat((f, i, o, g))


class HyperPathLSTMCell(HyperLSTMCell):
    """A layer of a :class:`TorchLayoutHyperLSTM`: only the hyper path (its elementary weights are the nn.LSTM's
    Parameters, held by the TorchLayoutHyperLSTM), so it cannot run on its own."""

    def forward(self, *args, **kwargs):
        raise TypeError("HyperPathLSTMCell: holds only the hyper path of one layer of an nn.LSTM converted by "
                        "stn_kernels.convert (the weights are the nn.LSTM's, on the TorchLayoutHyperLSTM): "
                        "call the whole TorchLayoutHyperLSTM")


class TorchLayoutHyperLSTM(HyperLSTM):
    """The HyperLSTM that :func:`convert` makes of an ``nn.LSTM``: the nn.LSTM's own Parameters, under its names
    (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``) and in its gate order
    (i, f, g, o), are the elementary weights; ``cells[k]`` (:class:`HyperPathLSTMCell`) hold only the hyper path
    (``i2h`` / ``h2h``: ``hyper_weight``, ``hyper_bias``, ``hparam_weight``; ``weight`` and ``bias`` are None).
    nn.LSTM's ``dropout`` between layers is kept (the same F.dropout draws).

    Why the nn.LSTM's Parameters are not simply the cells' weights: our recurrence takes the gates in the
    official STN's order (f, i, o, g), so the same objects cannot serve as i2h / h2h weights. A copy in our
    order would leave an optimiser built before :func:`convert`, and the nn.LSTM that :func:`revert` puts back,
    with stale tensors; reordering their rows in place would scramble an optimiser's state (Adam's moments) and
    anything else holding them. So the nn.LSTM's Parameters stay the source of truth, and each forward reorders
    their gate blocks (a cat of four views per tensor, differentiable, small next to the recurrence).
    """

    def __init__(self, lstm: nn.LSTM, *, num_hparams: int) -> None:
        weight = lstm.weight_ih_l0
        super().__init__(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
                         num_hparams=num_hparams, device=weight.device, dtype=weight.dtype)
        if lstm.num_layers > 1:  # nn.LSTM ignores it (with a warning) for one layer
            self.dropout = float(lstm.dropout)
        self._elementary_names = []
        for layer, cell in enumerate(self.cells):
            cell.__class__ = HyperPathLSTMCell  # the same module with the hyper path only: see its docstring
            for linear in (cell.i2h, cell.h2h):
                linear.register_parameter("weight", None)
                linear.register_parameter("bias", None)
            names = tuple(f"{name}_l{layer}" if lstm.bias or name.startswith("weight") else None
                          for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))
            for name in filter(None, names):
                _take(self, name, getattr(lstm, name))
            self._elementary_names.append(names)

    def _layer_params(self, layer: int, dropconnect):
        elementary = tuple(None if name is None else _in_our_gate_order(getattr(self, name))
                           for name in self._elementary_names[layer])
        return self.cells[layer]._params(dropconnect, elementary)

    def reset_parameters(self) -> None:
        """The hyper path as HyperLSTM's, the nn.LSTM's Parameters as ``nn.LSTM.reset_parameters``."""
        super().reset_parameters()
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for names in self._elementary_names:
                for name in filter(None, names):
                    getattr(self, name).uniform_(-bound, bound)


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


def _convert_plain(module: nn.Module, num_hparams: int, where: str) -> nn.Module:
    if isinstance(module, nn.LSTM):
        new = TorchLayoutHyperLSTM(module, num_hparams=num_hparams)
    else:
        new = _convert_plain_layer(module, num_hparams)
    with torch.no_grad():  # the hyper path adds (V·λ)⊙(W_h x) + (C·λ)⊙b_h = 0 until V, C learn
        for name, param in new.named_parameters():
            if name.rpartition(".")[2] == "hparam_weight":
                param.zero_()
    new.context_hparams = True  # λ from an enclosing stn_kernels.hparams(...) block when the forward gets none
    # Kept outside the module tree (not a submodule: no second copy of its parameters) for revert().
    object.__setattr__(new, "_stn_original", module)
    return new


def _convert_plain_layer(module: nn.Module, num_hparams: int) -> nn.Module:
    weight, bias = module.weight, getattr(module, "bias", None)
    factory = {"dtype": weight.dtype, "device": weight.device}
    if isinstance(module, nn.Embedding):
        new = HyperEmbedding(weight.shape[0], weight.shape[1], module.padding_idx, num_hparams=num_hparams,
                             **factory)
    elif isinstance(module, nn.Conv2d):
        new = HyperConv2d(weight.shape[1] * module.groups, weight.shape[0], tuple(weight.shape[2:]),
                          stride=module.stride, padding=module.padding, dilation=module.dilation,
                          groups=module.groups, bias=bias is not None, padding_mode=module.padding_mode,
                          num_hparams=num_hparams, **factory)
    else:
        # Sizes from the weight, not the attributes: a tied weight may have replaced the one built (the official
        # LSTMs build nn.Linear(nhid, ntoken) and then tie it to the [ntoken, ninp] embedding).
        new = HyperLinear(weight.shape[1], weight.shape[0], bias is not None, num_hparams=num_hparams, **factory)
    _take(new, "weight", weight)
    if not isinstance(module, nn.Embedding):
        _take(new, "bias", bias)
    return new


def revert(model: nn.Module) -> nn.Module:
    """Undoes :func:`convert` for the layers it made from plain ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` and
    ``nn.LSTM``: each is replaced, in place, by the original module, which holds the same weight and bias
    Parameters (trained since, if they were); the hyper path's own parameters are dropped. Returns ``model``
    (or the original layer if ``model`` itself is a converted one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")

    def original(module: nn.Module) -> Optional[nn.Module]:
        found = module.__dict__.get("_stn_original")
        if found is not None:
            found.train(module.training)
        return found

    top = original(model)
    if top is not None:
        return top
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            back = None if child is None else original(child)
            if back is not None:
                parent._modules[name] = back
    return model


def _check_num_hparams(found: int, expected: Optional[int], where: str) -> None:
    if expected is not None and found != expected:
        raise ValueError(f"num_hparams: expected {expected} to match the published layer {where}, "
                         f"which takes {found} hyperparameters")


@dataclass
class ConvertReport:
    """What :func:`convert` did: ``converted`` (name, from type, to type) and ``left`` (name, type, why) for the
    modules with parameters that it did not convert (the excluded ones with the reason "excluded (by name 'x')" or
    "excluded (by type T)"). The model itself, when converted or left, is named by its type."""

    converted: List[Tuple[str, str, str]] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}:"] + [f"  {n}: {a} -> {b}" for n, a, b in self.converted]
        lines += [f"left {len(self.left)}:"] + [f"  {n}: {t} ({why})" for n, t, why in self.left]
        return "\n".join(lines)


# The plain torch.nn layers convert() swaps when num_hparams is given: of exactly these types (a subclass's forward
# may differ), with exactly their own Parameters and no hooks.
_PLAIN_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LSTM)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_EXCLUDED = "excluded"


def _plain_base(module: nn.Module) -> Optional[type]:
    """The one of ``_PLAIN_LAYERS`` that ``module`` is an instance of (its type or a base), else None."""
    return next((base for base in _PLAIN_LAYERS if isinstance(module, base)), None)


def _lstm_lacks(module: nn.Module) -> Optional[str]:
    """The options of an nn.LSTM that HyperLSTM has no form of ("bidirectional=True, proj_size=2"), or None."""
    options = [f"bidirectional={module.bidirectional}"] if module.bidirectional else []
    options += [f"proj_size={module.proj_size}"] if module.proj_size else []
    return ", ".join(options) or None


def _plain_lacks(module: nn.Module, base: type) -> Optional[str]:
    """Why no Hyper layer can stand in for ``module`` (an instance of ``base``, one of ``_PLAIN_LAYERS``), or None
    when one can (computing the same function over the same Parameters)."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "an uninitialised lazy module: run one forward before convert"
    if parametrize.is_parametrized(module):
        return (f"parametrized {sorted(module.parametrizations)} (torch.nn.utils.parametrize), which the Hyper "
                f"layer would drop")
    if type(module) is not base:
        return f"a subclass of nn.{base.__name__}, whose forward may differ"
    hooks = [name[1:].replace("_", " ") for name in _HOOKS if getattr(module, name)]
    if hooks:  # also torch.nn.utils.weight_norm / spectral_norm, which recompute the weight in a forward pre-hook
        return f"has {', '.join(hooks)}, which the Hyper layer would not run"
    own = [name for name, param in module._parameters.items() if param is not None]
    if base is nn.LSTM:
        expected = module._flat_weights_names
        fits = sorted(own) == sorted(expected)
    else:  # weight, and a bias unless bias=False (registered as None)
        expected = ["weight"] if base is nn.Embedding else ["weight", "bias"]
        fits = "weight" in own and set(own) <= set(expected)
    if not fits:
        return f"has the Parameters {own}, not nn.{base.__name__}'s {expected}"
    weight = module._parameters[expected[0]]
    if not weight.is_floating_point():
        return f"{weight.dtype} weights (the Hyper layers take floating-point ones)"
    if base is nn.LSTM and _lstm_lacks(module):
        return f"HyperLSTM has no {_lstm_lacks(module)}"
    if base is nn.Embedding:
        options = [f"{name}={getattr(module, name)}" for name in ("max_norm", "scale_grad_by_freq", "sparse")
                   if getattr(module, name) not in (None, False)]
        if options:
            return f"HyperEmbedding has no {', '.join(options)}"
    return None


# Why a module is left when it is nothing convert takes: reported, never warned about (a BatchNorm, the plain
# decoder of a published model converted without num_hparams).
NO_HYPER_FORM = "no hyper form in stn_kernels"
NEEDS_NUM_HPARAMS = "plain layers are converted only with num_hparams"


def _why_left(module: nn.Module, num_hparams: Optional[int]) -> str:
    base = _plain_base(module)
    if base is None:
        return NO_HYPER_FORM
    # A plain layer no Hyper layer can stand in for says why, also without num_hparams (giving it would not help).
    return _plain_lacks(module, base) or NEEDS_NUM_HPARAMS


def _describe(item) -> str:
    if isinstance(item, nn.Module):
        cls = type(item).__name__
        return f"a {cls} instance (exclude it by its name, or all like it by the class {cls})"
    if isinstance(item, type):
        return f"the class {item.__name__}, not an nn.Module subclass"
    return f"{item!r} ({type(item).__name__})"


def _exclusions(exclude) -> Tuple[set, tuple]:
    """``exclude`` as (module names, module types). A single name or type counts as one, as ``isinstance`` takes one
    class or a tuple of them: ``exclude="decoder"`` can only mean that module, never the letters d, e, c, ..."""
    if exclude is None:  # as the default (): nothing excluded
        exclude = ()
    elif isinstance(exclude, (str, type)):
        exclude = (exclude,)
    if isinstance(exclude, nn.Module) or not hasattr(exclude, "__iter__"):
        raise TypeError(f"exclude: expected a module name (str), an nn.Module subclass or an iterable of them, got "
                        f"{_describe(exclude)}")
    items = list(exclude)
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(f"exclude: expected module names (str) or nn.Module subclasses, got {_describe(item)}")
    return {item for item in items if isinstance(item, str)}, tuple(item for item in items if isinstance(item, type))


def convert(model: nn.Module, num_hparams: Optional[int] = None, *,
            exclude: Union[None, str, Type[nn.Module], Iterable[Union[str, Type[nn.Module]]]] = (),
            report: bool = False):
    """Replaces, in place, every published STN / Delta-STN layer in ``model`` with the stn_kernels layer
    computing the same function, and, when ``num_hparams`` is given, every plain ``nn.Linear``, ``nn.Conv2d``,
    ``nn.Embedding`` and ``nn.LSTM`` with a Hyper layer whose hyper path starts at zero (see the module docstring).

    A plain layer no Hyper layer can stand in for is left as it is, with its children, and reported: a subclass
    (``nn.LazyLinear`` not yet initialised, QAT or ``NonDynamicallyQuantizableLinear``, a parametrized layer, your
    own), hooks (``torch.nn.utils.weight_norm``, ``spectral_norm``, yours), Parameters other than its own,
    non-floating-point weights, an ``nn.Embedding`` with ``max_norm``, ``scale_grad_by_freq`` or ``sparse``, an
    ``nn.LSTM`` bidirectional or with ``proj_size``. Converting such a layer itself (``model`` is that layer, with
    ``num_hparams``) raises ValueError instead. Any ``padding``, ``padding_mode``, ``dilation`` and ``groups`` of
    ``nn.Conv2d`` and ``padding_idx`` of ``nn.Embedding`` are converted.

    ``exclude``: modules to leave as they are, together with their children: qualified names (as in
    ``model.named_modules()``; a shared module is left everywhere it occurs) and module types (matched as
    ``isinstance``, so subclasses too), in any iterable, or a single name or type (None: none), e.g.
    ``exclude=("decoder", nn.Embedding)``. Modules shared between several places are converted once and stay
    shared; train/eval mode is kept. Returns ``model``, or the new layer if ``model`` itself is one. Published
    layers must agree with ``num_hparams`` when it is given.

    With ``report=True`` it returns ``(model, ConvertReport)``: what was converted, and which modules with
    parameters were left, and why (excluded by name or type; a plain layer without num_hparams; one no Hyper layer
    can stand in for; no hyper form). With ``report=False``, one UserWarning lists the plain layers no Hyper layer
    can stand in for, and every module left (but excluded ones) when nothing was converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if num_hparams is not None and (isinstance(num_hparams, bool) or not isinstance(num_hparams, int)
                                    or num_hparams < 1):
        raise ValueError(f"num_hparams: expected an int >= 1 or None, got {num_hparams!r}")
    excluded_names, excluded_types = _exclusions(exclude)
    # Each path of a shared module (remove_duplicate=False): it may be excluded by any of its names.
    excluded_by_name = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name in excluded_names:
            excluded_by_name.setdefault(id(module), name)
    unknown = sorted(excluded_names - {name for name, _ in model.named_modules(remove_duplicate=False)})
    if unknown:
        raise ValueError(f"exclude: expected names of modules in the model, got unknown {unknown}")
    converted: Dict[int, nn.Module] = {}
    done = ConvertReport()

    def exclusion(module: nn.Module) -> Optional[str]:
        if id(module) in excluded_by_name:
            return f"{_EXCLUDED} (by name {excluded_by_name[id(module)]!r})"
        by_type = next((cls for cls in excluded_types if isinstance(module, cls)), None)
        return None if by_type is None else f"{_EXCLUDED} (by type {by_type.__name__})"

    def replacement(module: nn.Module, where: str) -> Optional[nn.Module]:
        if id(module) in converted:
            return converted[id(module)]
        if isinstance(module, (HyperLinear, HyperConv2d, HyperEmbedding)):
            return None
        kind = published_layer_kind(module)
        base = _plain_base(module)
        if kind is None and _is_published_lstm_cell(module):
            new = _convert_published_cell(module, num_hparams, where)
        elif kind is not None:
            new = _convert_published(module, kind, num_hparams, where)
        elif num_hparams is not None and base is not None:
            lacks = _plain_lacks(module, base)
            if lacks is not None:
                if module is model:  # converting this very layer was asked for: an error, not a silent no-op
                    raise ValueError(f"model: expected an nn.{base.__name__} a Hyper layer can stand in for, got "
                                     f"{type(module).__name__}: {lacks}")
                return None  # left, with the reason in the report
            new = _convert_plain(module, num_hparams, where)
        else:
            return None
        new.train(module.training)
        converted[id(module)] = new
        done.converted.append((where, type(module).__name__, type(new).__name__))
        return new

    def leave(module: nn.Module, where: str) -> bool:
        """Reports ``module`` as left when it has parameters and is not ours; True to look into its children (not
        those of an excluded module or a plain layer left whole)."""
        why = exclusion(module)
        whole = why is not None or _plain_base(module) is not None
        if (not isinstance(module, (HyperLinear, HyperConv2d, HyperEmbedding, HyperLSTMCell, HyperLSTM))
                and any(True for _ in module.parameters(recurse=whole))):
            done.left.append((where, type(module).__name__, why or _why_left(module, num_hparams)))
        return not whole

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            where = f"{prefix}.{name}" if prefix else name
            new = None if exclusion(child) else replacement(child, where)
            if new is not None:
                parent._modules[name] = new
            elif leave(child, where):
                visit(child, where)

    top = None if exclusion(model) else replacement(model, type(model).__name__)
    if top is None and leave(model, type(model).__name__):
        visit(model, "")
    result = model if top is None else top
    if report:
        return result, done
    # Warned about, so that nothing is skipped silently: the layers of a kind convert takes that it could not take
    # (an nn.Embedding with max_norm, a bidirectional nn.LSTM, a hooked or parametrized layer, ...), and every
    # module left when convert changed nothing at all. Not: a BatchNorm or a published model's plain decoder
    # next to converted layers (the report lists them).
    left = [(name, kind, why) for name, kind, why in done.left if not why.startswith(_EXCLUDED)]
    unasked = [f"{name} ({kind}: {why})" for name, kind, why in left
               if not done.converted or why not in (NO_HYPER_FORM, NEEDS_NUM_HPARAMS)]
    if unasked:
        what = "converted nothing and left" if not done.converted else "left"
        warnings.warn(f"stn_kernels.convert {what} {len(unasked)} module(s) with parameters as they were: "
                      f"{'; '.join(unasked)}. Leave modules on purpose with exclude= (names or types), or pass "
                      f"report=True to get this list in a ConvertReport instead of this warning",
                      UserWarning, stacklevel=2)
    return result
