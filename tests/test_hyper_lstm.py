"""HyperLSTM (stn_kernels.lstm): the layer against the published formulation, backends, ops, kernels.

Ground truth is an unrolled loop written here from the published HyperLSTMCell formulas
(``_naive.naive_hyper_linear`` for i2h and h2h at every step, λ scales recomputed each
step; gates sigmoid on [0:3N] = forget, input, output and tanh on [3N:4N]) in float64.
It shares no code with stn_kernels. The Triton tests run the kernels through the
interpreter on the CPU (tests/conftest.py); sizes are tiny and odd (T ≤ 4).
"""

import os

import pytest
import torch
from torch import nn

import stn_kernels
from _naive import OpCheckError, assert_close_rel, naive_hyper_linear, single_threaded
from _published import OfficialLstmHyperLinear
from stn_kernels import lstm as L
from stn_kernels import reference_lstm

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("STN_KERNELS_TRITON_AUTOTUNE", "0")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
D64, F32 = torch.float64, torch.float32
NAMES = L._INPUT_NAMES


@pytest.fixture(autouse=True)
def _seed_no_tf32():
    torch.manual_seed(0)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


# ----------------------------------------------------------------------------- ground truth

def naive_cell_sequence(x, hparams, i2h, h2h, h, c):
    """Published HyperLSTMCell over x [T, B, K]; i2h/h2h dicts W, Wh, b, bh, V, C. Returns out, h, c."""
    n = h.shape[-1]
    outs = []
    for t in range(x.shape[0]):
        pre = naive_hyper_linear(x[t], hparams, **i2h) + naive_hyper_linear(h, hparams, **h2h)
        gates = torch.sigmoid(pre[:, :3 * n])
        forget, inp, outg = gates[:, :n], gates[:, n:2 * n], gates[:, 2 * n:]
        c = forget * c + inp * torch.tanh(pre[:, 3 * n:])
        h = outg * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def _linear_params(layer, dtype=None):
    """A HyperLinear's parameters as the naive formula's dict (V, C = halves of hparam_weight)."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    n = layer.weight.shape[0]
    return {"W": cast(layer.weight), "Wh": cast(layer.hyper_weight), "b": cast(layer.bias),
            "bh": cast(layer.hyper_bias), "V": cast(layer.hparam_weight[:n]), "C": cast(layer.hparam_weight[n:])}


def randomize_lstm_(model, gen=None):
    """O(1) pre-activations: weights std 1/sqrt(fan_in), biases std 0.5, λ maps std 1/sqrt(H)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("hparam_weight"):
                std = p.shape[1] ** -0.5
            elif name.endswith("weight"):
                std = p.shape[1] ** -0.5
            else:
                std = 0.5
            p.copy_((torch.randn(p.shape, dtype=D64, generator=gen) * std).to(p.dtype))
    return model


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def run_stack(model, x, hparams, hx, g_out, g_h, g_c, backend="auto"):
    """Our model: outputs and gradients w.r.t. x, hparams, h0, c0 and every parameter."""
    x, hparams = _leaves(x, hparams)
    hx = None if hx is None else tuple(_leaves(*hx))
    with stn_kernels.use_backend(backend):
        out, (h, c) = model(x, hx, hparams)
        inputs = [x] + ([hparams] if hparams is not None else []) + (list(hx) if hx else []) + list(model.parameters())
        loss = (out * g_out).sum() + (h * g_h).sum() + (c * g_c).sum()
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = (["x"] + (["hparams"] if hparams is not None else []) + (["h0", "c0"] if hx else [])
             + [n for n, _ in model.named_parameters()])
    return out, h, c, dict(zip(names, grads))


