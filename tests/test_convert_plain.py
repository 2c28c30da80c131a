"""convert(model, num_hparams=H) of a model written with plain torch.nn, λ fed by ``stn_kernels.hparams(...)``
without touching its forward, trained as an STN, compiled, and reverted."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels import stn
from stn_kernels.convert import TorchLayoutHyperLSTM

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
                             generator=torch.Generator().manual_seed(3), module=model)
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


def test_hparams_rejects_a_lam_that_is_not_a_tensor():
    with pytest.raises(TypeError, match=r"lam: expected a torch.Tensor of shape \[B, H\] or \[H\], got list"):
        with stn_kernels.hparams([1.0]):
            pass


class _Tied(nn.Module):
    """An embedding, an LSTM and a decoder tied to the embedding, plus a shared linear under two names."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(4, 4)
        self.embed, self.lstm, self.decoder = nn.Embedding(7, 4), nn.LSTM(4, 4), nn.Linear(4, 7)
        self.first, self.second, self.head = shared, shared, nn.Sequential(nn.Conv2d(2, 3, 1), nn.Linear(3, 3))


def test_exclude_by_name_and_by_type_leaves_them_quietly_and_reports_them():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # excluded modules give no warning
        model, report = stn_kernels.convert(_Tied(), num_hparams=H, exclude=("decoder", nn.Embedding), report=True)
        assert stn_kernels.convert(_Tied(), num_hparams=H, exclude=("decoder", nn.Embedding)) is not None
    assert type(model.embed) is nn.Embedding and type(model.decoder) is nn.Linear
    assert type(model.lstm) is TorchLayoutHyperLSTM and type(model.first) is stn_kernels.HyperLinear
    assert report.left == [("embed", "Embedding", "excluded (by type Embedding)"),
                           ("decoder", "Linear", "excluded (by name 'decoder')")]
    # A shared module excluded by either of its names is left under both (it stays shared); a type matches its
    # subclasses (isinstance: nn.Conv2d is a _ConvNd); a single name or type is one, not an iterable of letters.
    model, report = stn_kernels.convert(_Tied(), num_hparams=H, exclude=["second", nn.modules.conv._ConvNd],
                                        report=True)
    assert model.first is model.second and type(model.first) is nn.Linear
    assert ("head.0", "Conv2d", "excluded (by type _ConvNd)") in report.left
    assert type(model.head[1]) is stn_kernels.HyperLinear
    assert [name for name, _, _ in report.left] == ["first", "second", "head.0"]
    for single, left in (("decoder", "decoder"), (nn.LSTM, "lstm"), (_Tied, "_Tied")):
        model, report = stn_kernels.convert(_Tied(), num_hparams=H, exclude=single, report=True)
        assert [name for name, _, _ in report.left] == [left]
    assert type(model) is _Tied and report.converted == []  # the model itself excluded by its type
    assert stn_kernels.convert(_Tied(), num_hparams=H, exclude=None, report=True)[1].left == []


@pytest.mark.parametrize("exclude, message", [
    (3, r"expected a module name \(str\), an nn.Module subclass or an iterable of them, got 3 \(int\)"),
    (nn.Linear(2, 2), r"expected a module name .* got a Linear instance \(exclude it by its name"),
    (["lstm", nn.Linear(2, 2)], r"expected module names \(str\) or nn.Module subclasses, got a Linear instance"),
    ([int], r"expected module names \(str\) or nn.Module subclasses, got the class int, not an nn.Module"),
    ([None], r"expected module names \(str\) or nn.Module subclasses, got None \(NoneType\)"),
])
def test_exclude_of_anything_but_names_and_module_types_is_refused(exclude, message):
    with pytest.raises(TypeError, match="exclude: " + message):
        stn_kernels.convert(_Tied(), num_hparams=H, exclude=exclude)


class _MyLinear(nn.Linear):
    pass


