"""The ``stn_kernels`` operator library, registered through ``torch.library``.

Ops (all on 2-D / 4-D tensors as the kernels see them; the public functions in
:mod:`stn_kernels.functional` validate and reshape user input first):

* ``stn_kernels::hyper_linear(x, hparams?, weight, hyper_weight, bias?, hyper_bias?, weight_scale?, bias_scale?)
  -> (out, z_hyper)`` with x [M, K], hparams [M, H]; z_hyper = x·W_hyperᵀ is saved for backward
  (not differentiable; empty when hparams is None).
* ``stn_kernels::hyper_linear_backward(grad_out, x, hparams?, weight, hyper_weight, hyper_bias?, weight_scale?,
  bias_scale?, z_hyper, output_mask) -> 8 gradients`` (an empty tensor where output_mask is False).
* ``stn_kernels::hyper_conv2d`` / ``hyper_conv2d_backward`` and ``stn_kernels::hyper_embedding`` /
  ``hyper_embedding_backward``, likewise.

Each op has a fake (meta) kernel and autograd registration, so it runs under
``torch.compile(fullgraph=True)``. Eager calls (``apply_hyper_linear`` and
friends, used by the public functions) go through a ``torch.autograd.Function``
that calls the same kernels and shares the gradient code with the registered
op: the custom-op dispatcher path costs about 110 µs of Python per call on the
CPU here (measured; ~70 µs for the Function), more than the whole fused layer
takes on an H200 at the STN shapes. Calls that autograd would not record (no_grad,
inference mode, nothing requiring grad) call the kernels directly. Under torch.compile the registered op is
traced instead; under torch.func transforms and forward-mode AD, which custom
ops do not support, the reference composition of aten ops runs. The backend
(reference, triton, cuda) is chosen inside the op when it runs. Double backward (create_graph=True) differentiates
the reference formulation instead of calling the backward op, so
Jacobian-vector products through the layers (Delta-STN) are exact too.
"""

from __future__ import annotations

import importlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .reference import dense_format
from ._backend import resolve_backend

# Which module implements each op on each non-reference backend (imported on first use).
_KERNEL_MODULES = {
    "hyper_linear": {"triton": "stn_kernels.triton_kernels.hyper_linear", "cuda": "stn_kernels.cuda_ops"},
    "hyper_conv2d": {"triton": "stn_kernels.triton_kernels.hyper_conv2d"},
    "hyper_embedding": {"triton": "stn_kernels.triton_kernels.hyper_embedding"},
}
# What "auto" may pick on CUDA tensors: only kernels whose GPU tests have passed on a GPU
# (benchmarks/results/). The conv and embedding kernels have run only in the Triton
# interpreter so far: they stay opt-in (use_backend("triton")) until a GPU run checks them.
_AUTO_CHOICES = {
    "hyper_linear": ("triton",),  # add "cuda" once its GPU tests have passed on a GPU
    "hyper_conv2d": (),
    "hyper_embedding": (),
}


def _kernels(op: str, x: Tensor):
    """The module holding the chosen backend's ``{op}_forward`` and ``{op}_backward``."""
    modules = _KERNEL_MODULES[op]
    backend = resolve_backend(x.device, f"stn_kernels::{op}", ("reference", *modules), _AUTO_CHOICES[op],
                              rows=x.shape[0], dtype=x.dtype)
    if backend == "reference" or x.numel() == 0:  # empty problems need no kernel launch
        return reference
    return importlib.import_module(modules[backend])


def _composite_needed() -> bool:
    """Under torch.func transforms and forward-mode AD the layers run as the reference's
    composition of aten ops, which supports them all (custom ops have no forward-mode rule)."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def _records_graph(args: Sequence[object]) -> bool:
    """Whether autograd would record this call: grad mode on and some tensor argument requiring grad.
    Calls it would not record (no_grad, inference, frozen inputs) skip the autograd.Function."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args)


def _participating(mask: Sequence[bool], hparams_given: bool, bias_given: bool, hyper_bias_given: bool) -> list:
    """The output mask less the inputs that take no part: without hparams only x, W and b do."""
    mask = list(mask)
    mask[4] = mask[4] and bias_given
    if not hparams_given:
        mask[1] = mask[3] = mask[5] = mask[6] = mask[7] = False
    mask[7] = mask[7] and hyper_bias_given
    return mask


