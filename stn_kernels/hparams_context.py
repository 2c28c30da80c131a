"""``with stn_kernels.hparams(lam): out = model(x)``: λ for the layers that ``convert`` made from plain torch.nn
layers, without touching the model's forward.

Inside the block every such layer whose forward got no ``hparams`` uses ``lam`` ([B, H] per example or [H]
shared); outside it they are the plain layers they replaced (λ = None: the elementary path only). Blocks nest
(the innermost wins). The current λ is kept in a module-level list that ``torch.compile`` reads as a graph
input, so a compiled model called inside the block traces without a graph break.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

from torch import Tensor

_STACK: List[Tensor] = []


@contextlib.contextmanager
def hparams(lam: Tensor) -> Iterator[Tensor]:
    if not isinstance(lam, Tensor):
        raise TypeError(f"lam: expected a torch.Tensor of shape [B, H] or [H], got {type(lam).__name__}")
    if lam.dim() not in (1, 2) or not lam.is_floating_point():
        raise ValueError(f"lam: expected a floating-point tensor of shape [B, H] or [H], got {lam.dtype} "
                         f"of shape {tuple(lam.shape)}")
    _STACK.append(lam)
    try:
        yield lam
    finally:
        _STACK.pop()


def current_hparams() -> Optional[Tensor]:
    """The λ of the innermost ``hparams`` block, None outside any."""
    return _STACK[-1] if _STACK else None
