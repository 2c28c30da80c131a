"""Hyperparameters as STN optimises them.

Each hyperparameter has an *unconstrained* value u (a real number, what the
optimiser moves) and a *constrained* value c = T(u) (what the regulariser uses:
a dropout rate in (0, 0.9), a noise scale in (0, ∞), a number of holes in
{0, …, 4}). The transform T is chosen by the range:

==============  ==========================================  ======================================
range           transform c = T(u)                          inverse u = T⁻¹(c)
==============  ==========================================  ======================================
(low, high)     stretched sigmoid  low + (high−low)·σ(u)    stretched logit  log(z) − log(1−z),
                                                            z = (c−low)/(high−low)
(low, ∞)        low + softplus(u)                           inverse softplus of c − low
(−∞, high)      high − softplus(u)                          inverse softplus of high − c
(−∞, ∞)         identity                                    identity
==============  ==========================================  ======================================

A discrete hyperparameter with integer range [low, high] is continuous on
(low, high + 1) and floored (the published code's convention), so every
integer in [low, high] owns a cell of width 1; its initial value k starts in
the middle of its cell, at k + 0.5.

STN perturbs the unconstrained values per example, λ_b = λ + σ ⊙ ε_b with
ε_b ~ N(0, I) and σ = softplus(ρ) learnable, and rewards a wide perturbation
with the entropy Σ_h log(σ_h·√(2πe)) of that Gaussian. The layers see the
unconstrained values by default (as the published CNN code feeds them);
``constrained=True`` feeds T(λ_b) instead (the published LSTM code), and
``centre=True`` feeds λ_b − λ (Delta-STN).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..hparams_context import hparams as hparams_block

TRANSFORMS = ("auto", "sigmoid", "softplus", "identity")

# log(σ·√(2πe)) is the entropy of N(0, σ²); this is the constant part.
_HALF_LOG_2_PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


# --------------------------------------------------------------------------- transforms


def stretched_sigmoid(unconstrained: Tensor, low: float, high: float) -> Tensor:
    """low + (high − low)·sigmoid(u): maps ℝ onto (low, high)."""
    return low + (high - low) * torch.sigmoid(unconstrained)


def stretched_logit(constrained: Tensor, low: float, high: float) -> Tensor:
    """Inverse of :func:`stretched_sigmoid`: maps (low, high) onto ℝ."""
    fraction = (constrained - low) / (high - low)
    # log(z) − log1p(−z) keeps precision for z near 1, where log(1 − z) would cancel.
    return torch.log(fraction) - torch.log1p(-fraction)


def inverse_softplus(positive: Tensor) -> Tensor:
    """Inverse of softplus, y ↦ log(eʸ − 1), written as y + log(1 − e⁻ʸ) so it neither overflows
    for large y nor loses the small ones."""
    return positive + torch.log(-torch.expm1(-positive))


def _softplus(unconstrained: Tensor) -> Tensor:
    """log(1 + eᵘ) exactly everywhere: F.softplus returns u itself above its threshold (20), which
    is off by e⁻²⁰ and would break the round trip with :func:`inverse_softplus` in float64."""
    return torch.logaddexp(unconstrained, torch.zeros((), dtype=unconstrained.dtype, device=unconstrained.device))


# --------------------------------------------------------------------------- specification


@dataclass(frozen=True)
class Hyperparameter:
    """One tunable hyperparameter.

    name: unique within its :class:`HyperparameterSet`.
    init: the initial value, in constrained units (e.g. a dropout rate of 0.1).
    low, high: the range; open for continuous hyperparameters, the closed integer range for
        discrete ones. Infinite bounds make the range one-sided or the whole line.
    transform: "auto" (chosen from the range), "sigmoid" (both bounds finite), "softplus"
        (exactly one bound finite) or "identity" (no finite bound).
    discrete: floor the constrained value (integers low..high).
    per_example: True draws the perturbation ε independently for every example; False draws one
        value per batch and shares it (for hyperparameters that act on the whole batch).
    scale: the initial perturbation scale σ = softplus(ρ), in unconstrained units.
    """

    name: str
    init: float
    low: float = -math.inf
    high: float = math.inf
    transform: str = "auto"
    discrete: bool = False
    per_example: bool = True
    scale: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"name: expected a non-empty str, got {self.name!r}")
        for field in ("init", "low", "high", "scale"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{field} (hyperparameter {self.name!r}): expected a float, "
                                f"got {type(value).__name__}")
        for field in ("discrete", "per_example"):
            value = getattr(self, field)
            if not isinstance(value, bool):  # a string such as "False" would read as True
                raise TypeError(f"{field} (hyperparameter {self.name!r}): expected a bool, got "
                                f"{type(value).__name__} {value!r}")
        if math.isnan(self.low) or math.isnan(self.high) or not self.low < self.high:
            raise ValueError(f"low, high (hyperparameter {self.name!r}): expected low < high, "
                             f"got low={self.low}, high={self.high}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform (hyperparameter {self.name!r}): expected one of {TRANSFORMS}, "
                             f"got {self.transform!r}")
        expected = _transform_for_range(self.low, self.high)
        if self.transform != "auto" and self.transform != expected:
            raise ValueError(f"transform (hyperparameter {self.name!r}): the range ({self.low}, {self.high}) "
                             f"needs {expected!r}, got {self.transform!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale (hyperparameter {self.name!r}): expected a finite value > 0, "
                             f"got {self.scale}")
        if self.discrete:
            for field in ("low", "high", "init"):
                value = getattr(self, field)
                if math.isfinite(value) and value != math.floor(value):
                    raise ValueError(f"{field} (discrete hyperparameter {self.name!r}): expected an integer, "
                                     f"got {value}")
            if not (self.low <= self.init <= self.high) or not math.isfinite(self.init):
                raise ValueError(f"init (discrete hyperparameter {self.name!r}): expected an integer in "
                                 f"[{self.low}, {self.high}], got {self.init}")
        elif not (self.low < self.init < self.high):
            raise ValueError(f"init (hyperparameter {self.name!r}): expected a value strictly inside "
                             f"({self.low}, {self.high}), got {self.init}")

    @property
    def kind(self) -> str:
        """The transform actually used: "sigmoid", "softplus" or "identity"."""
        return _transform_for_range(self.low, self.high)

    @property
    def continuous_range(self) -> Tuple[float, float]:
        """The range of the continuous value before flooring: (low, high + 1) for discrete ones."""
        if self.discrete and math.isfinite(self.high):
            return self.low, self.high + 1.0
        return self.low, self.high

    @property
    def continuous_init(self) -> float:
        """The initial continuous value: init, or the middle of init's cell for a discrete one."""
        return self.init + 0.5 if self.discrete else self.init


