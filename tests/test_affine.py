"""The per-example affine transform (stn_kernels.affine, op stn_kernels::affine) on the reference backend:
the draws against an independent formulation of the hash and torchvision's RandomAffine ranges, the
transform against torchvision.transforms.v2.functional.affine applied per example with the drawn
parameters, odd sizes, both memory formats, gradients (images only), the op registration,
torch.compile and argument checks. The Triton kernel: tests/test_triton_affine.py."""

import math

import pytest
import torch
from test_per_example_dropout import _uniform_py  # the dropout hash with Python ints

import stn_kernels
from stn_kernels import affine, affine_draws
from stn_kernels.reference_affine import SLOTS

from _naive import assert_compiled_matches_eager, assert_rejected

TF = pytest.importorskip("torchvision.transforms.v2.functional")
MODE = {"nearest": TF.InterpolationMode.NEAREST, "bilinear": TF.InterpolationMode.BILINEAR}
STRENGTHS = dict(rotation=30.0, translation=0.2, scale=0.3, shear=20.0)


def _images(batch=6, channels=3, height=7, width=9, dtype=torch.float32, seed=0):
    return torch.rand(batch, channels, height, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _torchvision(images, draws, interpolation):
    """torchvision's functional affine per example with the drawn angle, shifts, scale and shear."""
    return torch.stack([TF.affine(images[b], angle=float(draws.angle[b]), translate=draws.translate[b].tolist(),
                                  scale=float(draws.scale[b]), shear=[float(draws.shear[b]), 0.0],
                                  interpolation=MODE[interpolation]) for b in range(images.shape[0])])


def test_draws_are_the_dropout_hash_at_the_documented_counters():
    x = _images(batch=3, height=7, width=9)
    seed, offset = 2**35 + 11, 5
    draws = affine_draws(x, seed=seed, offset=offset, **STRENGTHS)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    between = lambda u, lo, hi: f32(lo) + f32(u) * (f32(hi) - f32(lo))  # noqa: E731
    for b in range(3):
        u = [_uniform_py(seed, offset + b * SLOTS + slot) for slot in range(5)]
        assert draws.angle[b] == between(u[0], -30.0, 30.0)
        dx, dy = float(f32(0.2) * 9), float(f32(0.2) * 7)
        assert draws.translate[b].tolist() == [round(float(between(u[1], -dx, dx))),
                                               round(float(between(u[2], -dy, dy)))]
        assert draws.scale[b] == between(u[3], 0.7, 1.3)
        assert draws.shear[b] == between(u[4], -20.0, 20.0)


def test_draws_cover_randomaffines_ranges():
    n = 20000
    x = torch.zeros(n, 1, 10, 20)
    draws = affine_draws(x, rotation=torch.full((n,), 40.0), translation=0.25, scale=0.5, shear=10.0, seed=3)
    for values, low, high in ((draws.angle, -40, 40), (draws.scale, 0.5, 1.5), (draws.shear, -10, 10)):
        v = values.double()
        assert low <= v.min() and v.max() <= high
        mean, var = (low + high) / 2, (high - low) ** 2 / 12
        assert abs(v.mean().item() - mean) < 5 * math.sqrt(var / n)
    tx, ty = draws.translate.unbind(1)
    assert set(tx.unique().tolist()) == set(range(-5, 6)) and set(ty.unique().tolist()) == set(range(-2, 3))
    assert torch.equal(tx, tx.round())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("size", [(7, 9), (8, 8), (5, 12)])
def test_matches_torchvision_per_example(interpolation, dtype, size):
    x = _images(batch=8, height=size[0], width=size[1], dtype=dtype, seed=sum(size))
    strengths = dict(rotation=torch.linspace(0, 45, 8), translation=0.2, scale=torch.linspace(0, 0.4, 8),
                     shear=torch.linspace(30, 0, 8))
    draws = affine_draws(x, seed=17, **strengths)
    got = affine(x, interpolation=interpolation, seed=17, **strengths)
    expected = _torchvision(x, draws, interpolation)
    assert got.dtype == dtype
    if dtype == torch.float32 or interpolation == "nearest":
        # The same matrix, grid and grid_sample: the same bits (measured over 775k pixels of random
        # strengths and sizes, float32 and float64).
        assert torch.equal(got, expected)
    else:
        # float64 bilinear: torch's and Python's float64 cos / sin, and torchvision's bmm for the grid,
        # may differ in the last bit of a position, times the image's slope (values in [0, 1]).
        torch.testing.assert_close(got, expected, rtol=0, atol=64 * torch.finfo(dtype).eps)


def test_strength_zero_is_the_identity():
    x = _images(batch=3, height=5, width=6)
    assert torch.equal(affine(x, seed=1), x)
    # Bilinear resamples at the pixel centres up to the rounding of the grid (as torchvision does).
    got = affine(x, interpolation="bilinear", seed=1)
    identity = TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=MODE["bilinear"])
    assert torch.equal(got, identity)
    torch.testing.assert_close(got, x, rtol=0, atol=torch.finfo(torch.float32).eps)


