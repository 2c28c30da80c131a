"""Per-example dropout (stn_kernels.per_example_dropout, op stn_kernels::per_example_dropout): the
counter-based hash against an independent Python formulation, mask statistics, gradients, the op
registration, argument checks. The fused Triton kernel: tests/test_triton_per_example_dropout.py."""

import math
import subprocess
import sys

import pytest
import torch

from stn_kernels import reference_dropout
from stn_kernels.stn import per_example_channel_dropout, per_example_dropout

from _naive import assert_compiled_matches_eager, assert_rejected

# --------------------------------------------------------------------------- an independent formulation of the hash

M32 = 0xFFFFFFFF


def _mix_py(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _uniform_py(seed, counter):
    """The documented hash, with Python's unbounded ints (no 16-bit splitting, no tensors)."""
    k0 = _mix_py((seed & M32) ^ 0x9E3779B9)
    k1 = _mix_py(((seed >> 32) & M32) ^ 0x85EBCA6B)
    k2 = _mix_py(k0 ^ k1 ^ 0xC2B2AE35)
    h = _mix_py((counter & M32) ^ k0)
    h = _mix_py(h ^ ((counter >> 32) & M32) ^ k1)
    h = _mix_py(h ^ k2)
    return (h >> 8) / 2.0**24


SEEDS = [0, 1, 12345, 2**32 + 7, 2**63 - 1]
COUNTERS = [0, 1, 2, 1000, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 3, 2**62]


@pytest.mark.parametrize("seed", SEEDS)
def test_hash_matches_a_python_integer_formulation(seed):
    counters = torch.tensor(COUNTERS, dtype=torch.int64)
    expected = torch.tensor([_uniform_py(seed, c) for c in COUNTERS], dtype=torch.float32)
    # Python-int keys (seed on the host) and tensor keys (seed on a device) are two code paths.
    assert torch.equal(reference_dropout.hash_uniform(seed, counters), expected)
    assert torch.equal(reference_dropout.hash_uniform(torch.tensor(seed), counters), expected)


def test_hash_is_uniform_on_0_1():
    u = reference_dropout.hash_uniform(99, torch.arange(2**16, dtype=torch.int64)).double()
    n = u.numel()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    bins = 64
    counts = torch.bincount((u * bins).long(), minlength=bins).double()
    chi2 = ((counts - n / bins) ** 2 / (n / bins)).sum().item()
    # chi² with 63 degrees of freedom: mean 63, sd √126 ≈ 11.2; 6 sd above the mean essentially never happens.
    assert chi2 < 63 + 6 * math.sqrt(126), chi2


def _correlation(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).sum().item() / math.sqrt((a * a).sum().item() * (b * b).sum().item())


def test_neighbouring_counters_and_seeds_are_uncorrelated():
    n = 2**15
    counters = torch.arange(n + 1, dtype=torch.int64)
    u = reference_dropout.hash_uniform(7, counters)
    bound = 5 / math.sqrt(n)  # 5 standard errors of a correlation under independence
    assert abs(_correlation(u[:-1], u[1:])) < bound
    for other_seed in (8, 7 + 2**32, 7 ^ 1 << 40):
        assert abs(_correlation(u, reference_dropout.hash_uniform(other_seed, counters))) < bound
    # Keep decisions at p = 0.5 of adjacent units agree about half of the time.
    keep = u >= 0.5
    agree = (keep[:-1] == keep[1:]).double().mean().item()
    assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / n)


# --------------------------------------------------------------------------- reference statistics


