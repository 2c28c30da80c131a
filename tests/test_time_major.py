"""Time-major input ([T, B, ...], PyTorch's default sequence layout): a word_language_model-style LM converted with
``convert`` equals a naive per-example formulation in float64 (λ row b applied to column b) for its output and every
gradient, also when T == B; λ whose rows fit neither layout raises; ``convert`` reads the layout from the model's
sequence layers (or is told), refuses to guess when they disagree; and the LM trains as an STN with per-example λ and
per-example tuned dropout rates, in a loop written by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels import stn

from _naive import assert_close_rel, naive_hyper_linear

H = 2
D64 = torch.float64
VOCAB, EMB, HID = 11, 5, 6


class WordLM(nn.Module):
    """PyTorch's word_language_model RNNModel (LSTM, untied), time-major: tokens [T, B] → logits [T, B, VOCAB]."""

    def __init__(self, padding_idx=None, dropout=0.3):
        super().__init__()
        self.encoder = nn.Embedding(VOCAB, EMB, padding_idx=padding_idx)
        self.embed_drop = nn.Dropout(dropout)
        self.rnn = nn.LSTM(EMB, HID, 2, dropout=dropout)  # batch_first=False, PyTorch's default
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(HID, VOCAB)

    def forward(self, tokens, hidden=None):
        output, hidden = self.rnn(self.embed_drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden


RATES = {"dropout": ["drop"], "emb_dropout": "embed_drop"}


def _converted(padding_idx=None, dtype=D64, randomise=True):
    torch.manual_seed(0)
    model, report = stn_kernels.convert(WordLM(padding_idx).to(dtype), num_hparams=H, rates=RATES, report=True)
    assert report.batch_first is False and report.layout == "from rnn (LSTM)"
    if randomise:  # V and C start at zero: make λ matter
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("hparam_weight"):
                    p.copy_(torch.randn(p.shape, dtype=D64, generator=g).to(dtype) * H ** -0.5)
    return model, report


def _gates(t, order):
    return dict.fromkeys("ifgo") if t is None else dict(zip(order, t.chunk(4)))


def naive_lm_example(model, tokens_b, lam_b):
    """One example: tokens_b [T] (a column of the time-major batch), λ_b [H] applied to every layer; eval mode.
    Written from the formulas, one time step at a time: E[i] + (V·λ) ⊙ E_h[i]; each LSTM gate W_ih·x + b_ih +
    (V·λ) ⊙ (W_h·x) + (C·λ) ⊙ b_h plus the same of h, the elementary path in torch's gate order (i, f, g, o), the
    hyper path in HyperLSTM's documented order (f, i, o, g); the decoder's W·h + b + (V·λ) ⊙ (W_h·h) + (C·λ) ⊙ b_h."""
    enc, pad = model.encoder, model.encoder.padding_idx  # (nn.Embedding's padding_idx: no gradient into that row)
    seq = (F.embedding(tokens_b, enc.weight, pad)
           + (enc.hparam_weight @ lam_b) * F.embedding(tokens_b, enc.hyper_weight, pad))
    for k, cell in enumerate(model.rnn.cells):
        def path(linear, kind):
            w = _gates(getattr(model.rnn, f"weight_{kind}_l{k}"), "ifgo")
            b = _gates(getattr(model.rnn, f"bias_{kind}_l{k}"), "ifgo")
            wh, bh = _gates(linear.hyper_weight, "fiog"), _gates(linear.hyper_bias, "fiog")
            v, c = _gates(linear.hparam_weight[:4 * HID], "fiog"), _gates(linear.hparam_weight[4 * HID:], "fiog")
            return {g: dict(W=w[g], Wh=wh[g], b=b[g], bh=bh[g], V=v[g], C=c[g]) for g in "ifgo"}

        ih, hh = path(cell.i2h, "ih"), path(cell.h2h, "hh")
        h = c = seq.new_zeros(HID)
        outs = []
        for t in range(seq.shape[0]):
            pre = {g: naive_hyper_linear(seq[t:t + 1], lam_b, **ih[g])[0]
                   + naive_hyper_linear(h[None], lam_b, **hh[g])[0] for g in "ifgo"}
            c = torch.sigmoid(pre["f"]) * c + torch.sigmoid(pre["i"]) * torch.tanh(pre["g"])
            h = torch.sigmoid(pre["o"]) * torch.tanh(c)
            outs.append(h)
        seq = torch.stack(outs)
    dec = model.decoder
    v, c = dec.hparam_weight.chunk(2)
    return naive_hyper_linear(seq, lam_b, dec.weight, dec.hyper_weight, dec.bias, dec.hyper_bias, v, c)


def _loss(logits):
    # Weights that differ per element, so that a permuted output cannot give the same loss.
    w = torch.arange(1, logits.numel() + 1, dtype=logits.dtype).reshape(logits.shape).sin()
    return (logits * w).sum()


@pytest.mark.parametrize("steps, batch", [(5, 3), (3, 3)], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("padding_idx", [None, 1], ids=["no-padding", "padding_idx"])
def test_lm_in_the_block_is_the_naive_per_example_formulation_with_every_gradient(steps, batch, padding_idx):
    model, _ = _converted(padding_idx)
    model.eval()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, VOCAB, (steps, batch), generator=g)
    lam = torch.randn(batch, H, dtype=D64, generator=g, requires_grad=True)
    with stn_kernels.hparams(lam):
        logits, _ = model(tokens)
    assert logits.shape == (steps, batch, VOCAB)
    params = dict(model.named_parameters())
    inputs = [lam] + list(params.values())
    grads = torch.autograd.grad(_loss(logits), inputs)
    naive = torch.stack([naive_lm_example(model, tokens[:, b], lam[b]) for b in range(batch)], dim=1)
    naive_grads = torch.autograd.grad(_loss(naive), inputs)
    assert_close_rel(logits, naive, D64, "logits")
    for got, want, name in zip(grads, naive_grads, ["λ"] + list(params)):
        assert want.abs().max() > 0, name  # every gradient is exercised
        assert_close_rel(got, want, D64, f"grad {name}")
    # The test tells the examples apart: λ's rows given to other columns give other logits.
    swapped = torch.stack([naive_lm_example(model, tokens[:, b], lam[-1 - b]) for b in range(batch)], dim=1)
    assert (swapped - logits).abs().max() > 1e-3


def _linear(batch_first, seed=0):
    torch.manual_seed(seed)
    layer = stn_kernels.convert(nn.Linear(4, 3).to(D64), num_hparams=H, batch_first=batch_first)
    with torch.no_grad():
        layer.hparam_weight.normal_()
    return layer


def _by_example(layer, x, lam, dim):
    """The layer's output with λ row b applied to the slice b of x along ``dim``, one example at a time."""
    return torch.stack([layer(x.select(dim, b), lam[b]) for b in range(x.shape[dim])], dim=dim)


@pytest.mark.parametrize("shape, stated, dim", [
    ((5, 3, 4), None, 1),          # the layer's own layout: time-major
    ((3, 3, 4), None, 1),          # T == B: still the stated dim
    ((5, 3, 2, 4), None, 1),       # [T, B, S, K]
    ((3, 4), None, 0),             # no sequence dim: the examples are dim 0
    ((3, 5, 4), 0, 0),             # the block states batch first
])
def test_time_major_linear_takes_lambda_along_the_stated_dim(shape, stated, dim):
    layer = _linear(batch_first=False)
    assert layer.hparams_batch_dim == 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, dtype=D64, generator=g, requires_grad=True)
    lam = torch.randn(shape[dim], H, dtype=D64, generator=g, requires_grad=True)
    with stn_kernels.hparams(lam, batch_dim=stated):
        out = layer(x)
    want = _by_example(layer, x, lam, dim)
    assert_close_rel(out, want, D64, "output")
    for got, expected, name in zip(torch.autograd.grad(_loss(out), [x, lam, layer.hparam_weight]),
                                   torch.autograd.grad(_loss(want), [x, lam, layer.hparam_weight]),
                                   ("x", "λ", "hparam_weight")):
        assert_close_rel(got, expected, D64, f"grad {name}")


