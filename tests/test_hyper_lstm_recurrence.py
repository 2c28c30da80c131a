"""HyperLSTM (stn_kernels.hyper_lstm_recurrence, hyper_lstm_layer, HyperLSTMCell, HyperLSTM): the op and
the layers against the published formulation, on the reference backend; DropConnect and the locked
dropout between layers; argument checks.

Ground truth is an unrolled loop written from the published HyperLSTMCell formulas (tests/_naive.py:
``naive_cell_sequence``, ``naive_lstm_stack``) in float64; it shares no code with stn_kernels. The
Triton kernels of the op: tests/test_triton_hyper_lstm_recurrence.py.
"""

import pytest
import torch

import stn_kernels
from stn_kernels import reference_lstm
from stn_kernels.functional import dropconnect_mask

from _naive import (
    OpCheckError,
    assert_close_rel,
    compare_lstm,
    lstm_linear_params,
    lstm_recurrence_args,
    lstm_recurrence_fn,
    lstm_stack_inputs,
    naive_cell_sequence,
    naive_lstm_stack,
    randomize_lstm_,
    run_lstm_stack,
    single_threaded,
)

D64, F32 = torch.float64, torch.float32


pytestmark = pytest.mark.usefixtures("seeded_no_tf32")


# ----------------------------------------------------------------------------- reference backend (CPU)

