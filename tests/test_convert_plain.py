"""convert(model, num_hparams=H) of a model written with plain torch.nn, λ fed by ``stn_kernels.hparams(...)``
without touching its forward, trained as an STN, compiled, and reverted."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels import stn

H = 2
D64 = torch.float64


class PlainNet(nn.Module):
    """A torchvision-style CNN head on images plus an embedding of a token per image, plain torch.nn only."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"), nn.ReLU())
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        images, tokens = x
        h = self.features(images) + self.embed(tokens)[:, :, None, None]
        return self.classifier(h)


def _inputs(batch=4, dtype=D64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 8, 8, dtype=dtype, generator=g), torch.randint(0, 11, (batch,), generator=g)


def _converted(dtype=D64, randomise=True):
    torch.manual_seed(0)
    plain = PlainNet().to(dtype)
    originals = {name: m for name, m in plain.named_modules() if type(m) in (nn.Linear, nn.Conv2d, nn.Embedding)}
    params = {name: p for name, p in plain.named_parameters()}
    x = _inputs(dtype=dtype)
    expected = plain(x)
    model = stn_kernels.convert(plain, num_hparams=H)
    if randomise:
        with torch.no_grad():
            for m in model.modules():
                if getattr(m, "context_hparams", False):
                    m.hparam_weight.normal_()
    return model, originals, params, x, expected


def test_converts_every_plain_layer_sharing_parameters_and_outputs_unchanged_without_lambda():
    model, originals, params, x, expected = _converted(randomise=False)
    kinds = {name: type(m) for name, m in model.named_modules() if name in originals}
    assert kinds == {"features.0": stn_kernels.HyperConv2d, "features.3": stn_kernels.HyperConv2d,
                     "embed": stn_kernels.HyperEmbedding, "classifier.1": stn_kernels.HyperLinear,
                     "classifier.3": stn_kernels.HyperLinear}
    for name, p in params.items():
        assert dict(model.named_parameters())[name] is p, name  # the same Parameter objects
    assert torch.equal(model(x), expected)  # outside a hparams block: the plain layers
    with stn_kernels.hparams(torch.randn(4, H, dtype=D64)):
        torch.testing.assert_close(model(x), expected, rtol=1e-13, atol=1e-13)  # V, C start at zero (round-off)


def test_hparams_block_feeds_every_converted_layer_and_dlambda_is_exact():
    model, _, _, x, expected = _converted()
    lam = torch.randn(4, H, dtype=D64, requires_grad=True)
    with stn_kernels.hparams(lam):
        out = model(x)
    assert not torch.allclose(out, expected)
    # The same as passing λ to each layer by hand.
    images, tokens = x
    f = model.features
    h = F.relu(f[3](f[2](F.relu(f[0](images, lam))), lam)) + model.embed(tokens, lam)[:, :, None, None]
    c = model.classifier
    by_hand = c[3](F.relu(c[1](c[0](h), lam)), lam)
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.square().sum(), lam)
    (g_hand,) = torch.autograd.grad(by_hand.square().sum(), lam)
    torch.testing.assert_close(g, g_hand, rtol=1e-13, atol=1e-13)
    # Shared λ [H], nested blocks (the innermost wins), and nothing left behind after the blocks.
    with stn_kernels.hparams(torch.zeros(4, H, dtype=D64)), stn_kernels.hparams(lam[0].detach()):
        torch.testing.assert_close(model(x), model.classifier[3](
            F.relu(c[1](c[0](F.relu(f[3](f[2](F.relu(f[0](images, lam[0]))), lam[0]))
                            + model.embed(tokens, lam[0])[:, :, None, None]), lam[0])), lam[0]).detach(),
            rtol=1e-13, atol=1e-13)
    assert torch.equal(model(x), expected)


def test_trains_as_an_stn_with_the_trainer():
    model, _, _, _, _ = _converted(dtype=torch.float32, randomise=False)
    hp = stn.HyperparameterSet([stn.Hyperparameter("dropout", 0.2, 0.0, 0.9), stn.Hyperparameter("other", 0.5, 0.0)])

    def model_fn(x, sample):
        with stn_kernels.hparams(sample.layer_input):
            return model(x)

    trainer = stn.STNTrainer(model_fn, F.cross_entropy, hp, torch.optim.Adam(model.parameters(), 1e-2),
                             hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.1),
                             generator=torch.Generator().manual_seed(3))
    data = (_inputs(dtype=torch.float32), torch.tensor([0, 1, 2, 3]))
    lam0 = hp.unconstrained.detach().clone()
    v0 = model.classifier[1].hparam_weight.detach().clone()
    for _ in range(3):
        results = trainer.step(lambda: data, lambda: data)
    assert all(torch.isfinite(r.loss_tensor) for r in results)
    assert not torch.equal(hp.unconstrained, lam0)  # the hypergradient reached λ through the converted layers
    assert not torch.equal(model.classifier[1].hparam_weight, v0)  # and the weights' V learnt


def test_compiles_without_graph_break():
    torch._dynamo.reset()
    model, _, _, x, _ = _converted(dtype=torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    lam = torch.randn(4, H)
    with stn_kernels.hparams(lam):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_revert_restores_the_original_modules_with_their_parameters():
    model, originals, params, x, _ = _converted()
    with torch.no_grad():
        model.classifier[3].weight.add_(1.0)  # trained since the conversion
    back = stn_kernels.revert(model)
    assert back is model
    for name, m in model.named_modules():
        if name in originals:
            assert m is originals[name], name
    assert {n: p for n, p in model.named_parameters()} == params
    assert stn_kernels.revert(stn_kernels.convert(nn.Linear(2, 3), num_hparams=H)).__class__ is nn.Linear


def test_embedding_options_hyper_embedding_lacks_are_refused():
    with pytest.raises(ValueError, match="expected an nn.Embedding without max_norm"):
        stn_kernels.convert(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0)), num_hparams=H)
    with pytest.raises(TypeError, match=r"lam: expected a torch.Tensor of shape \[B, H\] or \[H\], got list"):
        with stn_kernels.hparams([1.0]):
            pass
