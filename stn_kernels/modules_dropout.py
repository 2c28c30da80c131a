"""Dropout whose rate a Self-Tuning Network tunes per example: :class:`TunedDropout` (``nn.Dropout``) and
:class:`TunedDropout1d`, :class:`TunedDropout2d`, :class:`TunedDropout3d` (whole channels, as ``nn.Dropout1d/2d/3d``).

``convert(model, num_hparams, rates={"dropout": nn.Dropout})`` makes them of a model's dropouts. In training mode,
inside ``with stn_kernels.hparams(lam, rates={"dropout": r}):`` with r a [B] tensor (one rate per example, e.g.
``sample["dropout"]``), a float or a 0-dim tensor, each drops with those rates (hard Bernoulli masks, inverted
scaling 1/(1 − r_b), no gradient into r: :func:`stn_kernels.per_example_dropout`); with no rate of their name in
the block they are exactly the torch.nn dropout they replaced (``F.dropout`` with ``p``: the same random draws);
in eval mode they return their input.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

from torch import Tensor, nn

from ._validation import REQUIRED
from .functional import per_example_channel_dropout, per_example_dropout
from .hparams_context import check_rows, current_batch_dim, current_rate

__all__ = ["TUNED_DROPOUTS", "TunedDropout", "TunedDropout1d", "TunedDropout2d", "TunedDropout3d", "tuned_form"]


def _check_arguments(cls_name: str, p, inplace, hparam) -> str:
    """nn.Dropout's ``p`` (in [0, 1]) and ``inplace`` (a bool: a name given there would read as True), and
    ``hparam``; a misread of the name as ``p`` or ``inplace`` shows the call with the keyword."""
    hint = (f" (hparam is keyword-only: {cls_name}(hparam={p if isinstance(p, str) else inplace!r}))"
            if isinstance(p, str) or isinstance(inplace, str) else "")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p: expected a dropout probability in [0, 1], got {type(p).__name__} {p!r}{hint}")
    if not 0.0 <= p <= 1.0:  # nn.Dropout's range (p = 1 drops everything)
        raise ValueError(f"p: expected a dropout probability in [0, 1], got {p!r}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__} {inplace!r}{hint}")
    if hparam is REQUIRED:
        raise TypeError(f"hparam: missing, the name of the rate in stn_kernels.hparams(..., rates={{name: ...}}) is "
                        f"a required keyword-only argument ({cls_name}({p!r}, hparam='dropout'))")
    if not isinstance(hparam, str) or not hparam:
        raise TypeError(f"hparam: expected the hyperparameter's name (a non-empty str), got {hparam!r}")
    return hparam


def _check_input(input, what: str) -> None:
    """What the per-example path needs of ``input`` (nn.Dropout's own checks run on the plain path)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input: expected a floating-point tensor for {what}'s per-example rates, got dtype "
                        f"{input.dtype}")
    if input.dim() == 0:
        raise ValueError(f"input: expected a floating-point tensor with a batch dim for {what}'s per-example rates, "
                         f"got {input.dtype} of shape {tuple(input.shape)}")


class _Tuned:
    """What the tuned dropouts share: the rate named ``hparam`` from the enclosing ``stn_kernels.hparams`` block in
    training mode, else the torch.nn dropout's own forward (``super().forward``)."""

    hparam: str
    p: float
    inplace: bool
    # The dim of a sequence input [T, B, ...] that holds the examples: 0, or 1 for time-major input (set by
    # convert(..., batch_first=False); the block's batch_dim overrides it). Channel dropouts are batch first.
    hparams_batch_dim = 0

    def __init__(self, p: float = 0.5, inplace: bool = False, *, hparam: str = REQUIRED) -> None:
        """The torch.nn dropout's ``p`` and ``inplace``, and ``hparam`` (required): the name of the rate in the
        block."""
        hparam = _check_arguments(type(self).__name__, p, inplace, hparam)
        super().__init__(p, inplace)
        self.hparam = hparam

    def forward(self, input: Tensor) -> Tensor:
        """In training mode with a rate named ``hparam`` in the enclosing ``stn_kernels.hparams`` block: dropout
        with that rate per example; else the torch.nn dropout's forward with ``p`` (identity in eval mode)."""
        rate = current_rate(self.hparam) if self.training else None
        if rate is None:
            return super().forward(input)
        _check_input(input, type(self).__name__)
        out = self._per_example(input, rate)
        return input.copy_(out) if self.inplace else out

    def _per_example(self, input: Tensor, rate: Union[Tensor, float]) -> Tensor:
        raise NotImplementedError

    def fold(self, hparams=None, rates: Optional[Mapping[str, Union[Tensor, float]]] = None) -> nn.Module:
        """The torch.nn dropout this one came from, at the rate ``rates[hparam]`` (a float or a one-element tensor:
        one rate for every example) when ``rates`` has it, else at ``p``; ``hparams`` (λ) is not used by a dropout.
        For shipping the tuned model (``stn_kernels.freeze``)."""
        p = self.p
        if rates is not None:
            if not isinstance(rates, Mapping):
                raise TypeError(f"rates: expected a mapping from hyperparameter names to rates, got "
                                f"{type(rates).__name__}")
            if self.hparam in rates:
                p = _one_rate(rates[self.hparam], self.hparam)
        plain = _PLAIN[type(self)](p, self.inplace)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        layout = f", hparams_batch_dim={self.hparams_batch_dim}" if self.hparams_batch_dim else ""
        return f"{super().extra_repr()}, hparam={self.hparam!r}{layout}"


