"""What every op file in :mod:`stn_kernels.ops` shares: the entry branch, double backward and the
helpers for gradient masks and fake outputs."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..backends import kernels, requested_backend
from ..reference import dense_format


def composite_needed() -> bool:
    """Under torch.func transforms and forward-mode AD the ops run as the reference's composition of
    aten ops, which supports them all (custom ops have no forward-mode rule: their tangent would be
    silently zero)."""
    return torch._C._are_functorch_transforms_active() or torch.autograd.forward_ad._current_level >= 0


def records_graph(args: Sequence[object]) -> bool:
    """Whether autograd would record this call: grad mode on and some tensor argument requiring grad."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args)


def run_op(args: tuple, *, registered: Callable, composite: Callable, kernel: Callable,
           function: type) -> Union[Tensor, tuple]:
    """The entry branch of every op, written once.

    ``registered``: the torch.library op (traced under torch.compile); ``composite``: the reference
    composition (torch.func transforms, forward-mode AD); ``kernel``: the chosen backend's forward,
    called directly when autograd would not record the call (no_grad, inference mode, frozen
    inputs); ``function``: the eager ``torch.autograd.Function`` over the same kernels, otherwise.
    Each returns what the public function returns. The custom-op dispatcher path costs about
    110 µs of Python per call on the CPU here (measured; ~70 µs for the Function), more than a
    whole fused layer takes on an H200 at the STN shapes, hence the eager Function.
    """
    if torch.compiler.is_compiling():
        return registered(*args)
    if composite_needed():
        return composite(*args)
    if not records_graph(args):
        return kernel(*args)
    return function.apply(*args)


def backward_backend(ctx, resolve: Callable):
    """The backend module for a backward: the one the forward resolved (kept on ``ctx`` with the request it
    answered), so a call resolves its backend once; anew only when the backend asked for has changed since
    (a backward under another ``use_backend``, which must raise if that backend cannot run)."""
    if requested_backend() == ctx.requested:
        return ctx.backend
    return resolve()


def keep_backend(ctx, backend):
    """Keeps the forward's backend module, and the request it answered, for :func:`backward_backend`."""
    ctx.backend, ctx.requested = backend, requested_backend()
    return backend


