"""Per-example data augmentation (stn_kernels.augment_images, color_jitter, cutout, input_scale; op
stn_kernels::augment) on the reference backend: the draws against an independent formulation of the hash
and their distributions, the semantics against torchvision's own functional ops applied per example with
the factors the op drew, gradients, memory formats, the op registration, torch.compile and argument
checks. The Triton kernel: tests/test_triton_augment.py; stn.augment and the presets:
tests/test_stn_augment.py."""

import math
import subprocess
import sys

import pytest
import torch
from test_per_example_dropout import _uniform_py  # the dropout hash with Python ints

import stn_kernels
from stn_kernels import augment_draws, augment_images, color_jitter, cutout, input_scale
from stn_kernels.reference_augment import PERMUTATIONS, SLOTS, STAGES

from _naive import assert_compiled_matches_eager, assert_rejected

TF = pytest.importorskip("torchvision.transforms.v2.functional")
ADJUST = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23}  # one ulp at 1.0: the images live in [0, 1]


def _images(batch=6, channels=3, height=7, width=9, dtype=torch.float32, seed=0):
    return torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _torchvision(images, draws):
    """torchvision's functional ops per example: the jitter stages in the drawn order, erase per box, scale."""
    out = []
    for b in range(images.shape[0]):
        img = images[b]
        for stage in draws.order[b].tolist():
            if stage >= 0:
                img = ADJUST[stage](img, float(draws.factors[b, stage]))
        for y0, y1, x0, x1 in draws.boxes[b].tolist():
            if y1 > y0 and x1 > x0:
                img = TF.erase(img, y0, x0, y1 - y0, x1 - x0, torch.zeros((), dtype=img.dtype))
        out.append(img * float(draws.scales[b]))
    return torch.stack(out)


# --------------------------------------------------------------------------- the draws


def test_draws_are_the_dropout_hash_at_the_documented_counters():
    x = _images(batch=3)
    seed, offset = 2**33 + 5, 17
    strengths = dict(brightness=0.3, contrast=0.8, saturation=1.5, hue=0.2, holes=2, length=5, scale=0.25)
    draws = augment_draws(x, seed=seed, offset=offset, random_order=True, **strengths)
    for b in range(3):
        u = [_uniform_py(seed, offset + b * SLOTS + slot) for slot in range(10)]
        # Formed in float32 as documented: lo + u·(hi − lo).
        f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        for stage, s in enumerate((0.3, 0.8, 1.5)):
            lo, hi = (f32(1.0) - f32(s)).clamp(min=0), f32(1.0) + f32(s)
            assert draws.factors[b, stage] == lo + f32(u[stage]) * (hi - lo)
        assert draws.factors[b, 3] == -f32(0.2) + f32(u[3]) * (f32(0.2) - -f32(0.2))
        assert tuple(draws.order[b].tolist()) == PERMUTATIONS[math.floor(u[4] * 24)]
        lo, hi = f32(1.0) / (f32(1.0) + f32(0.25)), f32(1.0) + f32(0.25)
        assert draws.scales[b] == lo + f32(u[5]) * (hi - lo)
        for k in range(2):
            y, x_ = math.floor(u[6 + 2 * k] * 7), math.floor(u[7 + 2 * k] * 9)
            assert draws.centres[b, k].tolist() == [y, x_]
            assert draws.boxes[b, k].tolist() == [max(0, y - 2), min(7, y + 2), max(0, x_ - 2), min(9, x_ + 2)]


def test_draw_distributions():
    n = 24000
    x = torch.zeros(n, 3, 1, 1)
    s = torch.tensor(0.4)
    draws = augment_draws(x, brightness=s, contrast=1.5, saturation=0.4, hue=0.3, scale=0.5, seed=9)
    f = draws.factors.double()
    for column, (low, high) in enumerate([(0.6, 1.4), (0.0, 2.5), (0.6, 1.4), (-0.3, 0.3)]):
        assert low <= f[:, column].min() and f[:, column].max() < high
        # Uniform: mean and variance of U(low, high) within 5 standard errors.
        mean, var = (low + high) / 2, (high - low) ** 2 / 12
        assert abs(f[:, column].mean().item() - mean) < 5 * math.sqrt(var / n)
    scales = draws.scales.double()
    assert 1 / 1.5 <= scales.min() and scales.max() < 1.5
    # Every one of the 24 orders about equally often (chi² with 23 degrees of freedom, 6 sd margin).
    index = {p: i for i, p in enumerate(PERMUTATIONS)}
    counts = torch.bincount(torch.tensor([index[tuple(o)] for o in draws.order.tolist()]), minlength=24).double()
    chi2 = ((counts - n / 24) ** 2 / (n / 24)).sum().item()
    assert chi2 < 23 + 6 * math.sqrt(46), chi2