def test_the_block_states_time_major_for_a_batch_first_layer_and_lambda_passed_by_hand_keeps_dim_0():
    layer = _linear(batch_first=None)  # no sequence layer: batch first
    assert layer.hparams_batch_dim == 0
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 4, dtype=D64, generator=g)
    lam = torch.randn(3, H, dtype=D64, generator=g)
    with stn_kernels.hparams(lam, batch_dim=1):
        assert_close_rel(layer(x), _by_example(layer, x, lam, 1), D64, "block batch_dim=1")
    time_major = _linear(batch_first=False)
    with stn_kernels.hparams(lam):  # a λ given to forward is the layer's argument, rows along dim 0 as always
        assert_close_rel(time_major(x, lam), _by_example(time_major, x, lam, 0), D64, "explicit λ")


def test_time_major_embedding_takes_lambda_along_dim_1_and_a_given_batch_dim_wins():
    torch.manual_seed(0)
    emb = stn_kernels.convert(nn.Embedding(VOCAB, 4).to(D64), num_hparams=H, batch_first=False)
    with torch.no_grad():
        emb.hparam_weight.normal_()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (3, 3), generator=g)  # T == B
    lam = torch.randn(3, H, dtype=D64, generator=g)
    with stn_kernels.hparams(lam):
        out = emb(tokens)
        assert torch.equal(emb(tokens, batch_dim=0), emb(tokens, lam))
        assert_close_rel(emb(tokens[0]), emb(tokens[0], lam), D64, "[B] indices: dim 0")
    assert_close_rel(out, emb(tokens, lam, batch_dim=1), D64, "time-major")
    assert (out - emb(tokens, lam)).abs().max() > 1e-3  # the layouts differ


