"""The hyperparameter sets of the paper's experiments, as :class:`Hyperparameter` lists.

Ranges are the published code's (``create_hparams`` of the official STN CNN code): dropout rates in
(0, 0.9); brightness, contrast, saturation and input dropout in (0, 1); hue in (0, 0.5); input scale in
(0, 0.3); cutout length an integer 0..24 and holes an integer 0..4 (the published continuous range
(0, 4) floors to 0..3; we keep the whole integer range). The initial values are ours (the published
ones are command-line flags): small regularisation everywhere, as STN starts from and then tunes.
Names are the published ones, which :func:`stn_kernels.stn.augment` reads by default.
"""

from __future__ import annotations

from typing import List

from .hyperparameters import Hyperparameter


def alexnet_cifar10(*, dropout: float = 0.05, jitter: float = 0.05, cutout_length: int = 4, cutout_holes: int = 1,
                    input_scale: float = 0.05, input_dropout: float = 0.05,
                    scale: float = 0.5) -> List[Hyperparameter]:
    """The 15 hyperparameters of STN's AlexNet on CIFAR-10: dropout of the 5 conv layers (``dropout0`` …
    ``dropout4``) and 2 hidden fully connected layers (``fcdropout0``, ``fcdropout1``), the colour jitter
    strengths (``hue``, ``contrast``, ``sat``, ``bright``), input dropout (``indropout``), input scale
    (``inscale``), cutout length and holes (``cutlength``, ``cutholes``). ``scale`` is every one's initial
    perturbation scale σ."""
    drops = [Hyperparameter(f"dropout{i}", dropout, 0.0, 0.9, scale=scale) for i in range(5)]
    return drops + [
        Hyperparameter("hue", jitter / 2, 0.0, 0.5, scale=scale),
        Hyperparameter("contrast", jitter, 0.0, 1.0, scale=scale),
        Hyperparameter("sat", jitter, 0.0, 1.0, scale=scale),
        Hyperparameter("bright", jitter, 0.0, 1.0, scale=scale),
        Hyperparameter("indropout", input_dropout, 0.0, 1.0, scale=scale),
        Hyperparameter("inscale", input_scale, 0.0, 0.3, scale=scale),
        Hyperparameter("cutlength", cutout_length, 0, 24, discrete=True, scale=scale),
        Hyperparameter("cutholes", cutout_holes, 0, 4, discrete=True, scale=scale),
    ] + [Hyperparameter(f"fcdropout{i}", dropout, 0.0, 0.9, scale=scale) for i in range(2)]