def test_drop_fraction_per_example_matches_its_rate_and_kept_values_are_scaled():
    rates = torch.tensor([0.0, 0.1, 0.5, 0.9])
    n = 40000
    x = torch.rand(4, n) + 0.5
    y = per_example_dropout(x, rates, seed=3)
    for b, p in enumerate(rates.tolist()):
        dropped = (y[b] == 0).double().mean().item()
        assert abs(dropped - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (b, p, dropped)
        kept = y[b] != 0
        torch.testing.assert_close(y[b][kept], x[b][kept] * torch.tensor(1.0 / (1.0 - p)), rtol=2**-23, atol=0)
    assert torch.equal(y[0], x[0])  # rate 0 keeps everything, scale exactly 1


def test_output_is_unbiased():
    n = 200000
    x = torch.randn(2, n) + 1.0
    y = per_example_dropout(x, torch.tensor([0.3, 0.7]), seed=11)
    for b, p in enumerate((0.3, 0.7)):
        # Var(y) = E[x²]/(1-p) - E[x]² for inverted dropout of x.
        var = (x[b].double() ** 2).mean().item() / (1 - p) - x[b].double().mean().item() ** 2
        assert abs(y[b].double().mean().item() - x[b].double().mean().item()) < 5 * math.sqrt(var / n)


def test_channel_dropout_drops_whole_feature_maps_at_the_rate():
    batch, channels = 3, 6000
    x = torch.rand(batch, channels, 2, 3) + 0.5
    rates = torch.tensor([0.2, 0.5, 0.8])
    y = per_example_channel_dropout(x, rates, seed=5)
    zero = (y == 0).flatten(2)
    assert torch.equal(zero.all(-1), zero.any(-1))  # a channel is dropped entirely or not at all
    for b, p in enumerate(rates.tolist()):
        dropped = zero.all(-1)[b].double().mean().item()
        assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / channels)


def test_mask_is_a_pure_function_of_seed_and_offset():
    x = torch.rand(1, 5000) + 0.5
    rate = torch.tensor([0.5])
    a = per_example_dropout(x, rate, seed=21, offset=0)
    assert torch.equal(a, per_example_dropout(x, rate, seed=21, offset=0))
    assert not torch.equal(a, per_example_dropout(x, rate, seed=22, offset=0))
    # Counter-based: the mask at offset k is the mask at offset 0 shifted by k units.
    shifted = per_example_dropout(x, rate, seed=21, offset=100)
    assert torch.equal(shifted[0, :-100] == 0, a[0, 100:] == 0)


def test_default_seed_comes_from_torch_generator():
    x = torch.rand(2, 300) + 0.5
    torch.manual_seed(4)
    first, second = per_example_dropout(x, 0.5), per_example_dropout(x, 0.5)
    torch.manual_seed(4)
    assert torch.equal(first, per_example_dropout(x, 0.5))
    assert not torch.equal(first, second)
    generator = torch.Generator().manual_seed(9)
    from_generator = per_example_dropout(x, 0.5, generator=generator)
    assert torch.equal(from_generator, per_example_dropout(x, 0.5, generator=torch.Generator().manual_seed(9)))


def test_not_training_returns_input_unchanged():
    x = torch.randn(3, 4)
    assert per_example_dropout(x, torch.full((3,), 0.5), training=False) is x


# --------------------------------------------------------------------------- gradients


def test_backward_regenerates_the_mask_and_rates_get_no_gradient():
    x = (torch.rand(4, 50) + 0.5).requires_grad_()
    rates = torch.tensor([0.1, 0.3, 0.6, 0.85], requires_grad=True)
    y = per_example_dropout(x, rates, seed=77)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    kept = (y != 0).float()
    expected = grad_out * kept / (1 - rates.detach()).unsqueeze(1)
    torch.testing.assert_close(x.grad, expected, rtol=2**-22, atol=0)
    assert rates.grad is None


@pytest.mark.parametrize("rate", [0.9, torch.tensor(0.9, dtype=torch.float64),
                                  torch.tensor([0.9, 0.9, 0.9], dtype=torch.float64)])
def test_float64_scale_is_formed_in_float64(rate):
    """1/(1 − p) in x's precision: at p = 0.9 kept values of a float64 x of ones are 10.0 exactly (float32 rates
    would give 9.9999976), forward and backward, given as a float, a 0-d or a [B] float64 tensor."""
    x = torch.ones(3, 4000, dtype=torch.float64, requires_grad=True)
    y = per_example_dropout(x, rate, seed=4)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    for t in (y, grad):
        kept = t[t != 0]
        assert kept.numel() > 100
        assert torch.equal(kept, torch.full_like(kept, 1.0 / (1.0 - 0.9))), kept.unique()
        assert 1.0 / (1.0 - 0.9) == 10.000000000000002  # the float64 value of the scale