def _grads_or_none(grads: Sequence[Optional[Tensor]], mask: Sequence[bool]) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, mask))


def _empty_unless(grads: Sequence[Optional[Tensor]], like: Tensor) -> List[Tensor]:
    """Custom ops cannot return None: unused gradients travel as empty tensors."""
    return [like.new_empty(0) if g is None else g for g in grads]


def _double_backward(fn, inputs: Sequence[Optional[Tensor]], mask: Sequence[bool], grad_out: Tensor) -> tuple:
    """Gradients by differentiating ``fn`` (the reference) with create_graph=True.

    The layer is recomputed on aliases of its saved inputs: differentiating with respect
    to the inputs themselves would also follow paths between them (in a stack of layers,
    x depends on λ through the earlier layers) and count those twice.
    """
    with torch.enable_grad():
        inputs = [t.view_as(t) if need else t for t, need in zip(inputs, mask)]
        wanted = [t for t, need in zip(inputs, mask) if need]
        out = fn(*inputs)
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in mask)


# ----------------------------------------------------------------------------- hyper_linear

@torch.library.custom_op("stn_kernels::hyper_linear", mutates_args=())
def hyper_linear(x: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                 bias: Optional[Tensor], hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                 bias_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    kernels = _kernels("hyper_linear", x)
    return kernels.hyper_linear_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)


@hyper_linear.register_fake
def _(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale):
    out = x.new_empty(x.shape[0], weight.shape[0])
    z_hyper = x.new_empty(0) if hparams is None else x.new_empty(x.shape[0], weight.shape[0])
    return out, z_hyper


@torch.library.custom_op("stn_kernels::hyper_linear_backward", mutates_args=())
def hyper_linear_backward(grad_out: Tensor, x: Tensor, hparams: Optional[Tensor], weight: Tensor,
                          hyper_weight: Tensor, hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                          bias_scale: Optional[Tensor], z_hyper: Tensor, output_mask: List[bool]) -> List[Tensor]:
    kernels = _kernels("hyper_linear", x)
    mask = _participating(output_mask, hparams is not None, True, hyper_bias is not None)
    grads = kernels.hyper_linear_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                          bias_scale, z_hyper, mask)
    return _empty_unless(grads, x)


def _empty_in_format_of(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=dense_format(t))


def _fake_grads(mask, inputs, empty_like: Tensor):
    """Shapes of the backward ops' outputs: like each input where asked for, else empty."""
    return [_empty_in_format_of(t) if (need and t is not None) else empty_like.new_empty(0)
            for t, need in zip(inputs, mask)]


@hyper_linear_backward.register_fake
def _(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, z_hyper, output_mask):
    mask = _participating(output_mask, hparams is not None, True, hyper_bias is not None)
    bias_like = weight.new_empty(weight.shape[0])
    return _fake_grads(mask, [x, hparams, weight, hyper_weight, bias_like, hyper_bias, weight_scale, bias_scale], x)


def _hyper_linear_setup_context(ctx, inputs, output):
    x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, output[1])


def _hyper_linear_grads(ctx, grad_out, backward):
    """Gradients for the 8 inputs from the saved tensors; ``backward`` is the backward op or a kernel."""
    x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, z_hyper = ctx.saved_tensors
    mask = _participating(ctx.needs_input_grad[:8], hparams is not None, bias is not None, hyper_bias is not None)
    if torch.is_grad_enabled():  # create_graph=True: stay differentiable
        return _double_backward(reference.hyper_linear,
                                (x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale),
                                mask, grad_out)
    grads = backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, z_hyper, mask)
    return _grads_or_none(grads, mask)


hyper_linear.register_autograd(lambda ctx, grad_out, _grad_z: _hyper_linear_grads(ctx, grad_out,
                                                                                  hyper_linear_backward),
                               setup_context=_hyper_linear_setup_context)


class _HyperLinearFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_linear: the same kernels without the dispatcher's overhead."""

    @staticmethod
    def forward(ctx, *inputs):
        out, z_hyper = _kernels("hyper_linear", inputs[0]).hyper_linear_forward(*inputs)
        ctx.save_for_backward(*inputs, z_hyper)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _hyper_linear_grads(ctx, grad_out, lambda *a: _kernels("hyper_linear", a[1]).hyper_linear_backward(*a))


