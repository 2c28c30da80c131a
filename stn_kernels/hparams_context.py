"""``with stn_kernels.hparams(lam): out = model(x)``: λ for the layers that ``convert`` made from plain torch.nn
layers, without touching the model's forward.

Inside the block every such layer whose forward got no ``hparams`` uses ``lam`` ([B, H] per example or [H]
shared); outside it they are the plain layers they replaced (λ = None: the elementary path only). Blocks nest
(the innermost wins). The current block is kept in a module-level list that ``torch.compile`` reads as a graph
input, so a compiled model called inside the block traces without a graph break.

Two more things travel with λ:

* ``batch_dim``: the dimension of a sequence layer's input that holds the examples (λ's rows). None (the
  default) lets each converted layer use the one ``convert`` stated for it (``batch_first``: 0, or 1 for
  time-major ``[T, B, ...]`` input as ``nn.LSTM``'s default layout; their ``hparams_batch_dim``); 0 or 1 states
  it for every converted linear and embedding layer and :class:`~stn_kernels.TunedDropout` in the block. Layers
  whose layout is fixed ignore it: convolutions and channel dropouts (``[B, C, H, W]``), and ``nn.LSTM`` /
  ``nn.MultiheadAttention`` conversions, which follow their own ``batch_first``. A layer's input without a
  sequence dimension (a linear layer's or dropout's ``[B, K]``, an embedding's ``[B]``) has the examples along
  dim 0 whatever the stated dimension. Nothing is guessed from sizes: λ's rows must match the stated dimension,
  also when it happens to equal another one (T == B); otherwise a ValueError names ``hparams``
  (:func:`check_rows`). docs/time-major.md has the table.
* ``rates``: per-example rates by hyperparameter name (``{"dropout": [B] tensor}``, or a float for every
  example), read by the dropout that ``convert(..., rates=...)`` tuned (:class:`stn_kernels.TunedDropout`, a
  converted attention's dropout). A tuned dropout with no rate in the block uses its own ``p``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

from torch import Tensor

# One entry per open block: (λ, batch_dim or None, rates by name). A list of plain tuples and dicts, which
# torch.compile reads as graph inputs.
_STACK: List[Tuple[Tensor, Optional[int], Dict[str, Union[Tensor, float]]]] = []


def _check_rates(rates, lam: Tensor) -> Dict[str, Union[Tensor, float]]:
    if rates is None:
        return {}
    if not isinstance(rates, Mapping):
        raise TypeError(f"rates: expected a mapping from hyperparameter names to per-example rates, got "
                        f"{type(rates).__name__}")
    batch = lam.shape[0] if lam.dim() == 2 else None
    checked = {}
    for name, rate in rates.items():
        if not isinstance(name, str):
            raise TypeError(f"rates: expected hyperparameter names (str) as keys, got {name!r} "
                            f"({type(name).__name__})")
        if isinstance(rate, Tensor):
            if not rate.is_floating_point():
                raise TypeError(f"rates[{name!r}]: expected a floating-point tensor, got dtype {rate.dtype}")
            if rate.dim() > 1 or (rate.dim() == 1 and batch is not None and rate.shape[0] != batch):
                want = f"[{batch}] (one per row of lam)" if batch is not None else "[B]"
                raise ValueError(f"rates[{name!r}]: expected a float, a 0-dim tensor or shape {want}, got "
                                 f"shape {tuple(rate.shape)}")
        elif isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0 \
                or math.isnan(rate):
            raise ValueError(f"rates[{name!r}]: expected a rate in [0, 1) or a tensor of rates, got {rate!r}")
        checked[name] = rate
    return checked


@contextlib.contextmanager
def hparams(lam: Tensor, *, batch_dim: Optional[int] = None,
            rates: Optional[Mapping[str, Union[Tensor, float]]] = None) -> Iterator[Tensor]:
    """λ for every layer :func:`stn_kernels.convert` made from a plain torch.nn one, inside the block.

    ``lam``: [B, H] (one row per example) or [H] (shared by the batch), as the layers take it (the
    :class:`~stn_kernels.stn.HyperparameterSample`'s ``layer_input``). ``batch_dim``: None (each converted layer's
    own, from ``convert(..., batch_first=...)``), 0, or 1 for time-major ``[T, B, ...]`` sequences (see the module
    docstring). ``rates``: per-example rates by hyperparameter name for the dropouts ``convert(..., rates=...)``
    tuned. Yields ``lam``. Blocks nest; the innermost wins.

    >>> import torch, stn_kernels
    >>> net = stn_kernels.convert(torch.nn.Linear(4, 3), num_hparams=2)
    >>> with stn_kernels.hparams(torch.zeros(5, 2)):
    ...     net(torch.randn(5, 4)).shape
    torch.Size([5, 3])
    """
    if not isinstance(lam, Tensor):
        raise TypeError(f"lam: expected a torch.Tensor of shape [B, H] or [H], got {type(lam).__name__}")
    if not lam.is_floating_point():
        raise TypeError(f"lam: expected a floating-point tensor of shape [B, H] or [H], got {lam.dtype} "
                        f"of shape {tuple(lam.shape)}")
    if lam.dim() not in (1, 2):
        raise ValueError(f"lam: expected a floating-point tensor of shape [B, H] or [H], got {lam.dtype} "
                         f"of shape {tuple(lam.shape)}")
    if batch_dim is not None and (isinstance(batch_dim, bool) or batch_dim not in (0, 1)):
        raise ValueError(f"batch_dim: expected None, 0 or 1 (1: time-major [T, B, ...] input), got {batch_dim!r}")
    _STACK.append((lam, batch_dim, _check_rates(rates, lam)))
    try:
        yield lam
    finally:
        _STACK.pop()


def current_hparams() -> Optional[Tensor]:
    """The λ of the innermost ``hparams`` block, None outside any."""
    return _STACK[-1][0] if _STACK else None


def current_batch_dim(default: int) -> int:
    """The batch dimension stated by the innermost block, else ``default`` (the layer's own)."""
    if _STACK and _STACK[-1][1] is not None:
        return _STACK[-1][1]
    return default


def current_rate(name: str) -> Optional[Union[Tensor, float]]:
    """The rate named ``name`` in the innermost block, None outside any or when it has none of that name."""
    return _STACK[-1][2].get(name) if _STACK else None


def context_layout(input, batch_dim: int, sequence_dims: int) -> Tuple[Optional[Tensor], int]:
    """(λ of the innermost block or None, the dim of ``input`` that holds λ's rows) for a converted layer whose own
    batch dimension is ``batch_dim`` (its ``hparams_batch_dim``): the block's ``batch_dim`` if it states one, else
    the layer's, for an input of at least ``sequence_dims`` dims (a sequence: a linear layer's ``[T, B, K]``, an
    embedding's ``[T, B]``); 0 for λ [H] and for inputs without a sequence dim. Checks nothing: the common
    batch-first call pays for one list read and a few comparisons here."""
    if not _STACK:
        return None, 0
    lam, stated, _ = _STACK[-1]
    if stated is not None:
        batch_dim = stated
    if batch_dim and lam.dim() == 2 and isinstance(input, Tensor) and input.dim() >= sequence_dims:
        return lam, 1
    return lam, 0


def check_rows(value: Tensor, input, dim: int, what: str, name: str = "hparams") -> None:
    """ValueError naming ``name`` (``hparams``, or ``rates['dropout']``) unless the rows of ``value`` (λ [B, H],
    rates [B]) are the examples along ``dim`` of ``input`` (the input of ``what``, a layer). A 0-dim input or a
    non-tensor is left to the layer, whose own check names ``input``."""
    if not isinstance(input, Tensor) or input.dim() <= dim or value.shape[0] == input.shape[dim]:
        return
    layout = "time-major [T, B, ...], batch_dim=1" if dim == 1 else "batch first, batch_dim=0"
    raise ValueError(f"{name}: expected {input.shape[dim]} rows (one per example along dim {dim} of {what}'s "
                     f"input of shape {tuple(input.shape)}, {layout}), got shape {tuple(value.shape)}; state the "
                     f"layout with convert(..., batch_first=...) or stn_kernels.hparams(lam, batch_dim=...)")


def hparams_rows(lam: Tensor, input: Tensor, batch_dim: int, sequence_dims: int, what: str) -> Tensor:
    """λ [B, H] from the context laid out for ``input``, whose examples lie along ``batch_dim`` when the input
    has at least ``sequence_dims`` dims (a sequence), else along dim 0: returned as the [rows, H] that aligns
    with dim 0 of ``input.flatten(0, batch_dim)`` (λ itself for batch_dim 0; each row repeated over the leading
    time dim for batch_dim 1). λ [H] (shared) is returned as it is. Raises ValueError naming ``hparams`` when λ's
    rows do not match the examples of ``input`` along the stated dimension (``what``: the layer)."""
    if lam.dim() != 2 or not isinstance(input, Tensor):
        return lam
    dim = batch_dim if input.dim() >= sequence_dims else 0
    check_rows(lam, input, dim, what)
    if dim == 0:
        return lam
    return lam.unsqueeze(0).expand(input.shape[0], *lam.shape).reshape(-1, lam.shape[1])
