"""Data augmentation driven by the hyperparameters STN tunes: :func:`augment` applies, per example, the
random affine transform, colour jitter, cutout, input scale and input dropout that one row of λ asks for
(``stn_kernels::affine``, one ``stn_kernels::augment`` op, plus per-example dropout), and nothing in
validation steps.

The hyperparameter names are the published code's (``bright``, ``contrast``, ``sat``, ``hue``,
``cutholes``, ``cutlength``, ``inscale``, ``indropout``: :data:`AUGMENT_NAMES`, what
:func:`stn_kernels.stn.presets.alexnet_cifar10` declares; the Delta-STN code's ``degrees``,
``translate``, ``scale``, ``shear`` for the affine transform: :data:`AFFINE_NAMES`); pass ``names=`` /
``affine_names=`` to map other ones.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..functional import affine, augment_images, per_example_dropout
from ..reference_augment import SLOTS
from .hyperparameters import HyperparameterSample

# augment_images argument (and "dropout" for the input dropout) -> hyperparameter name.
AUGMENT_NAMES: Mapping[str, str] = {
    "brightness": "bright", "contrast": "contrast", "saturation": "sat", "hue": "hue",
    "holes": "cutholes", "length": "cutlength", "scale": "inscale", "dropout": "indropout",
}
# stn_kernels.affine argument -> hyperparameter name (the Delta-STN code's).
AFFINE_NAMES: Mapping[str, str] = {"rotation": "degrees", "translation": "translate", "scale": "scale",
                                   "shear": "shear"}
_COLOR = ("brightness", "contrast", "saturation", "hue")
_SPATIAL = ("holes", "length", "scale")


def augment_arguments(sample: HyperparameterSample, names: Optional[Mapping[str, str]] = None) -> Dict[str, Tensor]:
    """The per-example strengths ([B] tensors) for :func:`stn_kernels.augment_images` (and ``"dropout"``, the
    input dropout rates) from a sample: one entry for every argument whose hyperparameter the sample has."""
    return _arguments(sample, names, AUGMENT_NAMES, "names")


def affine_arguments(sample: HyperparameterSample, names: Optional[Mapping[str, str]] = None) -> Dict[str, Tensor]:
    """The per-example strengths ([B] tensors) for :func:`stn_kernels.affine` (``rotation``, ``translation``,
    ``scale``, ``shear``) from a sample: one entry for every argument whose hyperparameter the sample has."""
    return _arguments(sample, names, AFFINE_NAMES, "affine_names")


def _arguments(sample: HyperparameterSample, names: Optional[Mapping[str, str]], defaults: Mapping[str, str],
               what: str) -> Dict[str, Tensor]:
    names = defaults if names is None else names
    if not isinstance(names, Mapping):
        raise TypeError(f"{what}: expected a mapping from argument names to hyperparameter names (as "
                        f"{{{next(iter(defaults))!r}: {next(iter(defaults.values()))!r}}}), got {type(names).__name__}")
    unknown = sorted(set(names) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: expected keys among {sorted(defaults)}, got {unknown}")
    return {arg: sample[name] for arg, name in names.items() if name in sample.names}


def _check_call(images, sample) -> None:
    """What :func:`augment` reads of its arguments before the augmentation's own checks: a tensor of images with a
    batch dim and a sample (the order of the two, the sample's batch size in training steps)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images: expected a torch.Tensor [B, C, H, W], got {type(images).__name__} (the call is "
                        f"stn.augment(images, sample))")
    if not isinstance(sample, HyperparameterSample):
        raise TypeError(f"sample: expected a HyperparameterSample (from HyperparameterSet.sample, or the one "
                        f"model_fn gets), got {type(sample).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images: expected shape [B, C, H, W], got {tuple(images.shape)}")
    if sample.regularize and sample.batch_size != images.shape[0]:
        raise ValueError(f"sample: expected batch size {images.shape[0]} (one row per image, images' first dim), "
                         f"got a sample of batch size {sample.batch_size}")