def apply_hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale) -> Tensor:
    """out of stn_kernels::hyper_linear with autograd: the registered op when compiling, else the Function."""
    args = (x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale)
    if torch.compiler.is_compiling():
        return hyper_linear(*args)[0]
    if _composite_needed():
        return reference.hyper_linear(*args)
    if not _records_graph(args):
        return _kernels("hyper_linear", x).hyper_linear_forward(*args)[0]
    return _HyperLinearFunction.apply(*args)


# ----------------------------------------------------------------------------- hyper_conv2d

@torch.library.custom_op("stn_kernels::hyper_conv2d", mutates_args=())
def hyper_conv2d(x: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor, bias: Optional[Tensor],
                 hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor], bias_scale: Optional[Tensor],
                 stride: List[int], padding: List[int], dilation: List[int], groups: int) -> tuple[Tensor, Tensor]:
    kernels = _kernels("hyper_conv2d", x)
    return kernels.hyper_conv2d_forward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale,
                                        stride, padding, dilation, groups)


def conv2d_output_shape(x_shape, weight_shape, stride, padding, dilation):
    (batch, _, height, width), (channels, _, kh, kw) = x_shape, weight_shape
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return batch, channels, out_h, out_w


@hyper_conv2d.register_fake
def _(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride, padding, dilation, groups):
    shape = conv2d_output_shape(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=dense_format(x))
    return out, (x.new_empty(0) if hparams is None else torch.empty_like(out))


@torch.library.custom_op("stn_kernels::hyper_conv2d_backward", mutates_args=())
def hyper_conv2d_backward(grad_out: Tensor, x: Tensor, hparams: Optional[Tensor], weight: Tensor,
                          hyper_weight: Tensor, hyper_bias: Optional[Tensor], weight_scale: Optional[Tensor],
                          bias_scale: Optional[Tensor], z_hyper: Tensor, stride: List[int], padding: List[int],
                          dilation: List[int], groups: int, output_mask: List[bool]) -> List[Tensor]:
    kernels = _kernels("hyper_conv2d", x)
    mask = _participating(output_mask, hparams is not None, True, hyper_bias is not None)
    grads = kernels.hyper_conv2d_backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                          bias_scale, z_hyper, stride, padding, dilation, groups, mask)
    return _empty_unless(grads, x)


@hyper_conv2d_backward.register_fake
def _(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale, bias_scale, z_hyper, stride, padding,
      dilation, groups, output_mask):
    mask = _participating(output_mask, hparams is not None, True, hyper_bias is not None)
    bias_like = weight.new_empty(weight.shape[0])
    return _fake_grads(mask, [x, hparams, weight, hyper_weight, bias_like, hyper_bias, weight_scale, bias_scale], x)


def _hyper_conv2d_setup_context(ctx, inputs, output):
    x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale = inputs[:8]
    ctx.conv_args = tuple(inputs[8:])
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, output[1])


def _hyper_conv2d_grads(ctx, grad_out, backward):
    x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, z_hyper = ctx.saved_tensors
    mask = _participating(ctx.needs_input_grad[:8], hparams is not None, bias is not None, hyper_bias is not None)
    if torch.is_grad_enabled():
        grads = _double_backward(
            lambda *t: reference.hyper_conv2d(*t, *ctx.conv_args),
            (x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale), mask, grad_out)
    else:
        grads = _grads_or_none(backward(grad_out, x, hparams, weight, hyper_weight, hyper_bias, weight_scale,
                                        bias_scale, z_hyper, *ctx.conv_args, mask), mask)
    return grads + (None,) * 4


hyper_conv2d.register_autograd(lambda ctx, grad_out, _grad_z: _hyper_conv2d_grads(ctx, grad_out,
                                                                                  hyper_conv2d_backward),
                               setup_context=_hyper_conv2d_setup_context)


