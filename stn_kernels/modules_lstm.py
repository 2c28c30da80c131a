"""Drop-in ``torch.nn`` modules for the published STN LSTM: HyperLSTMCell (one layer, the official
``HyperLSTMCell`` fused) and HyperLSTM (a stack of them, nn.LSTM's interface). Their ``i2h`` / ``h2h`` are
:class:`stn_kernels.HyperLinear` layers (parameter names as in :mod:`stn_kernels.modules`); ``load_state_dict``
also accepts the published names.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import functional, reference, reference_lstm
from ._param_checks import lstm_param_error, lstm_param_info, lstm_stack_param_error
from ._validation import (
    REQUIRED,
    any_autocast,
    check_ctor_bool,
    check_ctor_int,
    check_data_like,
    check_hparams,
    check_num_hparams,
    check_probability,
    check_tensor,
    misread_hint,
)
from .backends import kernels
from .backends.host import host_ops
from .hparams_context import current_hparams
from .modules import (
    _LAYER_PARAMS,
    HyperLinear,
    _cached,
    _checked_with_host,
    _fast_hparams_ok,
    _one_hparams_dtype,
    _ParamChecksCache,
    _raise_if_invalid,
)
from .ops import eager


def _set_mask(linear: nn.Module, weight: Tensor, hyper_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Both weights times the DropConnect mask that ``linear.mask_weights`` set, if any."""
    mask = getattr(linear, "weight_mask", None)
    return (weight, hyper_weight) if mask is None else (weight * mask, hyper_weight * mask)


def _layer_tensors(linear: nn.Module) -> tuple:
    """(weight, hyper_weight, bias, hyper_bias, hparam_weight) of an LSTM layer's i2h or h2h."""
    return linear.weight, linear.hyper_weight, linear.bias, linear.hyper_bias, linear.hparam_weight


def _input_layout(batch_first: bool, size: int) -> str:
    return f"[B, T, {size}] (batch_first)" if batch_first else f"[T, B, {size}] (time-major)"


def _batch_of(batch_first: bool) -> str:
    return "input's first dim, batch_first" if batch_first else "input's dim 1, time-major"


def _check_input(input, hparams, i2h: tuple, batch_first: bool, unbatched_ok: bool = False) -> int:
    """The module-level checks of an LSTM call's input and hparams, in its caller's terms, before the public
    function's (after the parameters'; ``i2h``: the first layer's): input in the parameters' dtype and on their
    device, [T, B, K] or [B, T, K] (also unbatched [T, K] where ``unbatched_ok``); hparams [B, H] or [H] with
    H = num_hparams. Returns B (1 for unbatched input)."""
    check_data_like(input, "input", i2h[0], "the layer's parameters")
    size = i2h[0].shape[1]
    if input.dim() not in ((2, 3) if unbatched_ok else (3,)) or input.shape[-1] != size:
        raise ValueError(f"input: expected shape {_input_layout(batch_first, size)}"
                         f"{f' or unbatched [T, {size}]' if unbatched_ok else ''}, got {tuple(input.shape)}")
    batch = 1 if input.dim() == 2 else input.shape[0 if batch_first else 1]
    check_hparams(hparams, input, "input", i2h[4].shape[1], batch,
                  "unbatched input" if input.dim() == 2 else _batch_of(batch_first))
    return batch


