"""pytest-benchmark microbenchmarks of hyper_linear on the CPU (float32, the STN shapes).

Every provider comes from the benchmark's linear layer, :mod:`stn_kernels.bench.linear`,
run by its harness (no second implementation here). Timed with

    .venv/bin/python -m pytest benchmarks --benchmark-enable -q

(``make bench``); under plain pytest (``--benchmark-disable`` in pyproject's
addopts) each runs once, as a smoke test. No timed assertions.
"""

import pytest
import torch

from stn_kernels.bench import harness, linear

SHAPES = [s.name for s in linear.STN_SHAPES]
PROVIDERS = ["published", "stn:reference"]
MODES = ["fwd", "fwd+bwd"]


@pytest.fixture(scope="module")
def cases():
    made = {}

    def get(shape):
        if shape not in made:
            made[shape] = linear.make_case(shape, torch.float32, "cpu")
        return made[shape]

    yield get
    made.clear()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_hyper_linear_cpu(benchmark, cases, shape, provider, mode):
    case = cases(shape)
    fn = harness.provider_fn(provider, case, mode)
    s = case.shape
    benchmark.group = f"hyper_linear {shape} (B={s.B}, H={s.H}, K={s.K}, N={s.N}) float32 {mode}"
    benchmark.extra_info.update(provider=provider, mode=mode, B=s.B, H=s.H, K=s.K, N=s.N, dtype="float32")
    result = benchmark(fn)
    # One sanity check of what was timed (not of its speed).
    if mode == "fwd":
        assert result.shape == (s.B, s.N)
    else:
        assert len(result) == (7 if provider == "published" else 8)
        assert all(g is not None and torch.isfinite(g).all() for g in result)
