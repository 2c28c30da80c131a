"""What every op file in :mod:`stn_kernels.ops` shares: the entry branch, double backward and the
helpers for gradient masks and fake outputs."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

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