@pytest.mark.parametrize("hparams_kind", ["per_example", "shared", "none"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_stack_matches_published_loop(hparams_kind, batch_first):
    """2 layers, float64, reference backend: output, (h, c) and the gradients of everything."""
    T, B, K, N, H = 4, 3, 11, 5, 7
    model = randomize_lstm_(stn_kernels.HyperLSTM(K, N, 2, num_hparams=H, batch_first=batch_first, dtype=D64))
    x, hparams, hx, (g_out, g_h, g_c) = lstm_stack_inputs(T, B, K, N, H, 2, hparams_kind, batch_first, D64)
    got = run_lstm_stack(model, x, hparams, hx, g_out, g_h, g_c, "reference")
    want = naive_lstm_stack(model, x, hparams, hx, g_out, g_h, g_c, batch_first)
    compare_lstm(got, want, D64)


def test_cell_published_hidden_shape_and_default_state():
    """HyperLSTMCell: hidden [1, B, N] in and out (published shape), zeros when hidden is None."""
    T, B, K, N, H = 3, 2, 4, 3, 2
    cell = randomize_lstm_(stn_kernels.HyperLSTMCell(K, N, num_hparams=H, dtype=D64))
    x, lam = torch.randn(T, B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    out, (h, c) = cell(x, None, lam)
    assert out.shape == (T, B, N) and h.shape == (1, B, N) and c.shape == (1, B, N)
    zeros = torch.zeros(1, B, N, dtype=D64)
    out2, (h2, c2) = cell(x, (zeros, zeros), lam)
    assert torch.equal(out, out2) and torch.equal(h, h2) and torch.equal(c, c2)
    _, (h3, c3) = cell(x, (zeros[0], zeros[0]), lam)
    assert h3.shape == (B, N) and torch.equal(h3, h[0]) and torch.equal(c3, c[0])
    torch.testing.assert_close(h[0], out[-1], rtol=0, atol=0)
    g = [torch.randn(T, B, N, dtype=D64), torch.randn(1, B, N, dtype=D64), torch.randn(1, B, N, dtype=D64)]
    compare_lstm(run_lstm_stack(cell, x, lam, (zeros, zeros), *g, "reference"),
            naive_lstm_stack(cell, x, lam, (zeros, zeros), *g), D64)


def test_no_bias():
    T, B, K, N, H = 3, 2, 5, 3, 2
    model = randomize_lstm_(stn_kernels.HyperLSTM(K, N, 1, num_hparams=H, bias=False, dtype=D64))
    x, hparams, hx, g = lstm_stack_inputs(T, B, K, N, H, 1, "per_example", False, D64)
    compare_lstm(run_lstm_stack(model, x, hparams, hx, *g, "reference"), naive_lstm_stack(model, x, hparams, hx, *g),
                 D64)


def test_gate_order_is_forget_input_output_cell():
    """With W = 0 and h0 = 0 the pre-activations are the biases: only the documented order gives this c, h."""
    N = 2
    cell = stn_kernels.HyperLSTMCell(1, N, num_hparams=1, dtype=D64)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.i2h.bias.copy_(torch.tensor([1.0, 1, 2, 2, -1, -1, 0.5, 0.5], dtype=D64))  # f, i, o, g blocks
    c0 = torch.full((1, 1, N), 3.0, dtype=D64)
    out, (h, c) = cell(torch.zeros(1, 1, 1, dtype=D64), (torch.zeros(1, 1, N, dtype=D64), c0))
    f, i, o, g = torch.sigmoid(torch.tensor(1.0)), torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(
        torch.tensor(-1.0)), torch.tanh(torch.tensor(0.5))
    c_want = f * 3.0 + i * g
    torch.testing.assert_close(c, torch.full_like(c, c_want.item()))
    torch.testing.assert_close(h, torch.full_like(h, (o * torch.tanh(c_want)).item()))
    assert reference_lstm.GATES == ("forget", "input", "output", "cell")


@pytest.mark.parametrize("variant", ["full", "no_hparams"])
def test_gradcheck_recurrence(variant):
    """float64 gradcheck and gradgradcheck (double backward: the reference composite) of the op."""
    args = [None if a is None else a.requires_grad_(True) for a in lstm_recurrence_args(hparams=variant == "full")]
    with single_threaded(), stn_kernels.use_backend("reference"):
        assert torch.autograd.gradcheck(lstm_recurrence_fn, args)
        if variant == "full":
            assert torch.autograd.gradgradcheck(lstm_recurrence_fn, args)


def test_gradcheck_layer_shared_hparams():
    """The whole layer (i2h HyperLinear + recurrence) with λ [H] shared by the batch, batch_first."""
    T, B, K, N, H = 3, 2, 3, 2, 2
    cell = randomize_lstm_(stn_kernels.HyperLSTMCell(K, N, num_hparams=H, batch_first=True, dtype=D64))
    x = torch.randn(B, T, K, dtype=D64, requires_grad=True)
    lam = torch.randn(H, dtype=D64, requires_grad=True)
    params = list(cell.parameters())

    def fn(x, lam, *ps):
        tuples = [(ps[0], ps[1], ps[2], ps[3], ps[4][:4 * N], ps[4][4 * N:]),
                  (ps[5], ps[6], ps[7], ps[8], ps[9][:4 * N], ps[9][4 * N:])]
        out, (h, c) = stn_kernels.hyper_lstm_layer(x, lam, tuples[0], tuples[1], batch_first=True)
        return out, c

    with single_threaded():
        assert torch.autograd.gradcheck(fn, [x, lam] + params)


def test_forward_ad_and_jvp_agree_with_backward():
    """torch.func.jvp runs the composite; <v, J u> must equal <Jᵀ v, u> from the op's backward."""
    args = lstm_recurrence_args()
    tangents = [None if a is None else torch.randn_like(a) for a in args]
    idx = [i for i, a in enumerate(args) if a is not None]

    def fn(*present):
        full = list(args)
        for i, t in zip(idx, present):
            full[i] = t
        return lstm_recurrence_fn(*full)

    (out, c), (dout, dc) = torch.func.jvp(fn, tuple(args[i] for i in idx), tuple(tangents[i] for i in idx))
    v_out, v_c = torch.randn_like(out), torch.randn_like(c)
    leaves = [args[i].clone().requires_grad_(True) for i in idx]
    out2, c2 = fn(*leaves)
    torch.testing.assert_close(out2, out)
    grads = torch.autograd.grad((out2, c2), leaves, (v_out, v_c))
    lhs = (v_out * dout).sum() + (v_c * dc).sum()
    rhs = sum((g * tangents[i]).sum() for g, i in zip(grads, idx))
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_opcheck_reference():
    args = lstm_recurrence_args(dtype=F32)
    for i in (0, 2, 3, 4, 7, 9):
        args[i].requires_grad_(True)
    with stn_kernels.use_backend("reference"):
        try:
            torch.library.opcheck(torch.ops.stn_kernels.hyper_lstm_recurrence.default, args)
        except OpCheckError as exc:  # pragma: no cover
            pytest.fail(str(exc))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    T, B, K, N, H = 3, 2, 5, 4, 3
    model = randomize_lstm_(stn_kernels.HyperLSTM(K, N, 1, num_hparams=H))
    x, lam = torch.randn(T, B, K), torch.randn(B, H, requires_grad=True)
    out, (h, c) = model(x, None, lam)
    ref = torch.autograd.grad(out.square().sum() + c.sum(), [lam] + list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out_c, (h_c, c_c) = compiled(x, None, lam)
    got = torch.autograd.grad(out_c.square().sum() + c_c.sum(), [lam] + list(model.parameters()))
    assert_close_rel(out_c, out, F32, "output")
    for a, b in zip(got, ref):
        assert_close_rel(a, b, F32, "grad")
    torch._dynamo.reset()


def test_empty_sequence():
    cell = stn_kernels.HyperLSTMCell(3, 2, num_hparams=1, dtype=D64)
    h0 = torch.randn(1, 2, 2, dtype=D64, requires_grad=True)
    c0 = torch.randn(1, 2, 2, dtype=D64, requires_grad=True)
    out, (h, c) = cell(torch.randn(0, 2, 3, dtype=D64), (h0, c0), torch.randn(2, 1, dtype=D64))
    assert out.shape == (0, 2, 2)
    torch.testing.assert_close(h, h0)
    torch.testing.assert_close(c, c0)
    gh, gc = torch.autograd.grad(h.sum() + 2 * c.sum(), [h0, c0])
    torch.testing.assert_close(gh, torch.ones_like(gh))
    torch.testing.assert_close(gc, torch.full_like(gc, 2.0))


# ----------------------------------------------------------------------------- DropConnect

def test_dropconnect_one_mask_shared_by_both_h2h_weights():
    """Training: the h2h weights are W ⊙ m / (1 − p) and W_h ⊙ m / (1 − p) with one mask m; i2h unmasked;
    the raw weights' gradients are masked; eval mode and p = 0 use the raw weights."""
    T, B, K, N, H, p = 3, 2, 4, 3, 2, 0.4
    cell = randomize_lstm_(stn_kernels.HyperLSTMCell(K, N, num_hparams=H, dropconnect=p, dtype=D64))
    x, lam = torch.randn(T, B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    torch.manual_seed(123)
    out, (h, c) = cell(x, None, lam)
    torch.manual_seed(123)
    mask = dropconnect_mask(cell.h2h.weight, p)
    kept = mask != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
    i2h = lstm_linear_params(cell.i2h)
    h2h = lstm_linear_params(cell.h2h)
    h2h["W"], h2h["Wh"] = h2h["W"] * mask, h2h["Wh"] * mask
    zeros = torch.zeros(B, N, dtype=D64)
    want, _, _ = naive_cell_sequence(x, lam, i2h, h2h, zeros, zeros)
    assert_close_rel(out, want, D64, "output")
    gW, gWh = torch.autograd.grad(out.sum(), [cell.h2h.weight, cell.h2h.hyper_weight])
    assert not gW[~kept].any() and not gWh[~kept].any()
    assert gW[kept].abs().min() > 0
    cell.eval()
    out_eval, _ = cell(x, None, lam)
    want_eval, _, _ = naive_cell_sequence(x, lam, i2h, lstm_linear_params(cell.h2h), zeros, zeros)
    assert_close_rel(out_eval, want_eval, D64, "output (eval)")
    cell.train()
    out_p0, _ = cell(x, None, lam, dropconnect=0.0)
    assert_close_rel(out_p0, want_eval, D64, "output (p = 0)")


def test_dropconnect_tensor_rate_and_stack_draws_per_layer():
    model = stn_kernels.HyperLSTM(3, 4, 2, num_hparams=1, dropconnect=0.5)
    x, lam = torch.randn(2, 2, 3), torch.randn(2, 1)
    torch.manual_seed(5)
    a, _ = model(x, None, lam, dropconnect=torch.tensor([0.5]))
    torch.manual_seed(5)
    b, _ = model(x, None, lam)
    torch.testing.assert_close(a, b)
    torch.manual_seed(5)
    m0 = dropconnect_mask(model.cells[0].h2h.weight, 0.5)
    m1 = dropconnect_mask(model.cells[1].h2h.weight, 0.5)
    assert not torch.equal(m0, m1)  # one mask per layer
    model.dropconnect = 0.0
    assert model.cells[1].dropconnect == 0.0


@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_layer_dropout_locked_per_example_between_layers(monkeypatch, batch_first):
    """Training: each layer's output reaches the next one times a mask that is 0 or 1/(1 − p_b), one per
    (example, unit) for all steps; none after the last layer; rate 0 keeps an example whole. The output is
    the published loop run on those masked inputs, and so are the gradients."""
    T, B, K, N, H, layers = 5, 4, 3, 6, 2, 3
    rates = torch.tensor([0.0, 0.5, 0.7, 0.3], dtype=D64)
    model = randomize_lstm_(stn_kernels.HyperLSTM(K, N, layers, num_hparams=H, batch_first=batch_first, dtype=D64))
    x = torch.randn((B, T, K) if batch_first else (T, B, K), dtype=D64, requires_grad=True)
    lam = torch.randn(B, H, dtype=D64)
    inputs = []  # time-major input of each layer
    layer_fn = stn_kernels.functional.hyper_lstm_layer

    def recording_layer(x, *args, batch_first=False, **kwargs):
        inputs.append((x.transpose(0, 1) if batch_first else x).detach().clone())
        return layer_fn(x, *args, batch_first=batch_first, **kwargs)

    monkeypatch.setattr(stn_kernels.functional, "hyper_lstm_layer", recording_layer)
    # The Python path, whose layer function is recorded here (the compiled host layer, which the test of the host
    # path compares with this one, would bypass it).
    monkeypatch.setenv("STN_KERNELS_HOST", "0")
    out, (h_n, c_n) = model(x, None, lam, layer_dropout=rates)
    assert len(inputs) == layers
    zeros = torch.zeros(B, N, dtype=D64)
    for layer, cell in enumerate(model.cells):
        want, h, c = naive_cell_sequence(inputs[layer], lam, lstm_linear_params(cell.i2h), lstm_linear_params(cell.h2h),
                                         zeros, zeros)
        if layer + 1 < layers:
            mask = inputs[layer + 1] / want  # [T, B, N], to float64 rounding (ours vs the naive loop)
            torch.testing.assert_close(mask, mask[:1].expand_as(mask), rtol=1e-9, atol=0,
                                       msg="one mask for all steps")
            for b in range(B):
                kept = mask[0, b] != 0
                torch.testing.assert_close(mask[0, b][kept], torch.full_like(mask[0, b][kept], 1 / (1 - rates[b])))
            torch.testing.assert_close(mask[0, 0], torch.ones_like(mask[0, 0]), msg="rate 0 keeps every unit")
            assert 0 < int((mask[0, 1:] == 0).sum()) < (B - 1) * N
        assert_close_rel(h_n[layer], h, D64, f"h_n[{layer}]")
        assert_close_rel(c_n[layer], c, D64, f"c_n[{layer}]")
    assert_close_rel(out.transpose(0, 1) if batch_first else out, want, D64, "output (no dropout after the last)")

    # Gradients: the naive loop with the same masks as constants, through every layer.
    params = list(model.parameters())
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [x] + params)
    x_tm = x.transpose(0, 1) if batch_first else x
    feed = x_tm
    for layer, cell in enumerate(model.cells):
        feed, _, _ = naive_cell_sequence(feed, lam, lstm_linear_params(cell.i2h), lstm_linear_params(cell.h2h), zeros,
                                         zeros)
        if layer + 1 < layers:
            # The scale 1/(1 − p) is formed in float64 from the float64 rates.
            feed = feed * ((inputs[layer + 1][0] != 0).to(D64) / (1 - rates)[:, None])
    naive = feed.transpose(0, 1) if batch_first else feed
    wanted = torch.autograd.grad((naive * g).sum(), [x] + params)
    for name, a, w in zip(["x"] + [n for n, _ in model.named_parameters()], got, wanted):
        assert_close_rel(a, w, D64, f"d{name}")

    monkeypatch.setattr(stn_kernels.functional, "hyper_lstm_layer", layer_fn)
    model.eval()
    eval_out, _ = model(x, None, lam, layer_dropout=rates)
    plain_out, _ = model(x, None, lam)
    torch.testing.assert_close(eval_out, plain_out, rtol=0, atol=0)  # eval mode: no dropout
    model.train()
    zero_out, _ = model(x, None, lam, layer_dropout=0.0)
    torch.testing.assert_close(zero_out, plain_out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rates"):
        model(x, None, lam, layer_dropout=torch.full((B + 1,), 0.5, dtype=D64))


# ----------------------------------------------------------------------------- validation and backends

def test_validation_messages():
    cell = stn_kernels.HyperLSTMCell(4, 3, num_hparams=2)
    x, lam = torch.randn(2, 5, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"input: expected shape \[T, B, 4\] \(time-major\), got \(2, 5, 3\)"):
        cell(torch.randn(2, 5, 3), None, lam)
    with pytest.raises(ValueError, match=r"hparams: expected batch size 5 \(input's dim 1, time-major\), got shape "
                                         r"\(4, 2\)"):
        cell(x, None, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"hidden\[0\]: expected shape \(5, 3\) or \(1, 5, 3\), got \(2, 5, 3\)"):
        cell(x, (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3)), lam)
    with pytest.raises(ValueError, match=r"hidden\[0\]: expected shape \(5, 3\) or \(1, 5, 3\), got \(4, 3\)"):
        cell(x, (torch.zeros(4, 3), torch.zeros(4, 3)), lam)
    with pytest.raises(TypeError, match=r"hidden: expected a tuple \(h0, c0\)"):
        cell(x, lam)
    with pytest.raises(TypeError, match=r"hidden\[1\]: expected dtype torch.float32 \(the dtype of the layer's "
                                        r"parameters.*got torch.float64"):
        cell(x, (torch.zeros(5, 3), torch.zeros(5, 3, dtype=D64)), lam)
    with pytest.raises(ValueError, match=r"dropconnect: expected a probability in \[0, 1\), got 1.0"):
        stn_kernels.HyperLSTMCell(4, 3, num_hparams=2, dropconnect=1.0)
    with pytest.raises(ValueError, match=r"dropconnect: expected a probability in \[0, 1\), got -0.1"):
        cell(x, None, lam, dropconnect=-0.1)
    with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(2, 5, 3\), got \(1, 5, 3\)"):
        stn_kernels.HyperLSTM(4, 3, 2, num_hparams=2)(x, (torch.zeros(1, 5, 3), torch.zeros(1, 5, 3)), lam)
    args = lstm_recurrence_args(dtype=F32)
    with pytest.raises(ValueError,
                       match=r"x_proj: expected shape \[T, B, 12\] \(4·hidden_size = 4·3\), got \(3, 2, 11\)"):
        stn_kernels.hyper_lstm_recurrence(args[0][..., :11], *args[1:])
    with pytest.raises(ValueError, match=r"weight: expected shape \[4·hidden_size, hidden_size\], got \(12, 4\)"):
        stn_kernels.hyper_lstm_recurrence(*args[:4], torch.zeros(12, 4), *args[5:])
    with pytest.raises(ValueError, match=r"weight_scale: required when hparams is given, got None"):
        stn_kernels.hyper_lstm_recurrence(*args[:8], None, args[9])
    with pytest.raises(TypeError, match=r"hparams: expected dtype torch.float32 \(from x_proj dtype torch.float32\), "
                                        r"got torch.float64"):
        stn_kernels.hyper_lstm_recurrence(*args[:3], args[3].double(), *args[4:])
    with pytest.raises(TypeError, match=r"i2h: expected a tuple \(weight, hyper_weight"):
        stn_kernels.hyper_lstm_layer(x, lam, cell.i2h.weight, (cell.h2h.weight, cell.h2h.hyper_weight))


def test_cuda_backend_has_no_lstm_kernel():
    args = lstm_recurrence_args(dtype=F32)
    with stn_kernels.use_backend("cuda"), pytest.raises(stn_kernels.BackendUnavailableError, match="hyper_lstm"):
        stn_kernels.hyper_lstm_recurrence(*args)
