"""The checks of the modules' parameters (HyperLinear, HyperConv2d, HyperEmbedding, the LSTM cells and stacks), part
of the one validation boundary (:mod:`stn_kernels._validation`): each ``*_error`` function returns what is wrong as
the exception to raise, naming the parameter by its public name as its module's caller sees it
(``cells.0.h2h.hparam_weight``), or None; each ``*_info`` function is what the modules' fast paths cache: the facts
they check each call against, or None when the ``*_error`` check finds a problem (the full path then raises it)."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ._validation import hparams_dtypes


def _param_error(names: Sequence[str], tensors: Sequence[Optional[Tensor]], shapes: Sequence[Optional[tuple]],
                 like: Tensor, like_name: str, hparam_weight: Optional[Tensor] = None,
                 hparam_weight_name: str = "") -> Optional[Exception]:
    """The first of ``tensors`` (None ones skipped) that is not a tensor of its shape (None: any) in ``like``'s
    dtype and on its device, as the exception to raise naming it; then ``hparam_weight`` (the λ map): on that
    device, in a dtype :func:`hparams_dtypes` allows."""
    for name, t, shape in zip(names, tensors, shapes):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            return TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if shape is not None and t.shape != shape:
            return ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        if t.dtype != like.dtype:
            return TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {t.dtype}")
        if t.device != like.device:
            return ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {t.device}")
    if hparam_weight is None:
        return None
    if hparam_weight.device != like.device:
        return ValueError(f"{hparam_weight_name}: expected device {like.device} (the device of {like_name}), got "
                          f"{hparam_weight.device}")
    allowed = hparams_dtypes(like.dtype)
    if hparam_weight.dtype not in allowed:
        return TypeError(f"{hparam_weight_name}: expected dtype {' or '.join(map(str, allowed))} (from {like_name} "
                         f"dtype {like.dtype}), got {hparam_weight.dtype}")
    return None


def _floating_error(weight, name: str) -> Optional[Exception]:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        what = f"dtype {weight.dtype}" if isinstance(weight, Tensor) else type(weight).__name__
        return TypeError(f"{name}: expected a floating-point tensor, got {what}")
    return None


def _map_shape_error(hparam_weight, rows: int, name: str, why: str) -> Optional[Exception]:
    """hparam_weight [rows, H] (a 2-D tensor with ``rows`` rows), else the ValueError naming it."""
    if not isinstance(hparam_weight, Tensor) or hparam_weight.dim() != 2 or hparam_weight.shape[0] != rows:
        got = f"shape {tuple(hparam_weight.shape)}" if isinstance(hparam_weight, Tensor) else \
            type(hparam_weight).__name__
        return ValueError(f"{name}: expected shape [{rows}, num_hparams] ({why}), got {got}")
    return None


_LAYER_NAMES = ("weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")


def layer_param_error(weight, hyper_weight, bias, hyper_bias, hparam_weight, weight_dim: int,
                      names: Sequence[str] = _LAYER_NAMES) -> Optional[Exception]:
    """What is wrong with a HyperLinear / HyperConv2d module's parameters (an LSTM cell's i2h or h2h), as the
    exception to raise naming each by its public name in ``names`` (qualified as the caller sees it:
    ``cells.0.h2h.hparam_weight``), or None when they pass every check the public function makes of them:
    floating weights of one dtype and device, ``weight_dim``-D, biases [N], hparam_weight [2N, H] in a dtype
    :func:`hparams_dtypes` allows."""
    error = _floating_error(weight, names[0])
    if error is None and weight.dim() != weight_dim:
        error = ValueError(f"{names[0]}: expected a {weight_dim}-D tensor, got shape {tuple(weight.shape)}")
    if error is None:
        n = weight.shape[0]
        error = (_map_shape_error(hparam_weight, 2 * n, names[4], f"V then C, {n} rows each")
                 or _param_error(names[1:4], (hyper_weight, bias, hyper_bias), (weight.shape, (n,), (n,)), weight,
                                 names[0], hparam_weight, names[4]))
    return error


def layer_param_info(weight: Tensor, hyper_weight: Tensor, bias: Optional[Tensor], hyper_bias: Optional[Tensor],
                     hparam_weight: Tensor, weight_dim: int) -> Optional[tuple]:
    """(dtype, device, λ map dtype, the λ dtypes the data dtype allows) when a HyperLinear/HyperConv2d module's
    parameters pass every check (:func:`layer_param_error`), else None: such a module takes the full path every
    call, which raises the error naming the parameter."""
    if layer_param_error(weight, hyper_weight, bias, hyper_bias, hparam_weight, weight_dim) is not None:
        return None
    return weight.dtype, weight.device, hparam_weight.dtype, hparams_dtypes(weight.dtype)


def lstm_param_error(i2h: Sequence[Optional[Tensor]], h2h: Sequence[Optional[Tensor]], num_hparams: int,
                     prefix: str = "", names: Optional[Sequence[Sequence[str]]] = None) -> Optional[Exception]:
    """What is wrong with an LSTM layer's i2h [4N, K] and h2h [4N, N] parameters (each as :func:`layer_param_error`
    takes them, in one dtype and on one device, λ maps of ``num_hparams`` columns), as the exception naming the
    parameter (``{prefix}i2h.weight``, ..., or ``names``: the i2h names and the h2h names), or None."""
    if names is None:
        names = [[f"{prefix}{layer}.{name}" for name in _LAYER_NAMES] for layer in ("i2h", "h2h")]
    error = (layer_param_error(*i2h, 2, names[0])
             or _param_error(names[1][:1], h2h[:1], (None,), i2h[0], names[0][0])
             or layer_param_error(*h2h, 2, names[1]))
    if error is not None:
        return error
    weight, h_weight = i2h[0], h2h[0]
    if h_weight.shape[0] != 4 * h_weight.shape[1]:
        return ValueError(f"{names[1][0]}: expected shape [4·hidden_size, hidden_size], got {tuple(h_weight.shape)}")
    if weight.shape[0] != h_weight.shape[0]:
        return ValueError(f"{names[0][0]}: expected {h_weight.shape[0]} rows (4·hidden_size, as {names[1][0]}), "
                          f"got shape {tuple(weight.shape)}")
    for params, layer_names in zip((i2h, h2h), names):
        if params[4].shape[1] != num_hparams:
            return ValueError(f"{layer_names[4]}: expected {num_hparams} columns (num_hparams), got shape "
                              f"{tuple(params[4].shape)}")
    return None


def lstm_stack_param_error(layers: Sequence[tuple], num_hparams: int) -> Optional[Exception]:
    """What is wrong with a stack of LSTM layers, each (i2h, h2h, names) as :func:`lstm_param_error` takes them:
    a layer's weights in another dtype or on another device than the first layer's, a layer's own problem, or a
    layer whose input size is not the previous layer's hidden size; None when they pass."""
    first = layers[0]
    for layer, (i2h, h2h, names) in enumerate(layers):
        error = None if not layer else _param_error(names[0][:1], i2h[:1], (None,), first[0][0], first[2][0][0])
        error = error or lstm_param_error(i2h, h2h, num_hparams, names=names)
        if error is None and layer:
            previous = layers[layer - 1][1][0]
            if i2h[0].shape[1] != previous.shape[1]:
                error = ValueError(f"{names[0][0]}: expected {previous.shape[1]} columns (the hidden size of layer "
                                   f"{layer - 1}), got shape {tuple(i2h[0].shape)}")
        if error is not None:
            return error
    return None


