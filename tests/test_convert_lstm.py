"""convert(model, num_hparams=H) of nn.LSTM: the same function as nn.LSTM without λ (outputs, states, gradients,
dropout draws), the STN formula with λ from ``stn_kernels.hparams(...)`` against a naive formulation in torch's
gate order, and a language model written with plain torch.nn trained as an STN, compiled and reverted."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels import stn
from stn_kernels.convert import TorchLayoutHyperLSTM

from _naive import assert_close_rel, naive_hyper_linear

H = 2
D64 = torch.float64
K, N, T, B = 3, 4, 5, 3


def _pair(num_layers=2, bias=True, batch_first=False, dropout=0.0):
    """(nn.LSTM, the same LSTM converted), float64, hyper path randomised (outputs then differ with λ)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(K, N, num_layers, bias=bias, batch_first=batch_first, dropout=dropout).to(D64)
    converted = stn_kernels.convert(nn.Sequential(lstm), num_hparams=H)[0]
    return lstm, converted


def _randomise_hyper_path(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "hparam_weight":
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=g) * H ** -0.5)


def _input(batch_first, unbatched, num_layers, with_state):
    g = torch.Generator().manual_seed(1)
    shape = (T, K) if unbatched else ((B, T, K) if batch_first else (T, B, K))
    x = torch.randn(shape, dtype=D64, generator=g, requires_grad=True)
    state_shape = (num_layers, N) if unbatched else (num_layers, B, N)
    hx = None
    if with_state:
        hx = tuple((torch.randn(state_shape, dtype=D64, generator=g) * 0.5).requires_grad_() for _ in range(2))
    return x, hx


def _loss(out, h, c):
    # Weights that differ per element, so that a permuted output or state cannot give the same loss.
    w = torch.arange(1, out.numel() + 1, dtype=out.dtype).reshape(out.shape).sin()
    return (out * w).sum() + (h * h.cos()).sum() + (c * 0.5).square().sum()


CONFIGS = [pytest.param(dict(num_layers=1), id="1-layer"),
           pytest.param(dict(num_layers=2, bias=False, batch_first=True), id="2-layers-no-bias-batch-first"),
           pytest.param(dict(num_layers=3, batch_first=True, dropout=0.4), id="3-layers-dropout")]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "given-state"])
def test_without_lambda_it_is_the_nn_lstm_sharing_its_parameters(config, unbatched, with_state):
    lstm, converted = _pair(**config)
    assert isinstance(converted, stn_kernels.HyperLSTM) and isinstance(converted, TorchLayoutHyperLSTM)
    shared = dict(converted.named_parameters())
    for name, p in lstm.named_parameters():
        assert shared[name] is p, name  # the nn.LSTM's own Parameter objects, under its names
    x, hx = _input(config.get("batch_first", False), unbatched, config["num_layers"], with_state)
    inputs = [x] + list(hx or ()) + list(lstm.parameters())
    results = []
    for train in (False, True):  # train mode: nn.LSTM's dropout between layers, the same draws
        for module in (lstm, converted):
            module.train(train)
            torch.manual_seed(7)
            out, (h, c) = module(x, hx)
            results.append((out, h, c, torch.autograd.grad(_loss(out, h, c), inputs)))
    for want, got in (results[:2], results[2:]):
        for a, b, what in zip(got[:3], want[:3], ("output", "h_n", "c_n")):
            assert_close_rel(a, b, D64, what)
        for a, b, p in zip(got[3], want[3], ["x", "h0", "c0"][:1 + 2 * with_state] + [n for n, _ in
                                                                                   lstm.named_parameters()]):
            assert_close_rel(a, b, D64, f"grad {p}")
    if config.get("dropout"):
        assert not torch.allclose(results[0][0], results[2][0])  # dropout really drew in train mode