@pytest.mark.parametrize("batch_first, shape, rows, dim", [
    (False, (5, 3, 4), 4, 1),  # fits neither
    (False, (5, 3, 4), 5, 1),  # fits time, not the stated batch dim
    (True, (3, 5, 4), 5, 0),   # fits the time dim of a batch-first layer, not its batch dim
    (False, (3, 4), 4, 0),     # no sequence dim
])
def test_lambda_whose_rows_fit_the_wrong_dim_raises_naming_hparams(batch_first, shape, rows, dim):
    layer = _linear(batch_first)
    x = torch.randn(shape, dtype=D64)
    with stn_kernels.hparams(torch.zeros(rows, H, dtype=D64)), pytest.raises(ValueError) as info:
        layer(x)
    message = str(info.value)
    for word in ("hparams", f"expected {shape[dim]} rows", f"along dim {dim}", f"got shape ({rows}, {H})",
                 "batch_first"):
        assert word in message, (word, message)


def test_embedding_and_lm_with_rows_that_fit_neither_raise_naming_hparams():
    model, _ = _converted()
    tokens = torch.randint(0, VOCAB, (5, 3))
    for rows in (5, 4):  # T, and neither T nor B
        with stn_kernels.hparams(torch.zeros(rows, H, dtype=D64)), pytest.raises(ValueError) as info:
            model(tokens)
        assert "hparams: expected 3 rows (one per example along dim 1 of HyperEmbedding's input of shape (5, 3)" \
               in str(info.value)
        assert f"got shape ({rows}, {H})" in str(info.value)


# --------------------------------------------------------------------------- the layout convert reads


def test_convert_reads_the_layout_from_the_sequence_layers():
    _, report = stn_kernels.convert(WordLM(), num_hparams=H, report=True)
    assert report.batch_first is False and "batch_first=False (from rnn (LSTM))" in str(report)
    model = stn_kernels.convert(WordLM(), num_hparams=H)
    assert model.encoder.hparams_batch_dim == 1 and model.decoder.hparams_batch_dim == 1
    assert "hparams_batch_dim=1" in repr(model.decoder)
    mha = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2), "head": nn.Linear(4, 3)})
    assert stn_kernels.convert(mha, num_hparams=H, report=True)[1].batch_first is False
    layer = nn.ModuleDict({"enc": nn.TransformerEncoderLayer(4, 2, 8, batch_first=True), "head": nn.Linear(4, 3)})
    assert stn_kernels.convert(layer, num_hparams=H, report=True)[1].batch_first is True
    plain, report = stn_kernels.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)),
                                        num_hparams=H, report=True)
    assert report.batch_first is True and report.layout == "no sequence layer"
    assert plain[2].hparams_batch_dim == 0 and not hasattr(plain[0], "hparams_batch_dim")
    stated, report = stn_kernels.convert(WordLM(), num_hparams=H, batch_first=True, report=True)
    assert stated.decoder.hparams_batch_dim == 0 and report.layout == "stated"