def _one_rate(rate, hparam: str) -> float:
    name = f"rates[{hparam!r}]"
    if isinstance(rate, Tensor):
        if rate.numel() != 1:
            raise ValueError(f"{name}: expected one rate for every example (a float or a one-element tensor) to "
                             f"fold into a plain dropout, got shape {tuple(rate.shape)}")
        rate = rate.item()
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0 or math.isnan(rate):
        raise ValueError(f"{name}: expected a rate in [0, 1), got {rate!r}")
    return float(rate)


class TunedDropout(_Tuned, nn.Dropout):
    """``nn.Dropout(p=0.5, inplace=False)`` whose rate the hyperparameter named ``hparam`` sets per example, inside
    ``stn_kernels.hparams(lam, rates={hparam: r})`` in training mode (module docstring). The examples lie along dim
    0, or along dim 1 of a time-major [T, B, ...] input when ``hparams_batch_dim`` or the block's ``batch_dim`` is
    1 (inputs of 3 or more dims; [B, N] inputs are batch first): r [B] must match them (ValueError naming the rate
    otherwise). A float or 0-dim rate is the same for every example."""

    def _per_example(self, input: Tensor, rate: Union[Tensor, float]) -> Tensor:
        if not (isinstance(rate, Tensor) and rate.dim() == 1):
            return per_example_dropout(input, rate)  # one rate for all: any layout
        dim = current_batch_dim(self.hparams_batch_dim) if input.dim() >= 3 else 0
        check_rows(rate, input, dim, type(self).__name__, f"rates[{self.hparam!r}]")
        if dim == 0:
            return per_example_dropout(input, rate)
        steps, batch = input.shape[:2]
        rows = rate.expand(steps, batch).reshape(-1)  # aligned with input.flatten(0, 1)
        return per_example_dropout(input.flatten(0, 1), rows).unflatten(0, (steps, batch))


class _TunedChannels(_Tuned):
    """Whole channels of a batched [N, C, *spatial] input per example, as the torch.nn channel dropouts."""

    _batched_dims: int

    def _per_example(self, input: Tensor, rate: Union[Tensor, float]) -> Tensor:
        if input.dim() != self._batched_dims:
            raise ValueError(f"input: expected a batched input of {self._batched_dims} dims [N, C, ...] for "
                             f"{type(self).__name__}'s per-example rates (rates[{self.hparam!r}]), got shape "
                             f"{tuple(input.shape)}")
        if isinstance(rate, Tensor) and rate.dim() == 1:
            check_rows(rate, input, 0, type(self).__name__, f"rates[{self.hparam!r}]")
        return per_example_channel_dropout(input, rate)


class TunedDropout1d(_TunedChannels, nn.Dropout1d):
    """``nn.Dropout1d`` with per-example rates (as :class:`TunedDropout`): whole channels of [N, C, L] (batched
    input only, while a rate is set)."""

    _batched_dims = 3


class TunedDropout2d(_TunedChannels, nn.Dropout2d):
    """``nn.Dropout2d`` with per-example rates (as :class:`TunedDropout`): whole channels of [N, C, H, W] (batched
    input only, while a rate is set: nn.Dropout2d reads a 3-D input as [N, C, L] with a deprecation warning)."""

    _batched_dims = 4


class TunedDropout3d(_TunedChannels, nn.Dropout3d):
    """``nn.Dropout3d`` with per-example rates (as :class:`TunedDropout`): whole channels of [N, C, D, H, W]
    (batched input only, while a rate is set)."""

    _batched_dims = 5


_PLAIN = {TunedDropout: nn.Dropout, TunedDropout1d: nn.Dropout1d, TunedDropout2d: nn.Dropout2d,
          TunedDropout3d: nn.Dropout3d}
_TUNED = {plain: tuned for tuned, plain in _PLAIN.items()}
TUNED_DROPOUTS = tuple(_PLAIN)


def tuned_form(module: nn.Module, hparam: str) -> Optional[nn.Module]:
    """The tuned dropout for ``module`` (exactly an ``nn.Dropout``, ``nn.Dropout1d``, ``nn.Dropout2d`` or
    ``nn.Dropout3d`` without hooks: a subclass's forward may differ), with its ``p``, ``inplace`` and mode, and the
    original kept for :func:`stn_kernels.revert`; None for any other module."""
    tuned_type = _TUNED.get(type(module))
    if tuned_type is None or any(getattr(module, name) for name in (
            "_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")):
        return None
    tuned = tuned_type(module.p, bool(module.inplace), hparam=hparam)
    tuned.train(module.training)
    object.__setattr__(tuned, "_stn_original", module)  # not a submodule: revert() puts it back
    return tuned
