"""The path most users take, end to end: a plain torch.nn model converted with ``convert`` (its dropouts tuned with
``rates=``), trained by ``STNTrainer`` given the module itself, then frozen at the tuned λ with ``freeze``: for a
CNN with BatchNorm, a time-major word language model (nn.LSTM's default layout) and a transformer language model.
The frozen model is plain torch.nn (also the transformer containers convert swapped) and computes what the converted
model computes at that λ, with the tuned dropout rates."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels import stn

V = 23


class WordLM(nn.Module):
    """PyTorch's word_language_model layout: tokens [T, B], nn.LSTM batch_first=False, decoder on [T, B, N]."""

    def __init__(self):
        super().__init__()
        self.embed, self.drop = nn.Embedding(V, 12), nn.Dropout(0.3)
        self.rnn, self.decoder = nn.LSTM(12, 12, 2), nn.Linear(12, V)

    def forward(self, tokens):
        out, _ = self.rnn(self.drop(self.embed(tokens)))
        return self.decoder(self.drop(out))


class TransformerLM(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=batch_first)
        self.embed, self.encoder = nn.Embedding(V, 8), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder, self.batch_first = nn.Linear(8, V), batch_first

    def forward(self, tokens):
        length = tokens.shape[1 if self.batch_first else 0]
        mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float64)
        return self.decoder(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _case(kind):
    """(model, rates, batch of (inputs, targets), criterion, batch dim of the inputs)."""
    if kind == "cnn":
        return (_cnn(), {"dropout": nn.Dropout}, lambda: (torch.randn(6, 1, 5, 5, dtype=torch.float64),
                                                          torch.randint(0, 3, (6,))), F.cross_entropy, 0)
    if kind == "word_lm":
        return WordLM(), {"dropout": nn.Dropout}, _tokens((7, 5)), _lm_loss, 1  # T=7, B=5
    batch_first = kind == "transformer_lm"
    shape = (5, 6) if batch_first else (6, 5)
    return (TransformerLM(batch_first), {"dropout": nn.Dropout, "attention_dropout": nn.MultiheadAttention},
            _tokens(shape), _lm_loss, 0 if batch_first else 1)


def _tokens(shape):
    """next_batch() for a language model: (inputs, targets) token tensors of ``shape``."""
    return lambda: (torch.randint(0, V, shape), torch.randint(0, V, shape))


def _lm_loss(out, targets):
    return F.cross_entropy(out.reshape(-1, V), targets.reshape(-1))


def _names(rates):
    return [stn.Hyperparameter(name, 0.2, 0.0, 0.9) for name in rates] + [stn.Hyperparameter("extra", 0.5, 0.0, 1.0)]


@pytest.mark.parametrize("kind", ["cnn", "word_lm", "transformer_lm", "transformer_lm_time_major"])
def test_convert_train_freeze(kind):
    torch.manual_seed(0)
    model, rates, batch, criterion, batch_dim = _case(kind)
    model = model.double()
    hp = stn.HyperparameterSet(_names(rates), dtype=torch.float64)
    model = stn_kernels.convert(model, num_hparams=len(hp), rates=rates)
    trainer = stn.STNTrainer(model, criterion, hp, torch.optim.Adam(model.parameters(), 1e-2),
                             hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.05))
    for _ in range(3):
        results = trainer.step(batch, batch)
    assert [r.kind for r in results] == ["train", "train", "valid"]
    assert hp.unconstrained.grad is not None and torch.isfinite(hp.unconstrained.grad).all()
    assert hp.unconstrained.grad.abs().sum() > 0  # the hypergradient reaches λ through the converted layers
    # The layout the trainer took the batch from: convert's, read from the model's sequence layers.
    inputs, _ = batch()
    assert trainer._batch_size(inputs, None) == inputs.shape[batch_dim]

    lam = trainer.tuned_layer_input()
    tuned_rates = {name: value for name, value in hp.values().items() if name in rates}
    frozen = stn_kernels.freeze(model, lam, rates=tuned_rates)
    ours = [type(m).__name__ for m in frozen.modules() if type(m).__module__.startswith("stn_kernels")]
    assert not ours, ours  # plain torch.nn throughout, the transformer containers too
    dropouts = [m for m in frozen.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == pytest.approx(tuned_rates["dropout"]) for m in dropouts)
    attention = [m for m in frozen.modules() if isinstance(m, nn.MultiheadAttention)]
    assert all(m.dropout == pytest.approx(tuned_rates["attention_dropout"]) for m in attention)
    model.eval()
    frozen.eval()
    with torch.no_grad(), stn_kernels.hparams(lam):
        expected = model(inputs)
    with torch.no_grad():
        torch.testing.assert_close(frozen(inputs), expected, rtol=1e-12, atol=1e-12)
        # λ matters: the converted model at another λ differs (the frozen one is not just the λ = 0 model).
        with stn_kernels.hparams(lam + 1.0):
            assert (model(inputs) - expected).abs().max() > 1e-6