def _check_normalisation(mean, std, images: Tensor) -> None:
    """``mean`` and ``std``: one value per channel of ``images``, or one for all; ``std`` nonzero."""
    for name, values in (("mean", mean), ("std", std)):
        given = torch.as_tensor(values)
        if given.numel() not in (1, images.shape[1]):
            raise ValueError(f"{name}: expected {images.shape[1]} values (one per channel of images of shape "
                             f"{tuple(images.shape)}) or one, got {given.numel()}")
        # Read on the host only when given there (a list, or a CPU tensor): a device tensor is not synchronised,
        # nor is anything read under torch.compile (no graph break).
        if name == "std" and given.device.type == "cpu" and not torch.compiler.is_compiling() \
                and bool((given == 0).any()):
            shown = values.tolist() if isinstance(values, Tensor) else values
            raise ValueError(f"std: expected nonzero values (the normalisation divides by them), got {shown}")


def augment(images: Tensor, sample: HyperparameterSample, *, names: Optional[Mapping[str, str]] = None,
            max_holes: int = 4, random_order: bool = True, mean: Union[Sequence[float], Tensor, None] = None,
            std: Union[Sequence[float], Tensor, None] = None, seed: Union[int, Tensor, None] = None, offset: int = 0,
            generator: Optional[torch.Generator] = None, affine_names: Optional[Mapping[str, str]] = None,
            interpolation: str = "nearest") -> Tensor:
    """Per-example augmentation of images [B, C, H, W] (values in [0, 1], or uint8, which is first scaled to
    [0, 1] in float32 as ToTensor does: the result is float) by the sample's hyperparameters.

    In training steps (``sample.regularize``): the random affine transform (if the sample has any of
    :data:`AFFINE_NAMES`: :func:`stn_kernels.affine` with ``interpolation``, first, as the Delta-STN code
    transforms the image before the jitter), colour jitter (brightness, contrast, saturation, hue, each
    example in its own random order unless ``random_order=False``), then, if ``mean`` and ``std`` are
    given, the normalisation (x − mean) / std per channel, then cutout (``max_holes`` bounds the floored
    holes), input scale and input dropout, the published order (jitter on the image, cutout after the
    normalisation, scale and dropout in the training step). Hyperparameters the sample lacks are off. In
    validation steps and evaluation only the normalisation is applied (``images`` is returned as it is
    without one). One seed drives it all (``seed=None``: drawn from torch's generator); the input dropout
    takes the counters after the augmentation's (offset + 64·B on), the affine transform those after the
    input dropout's (offset + 64·B + images.numel() on).
    """
    _check_call(images, sample)
    if images.dtype == torch.uint8:
        images = images.to(torch.float32).div_(255.0)  # as ToTensor: the pipeline works on [0, 1] floats
    normalise = mean is not None or std is not None
    if normalise and (mean is None or std is None):
        raise ValueError("mean, std: expected both or neither, got only one")
    if normalise:
        _check_normalisation(mean, std, images)

    def normalised(x: Tensor) -> Tensor:
        shape = (1, -1, 1, 1)
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
        return (x - m) / s

    if not sample.regularize:
        return normalised(images) if normalise else images
    args = augment_arguments(sample, names)
    rates = args.pop("dropout", None)
    transform = affine_arguments(sample, affine_names)
    if seed is None:  # one draw shared by every stage below
        device = generator.device if generator is not None else images.device
        seed = torch.randint(2**62, (1,), generator=generator, device=device).to(images.device)
    if transform:
        images = affine(images, **transform, interpolation=interpolation, seed=seed,
                        offset=offset + SLOTS * images.shape[0] + images.numel())
    common = dict(seed=seed, offset=offset, random_order=random_order)
    if normalise:
        x = augment_images(images, **common, **{k: v for k, v in args.items() if k in _COLOR})
        x = augment_images(normalised(x), max_holes=max_holes, **common,
                           **{k: v for k, v in args.items() if k in _SPATIAL})
    else:
        x = augment_images(images, max_holes=max_holes, **common, **args)
    if rates is not None:
        x = per_example_dropout(x, rates, seed=seed, offset=offset + SLOTS * images.shape[0])
    return x