def naive_converted_lstm(model, x, lam, hx):
    """The STN LSTM over time-major x [T, B, K] from the formula: each gate's pre-activation is
    W_ih·x + b_ih + (V·λ) ⊙ (W_h·x) + (C·λ) ⊙ b_h plus the same of h. The elementary path is read from the
    nn.LSTM's Parameters by torch's names in torch's gate order (i, f, g, o); the hyper path from the cells in
    HyperLSTM's documented order (f, i, o, g)."""
    hidden = model.hidden_size
    seq, hs, cs = x, [], []
    for k, cell in enumerate(model.cells):
        def gates(t, order):
            return dict.fromkeys("ifgo") if t is None else dict(zip(order, t.chunk(4)))

        def path(linear, kind):
            w, b = gates(getattr(model, f"weight_{kind}_l{k}"), "ifgo"), gates(getattr(model, f"bias_{kind}_l{k}",
                                                                                     None), "ifgo")
            wh, bh = gates(linear.hyper_weight, "fiog"), gates(linear.hyper_bias, "fiog")
            v, c = gates(linear.hparam_weight[:4 * hidden], "fiog"), gates(linear.hparam_weight[4 * hidden:], "fiog")
            return {g: dict(W=w[g], Wh=wh[g], b=b[g], bh=bh[g], V=v[g], C=c[g]) for g in "ifgo"}

        ih, hh = path(cell.i2h, "ih"), path(cell.h2h, "hh")
        h = x.new_zeros(x.shape[1], hidden) if hx is None else hx[0][k]
        c = x.new_zeros(x.shape[1], hidden) if hx is None else hx[1][k]
        outs = []
        for t in range(seq.shape[0]):
            pre = {g: naive_hyper_linear(seq[t], lam, **ih[g]) + naive_hyper_linear(h, lam, **hh[g]) for g in "ifgo"}
            c = torch.sigmoid(pre["f"]) * c + torch.sigmoid(pre["i"]) * torch.tanh(pre["g"])
            h = torch.sigmoid(pre["o"]) * torch.tanh(c)
            outs.append(h)
        seq = torch.stack(outs)
        hs.append(h)
        cs.append(c)
    return seq, torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("config", CONFIGS[:2])