def _transform_for_range(low: float, high: float) -> str:
    finite = math.isfinite(low) + math.isfinite(high)
    return ("identity", "softplus", "sigmoid")[finite]


def _constrain_one(spec: Hyperparameter, u: Tensor) -> Tensor:
    low, high = spec.continuous_range
    kind = spec.kind
    if kind == "sigmoid":
        return stretched_sigmoid(u, low, high)
    if kind == "softplus":
        return low + _softplus(u) if math.isfinite(low) else high - _softplus(u)
    return u


def _unconstrain_one(spec: Hyperparameter, c: Tensor) -> Tensor:
    low, high = spec.continuous_range
    kind = spec.kind
    if kind == "sigmoid":
        return stretched_logit(c, low, high)
    if kind == "softplus":
        return inverse_softplus(c - low) if math.isfinite(low) else inverse_softplus(high - c)
    return c


# --------------------------------------------------------------------------- one batch of values


@dataclass
class HyperparameterSample:
    """The hyperparameters of one mini-batch.

    unconstrained: [B, H] λ_b (differentiable w.r.t. λ and ρ in validation steps).
    layer_input: [B, H] what the hyper layers take (see :meth:`HyperparameterSet.layer_input`).
    values: [B, H] constrained values (discrete ones floored), detached: regularisers use them,
        and the hypergradient reaches λ only through the layers, as in the published code.
    regularize: whether the regularisers (dropout, augmentation) are active in this step:
        True in training steps, False in validation steps and evaluation.
    names: the hyperparameter names, in column order.
    """

    unconstrained: Tensor
    layer_input: Tensor
    values: Tensor
    regularize: bool
    names: Tuple[str, ...]

    def __getitem__(self, name: str) -> Tensor:
        """The [B] constrained values of hyperparameter ``name``."""
        try:
            index = self.names.index(name)
        except ValueError:
            raise KeyError(f"name: expected one of {self.names}, got {name!r}") from None
        return self.values[:, index]

    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    def rates(self) -> "OrderedDict[str, Tensor]":
        """Every hyperparameter's [B] constrained values by name: the per-example rates that the dropouts
        :func:`stn_kernels.convert` tuned read from ``stn_kernels.hparams(..., rates=...)``."""
        return OrderedDict((name, self.values[:, i]) for i, name in enumerate(self.names))

    def hparams(self, *, batch_dim: Optional[int] = None):
        """``with sample.hparams(): out = model(x)``: the :func:`stn_kernels.hparams` block of this batch, for a
        model :func:`stn_kernels.convert` made from a plain one: λ = ``layer_input`` and, when ``regularize``
        (training steps), :meth:`rates`; ``batch_dim`` as the block takes it (1: time-major ``[T, B, ...]``).
        What :class:`~stn_kernels.stn.STNTrainer` does around ``model(inputs)``."""
        return hparams_block(self.layer_input, batch_dim=batch_dim, rates=self.rates() if self.regularize else None)