def naive_stack(model, x, hparams, hx, g_out, g_h, g_c, batch_first=False):
    """The same in float64 through the naive published loop (cells = model.cells or [model])."""
    cells = list(model.cells) if isinstance(model, L.HyperLSTM) else [model]
    params = {n: p.detach().to(D64).requires_grad_(True) for n, p in model.named_parameters()}
    x, hparams = _leaves(None if x is None else x.to(D64), None if hparams is None else hparams.to(D64))
    h0 = c0 = None
    if hx is not None:
        h0, c0 = _leaves(hx[0].to(D64), hx[1].to(D64))
    prefix = {id(cell): (f"cells.{i}." if isinstance(model, L.HyperLSTM) else "") for i, cell in enumerate(cells)}
    seq = x.transpose(0, 1) if batch_first else x
    B, N = seq.shape[1], cells[0].hidden_size
    hs, cs = [], []
    for i, cell in enumerate(cells):
        p = prefix[id(cell)]
        layer_params = []
        for m in ("i2h", "h2h"):
            g = 4 * N
            layer_params.append({"W": params[p + m + ".weight"], "Wh": params[p + m + ".hyper_weight"],
                                 "b": params.get(p + m + ".bias"), "bh": params.get(p + m + ".hyper_bias"),
                                 "V": params[p + m + ".hparam_weight"][:g], "C": params[p + m + ".hparam_weight"][g:]})
        if h0 is None:
            h_init = c_init = torch.zeros(B, N, dtype=D64)
        else:
            h_init = h0[i] if h0.dim() == 3 else h0
            c_init = c0[i] if c0.dim() == 3 else c0
        seq, h, c = naive_cell_sequence(seq, hparams, layer_params[0], layer_params[1], h_init, c_init)
        hs.append(h)
        cs.append(c)
    out = seq.transpose(0, 1) if batch_first else seq
    h, c = torch.stack(hs), torch.stack(cs)
    if hx is not None and hx[0].dim() == 2:
        h, c = h[0], c[0]
    loss = (out * g_out.to(D64)).sum() + (h * g_h.to(D64)).sum() + (c * g_c.to(D64)).sum()
    inputs = [x] + ([hparams] if hparams is not None else []) + ([h0, c0] if hx is not None else []) + list(
        params.values())
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = (["x"] + (["hparams"] if hparams is not None else []) + (["h0", "c0"] if hx is not None else [])
             + list(params))
    return out, h, c, dict(zip(names, grads))


def compare(got, want, dtype, skip_zero_grads=True):
    out, h, c, grads = got
    out_r, h_r, c_r, grads_r = want
    assert_close_rel(out, out_r, dtype, "output")
    assert_close_rel(h, h_r, dtype, "h_T")
    assert_close_rel(c, c_r, dtype, "c_T")
    assert grads.keys() == grads_r.keys()
    for name in grads:
        if grads_r[name] is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert grads[name] is not None, f"grad {name}: missing"
        assert grads[name].dtype == dtype, name
        assert_close_rel(grads[name], grads_r[name], dtype, f"grad {name}")


def _stack_inputs(T, B, K, N, H, layers, hparams_kind, batch_first, dtype, device="cpu", with_hx=True):
    x = torch.randn((B, T, K) if batch_first else (T, B, K), dtype=dtype, device=device)
    hparams = {"per_example": torch.randn(B, H, dtype=dtype, device=device),
               "shared": torch.randn(H, dtype=dtype, device=device), "none": None}[hparams_kind]
    hx = None
    if with_hx:
        hx = (torch.randn(layers, B, N, dtype=dtype, device=device) * 0.5,
              torch.randn(layers, B, N, dtype=dtype, device=device) * 0.5)
    g = (torch.randn((B, T, N) if batch_first else (T, B, N), dtype=dtype, device=device),
         torch.randn(layers, B, N, dtype=dtype, device=device), torch.randn(layers, B, N, dtype=dtype, device=device))
    return x, hparams, hx, g


# ----------------------------------------------------------------------------- reference backend (CPU)

