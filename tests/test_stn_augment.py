"""stn.augment (augmentation driven by a HyperparameterSample), stn.augment_arguments and the paper's
hyperparameter preset stn.presets.alexnet_cifar10: against direct calls of the ops with the same seed."""

import pytest
import torch

from stn_kernels import augment_images, per_example_dropout, stn
from stn_kernels.reference_augment import SLOTS

from _naive import assert_compiled_matches_eager, assert_rejected


def _sample(batch=4, regularize=True, seed=0):
    hp = stn.HyperparameterSet(stn.presets.alexnet_cifar10(jitter=0.3, cutout_length=3, cutout_holes=2))
    return hp.sample(batch, regularize=regularize, generator=torch.Generator().manual_seed(seed))


def _images(batch=4):
    return torch.rand(batch, 3, 6, 7, generator=torch.Generator().manual_seed(1))


def test_preset_is_the_papers_15_hyperparameters_with_the_published_ranges():
    specs = {h.name: h for h in stn.presets.alexnet_cifar10()}
    assert len(specs) == 15
    assert {f"dropout{i}" for i in range(5)} | {"fcdropout0", "fcdropout1"} <= set(specs)
    ranges = {name: (h.low, h.high, h.discrete) for name, h in specs.items()}
    assert ranges["hue"] == (0.0, 0.5, False)
    for name in ("contrast", "sat", "bright", "indropout"):
        assert ranges[name] == (0.0, 1.0, False), name
    assert ranges["inscale"] == (0.0, 0.3, False)
    assert ranges["cutlength"] == (0, 24, True) and ranges["cutholes"] == (0, 4, True)
    assert all(ranges[f"dropout{i}"] == (0.0, 0.9, False) for i in range(5))
    assert set(stn.AUGMENT_NAMES.values()) <= set(specs)


def test_augment_arguments_maps_the_sample_to_the_op_arguments():
    sample = _sample()
    args = stn.augment_arguments(sample)
    assert set(args) == {"brightness", "contrast", "saturation", "hue", "holes", "length", "scale", "dropout"}
    assert torch.equal(args["saturation"], sample["sat"]) and torch.equal(args["holes"], sample["cutholes"])
    assert stn.augment_arguments(sample, {"hue": "hue"}).keys() == {"hue"}
    assert_rejected(lambda: stn.augment_arguments(sample, {"blur": "hue"}), ValueError, ["names", "blur"])


def test_augment_is_the_op_then_input_dropout_with_one_seed():
    x, sample = _images(), _sample()
    args = stn.augment_arguments(sample)
    rates = args.pop("dropout")
    expected = augment_images(x, max_holes=4, seed=5, offset=2, **args)
    expected = per_example_dropout(expected, rates, seed=5, offset=2 + SLOTS * 4)
    assert torch.equal(stn.augment(x, sample, seed=5, offset=2), expected)


def test_augment_with_normalisation_puts_cutout_after_it():
    x, sample = _images(), _sample()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    got = stn.augment(x, sample, mean=mean, std=std, seed=7, names={"hue": "hue", "holes": "cutholes",
                                                                     "length": "cutlength"})
    jittered = augment_images(x, hue=sample["hue"], seed=7)
    normalised = (jittered - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = augment_images(normalised, holes=sample["cutholes"], length=sample["cutlength"], max_holes=4, seed=7)
    assert torch.equal(got, expected)
    assert (got == 0).any()  # holes are 0 in the normalised space (the mean colour), as published


def test_no_augmentation_in_validation_steps():
    x = _images()
    sample = _sample(regularize=False)
    assert stn.augment(x, sample) is x
    normalised = stn.augment(x, sample, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.equal(normalised, (x - 0.5) / 0.25)
    assert_rejected(lambda: stn.augment(x, sample, mean=(0.5,) * 3), ValueError, ["mean, std"])


def test_seed_none_is_reproducible_from_torch_generator():
    x, sample = _images(), _sample()
    torch.manual_seed(3)
    first = stn.augment(x, sample)
    torch.manual_seed(3)
    assert torch.equal(first, stn.augment(x, sample))


@pytest.mark.parametrize("with_affine", [False, True])
def test_compiles_with_fullgraph(with_affine):
    sample = _affine_sample() if with_affine else _sample()
    x = _images().requires_grad_()
    assert_compiled_matches_eager(lambda t: stn.augment(t, sample, seed=torch.tensor(9)), x)


@pytest.mark.parametrize("regularize", [True, False])
def test_sample_values_get_no_gradient(regularize):
    hp = stn.HyperparameterSet(stn.presets.alexnet_cifar10())
    sample = hp.sample(2, regularize=regularize)
    out = stn.augment(_images(2), sample, seed=1)
    assert not out.requires_grad


def _affine_sample(batch=4, regularize=True):
    specs = stn.presets.alexnet_cifar10(jitter=0.3, cutout_length=3, cutout_holes=2) + [
        stn.Hyperparameter("degrees", 20.0, 0.0, 45.0), stn.Hyperparameter("translate", 0.1, 0.0, 0.5),
        stn.Hyperparameter("scale", 0.2, 0.0, 0.5), stn.Hyperparameter("shear", 5.0, 0.0, 30.0)]
    return stn.HyperparameterSet(specs).sample(batch, regularize=regularize,
                                               generator=torch.Generator().manual_seed(2))


def test_affine_hyperparameters_transform_first_with_the_counters_after_the_input_dropout():
    from stn_kernels import affine

    x, sample = _images(), _affine_sample()
    transform = stn.affine_arguments(sample)
    assert set(transform) == {"rotation", "translation", "scale", "shear"}
    assert torch.equal(transform["rotation"], sample["degrees"])
    moved = affine(x, **transform, seed=5, offset=2 + SLOTS * 4 + x.numel())
    assert not torch.equal(moved, x)
    args = stn.augment_arguments(sample)
    rates = args.pop("dropout")
    expected = per_example_dropout(augment_images(moved, max_holes=4, seed=5, offset=2, **args), rates, seed=5,
                                   offset=2 + SLOTS * 4)
    assert torch.equal(stn.augment(x, sample, seed=5, offset=2), expected)
    # Without the affine hyperparameters (or mapped to none) the transform is off.
    unmoved = per_example_dropout(augment_images(x, max_holes=4, seed=5, offset=2, **args), rates, seed=5,
                                  offset=2 + SLOTS * 4)
    assert torch.equal(stn.augment(x, sample, seed=5, offset=2, affine_names={}), unmoved)
    assert stn.augment(x, _affine_sample(regularize=False)) is x
    assert_rejected(lambda: stn.affine_arguments(sample, {"blur": "degrees"}), ValueError, ["affine_names", "blur"])


@pytest.mark.parametrize("regularize", [True, False])
def test_uint8_images_are_scaled_to_floats_first(regularize):
    images = torch.randint(0, 256, (4, 3, 6, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    sample = _sample(regularize=regularize)
    out = stn.augment(images, sample, seed=5, mean=[0.5] * 3, std=[0.25] * 3)
    expected = stn.augment(images.to(torch.float32) / 255.0, sample, seed=5, mean=[0.5] * 3, std=[0.25] * 3)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