def _check_state(t, name: str, shapes: tuple, like: Tensor) -> None:
    """A hidden state: a tensor of one of ``shapes`` in the parameters' dtype (``like``'s) and on their device."""
    check_tensor(t, name)
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {' or '.join(str(tuple(s)) for s in shapes)}, got {tuple(t.shape)}")
    check_data_like(t, name, like, "the layer's parameters")


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
        info = _cached(self, i2h + h2h, self.num_hparams, _checked_with_host, lstm_param_info, i2h, h2h,
                       self.num_hparams)
        if info is None or not isinstance(input, Tensor):
            return None
        dtype, device, _, hparams_dtypes, host = info
        shape = input.shape
        if (len(shape) != 3 or shape[2] != i2h[0].shape[1] or shape[self.batch_first] != 1  # one step
                or input.dtype != dtype or input.device != device or any_autocast()):
            return None
        batch, n = shape[1 - self.batch_first], h2h[0].shape[1]
        if not _fast_hparams_ok(hparams, batch, i2h[4].shape[1], hparams_dtypes, device):
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
        x = input[:, 0] if self.batch_first else input[0]
        if hparams is not None and hparams.dtype != i2h[4].dtype:  # a float32 λ with a half layer
            hparams, i2h_map, h2h_map = _one_hparams_dtype(hparams, i2h[4], h2h[4])
            i2h, h2h = i2h[:4] + (i2h_map,), h2h[:4] + (h2h_map,)
        if host is not None:  # the same ops, issued from C++
            h, c = host.hyper_lstm_cell_step(x, h0, c0, hparams, *i2h, *h2h)
        else:
            h, c = reference_lstm.hyper_lstm_cell_step(x, h0, c0, hparams, i2h, h2h)
        out = h.unsqueeze(1 if self.batch_first else 0)
        return out, ((h.unsqueeze(0), c.unsqueeze(0)) if keep_dim else (h, c))

    def forward(self, input: Tensor, hidden: Optional[Tuple[Tensor, Tensor]] = None,
                hparams: Optional[Tensor] = None, dropconnect: Optional[Union[float, Tensor]] = None):
        """One layer over the sequence: ``input`` [T, B, input_size] ([B, T, input_size] with batch_first);
        ``hidden`` (h0, c0), each [B, hidden_size] or [1, B, hidden_size], zeros when None; ``hparams`` [B, H], [H]
        or None; ``dropconnect`` this call's DropConnect rate of the h2h weights (training mode). Returns
        ``(output, (h_T, c_T))`` (see the class docstring for the shapes)."""
        fast = self._fast(input, hidden, hparams, dropconnect)
        if fast is not None:
            return fast
        i2h, h2h = _layer_tensors(self.i2h), _layer_tensors(self.h2h)
        _raise_if_invalid(self, i2h + h2h, self.num_hparams, lambda: lstm_param_error(i2h, h2h, self.num_hparams),
                          _checked_with_host, lstm_param_info, i2h, h2h, self.num_hparams)
        batch = _check_input(input, hparams, i2h, self.batch_first)
        keep_dim = True
        hx = None
        if hidden is not None:
            n = h2h[0].shape[1]
            if not isinstance(hidden, (tuple, list)) or len(hidden) != 2:
                raise TypeError(f"hidden: expected a tuple (h0, c0) of tensors [B, {n}] or [1, B, {n}], got "
                                f"{type(hidden).__name__}")
            h0, c0 = hidden
            for name, t in (("hidden[0]", h0), ("hidden[1]", c0)):
                _check_state(t, name, ((batch, n), (1, batch, n)), i2h[0])
            keep_dim = h0.dim() == 3
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

    # As _HyperLayer's: a HyperLSTMCell is never made by convert() from a plain layer (its forward takes λ from its
    # caller), so stn_kernels.freeze refuses it and points to its fold.
    context_hparams = False

    def fold(self, hparams: Tensor, rates=None) -> nn.LSTM:
        """The torch.nn layer this layer computes at the shared λ ``hparams`` [H] (as fed to the layer): a one-layer
        ``nn.LSTM`` (same sizes, bias and batch_first) whose gate rows are W' = W + diag(V·λ)·W_hyper and
        b' = b + (C·λ) ⊙ b_hyper of i2h and h2h, in torch's gate order (i, f, g, o; ours is f, i, o, g), computed in
        float64 and rounded once to the weights' dtype. New Parameters (``requires_grad`` as the weights' and
        biases'), in this layer's train/eval mode; this layer is left as it is. nn.LSTM takes states
        [1, B, hidden_size] only (this cell also takes [B, hidden_size]). DropConnect has no torch.nn form: a cell
        with it folds in eval mode only. ``rates`` is ignored (for :func:`stn_kernels.freeze`)."""
        from .freeze import check_shared_hparams, lstm_layer_values, plain_layer, refuse_dropconnect

        name = type(self).__name__
        check_shared_hparams(hparams, self.num_hparams, f"this {name}")
        masks = (getattr(self.i2h, "weight_mask", None), getattr(self.h2h, "weight_mask", None))
        refuse_dropconnect(self, masks, self.dropconnect, name)
        values = lstm_layer_values(*self._params(None), hparams, 0, name)
        lstm = plain_layer(nn.LSTM, self.input_size, self.hidden_size, 1, bias="bias_ih_l0" in values,
                           batch_first=self.batch_first, values=values)
        return lstm.train(self.training)