def test_half_precision_is_the_float32_transform_rounded():
    x = _images(batch=4, dtype=torch.float16)
    for interpolation in ("nearest", "bilinear"):
        got = affine(x, interpolation=interpolation, seed=2, **STRENGTHS)
        expected = affine(x.float(), interpolation=interpolation, seed=2, **STRENGTHS).half()
        assert got.dtype == torch.float16 and torch.equal(got, expected)


def test_channels_last_gives_the_same_values_in_the_same_format():
    x = _images(batch=5, channels=4)
    expected = affine(x, seed=6, interpolation="bilinear", **STRENGTHS)
    got = affine(x.contiguous(memory_format=torch.channels_last), seed=6, interpolation="bilinear", **STRENGTHS)
    assert got.is_contiguous(memory_format=torch.channels_last) and torch.equal(got, expected)


def test_seed_none_draws_from_torch_generator():
    x = _images()
    torch.manual_seed(4)
    first, second = affine(x, 30.0, seed=None), affine(x, 30.0)
    torch.manual_seed(4)
    assert torch.equal(first, affine(x, 30.0)) and not torch.equal(first, second)


def test_images_get_the_gradient_strengths_none():
    x = _images(batch=3, height=5, width=6, dtype=torch.float64).requires_grad_()
    rotation = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64, requires_grad=True)
    fn = lambda t: affine(t, rotation, 0.1, 0.2, 5.0, interpolation="bilinear", seed=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    fn(x).sum().backward()
    assert rotation.grad is None and x.grad is not None


def test_nearest_gradient_sends_each_output_back_to_its_source_pixel():
    x = _images(batch=2, channels=1, height=6, width=6).requires_grad_()
    y = affine(x, 25.0, 0.1, seed=9)
    grad = torch.randn_like(y)
    y.backward(grad)
    # Each output is one input pixel (or 0 outside): the gradients sum to the gradient on the inside.
    inside = y.detach() != 0
    torch.testing.assert_close(x.grad.sum(), (grad * inside).sum(), rtol=0, atol=1e-5)


def test_opcheck():
    x = _images(batch=3, height=4, width=5)
    matrices = affine_draws(x, seed=1, **STRENGTHS).matrices
    for images in (x, x.contiguous(memory_format=torch.channels_last)):
        for mode in (0, 1):
            torch.library.opcheck(torch.ops.stn_kernels.affine, (images, matrices, mode))
            torch.library.opcheck(torch.ops.stn_kernels.affine_backward, (torch.randn(x.shape), images, matrices,
                                                                          mode))


def test_compiles_without_graph_breaks():
    x = _images(batch=4).requires_grad_()
    seed = torch.tensor(31)
    strength = torch.tensor([0.1, 0.2, 0.3, 0.4])

    def f(t):
        return affine(t * 0.9, strength * 90, strength, strength, strength * 10, interpolation="bilinear",
                      seed=seed).sum((1, 2, 3))

    assert_compiled_matches_eager(f, x)


IMG = torch.rand(3, 3, 4, 4)


@pytest.mark.parametrize("call, error, words", [
    (lambda: affine(torch.rand(3, 4, 4), 10.0), ValueError, ["images", "[B, C, H, W]", "(3, 4, 4)"]),
    (lambda: affine((IMG * 255).to(torch.int32), 10.0), TypeError, ["images", "uint8, float16", "torch.int32"]),
    (lambda: affine(IMG, -1.0), ValueError, ["rotation", "[0.0, 180.0]", "-1"]),
    (lambda: affine(IMG, translation=torch.tensor([0.1, 1.5, 0.0])), ValueError, ["translation", "[0.0, 1.0]",
                                                                                  "1.5"]),
    (lambda: affine(IMG, scale=1.0), ValueError, ["scale", "[0.0, 0.99]", "1.0"]),
    (lambda: affine(IMG, shear=torch.ones(2)), ValueError, ["shear", "[3]", "(2,)"]),
    (lambda: affine(IMG, 10.0, interpolation="bicubic"), ValueError, ["interpolation", "nearest", "bicubic"]),
    (lambda: affine(IMG, "10"), TypeError, ["rotation", "str"]),
    (lambda: affine(IMG, 10.0, seed=-1), ValueError, ["seed", "-1"]),
])
def test_bad_input_is_rejected_with_a_message_naming_the_argument(call, error, words):
    assert_rejected(call, error, words)


def test_public_names():
    assert {"affine", "affine_draws"} <= set(stn_kernels.__all__)


def test_uint8_images_move_exactly_as_the_float_ones():
    torch.manual_seed(5)
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8)
    for interpolation in ("nearest", "bilinear"):
        out = affine(images, 30.0, 0.2, 0.1, 10.0, interpolation=interpolation, seed=2)
        as_float = affine(images.float() / 255.0, 30.0, 0.2, 0.1, 10.0, interpolation=interpolation, seed=2)
        assert out.dtype == torch.uint8
        assert torch.equal(out, (as_float * 255.0).round().clamp(0, 255).to(torch.uint8)), interpolation
    # Nearest neighbour only moves pixels: every output value is an input value of its image, or the fill 0.
    out = affine(images, 30.0, 0.2, 0.1, 10.0, seed=2)
    for b in range(4):
        assert set(out[b].unique().tolist()) <= set(images[b].unique().tolist()) | {0}
