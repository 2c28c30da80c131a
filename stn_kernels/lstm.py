"""HyperLSTM: the recurrent layer of the published STN language model, with fused kernels.

Modules :class:`HyperLSTMCell` (one layer over a sequence, drop-in for the official
``HyperLSTMCell``) and :class:`HyperLSTM` (a stack, time-major like ``torch.nn.LSTM``,
``batch_first`` option); functions :func:`hyper_lstm_layer` and
:func:`hyper_lstm_recurrence`; ops ``stn_kernels::hyper_lstm_recurrence`` and
``stn_kernels::hyper_lstm_recurrence_backward``.

One layer, with λ per example [B, H] (or [H], or None for the elementary path):

    x_proj = i2h(x)                  one HyperLinear call over all T·B rows (stn_kernels.hyper_linear)
    pre_t  = x_proj[t] + h2h(h_{t-1}) = x_proj[t] + h·W_eᵀ + s ⊙ (h·W_hᵀ) + b + t ⊙ b_h
    f, i, o = σ(pre[:, :N]), σ(pre[:, N:2N]), σ(pre[:, 2N:3N]);   g = tanh(pre[:, 3N:])
    c_t = f ⊙ c_{t-1} + i ⊙ g,   h_t = o ⊙ tanh(c_t)

Gate order (forget, input, output, cell candidate) is the official STN code's, not
torch.nn.LSTM's (i, f, g, o). s = λ·V_hᵀ and t = λ·C_hᵀ are formed once per sequence,
not once per step as in the published loop.

Why one op per layer (not per step): the op boundary costs ~70-110 µs of Python per call
(see :mod:`stn_kernels.ops`), more than a whole fused step takes on a GPU at the PTB
shapes, so the recurrence over all T steps is one op. The input projection stays outside
it (an ordinary ``hyper_linear`` op with its own autograd), because it is one large GEMM
over T·B rows with no sequential dependence.

``stn_kernels::hyper_lstm_recurrence(x_proj [T,B,4N], h0 [B,N], c0 [B,N], hparams? [B,H],
weight [4N,N], hyper_weight [4N,N], bias? [4N], hyper_bias? [4N], weight_scale? [4N,H],
bias_scale? [4N,H]) -> (out [T,B,N], c_T [B,N], gates [T,B,4N], cells [T,B,N], z [T,B,4N])``
    out holds h_1..h_T (h_T = out[-1]); gates (the activations), cells and z = h_{t-1}·W_hᵀ
    (empty without hparams) are saved for backward and not differentiable.
``stn_kernels::hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight,
hyper_bias, weight_scale, bias_scale, out, gates, cells, z, output_mask) -> 10 gradients``
    Backward through time per step (d_pre_t, which is also the x_proj gradient, and
    dh_{t-1}), then λ and the parameter gradients as one HyperLinear backward over the
    stacked T·B rows.

Saved for backward: x_proj (only for double backward), h0, c0, λ and the parameters
(references), out, gates, cells, z: 2·T·B·4N + 2·T·B·N values beyond the inputs.

Backends: "reference" (:mod:`stn_kernels.reference_lstm`) and "triton"
(:mod:`stn_kernels.triton_kernels.hyper_lstm`), chosen inside the op by
:func:`stn_kernels.use_backend` like the other ops ("auto" keeps the reference until the
kernels have passed their tests on a GPU: see ``_AUTO_CHOICES``). Eager calls go through an
autograd.Function over the same kernels, torch.compile traces the op, torch.func and
forward-mode AD run the reference composite, and double backward differentiates that
composite.

DropConnect (published ``wdrop``): in training mode one Bernoulli(1 − p) mask [4N, N] per
forward and layer, shared by the batch and by both h2h weights (W_e and W_h get the same
mask), scaled by 1/(1 − p); the i2h weights are never masked. The mask multiplies the
weights before the op, so their gradients are masked too; p itself gets no gradient.
"""

from __future__ import annotations

import importlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional, reference_lstm
from ._backend import resolve_backend
from ._validation import autocast_dtype, check_dtype, check_same_device, check_shape, check_tensor
from .modules import HyperLinear
from .ops import _composite_needed, _empty_in_format_of, _empty_unless, _grads_or_none, _records_graph

__all__ = ["HyperLSTM", "HyperLSTMCell", "hyper_lstm_layer", "hyper_lstm_recurrence"]