def _check_lstm_options(dropout, bidirectional, proj_size, num_layers) -> None:
    """nn.LSTM's ``dropout``, ``bidirectional`` and ``proj_size`` arguments: the first as nn.LSTM takes it (a
    probability in [0, 1], with its warning for one layer), the others only at their defaults (HyperLSTM has no
    reverse direction and no projection; ``convert`` leaves such an nn.LSTM as it is)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout: expected a probability in [0, 1] (nn.LSTM's dropout between layers), got "
                         f"{dropout!r}")
    if dropout and num_layers == 1:
        warnings.warn(f"dropout: applies between layers (as nn.LSTM's), so with num_layers=1 dropout={dropout} "
                      f"does nothing", UserWarning, stacklevel=3)
    if bidirectional is not False:
        raise ValueError(f"bidirectional: expected False (HyperLSTM runs one direction), got {bidirectional!r}")
    if proj_size != 0:
        raise ValueError(f"proj_size: expected 0 (HyperLSTM has no projection; per-layer hidden sizes are a list "
                         f"hidden_size), got {proj_size!r}")


def _locked_dropout(x: Tensor, rates: Union[float, Tensor]) -> Tensor:
    """Per-example dropout of x [T, B, N] with one mask per (b, n) for all T (variational / locked):
    channel dropout of the [B, N, T] view."""
    return functional.per_example_channel_dropout(x.permute(1, 2, 0), rates).permute(2, 0, 1)


def _has_dropconnect(cells, training: bool, dropconnect) -> bool:
    """Whether this call drops h2h (or i2h) weights: a rate given to the call, or in training mode a cell's rate or
    a mask set by a published model's ``mask_weights``."""
    if dropconnect is not None:
        return True
    return training and any(cell.dropconnect or getattr(cell.i2h, "weight_mask", None) is not None
                            or getattr(cell.h2h, "weight_mask", None) is not None for cell in cells)


def _host_layers(input: Tensor, hparams, params: Tensor, cells, training: bool, dropconnect):
    """The compiled host module when the layers of this call can run through its whole-sequence layer
    (csrc/host/lstm.cpp: the time loop and its backward in C++, the i2h products of all steps as one GEMM), else
    None: eager, no autocast, CPU tensors of one float dtype (λ's too), the reference backend for both ops, no
    DropConnect, a non-empty sequence. The checks of the parameters, input and hidden state come before."""
    if not eager() or any_autocast() or input.numel() == 0 or _has_dropconnect(cells, training, dropconnect):
        return None
    device, dtype = params.device, params.dtype
    host = host_ops(device, dtype, dtype if hparams is None else hparams.dtype)
    if host is None or kernels("hyper_linear", device, None, dtype) is not reference \
            or kernels("hyper_lstm_recurrence", device) is not reference_lstm:
        return None
    return host


def _host_layer(host, cell: "HyperLSTMCell", x: Tensor, hparams: Optional[Tensor], state, elementary: tuple,
                torch_order: bool) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """One layer through the host module: x [T, B, K] time-major, hparams [B, H], [H] or None, state (h0, c0) [B, N]
    or None; ``elementary`` (i2h weight, i2h bias, h2h weight, h2h bias), in nn.LSTM's gate order when
    ``torch_order``. Returns (out [T, B, N], (h_T, c_T))."""
    batch, n = x.shape[1], cell.hidden_size
    if hparams is not None and hparams.dim() == 1:
        hparams = hparams.expand(batch, hparams.shape[0])
    h0, c0 = state if state is not None else (x.new_zeros(batch, n),) * 2
    i2h, h2h = cell.i2h, cell.h2h
    out, h, c = host.hyper_lstm_layer(x, h0, c0, hparams, elementary[0], i2h.hyper_weight, elementary[1],
                                      i2h.hyper_bias, i2h.hparam_weight, elementary[2], h2h.hyper_weight,
                                      elementary[3], h2h.hyper_bias, h2h.hparam_weight, torch_order)
    return out, (h, c)