def eager() -> bool:
    """Neither torch.compile tracing nor a torch.func transform / forward-mode AD: the eager Functions and the
    kernels may be called directly (what :func:`run_op` checks first, for callers that branch themselves)."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch.autograd.forward_ad._current_level >= 0)  # composite_needed(), inlined: called per call


def participating(mask: Sequence[bool], hparams_given: bool, bias_given: bool, hyper_bias_given: bool) -> list:
    """The output mask of (x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale) less
    the inputs that take no part: without hparams only x, W and b do. (hyper_linear and hyper_conv2d.)"""
    mask = list(mask)
    mask[4] = mask[4] and bias_given
    if not hparams_given:
        mask[1] = mask[3] = mask[5] = mask[6] = mask[7] = False
    mask[7] = mask[7] and hyper_bias_given
    return mask


def split_scales(hparam_weight: Tensor, n: int, hparams: Optional[Tensor], hyper_bias: Optional[Tensor]) -> tuple:
    """(V, C) as the public functions pass them, from the modules' stacked [2N, H] ``hparam_weight``: both None
    without hparams, C None without a hyper bias."""
    if hparams is None:
        return None, None
    return hparam_weight[:n], (None if hyper_bias is None else hparam_weight[n:])


class StackedScalesFunction(torch.autograd.Function):
    """The eager Function of hyper_linear and hyper_conv2d as the modules call them: V and C come as the one
    stacked [2N, H] parameter and are split inside, unrecorded, and their gradients leave as one ``cat``.
    Two recorded slices (or a chunk) of the parameter per call cost more host time than the whole layer at small
    shapes. The backend module is resolved once by the caller and kept for the backward.

    ``apply(op, backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, *extra)``: ``op`` has
    ``forward``/``backward`` (names of the backend module's functions on V and C), ``stacked_forward`` /
    ``stacked_backward`` (names of those on [V; C], which a backend may have: the reference does) and
    ``reference`` (the composite, for double backward); ``extra`` are the op's non-tensor arguments (the
    conv's stride, padding, ...).
    """

    @staticmethod
    def forward(ctx, op, backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, *extra):
        out, z_hyper, scales = _stacked_forward(op, keep_backend(ctx, backend), x, hparams, weight, hyper_weight,
                                                bias, hyper_bias, hparam_weight, extra)
        # The forward's (s, t), internal tensors nobody else holds: on ctx, not checked for in-place changes.
        ctx.op, ctx.extra, ctx.scales = op, extra, scales
        ctx.save_for_backward(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, z_hyper)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, z_hyper = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = participating(need[2:9] + (need[8],), hparams is not None, bias is not None, hyper_bias is not None)
        n, op, extra = weight.shape[0], ctx.op, ctx.extra
        inputs = (x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight)
        backend = backward_backend(ctx, lambda: kernels(op.name, x.device, x.shape[0], x.dtype, x.numel() == 0))
        if torch.is_grad_enabled():  # create_graph=True: stay differentiable
            def composite(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight):
                return op.reference(x, hparams, weight, hyper_weight, bias, hyper_bias,
                                    *split_scales(hparam_weight, n, hparams, hyper_bias), *extra)

            grads = double_backward(composite, inputs, mask[:7], grad_out)
        elif hasattr(backend, op.stacked_backward):  # the backend takes [V; C] as it is
            grads = getattr(backend, op.stacked_backward)(grad_out, x, hparams, weight, hyper_weight, hyper_bias,
                                                              hparam_weight, z_hyper, *extra, mask[:7],
                                                              scales=ctx.scales)
        else:
            scales = split_scales(hparam_weight, n, hparams, hyper_bias)
            found = getattr(backend, op.backward)(grad_out, x, hparams, weight, hyper_weight, hyper_bias, *scales,
                                                      z_hyper, *extra, mask)
            grads = grads_or_none(found, mask)[:6] + (_stacked_grad(found[6], found[7], hparam_weight)
                                                      if mask[6] else None,)
        return (None, None) + tuple(grads) + (None,) * len(extra)


def run_stacked(op, backend, x: Tensor, hparams: Optional[Tensor], weight: Tensor, hyper_weight: Tensor,
                bias: Optional[Tensor], hyper_bias: Optional[Tensor], hparam_weight: Tensor, *extra) -> Tensor:
    """The op's output for a module's fast path (eager only, see :func:`eager`): the backend's forward directly
    when autograd does not record the call, or when the backend is ``op.plain_torch`` (the reference: plain
    torch ops, which torch's autograd differentiates, double backward included), else through
    :class:`StackedScalesFunction`. Measured in one process at the tiny shapes of ``--host-overhead``: for
    the conv torch's C++ backward nodes beat the Function's Python backward around the same ops (fwd+bwd
    1.05 vs 1.12 of published), for the linear layer the written-out backward, with fewer ops than
    autograd's, wins (0.90 vs 1.04): hyper_conv2d sets ``plain_torch``, hyper_linear does not."""
    if backend is not op.plain_torch and torch.is_grad_enabled() and (
            weight.requires_grad or hparam_weight.requires_grad or x.requires_grad or hyper_weight.requires_grad
            or (hparams is not None and hparams.requires_grad) or (bias is not None and bias.requires_grad)
            or (hyper_bias is not None and hyper_bias.requires_grad)):  # records_graph, unrolled: once per call
        return StackedScalesFunction.apply(op, backend, x, hparams, weight, hyper_weight, bias, hyper_bias,
                                           hparam_weight, *extra)
    return _stacked_forward(op, backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, extra)[0]


def _stacked_forward(op, backend, x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, extra):
    """(out, z_hyper, scales) from the backend's forward: its ``stacked_forward`` when it has one (the
    reference: one GEMM for λ·[V; C]ᵀ, whose (s, t) it returns for its stacked backward), else its forward
    on the split V and C (scales None)."""
    stacked = getattr(backend, op.stacked_forward, None)
    if stacked is not None:
        return stacked(x, hparams, weight, hyper_weight, bias, hyper_bias, hparam_weight, *extra)
    scales = split_scales(hparam_weight, weight.shape[0], hparams, hyper_bias)
    return (*getattr(backend, op.forward)(x, hparams, weight, hyper_weight, bias, hyper_bias, *scales, *extra), None)


def _stacked_grad(d_weight_scale: Optional[Tensor], d_bias_scale: Optional[Tensor], hparam_weight: Tensor) -> Tensor:
    """d[V; C], zeros for C where no hyper bias used it."""
    if d_bias_scale is None:
        d_bias_scale = d_weight_scale.new_zeros(hparam_weight.shape[0] - d_weight_scale.shape[0],
                                                hparam_weight.shape[1])
    return torch.cat([d_weight_scale, d_bias_scale])


def grads_or_none(grads: Sequence[Optional[Tensor]], mask: Sequence[bool]) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, mask))


def empty_unless(grads: Sequence[Optional[Tensor]], like: Tensor) -> List[Tensor]:
    """Custom ops cannot return None: unused gradients travel as empty tensors."""
    return [like.new_empty(0) if g is None else g for g in grads]


def empty_in_format_of(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=dense_format(t))


def fake_grads(mask: Sequence[bool], inputs: Sequence[Optional[Tensor]], empty_like: Tensor) -> List[Tensor]:
    """Shapes of a backward op's outputs: like each input where asked for, else empty."""
    return [empty_in_format_of(t) if (need and t is not None) else empty_like.new_empty(0)
            for t, need in zip(inputs, mask)]


def double_backward(fn: Callable, inputs: Sequence[Optional[Tensor]], mask: Sequence[bool],
                    grad_outputs: Sequence[Tensor]) -> tuple:
    """Gradients by differentiating ``fn`` (a reference composite returning a tensor or a tuple
    matching ``grad_outputs``) with create_graph=True, so that they are differentiable again
    (double backward: Delta-STN's Jacobian-vector products through the layers).

    The layer is recomputed on aliases of its saved inputs: differentiating with respect to the
    inputs themselves would also follow paths between them (in a stack of layers, x depends on λ
    through the earlier layers) and count those twice.
    """
    with torch.enable_grad():
        inputs = [t.view_as(t) if need else t for t, need in zip(inputs, mask)]
        wanted = [t for t, need in zip(inputs, mask) if need]
        outputs = fn(*inputs)
        found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in mask)