OP_NAME = "stn_kernels::hyper_lstm_recurrence"
GATES = reference_lstm.GATES
# Which module implements the recurrence on each non-reference backend (imported on first use).
_KERNEL_MODULES = {"triton": "stn_kernels.triton_kernels.hyper_lstm"}
# What "auto" may pick on CUDA tensors (as stn_kernels.ops._AUTO_CHOICES): only kernels whose GPU tests
# have passed on a GPU. The recurrence kernels have run only in the Triton interpreter so far, so they
# are opt-in (use_backend("triton")); add "triton" here once tests/test_hyper_lstm.py passes on a GPU.
_AUTO_CHOICES: tuple = ()
_INPUT_NAMES = ("x_proj", "h0", "c0", "hparams", "weight", "hyper_weight", "bias", "hyper_bias", "weight_scale",
                "bias_scale")


def _kernels(x: Tensor):
    """The module holding the chosen backend's ``hyper_lstm_recurrence_forward`` / ``_backward``."""
    backend = resolve_backend(x.device, OP_NAME, ("reference", *_KERNEL_MODULES), _AUTO_CHOICES)
    if backend == "reference" or x.numel() == 0:
        return reference_lstm
    return importlib.import_module(_KERNEL_MODULES[backend])


def _participating(mask: Sequence[bool], hparams_given: bool, hyper_bias_used: bool) -> list:
    """The output mask less the inputs that take no part (the hyper path without hparams)."""
    mask = list(mask)
    if not hparams_given:
        mask[3] = mask[5] = mask[7] = mask[8] = mask[9] = False
    if not hyper_bias_used:
        mask[7] = mask[9] = False
    return mask


# ----------------------------------------------------------------------------- the ops

@torch.library.custom_op(OP_NAME, mutates_args=())
def hyper_lstm_recurrence_op(x_proj: Tensor, h0: Tensor, c0: Tensor, hparams: Optional[Tensor], weight: Tensor,
                             hyper_weight: Tensor, bias: Optional[Tensor], hyper_bias: Optional[Tensor],
                             weight_scale: Optional[Tensor], bias_scale: Optional[Tensor]
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _kernels(x_proj).hyper_lstm_recurrence_forward(x_proj, h0, c0, hparams, weight, hyper_weight, bias,
                                                          hyper_bias, weight_scale, bias_scale)


@hyper_lstm_recurrence_op.register_fake
def _(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale):
    T, B, G = x_proj.shape
    N = G // 4
    z = x_proj.new_empty(T, B, G) if hparams is not None else x_proj.new_empty(0)
    return (x_proj.new_empty(T, B, N), x_proj.new_empty(B, N), x_proj.new_empty(T, B, G),
            x_proj.new_empty(T, B, N), z)


@torch.library.custom_op("stn_kernels::hyper_lstm_recurrence_backward", mutates_args=())
def hyper_lstm_recurrence_backward_op(grad_out: Tensor, grad_cT: Tensor, h0: Tensor, c0: Tensor,
                                      hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                                      hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                                      bias_scale: Optional[Tensor], out: Tensor, gates: Tensor, cells: Tensor,
                                      z: Tensor, output_mask: List[bool]) -> List[Tensor]:
    mask = _participating(output_mask, hparams is not None, hyper_bias is not None and bias_scale is not None)
    grads = _kernels(gates).hyper_lstm_recurrence_backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight,
                                                           hyper_bias, weight_scale, bias_scale, out, gates, cells,
                                                           z, mask)
    return _empty_unless(grads, gates)


@hyper_lstm_recurrence_backward_op.register_fake
def _(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, out, gates,
      cells, z, output_mask):
    mask = _participating(output_mask, hparams is not None, hyper_bias is not None and bias_scale is not None)
    like = [gates, h0, c0, hparams, weight, hyper_weight, weight.new_empty(weight.shape[0]), hyper_bias,
            weight_scale, bias_scale]
    return [_empty_in_format_of(t) if (need and t is not None) else gates.new_empty(0)
            for t, need in zip(like, mask)]


def _setup_context(ctx, inputs, output):
    out, _c_T, gates, cells, z = output
    ctx.mark_non_differentiable(gates, cells, z)
    ctx.save_for_backward(*inputs, out, gates, cells, z)


def _double_backward(inputs, mask, grad_out, grad_cT) -> tuple:
    """create_graph=True: differentiate the reference composite on aliases of the saved inputs
    (see stn_kernels.ops._double_backward for why aliases)."""
    with torch.enable_grad():
        inputs = [t.view_as(t) if need else t for t, need in zip(inputs, mask)]
        wanted = [t for t, need in zip(inputs, mask) if need]
        out, c_T = reference_lstm.hyper_lstm_recurrence(*inputs)
        found = iter(torch.autograd.grad((out, c_T), wanted, (grad_out, grad_cT), create_graph=True,
                                         allow_unused=True))
    return tuple(next(found) if need else None for need in mask)