class HyperLSTM(_ParamChecksCache):
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
    ``dropout`` (nn.LSTM's argument, and an attribute) is nn.LSTM's: plain dropout of each layer's output but
    the last's, in training mode. nn.LSTM's ``bidirectional`` and ``proj_size`` are taken at their defaults only
    (False, 0: HyperLSTM has neither), so that nn.LSTM's positional arguments mean the same here.
    """

    # As _HyperLayer's: True for an nn.LSTM that convert() made into a HyperLSTM.
    context_hparams = False
    # nn.LSTM's dropout between layers; convert() takes it from the nn.LSTM (the same F.dropout draws).
    dropout = 0.0

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0, *,
                 num_hparams: int = REQUIRED, dropconnect: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        _check_lstm_options(dropout, bidirectional, proj_size, num_layers)
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
        if dropout:
            self.dropout = float(dropout)
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
        """``nn.LSTM``'s call plus λ: ``input`` [T, B, input_size] ([B, T, input_size] with batch_first, or
        unbatched [T, input_size]); ``hx`` (h0, c0) each [num_layers, B, hidden_size] (per-layer sequences when
        hidden_size is a list), zeros when None; ``hparams`` [B, H] (row b for sequence b), [H] or None, the same for
        every layer (a layer made by :func:`stn_kernels.convert` takes it from an enclosing ``stn_kernels.hparams``
        block when None, its rows along this module's batch dimension); ``dropconnect`` the h2h DropConnect rate of
        this call; ``layer_dropout`` locked dropout between layers (a rate or one per example). Returns
        ``(output, (h_n, c_n))`` as ``nn.LSTM``."""
        L, N = self.num_layers, self.hidden_sizes[-1]
        uniform = len(set(self.hidden_sizes)) == 1
        if hparams is None and self.context_hparams:
            hparams = current_hparams()
        check_tensor(input, "input")
        i2h = self._check_params()
        B = _check_input(input, hparams, i2h, self.batch_first, unbatched_ok=True)
        like = i2h[0]
        # Unbatched [T, K] as nn.LSTM takes it (whatever batch_first): a batch of one, then squeezed back.
        unbatched = input.dim() == 2
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
        if hx is None:
            h0 = c0 = None
        elif uniform:
            want = f"[{L}, {N}]" if unbatched else f"[{L}, B, {N}]"
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected a tuple (h0, c0) of tensors {want}, got {type(hx).__name__}")
            h0, c0 = hx
            for name, t in (("hx[0]", h0), ("hx[1]", c0)):
                _check_state(t, name, ((L, N) if unbatched else (L, B, N),), like)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        else:
            h0, c0 = self._per_layer_states(hx, B, unbatched, like)
        x = input
        hs, cs = [], []
        host = _host_layers(input, hparams, like, self.cells, self.training, dropconnect)
        for layer in range(L):
            state = None if h0 is None else (h0[layer], c0[layer])
            first = layer == 0 and self.batch_first
            if host is not None:  # the whole layer in C++ (csrc/host/lstm.cpp), time-major
                x, (h, c) = _host_layer(host, self.cells[layer], x.transpose(0, 1) if first else x, hparams, state,
                                        *self._host_elementary(layer))
            else:
                i2h, h2h = self._layer_params(layer, dropconnect)
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

    def _check_params(self) -> tuple:
        """The first layer's i2h tensors (:func:`_layer_tensors`), after the checks of every layer's parameters
        (cached, :func:`stn_kernels.modules._cached`), which raise naming the parameter by its public name."""
        layers = [self._layer_tensors(layer) for layer in range(self.num_layers)]
        params = tuple(t for i2h, h2h, _ in layers for t in i2h + h2h)

        def error():
            return lstm_stack_param_error(layers, self.num_hparams)

        _raise_if_invalid(self, params, self.num_hparams, error, lambda: error() is None or None)
        return layers[0][0]

    def _layer_tensors(self, layer: int) -> tuple:
        """(i2h, h2h, names) of one layer for the parameter checks (:func:`lstm_param_error`): the tensors as
        :func:`_layer_tensors` gives them, and their public names in this module."""
        cell = self.cells[layer]
        names = [[f"cells.{layer}.{linear}.{name}" for name in
                  ("weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight")] for linear in ("i2h", "h2h")]
        return _layer_tensors(cell.i2h), _layer_tensors(cell.h2h), names

    def _layer_params(self, layer: int, dropconnect):
        """(i2h tuple, h2h tuple) of one layer for :func:`stn_kernels.hyper_lstm_layer`."""
        return self.cells[layer]._params(dropconnect)

    def _host_elementary(self, layer: int) -> Tuple[tuple, bool]:
        """((i2h weight, i2h bias, h2h weight, h2h bias), whether they are in nn.LSTM's gate order) of one layer for
        the host path."""
        cell = self.cells[layer]
        return (cell.i2h.weight, cell.i2h.bias, cell.h2h.weight, cell.h2h.bias), False

    def _per_layer_states(self, hx, batch: int, unbatched: bool, like: Tensor) -> Tuple[list, list]:
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
                _check_state(t, name, ((sizes[layer],) if unbatched else (batch, sizes[layer]),), like)
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

    def fold(self, hparams: Tensor, rates=None) -> nn.LSTM:
        """The torch.nn layer this layer computes at the shared λ ``hparams`` [H] (as fed to the layers): an
        ``nn.LSTM`` with the same input_size, hidden_size, num_layers, bias, batch_first and ``dropout`` between
        layers, whose gate rows are W' = W + diag(V·λ)·W_hyper and b' = b + (C·λ) ⊙ b_hyper of each layer's i2h and
        h2h, in torch's gate order (i, f, g, o; ours is f, i, o, g), computed in float64 and rounded once to the
        weights' dtype. New Parameters (``requires_grad`` as the weights' and biases'; for an nn.LSTM converted by
        :func:`stn_kernels.convert`, its own ``weight_ih_l0``, ...), in this layer's train/eval mode; this layer is
        left as it is. Raises ValueError for per-layer hidden sizes that differ (nn.LSTM has one: fold each layer,
        ``cells[l].fold(hparams)``, instead) and, in training mode, for DropConnect (no torch.nn form: fold in eval
        mode). ``layer_dropout`` is a forward argument and has no nn.LSTM form either. ``rates`` is ignored (for
        :func:`stn_kernels.freeze`)."""
        from .freeze import check_shared_hparams, lstm_layer_values, plain_layer, refuse_dropconnect

        name = type(self).__name__
        if len(set(self.hidden_sizes)) != 1:
            raise ValueError(f"hidden_size: nn.LSTM has one hidden size for all layers, this {name} has "
                             f"{list(self.hidden_sizes)}; fold each layer on its own (cells[l].fold(hparams))")
        check_shared_hparams(hparams, self.num_hparams, f"this {name}")
        values = {}
        for layer, cell in enumerate(self.cells):
            masks = (getattr(cell.i2h, "weight_mask", None), getattr(cell.h2h, "weight_mask", None))
            refuse_dropconnect(cell, masks, cell.dropconnect, f"{name} layer {layer}")
            values.update(lstm_layer_values(*self._layer_params(layer, None), hparams, layer, f"{name} layer {layer}"))
        dropout = self.dropout if self.num_layers > 1 else 0.0  # nn.LSTM warns about (and ignores) it for one layer
        lstm = plain_layer(nn.LSTM, self.input_size, self.hidden_sizes[0], self.num_layers, bias="bias_ih_l0" in values,
                           batch_first=self.batch_first, dropout=dropout, values=values)
        return lstm.train(self.training)