@pytest.mark.parametrize("lam_kind", ["per_example", "shared"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_lambda_from_the_block_is_the_stn_formula_with_every_gradient(config, lam_kind, unbatched):
    _, model = _pair(**config)
    _randomise_hyper_path(model)
    batch_first, layers = config.get("batch_first", False), config["num_layers"]
    x, hx = _input(batch_first, unbatched, layers, with_state=True)
    rows = 1 if unbatched else B
    lam = torch.randn((rows, H) if lam_kind == "per_example" else (H,), dtype=D64,
                      generator=torch.Generator().manual_seed(2), requires_grad=True)
    with stn_kernels.hparams(lam):
        out, (h, c) = model(x, hx)
    assert torch.equal(model(x, hx, lam)[0], out)  # the block = λ passed by hand
    params = dict(model.named_parameters())
    inputs = [x, lam, *hx] + list(params.values())
    grads = torch.autograd.grad(_loss(out, h, c), inputs)
    # The naive formula on time-major [T, B, *] tensors.
    seq = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if batch_first else x)
    state = tuple(s.unsqueeze(1) for s in hx) if unbatched else hx
    out_n, h_n, c_n = naive_converted_lstm(model, seq, lam, state)
    out_n = out_n.squeeze(1) if unbatched else (out_n.transpose(0, 1) if batch_first else out_n)
    if unbatched:
        h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
    grads_n = torch.autograd.grad(_loss(out_n, h_n, c_n), inputs)
    for a, b, what in zip((out, h, c), (out_n, h_n, c_n), ("output", "h_n", "c_n")):
        assert_close_rel(a, b, D64, what)
    for a, b, name in zip(grads, grads_n, ["x", "λ", "h0", "c0"] + list(params)):
        assert b.abs().max() > 0, name  # every gradient is exercised
        assert_close_rel(a, b, D64, f"grad {name}")


def test_options_hyper_lstm_lacks_are_left_with_the_reason_or_refused_when_asked_for():
    class MyLSTM(nn.LSTM):
        pass

    with pytest.warns(UserWarning, match="dropout"):  # nn.LSTM's own: dropout with one layer does nothing ...
        model = nn.ModuleDict({"bi": nn.LSTM(3, 4, bidirectional=True), "proj": nn.LSTM(3, 4, proj_size=2),
                               "mine": MyLSTM(3, 4), "ok": nn.LSTM(3, 4, dropout=0.5)})
    model, report = stn_kernels.convert(model, num_hparams=H, report=True)
    assert report.converted == [("ok", "LSTM", "TorchLayoutHyperLSTM")]
    assert model["ok"].dropout == 0.0  # ... and nothing here either
    assert report.left == [("bi", "LSTM", "HyperLSTM has no bidirectional=True"),
                           ("proj", "LSTM", "HyperLSTM has no proj_size=2"),
                           ("mine", "MyLSTM", "a subclass of nn.LSTM, whose forward may differ")]
    assert type(model["bi"]) is nn.LSTM and type(model["proj"]) is nn.LSTM
    _, report = stn_kernels.convert(nn.Sequential(nn.LSTM(3, 4)), report=True)
    assert report.left == [("0", "LSTM", "plain layers are converted only with num_hparams")]
    with pytest.raises(ValueError, match=r"model: expected an nn.LSTM a Hyper layer can stand in for, got LSTM: "
                                         r"HyperLSTM has no bidirectional=True"):
        stn_kernels.convert(nn.LSTM(3, 4, bidirectional=True), num_hparams=H)
    # Converting again changes nothing and reports nothing left.
    _, report = stn_kernels.convert(nn.Sequential(model["ok"]), num_hparams=H, report=True)
    assert report.converted == [] and report.left == []


def test_reset_parameters_and_repr():
    lstm, converted = _pair(num_layers=2, dropout=0.25)
    converted.reset_parameters()
    bound = N ** -0.5
    for name, p in lstm.named_parameters():  # as nn.LSTM.reset_parameters: U(±1/√hidden_size)
        assert p.abs().max() <= bound and p.std() > bound / 3, name
    assert all(cell.i2h.hparam_weight.std() > 0 for cell in converted.cells)
    assert converted.extra_repr() == f"{K}, {N}, num_layers=2, dropout=0.25, num_hparams={H}"
    with pytest.raises(TypeError, match="HyperPathLSTMCell: holds only the hyper path .* call the whole"):
        converted.cells[0](torch.zeros(T, B, K, dtype=D64))
    assert _pair(bias=False)[1].extra_repr() == f"{K}, {N}, num_layers=2, bias=False, num_hparams={H}"


# --------------------------------------------------------------------------- a language model in plain torch.nn

VOCAB = 11


class PlainLM(nn.Module):
    """nn.Embedding → 2-layer nn.LSTM (batch-first) → nn.Linear decoder, plain torch.nn only."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 5)
        self.lstm = nn.LSTM(5, 6, 2, batch_first=True)
        self.decoder = nn.Linear(6, VOCAB)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.decoder(out)


def _lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def _tokens(batch=3, length=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, length + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _converted_lm(dtype=D64):
    torch.manual_seed(0)
    plain = PlainLM().to(dtype)
    model, report = stn_kernels.convert(plain, num_hparams=H, report=True)
    assert [(name, to) for name, _, to in report.converted] == [
        ("embed", "HyperEmbedding"), ("lstm", "TorchLayoutHyperLSTM"), ("decoder", "HyperLinear")]
    assert report.left == []
    return model


def test_lm_dlambda_equals_finite_differences():
    model = _converted_lm()
    _randomise_hyper_path(model)
    tokens, targets = _tokens()
    for lam0 in (torch.tensor([0.3, -0.7], dtype=D64), torch.randn(3, H, dtype=D64)):
        def loss_at(lam):
            with stn_kernels.hparams(lam):
                return _lm_loss(model(tokens), targets)

        lam = lam0.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_at(lam), lam)
        eps = 1e-6
        fd = torch.zeros_like(lam0)
        with torch.no_grad():
            for i in range(lam0.numel()):
                step = torch.zeros_like(lam0).view(-1)
                step[i] = eps
                step = step.view_as(lam0)
                fd.view(-1)[i] = (loss_at(lam0 + step) - loss_at(lam0 - step)) / (2 * eps)
        assert grad.abs().min() > 1e-4  # λ reaches the loss through every entry
        # Central differences: truncation O(eps²) and round-off O(1e-16 / eps), both below 1e-8 here.
        torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-8)


def test_lm_trains_as_an_stn_with_the_trainer():
    model = _converted_lm(torch.float32)
    hp = stn.HyperparameterSet([stn.Hyperparameter("a", 0.2, 0.0, 0.9), stn.Hyperparameter("b", 0.5, 0.0)])

    def model_fn(tokens, sample):
        with stn_kernels.hparams(sample.layer_input):
            return model(tokens)

    trainer = stn.STNTrainer(model_fn, _lm_loss, hp, torch.optim.Adam(model.parameters(), 1e-2),
                             hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.1),
                             generator=torch.Generator().manual_seed(3), module=model)
    data = _tokens(batch=4)
    lam0 = hp.unconstrained.detach().clone()
    v0 = model.lstm.cells[1].h2h.hparam_weight.detach().clone()
    w0 = model.lstm.weight_hh_l1.detach().clone()
    for _ in range(3):
        results = trainer.step(lambda: data, lambda: data)
    assert all(torch.isfinite(r.loss_tensor) for r in results)
    assert not torch.equal(hp.unconstrained, lam0)  # the hypergradient reached λ through the LSTM
    assert not torch.equal(model.lstm.cells[1].h2h.hparam_weight, v0)  # V of the LSTM's last layer learnt
    assert not torch.equal(model.lstm.weight_hh_l1, w0)  # and the nn.LSTM's own weights


def test_lm_compiles_without_graph_break():
    torch._dynamo.reset()
    model = _converted_lm()
    _randomise_hyper_path(model)
    tokens, targets = _tokens()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        lam = torch.randn(3, H, dtype=D64, generator=torch.Generator().manual_seed(4), requires_grad=True)
        with stn_kernels.hparams(lam):
            logits = fn(tokens)
        results.append((logits, torch.autograd.grad(_lm_loss(logits, targets), [lam, model.lstm.weight_ih_l0])))
    (want, want_grads), (got, got_grads) = results
    assert_close_rel(got, want, D64, "logits")
    for a, b, what in zip(got_grads, want_grads, ("λ", "weight_ih_l0")):
        assert_close_rel(a, b, D64, f"grad {what}")
    torch._dynamo.reset()


def test_revert_restores_the_nn_lstm_trained_by_an_optimiser_built_before_convert():
    torch.manual_seed(0)
    plain = PlainLM().to(D64)
    lstm, lstm_params = plain.lstm, dict(plain.lstm.named_parameters())
    before = {name: p.detach().clone() for name, p in lstm_params.items()}
    sgd = torch.optim.SGD(plain.parameters(), lr=0.5)  # built before convert: holds the plain Parameters only
    model = stn_kernels.convert(plain, num_hparams=H)
    _randomise_hyper_path(model)
    tokens, targets = _tokens()
    for _ in range(2):
        sgd.zero_grad()
        with stn_kernels.hparams(torch.tensor([0.5, -1.0], dtype=D64)):
            _lm_loss(model(tokens), targets).backward()
        sgd.step()
    assert all(not torch.equal(p, before[name]) for name, p in lstm_params.items())  # trained through convert
    converted_logits = model(tokens)
    back = stn_kernels.revert(model)
    assert back is model and model.lstm is lstm and dict(lstm.named_parameters()) == lstm_params
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in PlainLM().named_parameters()}
    assert_close_rel(model(tokens), converted_logits, D64, "reverted logits")
    with stn_kernels.hparams(torch.ones(H, dtype=D64)):  # plain layers again: the block changes nothing
        inside = model(tokens)
    assert torch.equal(inside, model(tokens))