def test_convert_refuses_to_guess_when_the_sequence_layers_disagree():
    model = nn.ModuleDict({"lstm": nn.LSTM(4, 4, batch_first=True), "gru": nn.GRU(4, 4),
                           "attn": nn.MultiheadAttention(4, 2, batch_first=True), "head": nn.Linear(4, 3)})
    linear = model["head"]
    with pytest.raises(ValueError) as info:
        stn_kernels.convert(model, num_hparams=H)
    message = str(info.value)
    for word in ("batch_first", "batch_first=True: lstm (LSTM), attn (MultiheadAttention)",
                 "batch_first=False: gru (GRU)", "convert(..., batch_first=True or False)"):
        assert word in message, (word, message)
    assert model["head"] is linear  # nothing converted
    converted, _ = stn_kernels.convert(model, num_hparams=H, batch_first=False, report=True)
    assert converted["head"].hparams_batch_dim == 1
    with pytest.raises(TypeError, match=r"batch_first: expected None .* True or False, got 1"):
        stn_kernels.convert(nn.Linear(2, 2), num_hparams=H, batch_first=1)


# --------------------------------------------------------------------------- the LM trains as an STN


def _lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _batch(g, steps=6, batch=4):
    tokens = torch.randint(0, VOCAB, (steps + 1, batch), generator=g)
    return tokens[:-1], tokens[1:]


def test_time_major_lm_trains_as_an_stn_with_per_example_lambda_and_tuned_dropout():
    model, report = _converted(dtype=torch.float32, randomise=False)
    assert sorted(report.tuned) == [("drop", "Dropout", "dropout"), ("embed_drop", "Dropout", "emb_dropout")]
    hp = stn.HyperparameterSet([stn.Hyperparameter("dropout", 0.3, 0.0, 0.9),
                                stn.Hyperparameter("emb_dropout", 0.2, 0.0, 0.9)])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    hopt = torch.optim.Adam([hp.unconstrained], 0.05)
    g = torch.Generator().manual_seed(3)
    train, valid = _batch(g), _batch(g)
    seen = {}
    model.drop.register_forward_hook(lambda module, args, out: seen.update(input=args[0], output=out))
    lam0, w0 = hp.unconstrained.detach().clone(), model.rnn.weight_hh_l1.detach().clone()
    for cycle in range(3):
        model.train()
        for _ in range(2):  # weight steps: perturbed λ per example, dropout at each example's rates
            sample = hp.sample(4, generator=g)
            rates = {name: sample[name] for name in hp.names}
            with stn_kernels.hparams(sample.layer_input.detach(), rates=rates):
                loss = _lm_loss(model(train[0])[0], train[1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            # model.drop dropped along the batch dim 1 of its [T, B, N] input: kept units scaled by 1/(1 − r_b)
            x, y = seen["input"].detach(), seen["output"].detach()
            kept = y != 0
            scale = torch.where(kept, y / x, torch.zeros_like(y))
            want = (1 / (1 - rates["dropout"])).to(y.dtype)[None, :, None].expand_as(y)
            torch.testing.assert_close(scale[kept], want[kept])
        model.eval()  # the λ step: validation loss, no dropout, λ through the hyper layers
        sample = hp.sample(4, perturb=False, regularize=False)
        with stn_kernels.hparams(sample.layer_input):
            val = _lm_loss(model(valid[0])[0], valid[1])
        (grad,) = torch.autograd.grad(val, hp.unconstrained)
        assert torch.isfinite(grad).all() and (grad != 0).all(), (cycle, grad)
        hopt.zero_grad()
        hp.unconstrained.grad = grad
        hopt.step()
    assert not torch.equal(hp.unconstrained, lam0) and not torch.equal(model.rnn.weight_hh_l1, w0)
    assert model.decoder.hparam_weight.abs().max() > 0  # V of the decoder learnt


def test_time_major_lm_compiles_without_graph_break():
    torch._dynamo.reset()
    model, _ = _converted()
    model.eval()
    tokens = torch.randint(0, VOCAB, (5, 3), generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        lam = torch.randn(3, H, dtype=D64, generator=torch.Generator().manual_seed(7), requires_grad=True)
        with stn_kernels.hparams(lam):
            logits = fn(tokens)[0]
        results.append((logits, torch.autograd.grad(_loss(logits), [lam, model.decoder.hparam_weight])))
    (want, want_grads), (got, got_grads) = results
    assert_close_rel(got, want, D64, "logits")
    for a, b, what in zip(got_grads, want_grads, ("λ", "decoder hparam_weight")):
        assert_close_rel(a, b, D64, f"grad {what}")
    torch._dynamo.reset()
