"""The CUDA kernels of csrc/hyper_linear_kernels.cuh, compiled with g++ for a CPU emulation of the CUDA
execution model (csrc/emulate/; the ``emu`` fixture of conftest.py) and checked against float64 and
torch's own half/bfloat16 rounding: every dtype, odd and aligned sizes, strided operands, NaN-filled
outputs, both reduction variants (deterministic slots and atomics)."""

import pytest
import torch

from _cuda import d as _d, nan as _nan
from _naive import close_to_ref64 as close

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_emulated_conversions_match_torch(emu, dtype):
    """The emulation's half / bfloat16 conversions round like torch (and the GPU): bit for bit."""
    emu.set_sms(4)
    gen = torch.Generator().manual_seed(7)
    M, N = 16, 256
    scale = torch.logspace(-9, 5.2, N)  # subnormal halves up to overflow (65520 and beyond)
    g = (torch.randn(M, N, generator=gen) * scale).to(dtype)
    g[0, :4] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    v = torch.randn(N, 1, generator=gen) * 3
    lam = torch.ones(M, 1)
    gs = _nan(M, N, dtype=dtype)
    assert emu.reduce(g, None, lam, v, None, None, gs, None, None, None, None, None, True) == 0
    want = (g.float() * v.t()).to(dtype)  # one float32 product, rounded once: as the kernel
    assert torch.equal(gs.view(torch.int16), want.view(torch.int16))
    # Through the epilogue with s = 0 and no biases, acc comes back unchanged (but -0 + 0 = +0).
    out = _nan(M, N, dtype=dtype)
    assert emu.epilogue(g, torch.zeros(M, N, dtype=dtype), out, lam, torch.zeros(N, 1)) == 0
    assert torch.equal(out.view(torch.int16), (g.float() + 0.0).to(dtype).view(torch.int16))


EPILOGUE_CASES = [
    # M, N, H, dtype, lam dtype, sms    (aligned: N a multiple of 16 bytes of dtype)
    pytest.param(1, 53, 1, F32, F32, 4, id="M1-N53-H1-f32-unaligned"),
    pytest.param(33, 64, 4, F32, F32, 4, id="M33-N64-H4-f32-aligned"),
    pytest.param(37, 96, 16, F16, F32, 4, id="M37-N96-H16-f16-lamf32-aligned"),
    pytest.param(37, 100, 7, F16, F16, 4, id="M37-N100-H7-f16-unaligned"),
    pytest.param(70, 256, 20, BF16, BF16, 4, id="M70-N256-H20-bf16-aligned-2chunks"),
    pytest.param(70, 250, 33, BF16, F32, 4, id="M70-N250-H33-bf16-unaligned-3chunks"),
    pytest.param(200, 136, 3, F32, F32, 1, id="M200-N136-H3-f32-tiles-per-block"),
    pytest.param(150, 72, 24, F32, F32, 1, id="M150-N72-H24-f32-2chunks-tiles-per-block"),
]


@pytest.mark.parametrize("with_acc", [True, False])
@pytest.mark.parametrize("M,N,H,dtype,ldt,sms", EPILOGUE_CASES)
def test_emulated_epilogue(emu, M, N, H, dtype, ldt, sms, with_acc):
    emu.set_sms(sms)
    gen = torch.Generator().manual_seed(M * N + H)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    acc, z, lam, V, C, be, bh = rnd(M, N), rnd(M, N), rnd(M, H, dt=ldt), rnd(N, H, dt=ldt), rnd(N, H, dt=ldt), \
        rnd(N), rnd(N)
    for biases in ((be, bh, C), (None, None, None), (None, bh, C), (be, None, None)):
        b, hb, c = biases
        out = _nan(M, N, dtype=dtype)
        assert emu.epilogue(acc if with_acc else None, z, out, lam, V, c, b, hb) == 0
        want = (_d(lam) @ _d(V).t()) * _d(z)
        if with_acc:
            want = want + _d(acc)
        if b is not None:
            want = want + _d(b)
        if hb is not None:
            want = want + (_d(lam) @ _d(c).t()) * _d(hb)
        close(out, want, dtype if dtype != F32 else F32, "out")


def test_emulated_epilogue_strided(emu):
    """Row strides other than N (views of wider buffers), and hparams shared by the batch (row stride 0)."""
    emu.set_sms(4)
    M, N, H = 21, 64, 5
    gen = torch.Generator().manual_seed(3)
    wide = torch.randn(M, N + 8, generator=gen)
    acc, z = wide[:, 4:4 + N], torch.randn(M, N + 16, generator=gen)[:, :N]
    lam = torch.randn(H, generator=gen).expand(M, H)
    V, C = torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)
    be, bh = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    out_buf = _nan(M, N + 4, dtype=F32)
    out = out_buf[:, :N]
    assert lam.stride(0) == 0 and acc.stride(0) == N + 8
    assert emu.epilogue(acc, z, out, lam, V, C, be, bh) == 0
    want = _d(acc) + (_d(lam) @ _d(V).t()) * _d(z) + _d(be) + (_d(lam) @ _d(C).t()) * _d(bh)
    close(out, want, F32, "out")
    assert torch.isnan(out_buf[:, N:]).all(), "wrote outside the view"