def test_hole_centres_are_uniform_and_holes_are_floored():
    n, height, width = 12000, 5, 7
    x = torch.zeros(n, 1, height, width)
    holes = torch.full((n,), 1.0)
    holes[: n // 2] = 2.9  # floored to 2
    draws = augment_draws(x, holes=holes, length=3.7, seed=4, max_holes=3)
    assert draws.boxes.shape == (n, 3, 4)
    made = (draws.boxes[..., 1] > draws.boxes[..., 0]).sum(1)
    assert made[: n // 2].eq(2).all() and made[n // 2:].eq(1).all()
    for axis, size in ((0, height), (1, width)):
        counts = torch.bincount(draws.centres[:, 0, axis], minlength=size).double()
        chi2 = ((counts - n / size) ** 2 / (n / size)).sum().item()
        assert chi2 < (size - 1) + 6 * math.sqrt(2 * (size - 1)), (axis, chi2)
    side = draws.boxes[..., 1] - draws.boxes[..., 0]
    assert side.max() == 2  # length 3.7 -> 3 -> a square of side 2·⌊3/2⌋ = 2 before clipping


def test_same_seed_same_draws_whatever_is_switched_on():
    x = _images()
    full = augment_draws(x, brightness=0.5, hue=0.1, holes=2, length=4, scale=0.2, seed=7)
    alone = augment_draws(x, holes=2, length=4, seed=7)
    assert torch.equal(full.boxes, alone.boxes)
    assert torch.equal(full.factors[:, 0], augment_draws(x, brightness=0.5, seed=7).factors[:, 0])


# --------------------------------------------------------------------------- semantics against torchvision


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("stage", ["brightness", "contrast", "saturation"])
def test_each_jitter_stage_matches_torchvision(stage, dtype):
    x = _images(batch=8, dtype=dtype)
    strengths = {stage: torch.linspace(0.0, 0.9, 8)}  # strength 0 in example 0: stage skipped there
    draws = augment_draws(x, seed=3, **strengths)
    got = color_jitter(x, seed=3, **strengths)
    expected = _torchvision(x, draws)
    assert torch.equal(got[0], x[0])
    # torchvision blends with add(alpha=1 − f): one rounding apart at most (values in [0, 1]).
    torch.testing.assert_close(got, expected, rtol=0, atol=ULP[dtype])


def test_hue_matches_torchvision():
    x = _images(batch=8)
    x[0, :, 0, 0] = 0.5  # a grey pixel: hue and saturation 0, no 0/0
    hue = torch.linspace(0.0, 0.5, 8)
    got = color_jitter(x, hue=hue, seed=11)
    expected = _torchvision(x, augment_draws(x, hue=hue, seed=11))
    assert torch.equal(got[0], x[0])  # strength 0: no HSV round trip
    # The same formulas in the same order: a few float32 roundings apart at most.
    torch.testing.assert_close(got, expected, rtol=0, atol=4 * ULP[torch.float32])


@pytest.mark.parametrize("random_order", [True, False])
def test_whole_jitter_in_each_examples_order_matches_torchvision(random_order):
    x = _images(batch=12, dtype=torch.float32)
    kwargs = dict(brightness=0.6, contrast=0.6, saturation=0.6, hue=0.2, random_order=random_order, seed=21)
    draws = augment_draws(x, **kwargs)
    if random_order:
        assert len({tuple(o) for o in draws.order.tolist()}) > 3
    else:
        assert (draws.order == torch.arange(4)).all()
    got = color_jitter(x, **kwargs)
    # Four stages, each a few roundings from torchvision's: tolerance grows with the stages.
    torch.testing.assert_close(got, _torchvision(x, draws), rtol=0, atol=16 * ULP[torch.float32])


def test_the_order_matters():
    x = _images(batch=12)
    kwargs = dict(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.4, seed=2)
    random, fixed = color_jitter(x, **kwargs), color_jitter(x, random_order=False, **kwargs)
    draws = augment_draws(x, **kwargs)
    same = (draws.order == torch.arange(4)).all(1)
    assert torch.equal(random[same], fixed[same])
    assert (random[~same] - fixed[~same]).abs().amax((1, 2, 3)).min() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_cutout_and_scale_match_torchvision_erase(dtype):
    x = _images(batch=5, height=7, width=9, dtype=dtype) + 0.1  # no zeros before the cutout
    holes, length = torch.tensor([0.0, 1.0, 2.5, 3.0, 4.9]), torch.tensor([24.0, 3.0, 4.0, 5.9, 1.0])
    draws = augment_draws(x, holes=holes, length=length, scale=0.3, seed=8)
    got = augment_images(x, holes=holes, length=length, scale=0.3, seed=8)
    # One multiplication rounded once (in float32 for half inputs, then to the dtype).
    expected = _torchvision(x.to(torch.float64 if dtype == torch.float64 else torch.float32), draws).to(dtype)
    assert torch.equal(got, expected)
    assert torch.equal(cutout(x, holes, length, seed=8) == 0, got == 0)
    assert (got[0] != 0).all() and (got[1] == 0).any()  # 0 holes, then 1


def test_input_scale_is_the_image_times_its_factor():
    x = _images(batch=4, dtype=torch.float64)
    strength = torch.tensor([0.0, 0.1, 0.5, 2.0])
    scales = augment_draws(x, scale=strength, seed=1).scales
    assert torch.equal(input_scale(x, strength, seed=1), x * scales.double().view(-1, 1, 1, 1))
    assert scales[0] == 1.0


def test_all_strengths_zero_is_the_identity_bit_for_bit():
    x = torch.randn(3, 3, 4, 5) * 3  # even outside [0, 1]: no stage runs, so no clamp
    assert torch.equal(augment_images(x, seed=1), x)


def test_channels_last_gives_the_same_values_in_the_same_format():
    x = _images(batch=5)
    kwargs = dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2, holes=2, length=4, scale=0.2, seed=6)
    expected = augment_images(x, **kwargs)
    got = augment_images(x.contiguous(memory_format=torch.channels_last), **kwargs)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, expected)