def _recurrence_grads(ctx, grad_out, grad_cT, backward) -> tuple:
    """Gradients for the 10 inputs; ``backward`` is the backward op or a kernel module's function."""
    saved = ctx.saved_tensors
    inputs, (out, gates, cells, z) = saved[:10], saved[10:]
    x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale = inputs
    mask = _participating(ctx.needs_input_grad[:10], hparams is not None,
                          hyper_bias is not None and bias_scale is not None)
    mask[6] = mask[6] and bias is not None
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_cT is None:
        grad_cT = torch.zeros_like(c0)
    if torch.is_grad_enabled():
        return _double_backward(inputs, mask, grad_out, grad_cT)
    grads = backward(grad_out, grad_cT, h0, c0, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale,
                     out, gates, cells, z, mask)
    return _grads_or_none(grads, mask)


hyper_lstm_recurrence_op.register_autograd(
    lambda ctx, grad_out, grad_cT, _g, _c, _z: _recurrence_grads(ctx, grad_out, grad_cT,
                                                                 hyper_lstm_recurrence_backward_op),
    setup_context=_setup_context)


class _HyperLSTMRecurrenceFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_lstm_recurrence: the same kernels without the dispatcher."""

    @staticmethod
    def forward(ctx, *inputs):
        out, c_T, gates, cells, z = _kernels(inputs[0]).hyper_lstm_recurrence_forward(*inputs)
        ctx.save_for_backward(*inputs, out, gates, cells, z)
        return out, c_T

    @staticmethod
    def backward(ctx, grad_out, grad_cT):
        return _recurrence_grads(ctx, grad_out, grad_cT,
                                 lambda *a: _kernels(a[11]).hyper_lstm_recurrence_backward(*a))


def apply_hyper_lstm_recurrence(x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale,
                                bias_scale) -> Tuple[Tensor, Tensor]:
    """(out, c_T) with autograd: the registered op when compiling, else the Function."""
    args = (x_proj, h0, c0, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)
    if torch.compiler.is_compiling():
        out, c_T = hyper_lstm_recurrence_op(*args)[:2]
        return out, c_T
    if _composite_needed():
        return reference_lstm.hyper_lstm_recurrence(*args)
    if not _records_graph(args):
        out, c_T = _kernels(x_proj).hyper_lstm_recurrence_forward(*args)[:2]
        return out, c_T
    return _HyperLSTMRecurrenceFunction.apply(*args)


# ----------------------------------------------------------------------------- validation

def _check_hidden_params(weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, hparams, prefix=""):
    """h2h parameters: weight, hyper_weight [4N, N], biases [4N], scales [4N, H]; returns N."""
    check_tensor(weight, prefix + "weight")
    if weight.dim() != 2 or weight.shape[0] != 4 * weight.shape[1]:
        raise ValueError(f"{prefix}weight: expected shape [4·hidden_size, hidden_size], got {tuple(weight.shape)}")
    G, N = weight.shape
    check_tensor(hyper_weight, prefix + "hyper_weight")
    check_shape(hyper_weight, prefix + "hyper_weight", (G, N))
    _check_biases_and_scales(G, bias, hyper_bias, weight_scale, bias_scale, hparams, prefix)
    return N


def _check_biases_and_scales(G, bias, hyper_bias, weight_scale, bias_scale, hparams, prefix):
    for name, b in (("bias", bias), ("hyper_bias", hyper_bias)):
        if b is not None:
            check_tensor(b, prefix + name)
            check_shape(b, prefix + name, (G,))
    if hparams is None:
        return
    if weight_scale is None:
        raise ValueError(f"{prefix}weight_scale: required when hparams is given, got None")
    check_tensor(weight_scale, prefix + "weight_scale")
    H = hparams.shape[-1]
    check_shape(weight_scale, prefix + "weight_scale", (G, H))
    if hyper_bias is not None:
        if bias_scale is None:
            raise ValueError(f"{prefix}bias_scale: required when hparams and hyper_bias are given, got None")
    if bias_scale is not None:
        check_tensor(bias_scale, prefix + "bias_scale")
        check_shape(bias_scale, prefix + "bias_scale", (G, H))


def _check_lstm_hparams(hparams, batch: int, like: Tensor, like_name: str) -> Optional[Tensor]:
    """hparams [B, H] or [H] (expanded to [B, H]) or None, on like's device, like's dtype (or float32 for half)."""
    if hparams is None:
        return None
    check_tensor(hparams, "hparams")
    if hparams.dim() not in (1, 2) or (hparams.dim() == 2 and hparams.shape[0] != batch):
        raise ValueError(f"hparams: expected shape [B, H] with B = {batch} (the batch size) or [H], "
                         f"got {tuple(hparams.shape)}")
    allowed = (like.dtype, torch.float32) if like.dtype in (torch.float16, torch.bfloat16) else (like.dtype,)
    if hparams.dtype not in allowed:
        raise TypeError(f"hparams: expected dtype {' or '.join(map(str, allowed))} (from {like_name} dtype "
                        f"{like.dtype}), got {hparams.dtype}")
    check_same_device(like, like_name, hparams=hparams)
    return hparams.expand(batch, hparams.shape[-1]) if hparams.dim() == 1 else hparams


def _autocast_recurrence(device_type, tensors, hyper_tensors):
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors, hyper_tensors
    return ([None if t is None else t.to(dtype) for t in tensors],
            [None if t is None else t.float() for t in hyper_tensors])


# ----------------------------------------------------------------------------- functional API

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
    N = _check_hidden_params(weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                             None if hparams is None else check_tensor(hparams, "hparams"))
    if x_proj.dim() != 3 or x_proj.shape[2] != 4 * N:
        raise ValueError(f"x_proj: expected shape [T, B, {4 * N}] (4·hidden_size = 4·{N}), got "
                         f"{tuple(x_proj.shape)}")
    T, B = x_proj.shape[:2]
    for name, t in (("h0", h0), ("c0", c0)):
        check_tensor(t, name)
        check_shape(t, name, (B, N))
    (x_proj, h0, c0, weight, hyper_weight, bias, hyper_bias), (hparams, weight_scale, bias_scale) = \
        _autocast_recurrence(x_proj.device.type, (x_proj, h0, c0, weight, hyper_weight, bias, hyper_bias),
                             (hparams, weight_scale, bias_scale))
    check_dtype(x_proj.dtype, "x_proj", h0=h0, c0=c0, weight=weight, hyper_weight=hyper_weight, bias=bias,
                hyper_bias=hyper_bias)
    check_same_device(x_proj, "x_proj", h0=h0, c0=c0, weight=weight, hyper_weight=hyper_weight, bias=bias,
                      hyper_bias=hyper_bias, weight_scale=weight_scale, bias_scale=bias_scale)
    hparams = _check_lstm_hparams(hparams, B, x_proj, "x_proj")
    if hparams is None:
        weight_scale = bias_scale = None
    else:
        check_dtype(hparams.dtype, "hparams", weight_scale=weight_scale, bias_scale=bias_scale)
        if hyper_bias is None:
            bias_scale = None
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
    N = _check_hidden_params(wh, whh, bh, hbh, vh, ch, None if hparams is None else check_tensor(hparams, "hparams"),
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
        x_proj = functional.hyper_linear(input, hparams, wi, whi, bi, hbi, vi, ci).transpose(0, 1)
    else:
        rows = hparams
        if hparams is not None and hparams.dim() == 2:
            rows = hparams.unsqueeze(0).expand(T, B, hparams.shape[1]).reshape(T * B, hparams.shape[1])
        x_proj = functional.hyper_linear(input.reshape(T * B, K), rows, wi, whi, bi, hbi, vi, ci).view(T, B, 4 * N)
    out, state = hyper_lstm_recurrence(x_proj, h0, c0, hparams, wh, whh, bh, hbh, vh, ch)
    return (out.transpose(0, 1) if batch_first else out), state


# ----------------------------------------------------------------------------- modules

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


def _set_mask(linear: nn.Module, weight: Tensor, hyper_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Both weights times the DropConnect mask that ``linear.mask_weights`` set, if any."""
    mask = getattr(linear, "weight_mask", None)
    return (weight, hyper_weight) if mask is None else (weight * mask, hyper_weight * mask)