def _unconvertible():
    """Plain layers no Hyper layer can stand in for, by name, with the reason convert gives."""
    hooked = nn.Linear(3, 4)
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    extra = nn.Linear(3, 4)
    extra.scale = nn.Parameter(torch.ones(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still used
        old_norm = torch.nn.utils.weight_norm(nn.Linear(3, 4))
    return {
        "max_norm": (nn.Embedding(5, 3, max_norm=1.0), "HyperEmbedding has no max_norm=1.0"),
        "sparse": (nn.Embedding(5, 3, sparse=True, scale_grad_by_freq=True),
                   "HyperEmbedding has no scale_grad_by_freq=True, sparse=True"),
        "bi": (nn.LSTM(3, 4, bidirectional=True), "HyperLSTM has no bidirectional=True"),
        "lazy": (nn.LazyLinear(4), "an uninitialised lazy module: run one forward before convert"),
        # bias=False: no Parameter of its own left (the weight's is under parametrizations), reported all the same
        "parametrized": (torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4, bias=False)),
                         "parametrized ['weight'] (torch.nn.utils.parametrize), which the Hyper layer would drop"),
        "subclass": (_MyLinear(3, 4), "a subclass of nn.Linear, whose forward may differ"),
        "attention_out": (nn.MultiheadAttention(4, 2).out_proj, "a subclass of nn.Linear, whose forward may differ"),
        "hooked": (hooked, "has forward hooks, which the Hyper layer would not run"),
        "old_norm": (old_norm, "has forward pre hooks, which the Hyper layer would not run"),
        "extra": (extra, "has the Parameters ['weight', 'bias', 'scale'], not nn.Linear's ['weight', 'bias']"),
        "complex": (nn.Conv2d(2, 2, 1, dtype=torch.complex64),
                    "torch.complex64 weights (the Hyper layers take floating-point ones)"),
    }


def test_plain_layers_no_hyper_layer_can_stand_in_for_are_left_and_reported_in_a_model_refused_alone():
    cases = _unconvertible()
    # Options the Hyper layers do take, converted with the function unchanged.
    conv = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False, padding_mode="circular", dtype=D64)
    embed = nn.Embedding(5, 3, padding_idx=2, dtype=D64)
    model = nn.ModuleDict({name: module for name, (module, _) in cases.items()} | {"conv": conv, "embed": embed})
    x, tokens = torch.randn(2, 4, 5, 7, dtype=D64), torch.tensor([[0, 2, 4]])
    expected = conv(x), embed(tokens)
    with pytest.warns(UserWarning) as warned:
        out = stn_kernels.convert(model, num_hparams=H)
    assert out is model and type(model["conv"]) is stn_kernels.HyperConv2d
    assert type(model["embed"]) is stn_kernels.HyperEmbedding
    with stn_kernels.hparams(torch.randn(H, dtype=D64)):  # V, C = 0: the function is the plain layers'
        torch.testing.assert_close((model["conv"](x), model["embed"](tokens)), expected, rtol=1e-13, atol=1e-13)
    for name, (module, _) in cases.items():
        assert model[name] is module, name  # left as it was, children included
    # One warning, listing each with its reason.
    assert len(warned) == 1
    assert str(warned[0].message).startswith(f"stn_kernels.convert left {len(cases)} module(s) with parameters")
    for name, (module, why) in cases.items():
        assert f"{name} ({type(module).__name__}: {why})" in str(warned[0].message)
    # The same with report=True, and without num_hparams each says the same (num_hparams would not help).
    for hparams in (H, None):
        _, report = stn_kernels.convert(nn.ModuleDict({name: m for name, (m, _) in cases.items()}),
                                        num_hparams=hparams, report=True)
        assert report.left == [(name, type(m).__name__, why) for name, (m, why) in cases.items()]
    # Converting one of them itself is an error naming it.
    for name, (module, why) in cases.items():
        with pytest.raises(ValueError, match=rf"model: expected an nn.\w+ a Hyper layer can stand in for, got "
                                             rf"{type(module).__name__}: {re.escape(why)}"):
            stn_kernels.convert(module, num_hparams=H)


def test_a_model_with_parameters_of_its_own_and_no_hyper_form_is_reported_and_warned_about():
    gru = nn.GRU(3, 4)
    assert stn_kernels.convert(gru, num_hparams=H, report=True)[1].left == [
        ("GRU", "GRU", "no hyper form in stn_kernels")]
    # Nothing converted at all: every module left is warned about.
    with pytest.warns(UserWarning, match=r"converted nothing and left 1 module\(s\) with parameters as they were: "
                                         r"GRU \(GRU: no hyper"):
        assert stn_kernels.convert(gru, num_hparams=H) is gru
    with pytest.warns(UserWarning, match=r"Linear \(Linear: plain layers are converted only with num_hparams\)"):
        stn_kernels.convert(nn.Linear(2, 3))
