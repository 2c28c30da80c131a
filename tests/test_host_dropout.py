"""Per-example dropout's one-pass CPU kernel (csrc/host/dropout.cpp, ``stn_kernels._host``): the same bits as the
reference (stn_kernels/reference_dropout.py, the counter-based hash in torch ops) for every floating dtype, shape,
unit size (elements, whole channels), seed and counter offset (a run of counters crossing 2³², offsets past 2³²),
and rates at the edges (0, 1, exact multiples of 2⁻²⁴ where u ≥ p is decided by equality); used by
``per_example_dropout`` on CPU tensors, forward and backward, unless ``STN_KERNELS_HOST=0``."""

import pytest
import torch

import stn_kernels
from stn_kernels import reference_dropout
from stn_kernels.backends import host

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


pytestmark = pytest.mark.usefixtures("host_built")


def _bits(t):
    return t.contiguous().view(-1).view(_BITS[t.element_size()])


def _same_bits(a, b) -> bool:
    """The same bits, NaN for NaN (a NaN's payload after a conversion to a 16-bit type is the converter's)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(_bits(a)[~nan.view(-1)], _bits(b)[~nan.view(-1)])


def _kernel_args(x, rates):
    rates = rates.to(torch.float32).contiguous()
    scales = 1.0 / (1.0 - rates.to(reference_dropout.compute_dtype(x.dtype)))
    return rates, scales


SEEDS = [(123456789012, 0), (-5, 2 ** 32 - 37), (7, 2 ** 40 + 3), (0, 0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, unit_size", [((9, 130), 1), ((3, 17), 1), ((5, 4, 3, 2), 6), ((4, 6, 5), 5),
                                              ((2, 1), 1), ((6, 3, 1, 1), 1)])
@pytest.mark.parametrize("seed, offset", SEEDS)
def test_kernel_equals_the_reference_bit_for_bit(dtype, shape, unit_size, seed, offset):
    gen = torch.Generator().manual_seed(abs(seed) % 1000 + offset % 1000)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    x.view(-1)[0] = float("nan")  # a dropped NaN is 0 in the reference (where), kept it stays NaN
    rates = torch.rand(shape[0], generator=gen) * 0.9
    rates[0] = 0.0
    if shape[0] > 2:
        rates[1] = 1.0  # scale inf: every element dropped, to 0
        rates[2] = 5 * 2.0 ** -24  # u = m·2⁻²⁴ ≥ p decided by equality at m = 5
    rates, scales = _kernel_args(x, rates)
    seed_offset = torch.tensor([seed, offset])
    expected = reference_dropout.per_example_dropout_forward(x, rates, scales, seed_offset, unit_size)
    found = host.HOST.module().per_example_dropout_forward(x, rates, scales, seed_offset, unit_size)
    assert found.dtype == x.dtype and found.shape == x.shape and found.is_contiguous()
    assert _same_bits(found, expected)


def test_kernel_runs_of_counters_across_2_32_in_one_example():
    """Counters of one example from 2³² − 100 on: the high word changes inside the run."""
    x = torch.randn(2, 5000)
    rates, scales = _kernel_args(x, torch.tensor([0.3, 0.6]))
    seed_offset = torch.tensor([99, 2 ** 32 - 100])
    expected = reference_dropout.per_example_dropout_forward(x, rates, scales, seed_offset, 1)
    assert torch.equal(host.HOST.module().per_example_dropout_forward(x, rates, scales, seed_offset, 1), expected)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_public_function_uses_it_with_the_same_outputs_and_gradients(per_channel, dtype, monkeypatch):
    import stn_kernels.ops.per_example_dropout as op_module

    used = []
    real = op_module.dropout_ops

    def spy(x):
        found = real(x)
        used.append(found is not None)
        return found

    monkeypatch.setattr(op_module, "dropout_ops", spy)
    x = torch.randn(4, 6, 5, 3, dtype=dtype).transpose(2, 3).requires_grad_()  # non-contiguous input
    g = torch.randn(4, 6, 3, 5, dtype=dtype)
    rates = torch.tensor([0.0, 0.25, 0.5, 0.9])

    def run(on):
        monkeypatch.setenv("STN_KERNELS_HOST", "1" if on else "0")
        y = stn_kernels.per_example_dropout(x, rates, seed=1234, offset=7, per_channel=per_channel)
        return y, torch.autograd.grad(y, x, g)[0]

    y_host, dx_host = run(True)
    assert used == [True, True]  # the forward and the backward (the same op on the gradient)
    y_ref, dx_ref = run(False)
    assert used == [True, True, False, False]
    assert _same_bits(y_host, y_ref) and _same_bits(dx_host, dx_ref)
    assert (y_host == 0).any() and (y_host != 0).any()


def test_switched_off_and_cuda_tensors_take_the_reference(monkeypatch):
    monkeypatch.setenv("STN_KERNELS_HOST", "0")
    assert host.dropout_ops(torch.zeros(2, 3)) is None
    monkeypatch.setenv("STN_KERNELS_HOST", "1")
    assert host.dropout_ops(torch.zeros(2, 3)) is host.HOST.module()
    assert host.dropout_ops(torch.zeros(2, 3, device="meta")) is None
