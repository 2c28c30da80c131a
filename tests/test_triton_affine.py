"""The Triton kernel of the per-example affine transform (stn_kernels.backends.triton.affine) on the "triton"
backend against the reference backend: odd sizes, several blocks, dtypes, NaN-poisoned output buffers,
both memory formats, backward. On the CPU through the Triton interpreter (tiny shapes)."""

import pytest
import torch
from test_triton_augment import HAS_CUDA, _images  # the same images on the same device

from stn_kernels import affine, affine_draws

from _naive import on_both_backends

FULL = dict(rotation=35.0, translation=0.2, scale=0.3, shear=15.0)
# The kernel computes the reference's grid with the same operations; grid_sample's bilinear weights
# are formed in another order (and a GPU may contract to FMAs): a few ulps of the values.
ATOL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 1e-3}


@pytest.mark.triton
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_triton_matches_reference_at_odd_sizes(batch, dtype, interpolation, nan_poison):
    from stn_kernels.backends.triton import affine as kernels

    nan_poison(kernels)
    x = _images(batch, dtype)
    expected, got = on_both_backends(lambda: affine(x, interpolation=interpolation, seed=2**40 + 3, offset=7, **FULL))
    assert got.dtype == dtype and not got.isnan().any()
    if interpolation == "nearest" and not HAS_CUDA:
        assert torch.equal(got, expected)  # the same grid bits in the interpreter: the same pixels
    else:
        torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=ATOL[dtype])


@pytest.mark.triton
def test_triton_channels_last_more_than_one_block_and_backward():
    x = _images(2, torch.float32, channels=2, height=17, width=19)  # 323 pixels: two 256-pixel blocks
    channels_last = x.contiguous(memory_format=torch.channels_last)

    def run():
        leaf = channels_last.detach().requires_grad_()
        y = affine(leaf, interpolation="bilinear", seed=9, **FULL)
        (grad,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
        return y, grad

    (y_ref, g_ref), (y_tri, g_tri) = on_both_backends(run)
    assert y_tri.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_tri, y_ref, rtol=0, atol=ATOL[torch.float32])
    assert torch.equal(g_tri, g_ref)  # the backward is the reference's autograd on both backends
    draws = on_both_backends(lambda: affine_draws(x, seed=9, **FULL))
    for expected, got in zip(*draws):
        assert torch.equal(got, expected)


@pytest.mark.triton
def test_triton_nearest_rounds_ties_to_even_as_grid_sample():
    # A shift by half a pixel, and inverse scale 2 with a one-pixel shift on even sizes: sampling positions
    # exactly halfway between pixels (j + 0.5, 2j − 1.5), half of them rounding down to the even neighbour.
    x = _images(2, torch.float32, channels=1, height=8, width=6)
    matrices = torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0, 0.5], [2.0, 0.0, 1.0, 0.0, 2.0, 1.0]], dtype=torch.float64,
                            device=x.device)
    expected, got = on_both_backends(lambda: torch.ops.stn_kernels.affine(x, matrices, 0))
    assert torch.equal(got, expected)