class _HyperConv2dFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_conv2d (see _HyperLinearFunction)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, z_hyper = _kernels("hyper_conv2d", inputs[0]).hyper_conv2d_forward(*inputs)
        ctx.conv_args = tuple(inputs[8:])
        ctx.save_for_backward(*inputs[:8], z_hyper)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _hyper_conv2d_grads(ctx, grad_out, lambda *a: _kernels("hyper_conv2d", a[1]).hyper_conv2d_backward(*a))


def apply_hyper_conv2d(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride,
                       padding, dilation, groups) -> Tensor:
    args = (x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, stride, padding, dilation,
            groups)
    if torch.compiler.is_compiling():
        return hyper_conv2d(*args)[0]
    if _composite_needed():
        return reference.hyper_conv2d(*args)
    if not _records_graph(args):
        return _kernels("hyper_conv2d", x).hyper_conv2d_forward(*args)[0]
    return _HyperConv2dFunction.apply(*args)


# ----------------------------------------------------------------------------- hyper_embedding

@torch.library.custom_op("stn_kernels::hyper_embedding", mutates_args=())
def hyper_embedding(indices: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                    weight_scale: Optional[Tensor]) -> Tensor:
    kernels = _kernels("hyper_embedding", weight)
    return kernels.hyper_embedding_forward(indices, hparams, weight, hyper_weight, weight_scale)


@hyper_embedding.register_fake
def _(indices, hparams, weight, hyper_weight, weight_scale):
    return weight.new_empty(indices.shape[0], weight.shape[1])


@torch.library.custom_op("stn_kernels::hyper_embedding_backward", mutates_args=())
def hyper_embedding_backward(grad_out: Tensor, indices: Tensor, hparams: Optional[Tensor], weight: Tensor,
                             hyper_weight: Tensor, weight_scale: Optional[Tensor],
                             output_mask: List[bool]) -> List[Tensor]:
    kernels = _kernels("hyper_embedding", weight)
    mask = [False] + list(output_mask[1:])
    if hparams is None:
        mask[3] = mask[4] = False
    grads = kernels.hyper_embedding_backward(grad_out, indices, hparams, weight, hyper_weight, weight_scale, mask)
    return _empty_unless(grads, weight)


@hyper_embedding_backward.register_fake
def _(grad_out, indices, hparams, weight, hyper_weight, weight_scale, output_mask):
    mask = [False] + list(output_mask[1:])
    if hparams is None:
        mask[3] = mask[4] = False
    return _fake_grads(mask, [indices, hparams, weight, hyper_weight, weight_scale], weight)


def _hyper_embedding_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _hyper_embedding_grads(ctx, grad_out, backward):
    indices, hparams, weight, hyper_weight, weight_scale = ctx.saved_tensors
    mask = [False] + list(ctx.needs_input_grad[1:5])
    if hparams is None:
        mask[3] = mask[4] = False
    if torch.is_grad_enabled():
        return _double_backward(reference.hyper_embedding, (indices, hparams, weight, hyper_weight, weight_scale),
                                mask, grad_out)
    grads = backward(grad_out, indices, hparams, weight, hyper_weight, weight_scale, mask)
    return _grads_or_none(grads, mask)


hyper_embedding.register_autograd(lambda ctx, grad_out: _hyper_embedding_grads(ctx, grad_out,
                                                                               hyper_embedding_backward),
                                  setup_context=_hyper_embedding_setup_context)


class _HyperEmbeddingFunction(torch.autograd.Function):
    """Eager path of stn_kernels::hyper_embedding (see _HyperLinearFunction)."""

    @staticmethod
    def forward(ctx, *inputs):
        ctx.save_for_backward(*inputs)
        return _kernels("hyper_embedding", inputs[2]).hyper_embedding_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        return _hyper_embedding_grads(
            ctx, grad_out, lambda *a: _kernels("hyper_embedding", a[3]).hyper_embedding_backward(*a))


def apply_hyper_embedding(indices, hparams, weight, hyper_weight, weight_scale) -> Tensor:
    args = (indices, hparams, weight, hyper_weight, weight_scale)
    if torch.compiler.is_compiling():
        return hyper_embedding(*args)
    if _composite_needed():
        return reference.hyper_embedding(*args)
    if not _records_graph(args):
        return _kernels("hyper_embedding", weight).hyper_embedding_forward(*args)
    return _HyperEmbeddingFunction.apply(*args)
