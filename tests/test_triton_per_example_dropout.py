"""The fused Triton kernel of per-example dropout (stn_kernels.backends.triton.per_example_dropout) on the
"triton" backend against the reference backend: the same mask bit for bit from the same (seed, offset), in
every dtype, through backward and for non-contiguous input. On the CPU through the Triton interpreter."""

import pytest
import torch

from stn_kernels.stn import per_example_dropout

from _naive import on_both_backends

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # Triton tests run on the GPU, else on the CPU under the interpreter
INTERPRETING = not HAS_CUDA


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("per_channel", [False, True])
def test_triton_kernel_matches_reference_bit_for_bit(dtype, per_channel):
    # 3·5·7·11 = 1155 elements: more than one 1024-element block, not a multiple of it; the offset makes
    # the counters cross 2**32, so the high counter word is exercised on both sides.
    x = torch.randn(3, 5, 7, 11, device=DEVICE).to(dtype)
    rates = torch.tensor([0.0, 0.35, 0.8], device=DEVICE)
    kwargs = dict(seed=2**40 + 17, offset=2**32 - 600, per_channel=per_channel)
    expected, got = on_both_backends(lambda: per_example_dropout(x, rates, **kwargs))
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))  # bitwise, signed zeros included


@pytest.mark.triton
def test_triton_backward_and_noncontiguous_input_match_reference():
    base = torch.randn(6, 4, 5, device=DEVICE)
    rates = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.7, 0.9], device=DEVICE)

    def run():
        x = base.transpose(1, 2).detach().requires_grad_()  # non-contiguous
        y = per_example_dropout(x, rates, seed=5, offset=3)
        (grad,) = torch.autograd.grad(y, x, torch.ones_like(y) * 0.5)
        return y, grad

    (y_ref, g_ref), (y_tri, g_tri) = on_both_backends(run)
    assert torch.equal(y_tri, y_ref)
    assert torch.equal(g_tri, g_ref)


@pytest.mark.triton
def test_triton_bfloat16_keeps_the_same_mask():
    x = torch.randn(2, 300, device=DEVICE).to(torch.bfloat16)
    rates = torch.tensor([0.25, 0.6], device=DEVICE)
    expected, got = on_both_backends(lambda: per_example_dropout(x, rates, seed=1))
    assert torch.equal(got == 0, expected == 0)
    if INTERPRETING:
        # The interpreter truncates float32 → bfloat16 instead of rounding: at most one bfloat16 ulp apart.
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=0)
    else:
        assert torch.equal(got, expected)


@pytest.mark.triton
def test_triton_float64_scale_is_formed_in_float64():
    x = torch.ones(2, 3000, dtype=torch.float64, device=DEVICE)
    rates = torch.tensor([0.9, 0.7], dtype=torch.float64, device=DEVICE)
    expected, got = on_both_backends(lambda: per_example_dropout(x, rates, seed=9))
    assert torch.equal(got, expected)
    for b, p in enumerate((0.9, 0.7)):
        kept = got[b][got[b] != 0]
        assert kept.numel() > 100 and torch.equal(kept, torch.full_like(kept, 1.0 / (1.0 - p)))