def test_seed_none_draws_from_torch_generator():
    x = _images()
    torch.manual_seed(4)
    first, second = input_scale(x, 0.5), input_scale(x, 0.5)
    torch.manual_seed(4)
    assert torch.equal(first, input_scale(x, 0.5))
    assert not torch.equal(first, second)
    g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    assert torch.equal(cutout(x, 2, 4, generator=g()), cutout(x, 2, 4, generator=g()))


# --------------------------------------------------------------------------- gradients


def test_images_get_the_gradient_strengths_none():
    x = (_images(batch=3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    strength = torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64, requires_grad=True)
    kwargs = dict(brightness=strength, contrast=0.3, saturation=strength, hue=0.1, holes=1, length=3, scale=0.2,
                  seed=5)
    fn = lambda t: augment_images(t, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    fn(x).sum().backward()
    assert strength.grad is None and x.grad is not None


def test_cutout_and_scale_gradient_is_the_mask_times_the_scale():
    x = _images(batch=4).requires_grad_()
    y = augment_images(x, holes=2, length=4, scale=0.5, seed=3)
    grad = torch.randn_like(y)
    y.backward(grad)
    draws = augment_draws(x, holes=2, length=4, scale=0.5, seed=3)
    assert torch.equal(x.grad, torch.where(y == 0, 0.0, grad * draws.scales.view(-1, 1, 1, 1)))


# --------------------------------------------------------------------------- the op registration


def _operands(x, **kwargs):
    d = augment_draws(x, **kwargs)
    return x, d.order, d.factors, d.boxes, d.scales


def test_opcheck():
    x = _images(batch=3, height=4, width=5)
    full = dict(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.2, holes=2, length=3, scale=0.2, seed=1)
    for operands in (_operands(x, **full), _operands(x, holes=1, length=2, seed=2),
                     _operands(x.contiguous(memory_format=torch.channels_last), **full)):
        torch.library.opcheck(torch.ops.stn_kernels.augment, operands)
        grad_out = torch.randn(x.shape)
        torch.library.opcheck(torch.ops.stn_kernels.augment_backward, (grad_out, *operands))


def test_compiles_without_graph_breaks():
    x = _images(batch=4).requires_grad_()
    seed = torch.tensor(31)
    strength = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def f(t):
        return augment_images(t * 0.9, brightness=strength, contrast=0.3, hue=strength * 0.5, holes=strength * 5,
                              length=3, scale=0.1, max_holes=2, seed=seed).sum((1, 2, 3))

    assert_compiled_matches_eager(f, x)


# --------------------------------------------------------------------------- input checks


IMG = torch.rand(3, 3, 4, 4)


@pytest.mark.parametrize("call, error, words", [
    (lambda: color_jitter(torch.rand(3, 4, 4, 4), 0.5), ValueError, ["images", "3 channels", "(3, 4, 4, 4)"]),
    (lambda: color_jitter(torch.rand(3, 3, 4), 0.5), ValueError, ["images", "[B, C, H, W]", "(3, 3, 4)"]),
    (lambda: cutout((IMG * 255).to(torch.int32), 1, 2), TypeError, ["images", "uint8, float16", "torch.int32"]),
    (lambda: cutout([1.0], 1, 2), TypeError, ["images", "torch.Tensor", "list"]),
    (lambda: color_jitter(IMG, brightness=-0.1), ValueError, ["brightness", "[0.0, inf]", "-0.1"]),
    (lambda: color_jitter(IMG, hue=torch.tensor([0.1, 0.6, 0.2])), ValueError, ["hue", "[0.0, 0.5]", "0.6"]),
    (lambda: color_jitter(IMG, contrast=torch.ones(2)), ValueError, ["contrast", "[3]", "(2,)"]),
    (lambda: color_jitter(IMG, saturation="1"), TypeError, ["saturation", "str"]),
    (lambda: cutout(IMG, -1, 2), ValueError, ["holes", "[0.0, inf]", "-1"]),
    (lambda: cutout(IMG, torch.tensor([1.0, 5.0, 0.0]), 2, max_holes=4), ValueError, ["holes", "max_holes = 4", "5"]),
    (lambda: cutout(IMG, 1, torch.tensor([-2.0, 1.0, 1.0])), ValueError, ["length", "[0.0, inf]", "-2"]),
    (lambda: cutout(IMG, 40, 2), ValueError, ["max_holes", "[0, 29]", "40"]),
    (lambda: input_scale(IMG, -0.5), ValueError, ["scale", "-0.5"]),
    (lambda: input_scale(IMG, torch.tensor([True, False, True])), TypeError, ["scale", "bool"]),
    (lambda: input_scale(IMG, 0.1, seed=-1), ValueError, ["seed", "-1"]),
    (lambda: input_scale(IMG, 0.1, offset=-3), ValueError, ["offset", "-3"]),
])
def test_bad_input_is_rejected_with_a_message_naming_the_argument(call, error, words):
    assert_rejected(call, error, words)


def test_import_loads_neither_torchvision_nor_triton():
    code = ("import sys, stn_kernels, stn_kernels.stn; "
            "assert not {'torchvision', 'triton'} & set(sys.modules), 'torchvision or triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names():
    assert {"augment_images", "color_jitter", "cutout", "input_scale", "augment_draws"} <= set(stn_kernels.__all__)
    assert STAGES == ("brightness", "contrast", "saturation", "hue")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_jitter_is_each_example_alone_bit_for_bit(dtype):
    # The reference computes every stage for the whole batch and selects per example (no host
    # synchronisation): the same bits as running each example's stages on it alone.
    from stn_kernels.reference_augment import apply_stage

    x = _images(batch=9, dtype=dtype)
    strengths = torch.tensor([0.0, 0.3, 0.7, 1.2, 0.5, 0.0, 0.9, 0.2, 0.4])
    kwargs = dict(brightness=strengths, contrast=strengths.flip(0), saturation=0.8, hue=strengths * 0.4, seed=13)
    draws = augment_draws(x, **kwargs)
    expected = []
    for b in range(9):
        img = x[b:b + 1]
        for stage in draws.order[b].tolist():
            if stage >= 0:
                img = apply_stage(img, stage, draws.factors[b:b + 1, stage].to(dtype))
        expected.append(img)
    expected = torch.cat(expected)
    assert torch.equal(color_jitter(x, **kwargs), expected)  # on the CPU: stages on subsets of the batch
    from stn_kernels.reference_augment import color_jitter as jitter  # the accelerators' way: torch.where

    for by_subset in (True, False):
        assert torch.equal(jitter(x, draws.order, draws.factors, by_subset=by_subset), expected)


def test_order_has_a_column_per_stage_that_may_be_on():
    x = _images(batch=4)
    assert augment_draws(x, holes=1, length=2, seed=1).order.shape == (4, 0)
    assert augment_draws(x, hue=0.1, contrast=torch.zeros(4), seed=1).order.shape == (4, 2)
    full = augment_draws(x, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, seed=1).order
    two = augment_draws(x, brightness=0.1, hue=0.1, seed=1).order
    for row_full, row_two in zip(full.tolist(), two.tolist()):
        assert row_two == [stage for stage in row_full if stage in (0, 3)]  # the same permutation draw


@pytest.mark.parametrize("random_order", [True, False])
def test_brightness_and_contrast_of_single_channel_images_match_torchvision(random_order):
    x = _images(batch=8, channels=1, dtype=torch.float64)
    kwargs = dict(brightness=torch.linspace(0.0, 0.9, 8), contrast=torch.linspace(0.8, 0.0, 8), holes=1, length=3,
                  random_order=random_order, max_holes=1, seed=23)
    draws = augment_draws(x, **kwargs)
    got = augment_images(x, **kwargs)
    # torchvision's adjust_contrast takes the mean of a single-channel image itself.
    torch.testing.assert_close(got, _torchvision(x, draws), rtol=0, atol=2 * ULP[torch.float64])
    from stn_kernels.reference_augment import color_jitter as jitter

    assert torch.equal(jitter(x, draws.order, draws.factors, by_subset=False),
                       jitter(x, draws.order, draws.factors, by_subset=True))
    with pytest.raises(ValueError, match="3 channels"):
        augment_images(x, saturation=0.5, seed=1)
    with pytest.raises(ValueError, match=r"1 or 3 channels.*\(2, 2, 3, 3\)"):
        augment_images(torch.rand(2, 2, 3, 3), contrast=0.5, seed=1)


# --------------------------------------------------------------------------- uint8 images


@pytest.mark.parametrize("channels_last", [False, True])
def test_uint8_images_are_the_float_result_rounded_once(channels_last):
    torch.manual_seed(3)
    images = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    strengths = dict(brightness=torch.rand(5) * 0.8, contrast=0.4, saturation=torch.rand(5), hue=0.1,
                     holes=torch.tensor([0.0, 1.0, 2.0, 3.0, 1.5]), length=4, scale=0.2, max_holes=3, seed=11)
    out = augment_images(images, **strengths)
    as_float = augment_images(images.to(torch.float32) / 255.0, **strengths)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(out, (as_float * 255.0).round().clamp(0, 255).to(torch.uint8))


def test_uint8_brightness_within_a_level_of_torchvision_uint8():
    torch.manual_seed(4)
    images = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8)
    strength = torch.tensor([0.1, 0.5, 0.9, 0.3])
    out = augment_images(images, brightness=strength, seed=5)
    factors = augment_draws(images, brightness=strength, seed=5).factors[:, 0]
    for b in range(4):
        # torchvision truncates its uint8 result, we round once: at most one level apart.
        expected = TF.adjust_brightness(images[b], float(factors[b])).to(torch.int16)
        assert (out[b].to(torch.int16) - expected).abs().max() <= 1, b