# --------------------------------------------------------------------------- the container


class HyperparameterSet(nn.Module):
    """Named hyperparameters with their perturbation distribution.

    Parameters: ``unconstrained`` [H] (λ, optimised by the hyperparameter optimiser) and
    ``raw_scale`` [H] (ρ with σ = softplus(ρ), optimised by the scale optimiser).

    >>> hp = HyperparameterSet([Hyperparameter("dropout", 0.1, 0.0, 0.9),
    ...                         Hyperparameter("noise", 0.05, 0.0, 1.0)])
    >>> sample = hp.sample(batch_size=32)       # λ_b = λ + σ ⊙ ε_b
    >>> sample.layer_input.shape, sample["dropout"].shape
    (torch.Size([32, 2]), torch.Size([32]))
    """

    def __init__(self, hyperparameters: Iterable[Hyperparameter], *, dtype: torch.dtype = torch.float32,
                 device=None) -> None:
        super().__init__()
        if isinstance(hyperparameters, Hyperparameter) or not hasattr(hyperparameters, "__iter__"):
            what = "a Hyperparameter (put it in a list)" if isinstance(hyperparameters, Hyperparameter) \
                else type(hyperparameters).__name__
            raise TypeError(f"hyperparameters: expected an iterable of Hyperparameter, got {what}")
        specs = tuple(hyperparameters)
        if not specs:
            raise ValueError("hyperparameters: expected at least one Hyperparameter, got none")
        for i, spec in enumerate(specs):
            if not isinstance(spec, Hyperparameter):
                raise TypeError(f"hyperparameters[{i}]: expected a Hyperparameter, got {type(spec).__name__}")
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"hyperparameters: expected unique names, got duplicates {duplicates}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        self.specs: Tuple[Hyperparameter, ...] = specs
        self.names: Tuple[str, ...] = tuple(names)
        init = torch.tensor([s.continuous_init for s in specs], dtype=torch.float64)
        scale = torch.tensor([s.scale for s in specs], dtype=torch.float64)
        self.unconstrained = nn.Parameter(self._unconstrain(init).to(dtype=dtype, device=device))
        self.raw_scale = nn.Parameter(inverse_softplus(scale).to(dtype=dtype, device=device))
        # Hyperparameters with one perturbation draw per batch (the published "minibatch=False").
        self.register_buffer("_shared_draw", torch.tensor([not s.per_example for s in specs], device=device),
                             persistent=False)

    # -- bookkeeping

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def num_hparams(self) -> int:
        return len(self.specs)

    def index(self, name: str) -> int:
        """The column of hyperparameter ``name`` in every [B, H] tensor."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"name: expected one of {self.names}, got {name!r}") from None

    @property
    def scale(self) -> Tensor:
        """σ = softplus(ρ), [H]."""
        return _softplus(self.raw_scale)

    # -- transforms

    def _check_last_dim(self, t: Tensor, name: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[-1] != len(self):
            raise ValueError(f"{name}: expected shape [..., {len(self)}] (one column per hyperparameter), "
                             f"got {tuple(t.shape)}")

    def _unconstrain(self, constrained: Tensor) -> Tensor:
        return torch.stack([_unconstrain_one(s, constrained[..., i]) for i, s in enumerate(self.specs)], dim=-1)

    def constrain(self, unconstrained: Tensor, *, floor_discrete: bool = True) -> Tensor:
        """T(u) column by column, [..., H] → [..., H]; discrete columns floored unless floor_discrete=False
        (the floor has zero gradient: use the continuous value where a gradient must pass)."""
        self._check_last_dim(unconstrained, "unconstrained")
        columns = []
        for i, spec in enumerate(self.specs):
            c = _constrain_one(spec, unconstrained[..., i])
            if spec.discrete and floor_discrete:
                c = torch.floor(c)
                if math.isfinite(spec.high):  # σ(u) can round to exactly 1, which would floor to high + 1
                    c = c.clamp(max=spec.high)
                if math.isfinite(spec.low):
                    c = c.clamp(min=spec.low)
            columns.append(c)
        return torch.stack(columns, dim=-1)

    def unconstrain(self, constrained: Tensor) -> Tensor:
        """T⁻¹(c) column by column, [..., H] → [..., H]; c must be the continuous value (for a discrete
        hyperparameter, a point inside (low, high + 1))."""
        self._check_last_dim(constrained, "constrained")
        return self._unconstrain(constrained)

    # -- perturbation and entropy

    def repeat(self, batch_size: int) -> Tensor:
        """λ for every example, unperturbed: [B, H], differentiable w.r.t. λ."""
        _check_batch_size(batch_size)
        return self.unconstrained.unsqueeze(0).expand(batch_size, len(self))

    def noise(self, batch_size: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
        """ε [B, H] ~ N(0, I), the draw behind :meth:`perturb`; columns of hyperparameters with
        per_example=False hold one draw shared by the whole batch."""
        _check_batch_size(batch_size)
        lam = self.unconstrained
        noise = torch.randn(batch_size, len(self), dtype=lam.dtype, device=lam.device, generator=generator)
        return torch.where(self._shared_draw, noise[:1], noise)

    def perturb(self, batch_size: int, *, generator: Optional[torch.Generator] = None,
                noise: Optional[Tensor] = None) -> Tensor:
        """λ_b = λ + σ ⊙ ε_b, ε_b ~ N(0, I): [B, H], differentiable w.r.t. λ and ρ.

        Columns of hyperparameters with per_example=False hold one draw shared by the whole batch.
        ``noise``: a given ε [B, H] (e.g. from :meth:`noise`) instead of a fresh draw.
        """
        if noise is None:
            noise = self.noise(batch_size, generator=generator)
        else:
            _check_batch_size(batch_size)
            if generator is not None:
                raise ValueError("generator: expected None when noise is given (the noise is the draw), "
                                 "got a Generator")
            if not isinstance(noise, Tensor) or noise.shape != (batch_size, len(self)):
                got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
                raise ValueError(f"noise: expected a tensor of shape ({batch_size}, {len(self)}), got {got}")
        return self.unconstrained + self.scale * noise

    def entropy(self) -> Tensor:
        """Entropy of the perturbation distribution, Σ_h log(σ_h·√(2πe)) (a scalar, differentiable w.r.t. ρ)."""
        return (torch.log(self.scale) + _HALF_LOG_2_PI_E).sum()

    # -- what the layers and regularisers see

    def layer_input(self, unconstrained_batch: Tensor, *, constrained: bool = False, centre: bool = False) -> Tensor:
        """The [B, H] tensor fed to the hyper layers.

        Unconstrained λ_b by default (the published CNN code); ``constrained=True`` gives the continuous
        constrained values T(λ_b) (the published LSTM code; not floored, so gradients pass);
        ``centre=True`` subtracts the current, detached value (Delta-STN's λ_b − λ₀), so an unperturbed
        batch feeds zeros while the gradient w.r.t. λ still flows.
        """
        self._check_last_dim(unconstrained_batch, "unconstrained_batch")
        if unconstrained_batch.dim() != 2:
            raise ValueError(f"unconstrained_batch: expected shape [B, {len(self)}], "
                             f"got {tuple(unconstrained_batch.shape)}")
        if constrained:
            value = self.constrain(unconstrained_batch, floor_discrete=False)
            if centre:
                value = value - self.constrain(self.unconstrained.detach(), floor_discrete=False)
            return value
        return unconstrained_batch - self.unconstrained.detach() if centre else unconstrained_batch

    def make_sample(self, unconstrained_batch: Tensor, *, regularize: bool, constrained: bool = False,
                    centre: bool = False) -> HyperparameterSample:
        """Wraps a [B, H] batch of unconstrained values with its layer input and constrained values."""
        return HyperparameterSample(
            unconstrained=unconstrained_batch,
            layer_input=self.layer_input(unconstrained_batch, constrained=constrained, centre=centre),
            values=self.constrain(unconstrained_batch.detach()),
            regularize=regularize,
            names=self.names,
        )

    def sample(self, batch_size: int, *, perturb: bool = True, regularize: bool = True, constrained: bool = False,
               centre: bool = False, generator: Optional[torch.Generator] = None) -> HyperparameterSample:
        """A perturbed (or, with perturb=False, the current) batch of hyperparameters."""
        batch = self.perturb(batch_size, generator=generator) if perturb else self.repeat(batch_size)
        return self.make_sample(batch, regularize=regularize, constrained=constrained, centre=centre)

    # -- reading and setting the current values

    def values(self) -> "OrderedDict[str, float]":
        """The current constrained values (discrete ones floored), by name."""
        with torch.no_grad():
            c = self.constrain(self.unconstrained.detach().double())
        return OrderedDict(zip(self.names, c.tolist()))

    def scales(self) -> "OrderedDict[str, float]":
        """The current perturbation scales σ (unconstrained units), by name."""
        with torch.no_grad():
            return OrderedDict(zip(self.names, self.scale.double().tolist()))

    def set_values(self, **values: float) -> None:
        """Sets hyperparameters by name, in constrained units (a discrete one to the middle of its cell)."""
        for name, value in values.items():
            spec = self.specs[self.index(name)]
            value = _number(value, name)
            low, high = spec.continuous_range
            if spec.discrete:
                if value != math.floor(value) or not spec.low <= value <= spec.high:
                    raise ValueError(f"{name}: expected an integer in [{spec.low}, {spec.high}], got {value}")
                value = value + 0.5
            elif not low < value < high:
                raise ValueError(f"{name}: expected a value strictly inside ({low}, {high}), got {value}")
            u = _unconstrain_one(spec, torch.tensor(float(value), dtype=torch.float64))
            with torch.no_grad():
                self.unconstrained[self.index(name)] = u.to(self.unconstrained.dtype)

    def set_scales(self, **scales: float) -> None:
        """Sets perturbation scales σ by name (unconstrained units, > 0)."""
        for name, value in scales.items():
            value = _number(value, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a scale > 0, got {value}")
            with torch.no_grad():
                self.raw_scale[self.index(name)] = inverse_softplus(torch.tensor(float(value), dtype=torch.float64))

    def extra_repr(self) -> str:
        parts = []
        for spec, (name, value), sigma in zip(self.specs, self.values().items(), self.scales().values()):
            where = (f"∈ {{{spec.low:g}, …, {spec.high:g}}}" if spec.discrete
                     else f"∈ ({spec.low:g}, {spec.high:g})")
            parts.append(f"{name}={value:.4g} {where} {spec.kind}, σ={sigma:.3g}")
        return "\n".join(parts)


def _number(value, name: str) -> float:
    """A value given by keyword to set_values / set_scales as a float: a real number or a one-element tensor (a
    str would fail in a comparison)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")