@pytest.mark.parametrize("hparams_kind", ["per_example", "shared", "none"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
def test_stack_matches_published_loop(hparams_kind, batch_first):
    """2 layers, float64, reference backend: output, (h, c) and the gradients of everything."""
    T, B, K, N, H = 4, 3, 11, 5, 7
    model = randomize_lstm_(L.HyperLSTM(K, N, 2, H, batch_first=batch_first, dtype=D64))
    x, hparams, hx, (g_out, g_h, g_c) = _stack_inputs(T, B, K, N, H, 2, hparams_kind, batch_first, D64)
    got = run_stack(model, x, hparams, hx, g_out, g_h, g_c, "reference")
    want = naive_stack(model, x, hparams, hx, g_out, g_h, g_c, batch_first)
    compare(got, want, D64)


def test_cell_published_hidden_shape_and_default_state():
    """HyperLSTMCell: hidden [1, B, N] in and out (published shape), zeros when hidden is None."""
    T, B, K, N, H = 3, 2, 4, 3, 2
    cell = randomize_lstm_(L.HyperLSTMCell(K, N, H, dtype=D64))
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
    compare(run_stack(cell, x, lam, (zeros, zeros), *g, "reference"),
            naive_stack(cell, x, lam, (zeros, zeros), *g), D64)


def test_no_bias():
    T, B, K, N, H = 3, 2, 5, 3, 2
    model = randomize_lstm_(L.HyperLSTM(K, N, 1, H, bias=False, dtype=D64))
    x, hparams, hx, g = _stack_inputs(T, B, K, N, H, 1, "per_example", False, D64)
    compare(run_stack(model, x, hparams, hx, *g, "reference"), naive_stack(model, x, hparams, hx, *g), D64)


def test_gate_order_is_forget_input_output_cell():
    """With W = 0 and h0 = 0 the pre-activations are the biases: only the documented order gives this c, h."""
    N = 2
    cell = L.HyperLSTMCell(1, N, 1, dtype=D64)
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


def _recurrence_args(T=3, B=2, N=3, H=2, dtype=D64, hparams=True, bias=True, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, dtype=D64, generator=gen) * scale).to(dtype).to(device)

    G = 4 * N
    return [r(T, B, G), r(B, N, scale=0.5), r(B, N, scale=0.5), r(B, H) if hparams else None,
            r(G, N, scale=N ** -0.5), r(G, N, scale=N ** -0.5), r(G, scale=0.5) if bias else None,
            r(G, scale=0.5) if bias and hparams else None, r(G, H, scale=H ** -0.5) if hparams else None,
            r(G, H, scale=H ** -0.5) if bias and hparams else None]


def _recurrence_fn(*args):
    out, (h, c) = L.hyper_lstm_recurrence(*args)
    return out, c


@pytest.mark.parametrize("variant", ["full", "no_hparams"])
def test_gradcheck_recurrence(variant):
    """float64 gradcheck and gradgradcheck (double backward: the reference composite) of the op."""
    args = [None if a is None else a.requires_grad_(True) for a in _recurrence_args(hparams=variant == "full")]
    with single_threaded(), stn_kernels.use_backend("reference"):
        assert torch.autograd.gradcheck(_recurrence_fn, args)
        if variant == "full":
            assert torch.autograd.gradgradcheck(_recurrence_fn, args)


def test_gradcheck_layer_shared_hparams():
    """The whole layer (i2h HyperLinear + recurrence) with λ [H] shared by the batch, batch_first."""
    T, B, K, N, H = 3, 2, 3, 2, 2
    cell = randomize_lstm_(L.HyperLSTMCell(K, N, H, batch_first=True, dtype=D64))
    x = torch.randn(B, T, K, dtype=D64, requires_grad=True)
    lam = torch.randn(H, dtype=D64, requires_grad=True)
    params = list(cell.parameters())

    def fn(x, lam, *ps):
        tuples = [(ps[0], ps[1], ps[2], ps[3], ps[4][:4 * N], ps[4][4 * N:]),
                  (ps[5], ps[6], ps[7], ps[8], ps[9][:4 * N], ps[9][4 * N:])]
        out, (h, c) = L.hyper_lstm_layer(x, lam, tuples[0], tuples[1], batch_first=True)
        return out, c

    with single_threaded():
        assert torch.autograd.gradcheck(fn, [x, lam] + params)


def test_forward_ad_and_jvp_agree_with_backward():
    """torch.func.jvp runs the composite; <v, J u> must equal <Jᵀ v, u> from the op's backward."""
    args = _recurrence_args()
    tangents = [None if a is None else torch.randn_like(a) for a in args]
    idx = [i for i, a in enumerate(args) if a is not None]

    def fn(*present):
        full = list(args)
        for i, t in zip(idx, present):
            full[i] = t
        return _recurrence_fn(*full)

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
    args = _recurrence_args(dtype=F32)
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
    model = randomize_lstm_(L.HyperLSTM(K, N, 1, H))
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
    cell = L.HyperLSTMCell(3, 2, 1, dtype=D64)
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
    cell = randomize_lstm_(L.HyperLSTMCell(K, N, H, dropconnect=p, dtype=D64))
    x, lam = torch.randn(T, B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    torch.manual_seed(123)
    out, (h, c) = cell(x, None, lam)
    torch.manual_seed(123)
    mask = L.dropconnect_mask(cell.h2h.weight, p)
    kept = mask != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
    i2h = _linear_params(cell.i2h)
    h2h = _linear_params(cell.h2h)
    h2h["W"], h2h["Wh"] = h2h["W"] * mask, h2h["Wh"] * mask
    zeros = torch.zeros(B, N, dtype=D64)
    want, _, _ = naive_cell_sequence(x, lam, i2h, h2h, zeros, zeros)
    assert_close_rel(out, want, D64, "output")
    gW, gWh = torch.autograd.grad(out.sum(), [cell.h2h.weight, cell.h2h.hyper_weight])
    assert not gW[~kept].any() and not gWh[~kept].any()
    assert gW[kept].abs().min() > 0
    cell.eval()
    out_eval, _ = cell(x, None, lam)
    want_eval, _, _ = naive_cell_sequence(x, lam, i2h, _linear_params(cell.h2h), zeros, zeros)
    assert_close_rel(out_eval, want_eval, D64, "output (eval)")
    cell.train()
    out_p0, _ = cell(x, None, lam, dropconnect=0.0)
    assert_close_rel(out_p0, want_eval, D64, "output (p = 0)")


def test_dropconnect_tensor_rate_and_stack_draws_per_layer():
    model = L.HyperLSTM(3, 4, 2, 1, dropconnect=0.5)
    x, lam = torch.randn(2, 2, 3), torch.randn(2, 1)
    torch.manual_seed(5)
    a, _ = model(x, None, lam, dropconnect=torch.tensor([0.5]))
    torch.manual_seed(5)
    b, _ = model(x, None, lam)
    torch.testing.assert_close(a, b)
    torch.manual_seed(5)
    m0 = L.dropconnect_mask(model.cells[0].h2h.weight, 0.5)
    m1 = L.dropconnect_mask(model.cells[1].h2h.weight, 0.5)
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
    model = randomize_lstm_(L.HyperLSTM(K, N, layers, H, batch_first=batch_first, dtype=D64))
    x = torch.randn((B, T, K) if batch_first else (T, B, K), dtype=D64, requires_grad=True)
    lam = torch.randn(B, H, dtype=D64)
    inputs = []  # time-major input of each layer
    layer_fn = L.hyper_lstm_layer

    def recording_layer(x, *args, batch_first=False, **kwargs):
        inputs.append((x.transpose(0, 1) if batch_first else x).detach().clone())
        return layer_fn(x, *args, batch_first=batch_first, **kwargs)

    monkeypatch.setattr(L, "hyper_lstm_layer", recording_layer)
    out, (h_n, c_n) = model(x, None, lam, layer_dropout=rates)
    assert len(inputs) == layers
    zeros = torch.zeros(B, N, dtype=D64)
    for layer, cell in enumerate(model.cells):
        want, h, c = naive_cell_sequence(inputs[layer], lam, _linear_params(cell.i2h), _linear_params(cell.h2h),
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
        feed, _, _ = naive_cell_sequence(feed, lam, _linear_params(cell.i2h), _linear_params(cell.h2h), zeros, zeros)
        if layer + 1 < layers:
            # The dropout op takes its rates in float32 (they are compared with float32 uniforms).
            feed = feed * ((inputs[layer + 1][0] != 0).to(D64) / (1 - rates.float().to(D64))[:, None])
    naive = feed.transpose(0, 1) if batch_first else feed
    wanted = torch.autograd.grad((naive * g).sum(), [x] + params)
    for name, a, w in zip(["x"] + [n for n, _ in model.named_parameters()], got, wanted):
        assert_close_rel(a, w, D64, f"d{name}")

    monkeypatch.setattr(L, "hyper_lstm_layer", layer_fn)
    model.eval()
    eval_out, _ = model(x, None, lam, layer_dropout=rates)
    plain_out, _ = model(x, None, lam)
    torch.testing.assert_close(eval_out, plain_out, rtol=0, atol=0)  # eval mode: no dropout
    model.train()
    zero_out, _ = model(x, None, lam, layer_dropout=0.0)
    torch.testing.assert_close(zero_out, plain_out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rates"):
        model(x, None, lam, layer_dropout=torch.full((B + 1,), 0.5, dtype=D64))


# ----------------------------------------------------------------------------- published checkpoints

class PublishedHyperLSTMCell(nn.Module):
    """Stand-in of the official HyperLSTMCell (i2h, h2h = official LSTM HyperLinear), from its formulas."""

    def __init__(self, ninp, nhid, num_hparams):
        super().__init__()
        self.nhid = nhid
        self.i2h = OfficialLstmHyperLinear(ninp, 4 * nhid, num_hparams)
        self.h2h = OfficialLstmHyperLinear(nhid, 4 * nhid, num_hparams)
        with torch.no_grad():  # O(1) pre-activations
            for m, fan_in in ((self.i2h, ninp), (self.h2h, nhid)):
                for p in m.parameters():
                    p.mul_(fan_in ** -0.5 if p.dim() == 2 else 0.5)
        self.i2h.mask_weights(0.0)
        self.h2h.mask_weights(0.0)

    def forward(self, input, hidden, hparams):
        n = self.nhid
        h, cell = hidden[0].squeeze(0), hidden[1].squeeze(0)
        hs = []
        for t in range(len(input)):
            pre = self.i2h(input[t], hparams) + self.h2h(h, hparams)
            gates = torch.sigmoid(pre[:, :3 * n])
            cell = gates[:, :n] * cell + gates[:, n:2 * n] * torch.tanh(pre[:, 3 * n:])
            h = gates[:, 2 * n:] * torch.tanh(cell)
            hs.append(h)
        return torch.stack(hs), (h.unsqueeze(0), cell.unsqueeze(0))


def test_published_cell_checkpoint_loads_strict():
    T, B, K, N, H = 3, 2, 5, 3, 2
    published = PublishedHyperLSTMCell(K, N, H)
    keys = set(published.state_dict())
    assert {"i2h.elem_weight_raw", "h2h.hnet_weight_raw", "h2h.hnet_tensor_to_scalars.weight"} <= keys
    ours = L.HyperLSTMCell(K, N, H, dtype=D64)
    ours.load_state_dict(published.state_dict(), strict=True)
    x, lam = torch.randn(T, B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    hidden = (torch.randn(1, B, N, dtype=D64), torch.randn(1, B, N, dtype=D64))
    want, (h_w, c_w) = published(x, hidden, lam)
    got, (h, c) = ours(x, hidden, lam)
    assert_close_rel(got, want, D64, "output")
    assert_close_rel(h, h_w, D64, "h")
    assert_close_rel(c, c_w, D64, "c")


def test_published_model_rnns_load_into_stack():
    """The published model's rnns.{l}.* entries load into a HyperLSTM used as its ``rnns``."""
    T, B, N, H = 3, 2, 4, 2

    class Published(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnns = nn.ModuleList([PublishedHyperLSTMCell(N, N, H) for _ in range(2)])

    class Ours(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnns = L.HyperLSTM(N, N, 2, H, dtype=D64)

    published, ours = Published(), Ours()
    ours.load_state_dict(published.state_dict(), strict=True)
    x, lam = torch.randn(T, B, N, dtype=D64), torch.randn(B, H, dtype=D64)
    zeros = (torch.zeros(1, B, N, dtype=D64), torch.zeros(1, B, N, dtype=D64))
    y = x
    for cell in published.rnns:
        y, _ = cell(y, zeros, lam)
    got, _ = ours.rnns(x, None, lam)
    assert_close_rel(got, y, D64, "output")


class HyperLSTMCell(PublishedHyperLSTMCell):
    """The stand-in under the official class name, which stn_kernels.convert recognises."""


class PublishedLanguageModelCore(nn.Module):
    """The published model's loop over its cells: DropConnect drawn by h2h.mask_weights(wdrop) before each."""

    def __init__(self, K, N, H, layers, wdrop=0.0, cell=HyperLSTMCell):
        super().__init__()
        self.rnns = nn.ModuleList([cell(K if layer == 0 else N, N, H) for layer in range(layers)])
        self.wdrop = wdrop

    def forward(self, x, hidden, lam):
        new_hidden = []
        for layer, rnn in enumerate(self.rnns):
            rnn.h2h.mask_weights(self.wdrop)
            rnn.i2h.mask_weights(0)
            x, state = rnn(x, hidden[layer], lam)
            new_hidden.append(state)
        return x, new_hidden


def _published_run(model, x, hidden, lam):
    """Output, final states and the gradients of a fixed function of them: w.r.t. x, λ and each parameter
    (keyed by the Parameter object's id, which conversion keeps)."""
    x, lam = _leaves(x, lam)
    out, states = model(x, hidden, lam)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=D64).view_as(out)).sum()
    loss = loss + sum((h * 0.3 + c * 0.7).sum() for h, c in states)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, [x, lam, *params])
    return out, states, {"x": grads[0], "hparams": grads[1], **{id(p): g for p, g in zip(params, grads[2:])}}


def test_convert_swaps_published_cells_for_the_fused_cell():
    """convert() replaces each official HyperLSTMCell by ours over the same Parameters; the published model's
    forward runs unchanged and gives the same output, states and gradients."""
    T, B, K, N, H = 4, 3, 5, 4, 2
    model = PublishedLanguageModelCore(K, N, H, 2)
    x, lam = torch.randn(T, B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    hidden = [(torch.randn(1, B, N, dtype=D64) * 0.5, torch.randn(1, B, N, dtype=D64) * 0.5) for _ in range(2)]
    params = list(model.parameters())
    want_out, want_states, want_grads = _published_run(model, x, hidden, lam)
    assert stn_kernels.convert(model) is model
    assert all(type(cell) is L.HyperLSTMCell for cell in model.rnns)
    assert {id(p) for p in model.parameters()} == {id(p) for p in params}  # taken over, not copied
    out, states, grads = _published_run(model, x, hidden, lam)
    assert_close_rel(out, want_out, D64, "output")
    for (h, c), (wh, wc) in zip(states, want_states):
        assert h.shape == wh.shape == (1, B, N)
        assert_close_rel(h, wh, D64, "h_T")
        assert_close_rel(c, wc, D64, "c_T")
    assert grads.keys() == want_grads.keys()
    for key, w in want_grads.items():
        assert_close_rel(grads[key], w, D64, f"d{key}")


def test_converted_cell_uses_the_dropconnect_mask_the_published_model_draws():
    T, B, K, N, H = 3, 2, 4, 5, 2
    model = PublishedLanguageModelCore(K, N, H, 2, wdrop=0.5)
    stn_kernels.convert(model)
    model.train()
    x, lam = torch.randn(T, B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    hidden = [(torch.zeros(1, B, N, dtype=D64), torch.zeros(1, B, N, dtype=D64)) for _ in range(2)]
    out, _ = model(x, hidden, lam)
    feed = x
    for cell in model.rnns:
        mask = cell.h2h.weight_mask  # drawn by the model's mask_weights(0.5) call, kept until the next one
        assert mask is not None and cell.i2h.weight_mask is None
        assert set(mask.unique().tolist()) == {0.0, 2.0}
        h2h = _linear_params(cell.h2h)
        h2h["W"], h2h["Wh"] = h2h["W"] * mask, h2h["Wh"] * mask
        zeros = torch.zeros(B, N, dtype=D64)
        feed, _, _ = naive_cell_sequence(feed, lam, _linear_params(cell.i2h), h2h, zeros, zeros)
    assert_close_rel(out, feed, D64, "output with DropConnect")
    model.eval()  # the training masks are still set on h2h, and must not apply now
    out_eval, _ = model.rnns[0](x, hidden[0], lam)
    zeros = torch.zeros(B, N, dtype=D64)
    cell = model.rnns[0]
    want_eval, _, _ = naive_cell_sequence(x, lam, _linear_params(cell.i2h), _linear_params(cell.h2h), zeros, zeros)
    assert cell.h2h.weight_mask is not None
    assert_close_rel(out_eval, want_eval, D64, "output in eval mode")


def test_convert_leaves_other_cells_whole():
    """Only the official class is fused: a cell of another name (its gates could be in another order) keeps its
    own loop, with its linears converted."""
    model = PublishedLanguageModelCore(3, 4, 2, 1, cell=PublishedHyperLSTMCell)
    stn_kernels.convert(model)
    cell = model.rnns[0]
    assert type(cell) is PublishedHyperLSTMCell
    assert type(cell.i2h).__name__ == type(cell.h2h).__name__ == "DropConnectHyperLinear"


# ----------------------------------------------------------------------------- validation and backends

def test_validation_messages():
    cell = L.HyperLSTMCell(4, 3, 2)
    x, lam = torch.randn(2, 5, 4), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"input: expected shape \[T, B, 4\] \(time-major\), got \(2, 5, 3\)"):
        cell(torch.randn(2, 5, 3), None, lam)
    with pytest.raises(ValueError, match=r"hparams: expected shape \[B, H\] with B = 5"):
        cell(x, None, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"hidden\[0\]: expected shape \[B, 3\] or \[1, B, 3\], got \(2, 5, 3\)"):
        cell(x, (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3)), lam)
    with pytest.raises(ValueError, match=r"h0: expected shape \(5, 3\), got \(4, 3\)"):
        cell(x, (torch.zeros(4, 3), torch.zeros(4, 3)), lam)
    with pytest.raises(TypeError, match=r"hidden: expected a tuple \(h0, c0\)"):
        cell(x, lam)
    with pytest.raises(TypeError, match=r"c0: expected dtype torch.float32 \(the dtype of x_proj\), got torch.float64"):
        cell(x, (torch.zeros(5, 3), torch.zeros(5, 3, dtype=D64)), lam)
    with pytest.raises(ValueError, match=r"dropconnect: expected a probability in \[0, 1\), got 1.0"):
        L.HyperLSTMCell(4, 3, 2, dropconnect=1.0)
    with pytest.raises(ValueError, match=r"dropconnect: expected a probability in \[0, 1\), got -0.1"):
        cell(x, None, lam, dropconnect=-0.1)
    with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(2, 5, 3\), got \(1, 5, 3\)"):
        L.HyperLSTM(4, 3, 2, 2)(x, (torch.zeros(1, 5, 3), torch.zeros(1, 5, 3)), lam)
    args = _recurrence_args(dtype=F32)
    with pytest.raises(ValueError,
                       match=r"x_proj: expected shape \[T, B, 12\] \(4·hidden_size = 4·3\), got \(3, 2, 11\)"):
        L.hyper_lstm_recurrence(args[0][..., :11], *args[1:])
    with pytest.raises(ValueError, match=r"weight: expected shape \[4·hidden_size, hidden_size\], got \(12, 4\)"):
        L.hyper_lstm_recurrence(*args[:4], torch.zeros(12, 4), *args[5:])
    with pytest.raises(ValueError, match=r"weight_scale: required when hparams is given, got None"):
        L.hyper_lstm_recurrence(*args[:8], None, args[9])
    with pytest.raises(TypeError, match=r"hparams: expected dtype torch.float32 \(from x_proj dtype torch.float32\), "
                                        r"got torch.float64"):
        L.hyper_lstm_recurrence(*args[:3], args[3].double(), *args[4:])
    with pytest.raises(TypeError, match=r"i2h: expected a tuple \(weight, hyper_weight"):
        L.hyper_lstm_layer(x, lam, cell.i2h.weight, (cell.h2h.weight, cell.h2h.hyper_weight))


def test_auto_keeps_the_reference_until_the_kernels_are_gpu_checked():
    from stn_kernels._backend import resolve_backend

    for device in ("cpu", "cuda"):
        assert resolve_backend(torch.device(device), L.OP_NAME, ("reference", *L._KERNEL_MODULES),
                               L._AUTO_CHOICES) == "reference"


def test_cuda_backend_has_no_lstm_kernel():
    args = _recurrence_args(dtype=F32)
    with stn_kernels.use_backend("cuda"), pytest.raises(stn_kernels.BackendUnavailableError, match="hyper_lstm"):
        L.hyper_lstm_recurrence(*args)


# ----------------------------------------------------------------------------- Triton (interpreter on CPU)

triton_only = pytest.mark.triton


def _kernels():
    from stn_kernels.triton_kernels import hyper_lstm

    return hyper_lstm


def _check_kernels(args, mask=None, tol=F32, seed=1):
    """Triton forward/backward of the op against the float64 reference composite (autograd)."""
    K = _kernels()
    args = [None if a is None else a.to(DEVICE) for a in args]
    x_proj = args[0]
    T, B, G = x_proj.shape
    gen = torch.Generator().manual_seed(seed)
    g_out = torch.randn(T, B, G // 4, generator=gen).to(x_proj.dtype).to(DEVICE)
    g_c = torch.randn(B, G // 4, generator=gen).to(x_proj.dtype).to(DEVICE)
    out, c_T, gates, cells, z = K.hyper_lstm_recurrence_forward(*args)
    leaves = [None if a is None else a.detach().cpu().double().requires_grad_(True) for a in args]
    ref_out, ref_c = reference_lstm.hyper_lstm_recurrence(*leaves)
    assert_close_rel(out, ref_out, tol, "out")
    assert_close_rel(c_T, ref_c, tol, "c_T")
    if T:
        assert_close_rel(cells[-1], ref_c, tol, "cells[-1]")
    present = [i for i, a in enumerate(leaves) if a is not None]
    ref = dict(zip(present, torch.autograd.grad((ref_out, ref_c), [leaves[i] for i in present],
                                                (g_out.cpu().double(), g_c.cpu().double()), allow_unused=True)))
    if mask is None:
        mask = [a is not None for a in args]
        mask[5] = mask[5] and args[3] is not None  # W_h takes no part without hparams
    grads = K.hyper_lstm_recurrence_backward(g_out, g_c, args[1], args[2], args[3], args[4], args[5], args[7],
                                             args[8], args[9], out, gates, cells, z, mask)
    assert len(grads) == 10
    for i, (name, need) in enumerate(zip(NAMES, mask)):
        if not need:
            assert grads[i] is None, name
            continue
        assert grads[i].dtype == args[i].dtype, name
        assert_close_rel(grads[i], ref[i], tol, f"d{name}")
    return (out, c_T, gates, cells, z), grads


@triton_only
@pytest.mark.parametrize("T,B,N,H", [(4, 3, 5, 1), (3, 3, 13, 7), (2, 17, 21, 3), (1, 2, 5, 2)], ids=str)
def test_triton_kernels_match_reference(T, B, N, H):
    """Odd sizes; (2, 17, 21, 3) spans two row blocks and two unit blocks of the interpreter's 16."""
    _check_kernels(_recurrence_args(T, B, N, H, dtype=F32))


@triton_only
@pytest.mark.parametrize("variant", ["no_hparams", "no_bias", "hyper_bias_only", "mask"])
def test_triton_kernel_variants(variant):
    args = _recurrence_args(3, 3, 5, 7, dtype=F32, hparams=variant != "no_hparams", bias=variant != "no_bias")
    mask = None
    if variant == "hyper_bias_only":
        args[6] = None
    if variant == "mask":  # no dh0 (the last step skips its GEMM), λ and W_h only
        mask = [False, False, True, True, False, True, False, False, False, False]
    _check_kernels(args, mask)


@triton_only
def test_triton_fp16():
    args = _recurrence_args(3, 3, 13, 7, dtype=torch.float16)
    args[3], args[8], args[9] = args[3].float(), args[8].float(), args[9].float()  # λ, V, C stay float32
    _check_kernels(args, tol=torch.float16)


@triton_only
def test_triton_non_contiguous_inputs():
    """x_proj transposed from a batch-first projection, h0 with row padding, c0 with inner stride 2."""
    args = _recurrence_args(3, 3, 5, 2, dtype=F32)
    args[0] = args[0].transpose(0, 1).contiguous().transpose(0, 1)
    args[1] = torch.zeros(3, 9)[:, :5].copy_(args[1])
    args[2] = torch.zeros(3, 10)[:, ::2].copy_(args[2])
    assert not (args[0].is_contiguous() or args[1].is_contiguous() or args[2].is_contiguous())
    _check_kernels(args)


def _nan_alloc(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@triton_only
def test_triton_nan_poisoned_buffers(monkeypatch):
    """Every buffer the LSTM and HyperLinear kernels write in full starts as NaN."""
    from stn_kernels.triton_kernels import hyper_linear as hl

    monkeypatch.setattr(_kernels(), "_alloc", _nan_alloc)
    monkeypatch.setattr(hl, "_alloc", _nan_alloc)
    (out, c_T, gates, cells, z), grads = _check_kernels(_recurrence_args(3, 3, 13, 7, dtype=F32, seed=4))
    for t in (out, c_T, gates, cells, z, *grads):
        assert torch.isfinite(t).all()


@triton_only
def test_triton_deterministic_bitwise():
    args = [None if a is None else a.to(DEVICE) for a in _recurrence_args(3, 3, 5, 7, dtype=F32, seed=5)]
    K = _kernels()
    g_out, g_c = torch.randn(3, 3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            fwd = K.hyper_lstm_recurrence_forward(*args)
            grads = K.hyper_lstm_recurrence_backward(g_out, g_c, args[1], args[2], args[3], args[4], args[5],
                                                     args[7], args[8], args[9], fwd[0], fwd[2], fwd[3], fwd[4])
            runs.append([*fwd, *grads])
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@triton_only
@pytest.mark.parametrize("hparams_kind,batch_first", [("per_example", False), ("shared", True)])
def test_triton_stack_gradients_equal_reference(hparams_kind, batch_first):
    """2 layers, K=11, N=5, H=7, T=3: output, (h, c) and the gradients of all parameters, λ, x, h0 and c0
    from the Triton path (i2h HyperLinear kernels + recurrence kernels) equal the reference path's."""
    T, B, K, N, H = 3, 3, 11, 5, 7
    model = randomize_lstm_(L.HyperLSTM(K, N, 2, H, batch_first=batch_first, device=DEVICE))
    x, hparams, hx, g = _stack_inputs(T, B, K, N, H, 2, hparams_kind, batch_first, F32, DEVICE)
    got = run_stack(model, x, hparams, hx, *g, "triton")
    ref = run_stack(model, x, hparams, hx, *g, "reference")
    compare(got, ref, F32)
    want = naive_stack(model.cpu(), x.cpu(), None if hparams is None else hparams.cpu(),
                       tuple(t.cpu() for t in hx), *(t.cpu() for t in g), batch_first)
    compare(tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in got[:3])
            + ({k: v.cpu() for k, v in got[3].items()},), want, F32)


@triton_only
def test_triton_backend_runs_the_lstm_kernels(monkeypatch):
    K = _kernels()
    calls = []
    for name in ("hyper_lstm_recurrence_forward", "hyper_lstm_recurrence_backward"):
        original = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    cell = L.HyperLSTMCell(3, 5, 2, device=DEVICE)
    lam = torch.randn(2, 2, device=DEVICE, requires_grad=True)
    with stn_kernels.use_backend("triton"):
        out, _ = cell(torch.randn(2, 2, 3, device=DEVICE), None, lam)
        out.sum().backward()
    assert calls == ["hyper_lstm_recurrence_forward", "hyper_lstm_recurrence_backward"]
    assert lam.grad is not None and torch.isfinite(lam.grad).all()


@triton_only
def test_opcheck_triton():
    args = [None if a is None else a.to(DEVICE) for a in _recurrence_args(2, 3, 5, 2, dtype=F32)]
    for i in (0, 1, 3, 5, 8):
        args[i].requires_grad_(True)
    with stn_kernels.use_backend("triton"):
        try:
            torch.library.opcheck(torch.ops.stn_kernels.hyper_lstm_recurrence.default, args,
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        except OpCheckError as exc:  # pragma: no cover
            pytest.fail(str(exc))


@triton_only
def test_compile_fullgraph_with_triton_backend():
    torch._dynamo.reset()
    cell = randomize_lstm_(L.HyperLSTMCell(3, 5, 2, device=DEVICE))
    x = torch.randn(2, 3, 3, device=DEVICE)
    lam = torch.randn(3, 2, device=DEVICE, requires_grad=True)
    with stn_kernels.use_backend("triton"):
        out, (h, c) = cell(x, None, lam)
        (grad,) = torch.autograd.grad(out.square().sum() + c.sum(), lam)
        compiled = torch.compile(cell, fullgraph=True)
        out_c, (h_c, c_c) = compiled(x, None, lam)
        (grad_c,) = torch.autograd.grad(out_c.square().sum() + c_c.sum(), lam)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_c, grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_bf16_kernels():
    args = _recurrence_args(3, 5, 37, 7, dtype=torch.bfloat16)
    args[3], args[8], args[9] = args[3].float(), args[8].float(), args[9].float()
    _check_kernels(args, tol=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, torch.float16], ids=["fp32", "fp16"])
def test_gpu_ptb_shape(dtype):
    """B=40, N=650, H=7 (the published PTB layer), 4 steps, against the float64 composite."""
    args = _recurrence_args(4, 40, 650, 7, dtype=dtype)
    if dtype != F32:
        args[3], args[8], args[9] = args[3].float(), args[8].float(), args[9].float()
    _check_kernels(args, tol=dtype)