REDUCE_CASES = [
    # M, N, H, dtype, lam dtype, sms
    pytest.param(1, 53, 1, F32, F32, 4, id="M1-N53-H1-f32"),
    pytest.param(33, 53, 7, F32, F32, 4, id="M33-N53-H7-f32"),
    pytest.param(70, 300, 15, F16, F32, 1, id="M70-N300-H15-f16-lamf32"),
    pytest.param(70, 256, 20, BF16, BF16, 4, id="M70-N256-H20-bf16-2chunks"),
    pytest.param(200, 136, 3, F32, F32, 64, id="M200-N136-H3-f32-7row-chunks"),
    pytest.param(45, 130, 40, F16, F16, 2, id="M45-N130-H40-f16-3chunks"),
]


def _reduce_reference(g, z, lam, V, C, bh):
    G, Z, L, VV = _d(g), _d(z), _d(lam), _d(V)
    ref = {"gs": G * (L @ VV.t()), "dlam": (G * Z) @ VV, "dv": (G * Z).t() @ L, "dbe": G.sum(0)}
    if C is not None:
        CC, BH = _d(C), _d(bh)
        ref["dlam"] = ref["dlam"] + (G * BH) @ CC
        ref["dc"] = (G * BH).t() @ L
        ref["dbh"] = (G * (L @ CC.t())).sum(0)
    return ref


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("M,N,H,dtype,ldt,sms", REDUCE_CASES)
def test_emulated_reduce(emu, M, N, H, dtype, ldt, sms, deterministic):
    emu.set_sms(sms)
    gen = torch.Generator().manual_seed(M + N + H)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(dt)

    g, z, lam, V, C, bh = rnd(M, N), rnd(M, N), rnd(M, H, dt=ldt), rnd(N, H, dt=ldt), rnd(N, H, dt=ldt), rnd(N)
    ref = _reduce_reference(g, z, lam, V, C, bh)
    masks = [
        ("gs", "dlam", "dv", "dc", "dbe", "dbh"),
        ("gs",),
        ("dlam", "dv"),
        ("dc", "dbh", "dbe"),
        ("dlam",),
    ]
    for wanted in masks:
        outs = {"gs": _nan(M, N, dtype=dtype), "dlam": _nan(M, H, dtype=ldt), "dv": _nan(N, H, dtype=ldt),
                "dc": _nan(N, H, dtype=ldt), "dbe": _nan(N, dtype=dtype), "dbh": _nan(N, dtype=dtype)}
        outs = {k: (v if k in wanted else None) for k, v in outs.items()}
        needs_z = "dlam" in wanted or "dv" in wanted
        code = emu.reduce(g, z if needs_z else None, lam, V, C, bh, outs["gs"], outs["dlam"], outs["dv"],
                          outs["dc"], outs["dbe"], outs["dbh"], deterministic)
        assert code == 0
        for k in wanted:
            close(outs[k], ref[k], dtype, f"{k} (asked for {wanted})")


def test_emulated_reduce_without_hyper_bias_and_strided(emu):
    """No hyper bias (dλ from g⊙z only); g and z views with row strides > N; shared hparams."""
    emu.set_sms(3)
    M, N, H = 40, 72, 6
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(M, N + 5, generator=gen)[:, 2:2 + N]
    z = torch.randn(M, N + 9, generator=gen)[:, :N]
    lam = torch.randn(H, generator=gen).expand(M, H)
    V = torch.randn(N, H, generator=gen)
    ref = _reduce_reference(g, z, lam, V, None, None)
    gs, dlam, dv, dbe = _nan(M, N, dtype=F32), _nan(M, H, dtype=F32), _nan(N, H, dtype=F32), _nan(N, dtype=F32)
    assert emu.reduce(g, z, lam, V, None, None, gs, dlam, dv, None, dbe, None, True) == 0
    for name, got in (("gs", gs), ("dlam", dlam), ("dv", dv), ("dbe", dbe)):
        close(got, ref[name], F32, name)
    # dC / db_h without a hyper bias are refused.
    assert emu.reduce(g, z, lam, V, None, None, None, None, None, _nan(N, H, dtype=F32), None, None, True) != 0


def test_emulated_reduce_deterministic_repeats_bitwise(emu):
    emu.set_sms(8)
    gen = torch.Generator().manual_seed(11)
    M, N, H = 150, 200, 9
    g, z, lam, V, C, bh = (torch.randn(*s, generator=gen) for s in ((M, N), (M, N), (M, H), (N, H), (N, H), (N,)))
    runs = []
    for _ in range(2):
        outs = [_nan(M, N, dtype=F32), _nan(M, H, dtype=F32), _nan(N, H, dtype=F32), _nan(N, H, dtype=F32),
                _nan(N, dtype=F32), _nan(N, dtype=F32)]
        assert emu.reduce(g, z, lam, V, C, bh, *outs, True) == 0
        runs.append(outs)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