class HyperLSTMCell(nn.Module):
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

    def __init__(self, input_size: int, hidden_size: int, num_hparams: int, bias: bool = True,
                 dropconnect: float = 0.0, batch_first: bool = False, *, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(dropconnect, bool) or not isinstance(dropconnect, (int, float)) or not 0 <= dropconnect < 1:
            raise ValueError(f"dropconnect: expected a probability in [0, 1), got {dropconnect!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_hparams = num_hparams
        self.dropconnect = float(dropconnect)
        self.batch_first = batch_first
        factory = {"device": device, "dtype": dtype}
        self.i2h = HyperLinear(input_size, 4 * hidden_size, num_hparams, bias, **factory)
        self.h2h = HyperLinear(hidden_size, 4 * hidden_size, num_hparams, bias, **factory)

    def reset_parameters(self) -> None:
        self.i2h.reset_parameters()
        self.h2h.reset_parameters()

    def _params(self, dropconnect):
        """(i2h tuple, h2h tuple), the h2h weights DropConnect-masked in training mode.

        A cell converted from the published one (:func:`stn_kernels.convert`) has DropConnectHyperLinear
        i2h / h2h, whose ``mask_weights(p)`` the published model calls before every forward: a mask
        set that way is used instead of this cell's own rate, in training mode only (a mask left from
        training is never applied in eval mode)."""
        n = 4 * self.hidden_size
        i2h_weight, i2h_hyper_weight = self.i2h.weight, self.i2h.hyper_weight
        if self.training:
            i2h_weight, i2h_hyper_weight = _set_mask(self.i2h, i2h_weight, i2h_hyper_weight)
        i2h = (i2h_weight, i2h_hyper_weight, self.i2h.bias, self.i2h.hyper_bias,
               self.i2h.hparam_weight[:n], self.i2h.hparam_weight[n:])
        weight, hyper_weight = self.h2h.weight, self.h2h.hyper_weight
        p = self.dropconnect if dropconnect is None else dropconnect
        if self.training and getattr(self.h2h, "weight_mask", None) is not None:
            weight, hyper_weight = _set_mask(self.h2h, weight, hyper_weight)
        elif self.training:
            mask = dropconnect_mask(weight, p)
            if mask is not None:
                weight, hyper_weight = weight * mask, hyper_weight * mask
        elif not isinstance(p, Tensor) and (isinstance(p, bool) or not isinstance(p, (int, float))
                                            or not 0.0 <= p < 1.0):
            raise ValueError(f"dropconnect: expected a probability in [0, 1), got {p!r}")
        h2h = (weight, hyper_weight, self.h2h.bias, self.h2h.hyper_bias, self.h2h.hparam_weight[:n],
               self.h2h.hparam_weight[n:])
        return i2h, h2h

    def forward(self, input: Tensor, hidden: Optional[Tuple[Tensor, Tensor]] = None,
                hparams: Optional[Tensor] = None, dropconnect: Optional[Union[float, Tensor]] = None):
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
        out, (h, c) = hyper_lstm_layer(input, hparams, i2h, h2h, hx, self.batch_first)
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
    from .stn.dropout import per_example_channel_dropout

    return per_example_channel_dropout(x.permute(1, 2, 0), rates).permute(2, 0, 1)


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

    ``layer_dropout`` (a rate, or one per example [B]) drops units of each layer's output
    before the next layer, in training mode only, with one mask per (example, unit) for the
    whole sequence: the published model's ``LockedDropout`` with its per-example ``dropouth``
    (:func:`stn_kernels.stn.per_example_dropout` underneath; pass None in the validation steps).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, num_hparams: int, bias: bool = True,
                 batch_first: bool = False, dropconnect: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_hparams = num_hparams
        self.batch_first = batch_first
        self.cells = nn.ModuleList(
            HyperLSTMCell(input_size if layer == 0 else hidden_size, hidden_size, num_hparams, bias, dropconnect,
                          device=device, dtype=dtype)
            for layer in range(num_layers))

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
        L, N = self.num_layers, self.hidden_size
        check_tensor(input, "input")
        if input.dim() != 3:
            raise ValueError(f"input: expected shape {'[B, T, ' if self.batch_first else '[T, B, '}"
                             f"{self.input_size}], got {tuple(input.shape)}")
        B = input.shape[0 if self.batch_first else 1]
        if hx is None:
            h0 = c0 = None
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"hx: expected a tuple (h0, c0) of tensors [{L}, B, {N}], got {type(hx).__name__}")
            h0, c0 = hx
            for name, t in (("hx[0]", h0), ("hx[1]", c0)):
                check_tensor(t, name)
                check_shape(t, name, (L, B, N))
        x = input
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            i2h, h2h = cell._params(dropconnect)
            state = None if h0 is None else (h0[layer], c0[layer])
            first = layer == 0 and self.batch_first
            x, (h, c) = hyper_lstm_layer(x, hparams, i2h, h2h, state, batch_first=first)
            if first:
                x = x.transpose(0, 1)  # time-major between layers
            if layer_dropout is not None and self.training and layer < L - 1:
                x = _locked_dropout(x, layer_dropout)
            hs.append(h)
            cs.append(c)
        out = x.transpose(0, 1) if self.batch_first else x
        return out, (torch.stack(hs), torch.stack(cs))

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
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, num_hparams={self.num_hparams}"
        if self.batch_first:
            s += ", batch_first=True"
        return s
