"""``stn_kernels.freeze(model, hparams)``: the plain torch.nn model that a converted model computes at one shared λ.

With one λ [H] for every example, each hyper layer is a plain layer: out = W·x + (V·λ) ⊙ (W_hyper·x) + b +
(C·λ) ⊙ b_hyper = W'·x + b' with W' = a·W + diag(V·λ)·W_hyper and b' = a·b + (C·λ) ⊙ b_hyper (a: the official
layers' ``elem_scalar``, 1 otherwise). The layers' ``fold(hparams, rates=None)`` methods build those torch.nn layers
(per output row for linear layers, per output channel for convolutions, per column for embeddings, per gate row
for LSTMs, in torch's gate order); :func:`freeze` puts them in a copy of the model. The helpers below hold the
arithmetic and the checks the ``fold`` methods share (written once here; this file imports no layer, so the
layers may import it).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ._validation import check_tensor
from .hparams_context import _check_rates

__all__ = ["freeze"]

_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


# --------------------------------------------------------------------------- checks


def check_shared_hparams(hparams, num_hparams: Optional[int], owner: str = "the layer") -> Tensor:
    """``hparams`` checked as one shared λ [num_hparams] (any floating dtype, finite values); returned as given.
    ``owner`` names what num_hparams comes from, for the message. num_hparams None: any H."""
    check_tensor(hparams, "hparams")
    want = f"[{num_hparams}]" if num_hparams is not None else "[H]"
    if hparams.dim() == 2:
        one_row = " (one row: hparams[0])" if hparams.shape[0] == 1 else ""
        raise ValueError(f"hparams: expected one λ shared by every example, shape {want} (a plain layer has one set "
                         f"of weights), got per-example λ of shape {tuple(hparams.shape)}: pass the one λ to fold"
                         f"{one_row}, as fed to the layers")
    if hparams.dim() != 1:
        raise ValueError(f"hparams: expected one shared λ of shape {want}, got shape {tuple(hparams.shape)}")
    if num_hparams is not None and hparams.shape[0] != num_hparams:
        raise ValueError(f"hparams: expected shape [{num_hparams}] (num_hparams of {owner}), got shape "
                         f"{tuple(hparams.shape)}")
    if not bool(torch.isfinite(hparams).all()):
        raise ValueError(f"hparams: expected finite values, got {hparams.tolist()}")
    return hparams


def check_fold_rates(rates, hparams: Tensor) -> Dict[str, float]:
    """``rates`` (None or a mapping from hyperparameter names to one rate each) as a dict of floats in [0, 1): the
    checks of ``stn_kernels.hparams(..., rates=)``, and one rate per name (no per-example rates)."""
    checked = {}
    for name, rate in _check_rates(rates, hparams).items():
        if isinstance(rate, Tensor):
            if rate.numel() != 1:
                raise ValueError(f"rates[{name!r}]: expected one rate for the frozen model (a float or a "
                                 f"one-element tensor), got shape {tuple(rate.shape)}")
            rate = float(rate.detach())
            if math.isnan(rate) or not 0.0 <= rate < 1.0:
                raise ValueError(f"rates[{name!r}]: expected a rate in [0, 1), got {rate!r}")
        checked[name] = float(rate)
    return checked


def refuse_dropconnect(module: nn.Module, masks: Sequence[Optional[Tensor]], rate, what: str) -> None:
    """ValueError when ``module`` (in training mode) would apply DropConnect (a nonzero ``rate`` or a mask set by
    the published ``mask_weights``): no torch.nn layer has it, so its fold would compute another function."""
    if module.training and (any(mask is not None for mask in masks) or (rate is not None and rate != 0)):
        raise ValueError(f"{what}: DropConnect (dropconnect={rate}, or a mask set by mask_weights) acts in training "
                         f"mode and no torch.nn layer has it; fold the layer in eval mode (layer.eval()), where it "
                         f"computes no DropConnect")


# --------------------------------------------------------------------------- arithmetic


def fold_scaled(base: Optional[Tensor], hyper: Optional[Tensor], scale_map: Tensor, hparams: Tensor, dim: int = 0,
                elem_scalar: Optional[Tensor] = None) -> Optional[Tensor]:
    """a·base + (M·λ) ⊙ hyper, the scale (M·λ)[j] applied along ``dim`` of hyper (M = ``scale_map`` [n, H]), computed
    in float64 and returned in base's dtype, detached; None when base is None. ``hyper`` None (a layer without
    hyper bias) adds nothing. In float64 so that the only rounding is the one to the layer's dtype."""
    if base is None:
        return None
    with torch.no_grad():
        f64 = torch.float64
        out = base.detach().to(f64)
        if elem_scalar is not None:
            out = out * elem_scalar.detach().to(f64)
        if hyper is not None:
            scale = scale_map.detach().to(f64) @ hparams.detach().to(device=scale_map.device, dtype=f64)
            shape = [1] * hyper.dim()
            shape[dim] = -1
            out = out + hyper.detach().to(f64) * scale.view(shape)
        return out.to(base.dtype)