def test_gradcheck_and_gradgradcheck_in_float64():
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    rates = torch.tensor([0.2, 0.5, 0.0], dtype=torch.float64)
    for per_channel in (False, True):
        fn = lambda t: per_example_dropout(t, rates, seed=8, per_channel=per_channel)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


# --------------------------------------------------------------------------- the op registration


def test_opcheck():
    x = torch.randn(4, 3, 5)
    rates = torch.tensor([0.1, 0.2, 0.5, 0.0])
    seed_offset = torch.tensor([123, 4], dtype=torch.int64)
    for unit_size in (1, 5):
        torch.library.opcheck(torch.ops.stn_kernels.per_example_dropout, (x, rates, seed_offset, unit_size))


def test_compiles_without_graph_breaks():
    x = torch.randn(4, 8, requires_grad=True)
    rates = torch.tensor([0.1, 0.2, 0.5, 0.0])
    seed = torch.tensor(31)

    def f(t):
        return per_example_dropout(torch.relu(t), rates, seed=seed).sum(1)

    assert_compiled_matches_eager(f, x)


# --------------------------------------------------------------------------- input checks


ONES = torch.ones(3, 2)


@pytest.mark.parametrize("call, error, words", [
    (lambda: per_example_dropout(torch.ones(3, 2, dtype=torch.int64), 0.5), TypeError, ["x", "floating", "int64"]),
    (lambda: per_example_dropout([1.0], 0.5), TypeError, ["x", "torch.Tensor", "list"]),
    (lambda: per_example_dropout(ONES, torch.ones(2) * 0.5), ValueError, ["rates", "[3]", "(2,)"]),
    (lambda: per_example_dropout(ONES, torch.tensor([0.1, 1.0, 0.2])), ValueError, ["rates", "[0, 1)", "1.0"]),
    (lambda: per_example_dropout(ONES, -0.1), ValueError, ["rates", "[0, 1)", "-0.1"]),
    (lambda: per_example_dropout(ONES, torch.tensor([1, 0, 0])), TypeError, ["rates", "floating"]),
    (lambda: per_example_dropout(ONES, "0.5"), TypeError, ["rates", "str"]),
    (lambda: per_example_dropout(ONES, 0.5, seed=-1), ValueError, ["seed", "-1"]),
    (lambda: per_example_dropout(ONES, 0.5, seed=torch.tensor(1.5)), TypeError, ["seed", "int64", "float32"]),
    (lambda: per_example_dropout(ONES, 0.5, offset=-2), ValueError, ["offset", "-2"]),
    (lambda: per_example_dropout(ONES, 0.5, seed=1, generator=torch.Generator()), ValueError, ["generator"]),
    (lambda: per_example_channel_dropout(torch.ones(3), 0.5), ValueError, ["x", "[B, C, ...]", "(3,)"]),
])
def test_bad_input_is_rejected_with_a_message_naming_the_argument(call, error, words):
    assert_rejected(call, error, words)


def test_import_does_not_load_triton():
    code = "import sys, stn_kernels, stn_kernels.stn; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_forward_mode_ad_gives_the_masked_tangent():
    """torch.func.jvp and forward_ad through the dropout: the tangent is dropped with the same mask."""
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(4, 6, dtype=torch.float64)
    rates = torch.full((4,), 0.5)
    tangent = torch.randn_like(x)
    apply = lambda t: per_example_dropout(t, rates, seed=3)  # noqa: E731
    expected = apply(tangent)  # linear in x: the JVP is the same dropout of the tangent
    assert expected.abs().sum() > 0
    _, jvp = torch.func.jvp(apply, (x,), (tangent,))
    torch.testing.assert_close(jvp, expected, rtol=0, atol=0)
    with fwAD.dual_level():
        out = apply(fwAD.make_dual(x, tangent))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, expected, rtol=0, atol=0)