def lstm_param_info(i2h: Sequence[Optional[Tensor]], h2h: Sequence[Optional[Tensor]], num_hparams: int
                    ) -> Optional[tuple]:
    """(dtype, device, λ map dtype, allowed λ dtypes) when a HyperLSTMCell's i2h and h2h layers pass every check
    (:func:`lstm_param_error`) and their λ maps have one dtype, else None."""
    if lstm_param_error(i2h, h2h, num_hparams) is not None or i2h[4].dtype != h2h[4].dtype:
        return None
    return i2h[0].dtype, i2h[0].device, i2h[4].dtype, hparams_dtypes(i2h[0].dtype)


def embedding_param_error(weight, hyper_weight, hparam_weight) -> Optional[Exception]:
    """What is wrong with a HyperEmbedding's tables [num, D] and hparam_weight V [D, H] (as
    :func:`layer_param_error`), or None."""
    error = _floating_error(weight, "weight")
    if error is None and weight.dim() != 2:
        error = ValueError(f"weight: expected shape [num_embeddings, embedding_dim], got {tuple(weight.shape)}")
    if error is None:
        error = (_map_shape_error(hparam_weight, weight.shape[1], "hparam_weight", "embedding_dim rows")
                 or _param_error(("hyper_weight",), (hyper_weight,), (weight.shape,), weight, "weight", hparam_weight,
                                 "hparam_weight"))
    return error


def embedding_param_info(weight: Tensor, hyper_weight: Tensor, hparam_weight: Tensor) -> Optional[tuple]:
    """(dtype, device, λ map dtype, allowed λ dtypes) when a HyperEmbedding's parameters pass every check
    (:func:`embedding_param_error`), else None."""
    if embedding_param_error(weight, hyper_weight, hparam_weight) is not None:
        return None
    return weight.dtype, weight.device, hparam_weight.dtype, hparams_dtypes(weight.dtype)