def torch_gate_order(rows: Optional[Tensor]) -> Optional[Tensor]:
    """Gate blocks along dim 0 from ours, the official STN's (f, i, o, g), to nn.LSTM's (i, f, g, o)."""
    if rows is None:
        return None
    f, i, o, g = rows.chunk(4)
    return torch.cat((i, f, g, o))


def plain_layer(cls, *args, values: Mapping[str, Tuple[Optional[Tensor], Optional[Tensor]]], **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` with its Parameters set to ``values`` {name: (value, like)}: new Parameters holding
    ``value`` with requires_grad as ``like`` (the layer's Parameter it comes from). Built without initialising (on
    the meta device, then ``to_empty``, as ``torch.nn.utils.skip_init``, which cannot see nn.LSTM's ``device``
    argument) on the values' device and in their dtype; a value None must be a Parameter the layer does not have
    (bias=False)."""
    first = next(value for value, _ in values.values() if value is not None)
    layer = cls(*args, device="meta", dtype=first.dtype, **kwargs).to_empty(device=first.device)
    with torch.no_grad():
        for name, (value, like) in values.items():
            param = getattr(layer, name)
            if value is None:
                if param is not None:
                    raise AssertionError(f"{cls.__name__}.{name}: built with a Parameter the layer has no value for")
                continue
            param.copy_(value)
            param.requires_grad_(like is None or like.requires_grad)
    return layer


def lstm_layer_values(i2h: tuple, h2h: tuple, hparams: Tensor, layer: int, owner: str) -> dict:
    """The folded nn.LSTM Parameters of one layer, {``weight_ih_l{layer}``: (value, like), ...} in torch's gate
    order, from the (weight, hyper_weight, bias, hyper_bias, V, C) of i2h and h2h in our order (as the layers'
    ``_params`` give them: a weight None is a cell that holds only the hyper path)."""
    if i2h[0] is None or h2h[0] is None:
        raise TypeError(f"{owner}: holds only the hyper path of one layer of an nn.LSTM converted by "
                        f"stn_kernels.convert (the weights are the nn.LSTM's): fold the whole TorchLayoutHyperLSTM")
    values = {}
    for suffix, (weight, hyper_weight, bias, hyper_bias, weight_map, bias_map) in (("ih", i2h), ("hh", h2h)):
        values[f"weight_{suffix}_l{layer}"] = (
            torch_gate_order(fold_scaled(weight, hyper_weight, weight_map, hparams)), weight)
        if bias is not None:
            values[f"bias_{suffix}_l{layer}"] = (torch_gate_order(fold_scaled(bias, hyper_bias, bias_map, hparams)),
                                                 bias)
    return values


# --------------------------------------------------------------------------- the model


def _converted_by_convert(module: nn.Module) -> bool:
    """A layer that takes λ (or its rate) from the ``hparams`` block, never from its caller: a layer convert made
    from a plain one, or a tuned dropout (:class:`stn_kernels.TunedDropout`, an ``nn.Dropout`` with a ``fold``;
    duck-typed, as the layers import this file)."""
    return getattr(module, "context_hparams", False) is True or (
        isinstance(module, nn.modules.dropout._DropoutNd) and callable(getattr(module, "fold", None)))


def _restore_containers(model: nn.Module) -> None:
    """The transformer containers convert swapped to a class of ours (``_torch_class``: a forward without torch's
    fused fast path, see :mod:`stn_kernels.convert_attention`) back to torch's class, in the frozen copy: over
    plain layers the fused path computes the same function, and the frozen model is plain torch.nn."""
    for module in model.modules():
        plain = getattr(type(module), "_torch_class", None)
        if plain is not None and type(module) is not plain:
            module.__class__ = plain


def freeze(model: nn.Module, hparams: Tensor, *, rates: Optional[Mapping[str, float]] = None) -> nn.Module:
    """The plain torch.nn model that ``model`` computes at one shared λ: a new model, ``model`` left as it is.

    A deep copy of ``model`` in which every layer :func:`stn_kernels.convert` made from a plain torch.nn layer (those
    that take λ from ``with stn_kernels.hparams(lam):``) is replaced by ``layer.fold(hparams, rates)``, the torch.nn
    layer it computes at that λ: ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.LSTM`` with
    W' = W + diag(V·λ)·W_hyper, b' = b + (C·λ) ⊙ b_hyper (per output row, output channel, embedding column, gate
    row), computed in float64 and rounded once to the layer's dtype. Every other module is copied as it is.

    ``hparams``: λ [H] as fed to the layers, i.e. the tensor you would pass to ``stn_kernels.hparams(...)`` for
    every example (for the STN toolkit: the layers' input at the tuned λ, unconstrained or constrained as the
    trainer feeds them, not the hyperparameters' values). Per-example λ [B, H] is refused (a plain layer has one
    set of weights). ``rates``: {hyperparameter name: rate} for the tuned dropouts, which fold into ``nn.Dropout``
    at that rate (a tuned dropout without a rate here keeps its own ``p``).

    The frozen model's Parameters are new tensors (no gradient history, ``requires_grad`` as the Parameters they
    come from); shared modules stay shared; train/eval mode is kept. Its outputs equal ``model``'s inside
    ``with stn_kernels.hparams(hparams):`` up to the rounding of the folded weights (float64: 1e-12), in eval mode
    (and in training mode but for the random draws of dropouts).

    Raises ValueError for a hyper layer that ``convert`` did not make from a plain one (built directly, or converted
    from published STN code): its caller passes λ to its forward, which the torch.nn layer could not take; fold it
    yourself with ``layer.fold(hparams)`` where the forward no longer passes λ. Also for a converted layer with
    hooks (the folded layer would not run them) or with no ``fold``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    check_shared_hparams(hparams, None)
    rates = check_fold_rates(rates, hparams)
    folded: Dict[int, nn.Module] = {}

    def fold(module: nn.Module, where: str) -> None:
        fold_method = getattr(module, "fold", None)
        if not callable(fold_method):
            raise ValueError(f"model: the layer {where} ({type(module).__name__}) takes λ from stn_kernels.hparams "
                             f"but has no fold method, so freeze cannot make it a torch.nn layer")
        hooks = [name[1:].replace("_", " ") for name in _HOOKS if getattr(module, name, None)]
        if hooks:
            raise ValueError(f"model: the layer {where} ({type(module).__name__}) has {', '.join(hooks)}, which the "
                             f"folded torch.nn layer would not run; remove them before freeze and register them "
                             f"on the frozen model")
        num_hparams = getattr(module, "num_hparams", None)
        check_shared_hparams(hparams, num_hparams, f"the layer {where}")
        new = fold_method(hparams, rates)
        new.train(module.training)
        folded[id(module)] = new

    def visit(module: nn.Module, where: str) -> None:
        if id(module) in folded:
            return
        if _converted_by_convert(module):
            fold(module, where)
            return  # its children are the hyper path, folded with it
        if callable(getattr(module, "fold", None)) and hasattr(module, "context_hparams"):
            raise ValueError(f"model: the hyper layer {where} ({type(module).__name__}) was not made by "
                             f"stn_kernels.convert from a plain torch.nn layer: the model's forward passes λ to it, "
                             f"which the torch.nn layer could not take; freeze folds only converted plain layers. "
                             f"Fold it yourself with {where}.fold(hparams) in a model whose forward no longer passes "
                             f"λ")
        for name, child in module._modules.items():
            if child is not None:
                visit(child, f"{where}.{name}" if where else name)

    visit(model, "")
    if id(model) in folded:
        return folded[id(model)]
    if not folded:
        warnings.warn("stn_kernels.freeze found no layer made by stn_kernels.convert in model: the frozen model is "
                      "a plain copy", UserWarning, stacklevel=2)
    # Each converted layer is copied as its folded layer (a shared one stays shared): deepcopy takes the memo's
    # entry for it and never copies the hyper path or the original module convert kept for revert.
    frozen = copy.deepcopy(model, dict(folded))
    _restore_containers(frozen)
    return frozen
