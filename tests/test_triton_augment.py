"""The Triton kernel of per-example augmentation (stn_kernels.backends.triton.augment) on the "triton" backend
against the reference backend: odd sizes, every dtype, NaN-poisoned output buffers, both memory formats,
images larger than one block, backward. On the CPU through the Triton interpreter (tiny shapes)."""

import pytest
import torch

import stn_kernels
from stn_kernels import augment_draws, augment_images
from stn_kernels.reference_augment import hole_mask

from _naive import on_both_backends

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETING = not HAS_CUDA
FULL = dict(brightness=0.6, contrast=0.6, saturation=0.6, hue=0.3, holes=2, length=4, scale=0.3)
# Image math in float32 (float64 for float64): the only differences from the reference are the order of
# the grayscale-mean sum and, in half precision, intermediate stages stored in the image dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 4e-3}



def _images(batch, dtype, channels=3, height=7, width=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, height, width, generator=g).to(device=DEVICE, dtype=dtype)


@pytest.mark.triton
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_triton_matches_reference_at_odd_sizes(batch, dtype, nan_poison):
    from stn_kernels.backends.triton import augment as kernels

    nan_poison(kernels)
    x = _images(batch, dtype)
    expected, got = on_both_backends(lambda: augment_images(x, seed=2**40 + 3, offset=7, **FULL))
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=ATOL[dtype])
    holes = hole_mask(augment_draws(x, seed=2**40 + 3, offset=7, **FULL).boxes, 7, 9).expand_as(got)
    assert holes.any() and (got[holes] == 0).all() and (expected[holes] == 0).all()  # the same holes


@pytest.mark.triton
def test_triton_each_stage_alone_and_no_stage(nan_poison):
    from stn_kernels.backends.triton import augment as kernels

    nan_poison(kernels)
    x = _images(3, torch.float32)
    for kwargs in (dict(brightness=0.5), dict(contrast=0.5), dict(saturation=0.5), dict(hue=0.4), dict(scale=0.5),
                   dict(holes=3, length=3), {}):
        expected, got = on_both_backends(lambda: augment_images(x, seed=5, **kwargs))
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL[torch.float32], msg=str(kwargs))


@pytest.mark.triton
def test_triton_channels_last_more_than_one_block_and_other_channel_counts():
    x = _images(2, torch.float32, height=33, width=35)  # 1155 pixels: more than one 1024-pixel block
    channels_last = x.contiguous(memory_format=torch.channels_last)
    expected, got = on_both_backends(lambda: augment_images(channels_last, seed=9, **FULL))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL[torch.float32])
    with stn_kernels.use_backend("triton"):
        assert torch.equal(augment_images(x, seed=9, **FULL), got)
    grey = _images(2, torch.float32, channels=1)  # cutout and scale need no RGB
    expected, got = on_both_backends(lambda: augment_images(grey, holes=1, length=3, scale=0.5, seed=1))
    assert torch.equal(got, expected)


@pytest.mark.triton
def test_triton_draws_and_backward_are_the_references():
    x = _images(4, torch.float32)
    draws = on_both_backends(lambda: augment_draws(x, seed=12, **FULL))
    for expected, got in zip(*draws):
        assert torch.equal(got, expected)

    def run():
        leaf = x.detach().requires_grad_()
        y = augment_images(leaf, seed=12, **FULL)
        (grad,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
        return y, grad

    (y_ref, g_ref), (y_tri, g_tri) = on_both_backends(run)
    torch.testing.assert_close(y_tri, y_ref, rtol=0, atol=ATOL[torch.float32])
    assert torch.equal(g_tri, g_ref)  # the backward is the reference's autograd on both backends


@pytest.mark.triton
def test_triton_bfloat16_within_one_ulp_of_bfloat16():
    x = _images(2, torch.bfloat16)
    expected, got = on_both_backends(lambda: augment_images(x, seed=3, **FULL))
    # Intermediate stages rounded to bfloat16 (and truncated, in the interpreter): a few bfloat16 ulps.
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=4 * 2.0**-8)


@pytest.mark.triton
def test_triton_single_channel_brightness_and_contrast_are_the_references():
    grey = _images(3, torch.float32, channels=1)
    kwargs = dict(brightness=0.5, contrast=0.5, holes=1, length=3, seed=4)
    expected, got = on_both_backends(lambda: augment_images(grey, **kwargs))
    assert torch.equal(got, expected)
