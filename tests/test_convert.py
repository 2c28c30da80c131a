"""``stn_kernels.convert``: published-style STN / Delta-STN layers (the stand-ins of ``_published``, written
from their documented formulas and parameter names) are swapped for ours with the outputs unchanged."""

import pytest
import torch
from torch import nn

import stn_kernels
from stn_kernels import HyperConv2d, HyperEmbedding, HyperLinear
from stn_kernels.convert import DropConnectHyperLinear, TimeMajorHyperEmbedding, published_layer_kind

from _naive import assert_close_rel, leaves, lstm_linear_params, naive_cell_sequence, no_warnings
from _published import (
    BaselineRNNModel,
    DeltaStnConv2d,
    DeltaStnLinear,
    DeltaStnSimpleCnn,
    DropconnectLinear,
    OfficialHyperConv2d,
    OfficialHyperEmbedding,
    OfficialHyperLinear,
    OfficialLstmHyperLinear,
    PublishedHyperLSTMCell,
    PublishedLanguageModelCore,
)

F64 = torch.float64
H = 2


# --------------------------------------------------------------------------- models of published-style layers


class PublishedCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = OfficialHyperConv2d(3, 4, 3, padding=1, num_hparams=H, stride=2, elem_scalar=0.6)
        self.delta_conv = DeltaStnConv2d(4, 6, 3, H, padding=2, groups=2, dilation=2)
        self.block = nn.ModuleDict({"fc": OfficialHyperLinear(6 * 4 * 4, 8, H), "delta_fc": DeltaStnLinear(8, 5, H)})
        self.head = nn.Linear(5, 3, dtype=F64)

    def forward(self, x, h):
        x = torch.tanh(self.conv(x, h))
        x = torch.tanh(self.delta_conv(x, h))
        x = torch.tanh(self.block["fc"](x.flatten(1), h))
        return self.head(torch.tanh(self.block["delta_fc"](x, h)))


class PublishedLstmParts(nn.Module):
    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.encoder = OfficialHyperEmbedding(vocab, dim, H)
        self.i2h = OfficialLstmHyperLinear(dim, 4 * dim, H)
        self.decoder = nn.Linear(dim, vocab, dtype=F64)
        self.decoder.weight = self.encoder.elem_embedding.weight  # tied, as in the published LSTM

    def forward(self, tokens, h):  # tokens [T, B]
        emb = self.encoder(tokens, h)
        self.i2h.mask_weights(0.0)
        gates = torch.stack([self.i2h(emb[t], h) for t in range(tokens.shape[0])])
        return self.decoder(torch.tanh(gates[..., :5]))


def _randomise(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


# --------------------------------------------------------------------------- tests


def test_published_cnn_layers_convert_in_place_with_outputs_and_gradients_unchanged():
    model = PublishedCnn()
    _randomise(model)
    x = torch.randn(3, 3, 8, 8, dtype=F64)
    h = torch.randn(3, H, dtype=F64, requires_grad=True)
    before = model(x, h)
    (grad_before,) = torch.autograd.grad(before.sum(), h)
    kept = {name: model.delta_conv._parameters[name] for name in ("general_weight", "response_weight")}

    # Without num_hparams the plain head stays, next to converted layers: no warning (the report lists it).
    with no_warnings():
        assert stn_kernels.convert(model) is model
    assert type(model.conv) is HyperConv2d and type(model.block["fc"]) is HyperLinear
    # Delta-STN layers: ours, and still instances of the published classes (Delta-STN's isinstance lists).
    assert type(model.delta_conv).__bases__ == (HyperConv2d, DeltaStnConv2d)
    assert type(model.block["delta_fc"]).__bases__ == (HyperLinear, DeltaStnLinear)
    assert type(model.head) is nn.Linear            # plain layers only with num_hparams
    assert model.delta_conv.groups == 2 and model.delta_conv.dilation == (2, 2) and model.conv.stride == (2, 2)
    # The same Parameter objects (no copy) where nothing had to be folded in.
    assert model.delta_conv.weight is kept["general_weight"]
    assert model.delta_conv.hyper_weight is kept["response_weight"]

    after = model(x, h)
    (grad_after,) = torch.autograd.grad(after.sum(), h)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_after, grad_before, rtol=1e-12, atol=1e-12)
    assert [p.dtype for p in model.parameters()] == [F64] * len(list(model.parameters()))


def test_delta_stn_layers_keep_their_parameter_lists():
    model = nn.Sequential(DeltaStnLinear(4, 3, H))
    stn_kernels.convert(model)
    layer = model[0]
    assert [id(p) for p in layer.general_parameters] == [id(layer.weight), id(layer.bias)]
    assert [id(p) for p in layer.response_parameters] == [id(layer.hyper_weight), id(layer.hyper_bias),
                                                          id(layer.hparam_weight)]


def test_published_lstm_parts_convert_and_keep_weight_tying():
    model = PublishedLstmParts()
    _randomise(model)
    tokens = torch.randint(0, 11, (4, 3))
    h = torch.randn(3, H, dtype=F64)
    before = model(tokens, h)
    with no_warnings():
        stn_kernels.convert(model)
    assert type(model.encoder) is TimeMajorHyperEmbedding and type(model.i2h) is DropConnectHyperLinear
    assert model.decoder.weight is model.encoder.weight   # still tied
    torch.testing.assert_close(model(tokens, h), before, rtol=1e-12, atol=1e-12)


def test_converted_lstm_layer_applies_dropconnect_shared_by_both_weights():
    layer = stn_kernels.convert(OfficialLstmHyperLinear(40, 50, H))
    assert type(layer) is DropConnectHyperLinear
    x, h = torch.randn(6, 40, dtype=F64), torch.randn(6, H, dtype=F64)
    torch.manual_seed(0)
    layer.train()
    layer.mask_weights(0.25)
    mask = layer.weight_mask
    assert set(mask.unique().tolist()) == {0.0, 1.0 / 0.75}
    assert abs((mask == 0).double().mean().item() - 0.25) < 5 * (0.25 * 0.75 / mask.numel()) ** 0.5
    n = 50
    v, c = layer.hparam_weight[:n], layer.hparam_weight[n:]
    expected = (x @ (layer.weight * mask).T + layer.bias + (h @ v.T) * (x @ (layer.hyper_weight * mask).T)
                + (h @ c.T) * layer.hyper_bias)
    torch.testing.assert_close(layer(x, h), expected, rtol=1e-12, atol=1e-12)
    layer.eval()
    layer.mask_weights(0.25)  # no DropConnect at evaluation, as in the published code
    assert layer.weight_mask is None


def test_plain_linear_and_conv_convert_with_a_zero_hyper_path():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    x = torch.randn(2, 2, 6, 6)
    before = model(x)
    weight = model[2].weight
    stn_kernels.convert(model, num_hparams=3)
    assert type(model[0]) is HyperConv2d and type(model[2]) is HyperLinear and model[2].weight is weight
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)   # Sequential calls forward(x): elementary path
    h = torch.randn(2, 3)
    out = model[2](model[1](model[0](x, h)), h)
    torch.testing.assert_close(out, before, rtol=1e-6, atol=1e-6)    # λ·0 adds nothing
    out.sum().backward()
    assert model[2].hparam_weight.grad.abs().sum() > 0                 # but the hyper path can learn


def test_exclude_shared_and_top_level_modules():
    shared = OfficialHyperLinear(4, 4, H)
    model = nn.ModuleDict({"a": shared, "b": shared, "keep": OfficialHyperLinear(4, 4, H), "plain": nn.Linear(4, 4)})
    stn_kernels.convert(model, num_hparams=H, exclude=["keep"])
    assert model["a"] is model["b"] and type(model["a"]) is HyperLinear
    assert type(model["keep"]) is OfficialHyperLinear and type(model["plain"]) is HyperLinear
    layer = OfficialHyperConv2d(2, 3, 3, padding=1, num_hparams=H)
    assert type(stn_kernels.convert(layer)) is HyperConv2d


def test_already_converted_models_are_left_alone():
    model = nn.Sequential(HyperLinear(3, 4, num_hparams=H), HyperEmbedding(5, 3, num_hparams=H))
    layers = list(model)
    stn_kernels.convert(model, num_hparams=H)
    assert list(model) == layers


def test_recognition():
    assert published_layer_kind(OfficialHyperLinear(2, 3, H)) == "stn"
    assert published_layer_kind(OfficialLstmHyperLinear(2, 3, H)) == "stn_lstm"
    assert published_layer_kind(OfficialHyperEmbedding(4, 3, H)) == "stn_embedding"
    assert published_layer_kind(DeltaStnConv2d(2, 2, 3, H)) == "delta_stn"
    assert published_layer_kind(nn.Linear(2, 3)) is None


def test_bad_input_is_rejected():
    broken = OfficialHyperLinear(2, 3, H)
    del broken.htensor_to_scalars
    with pytest.raises(ValueError, match=r"published stn layer .*lacks \['htensor_to_scalars.weight'\]"):
        stn_kernels.convert(nn.Sequential(broken))
    with pytest.raises(ValueError, match=r"num_hparams: expected 5 to match the published layer 0, which takes 2"):
        stn_kernels.convert(nn.Sequential(OfficialHyperLinear(2, 3, H)), num_hparams=5)
    with pytest.raises(ValueError, match=r"exclude: expected names of modules in the model, got unknown \['nope'\]"):
        stn_kernels.convert(nn.Sequential(nn.Linear(2, 2)), exclude=["nope"])
    with pytest.raises(TypeError, match="model: expected an nn.Module, got dict"):
        stn_kernels.convert({})
    with pytest.raises(ValueError, match="num_hparams: expected an int >= 1 or None, got 0"):
        stn_kernels.convert(nn.Linear(2, 2), num_hparams=0)


# --------------------------------------------------------------------------- the official HyperLSTMCell

D64 = torch.float64


def _published_run(model, x, hidden, lam):
    """Output, final states and the gradients of a fixed function of them: w.r.t. x, λ and each parameter
    (keyed by the Parameter object's id, which conversion keeps)."""
    x, lam = leaves(x, lam)
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
    assert all(type(cell) is stn_kernels.HyperLSTMCell for cell in model.rnns)
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
        h2h = lstm_linear_params(cell.h2h)
        h2h["W"], h2h["Wh"] = h2h["W"] * mask, h2h["Wh"] * mask
        zeros = torch.zeros(B, N, dtype=D64)
        feed, _, _ = naive_cell_sequence(feed, lam, lstm_linear_params(cell.i2h), h2h, zeros, zeros)
    assert_close_rel(out, feed, D64, "output with DropConnect")
    model.eval()  # the training masks are still set on h2h, and must not apply now
    out_eval, _ = model.rnns[0](x, hidden[0], lam)
    zeros = torch.zeros(B, N, dtype=D64)
    cell = model.rnns[0]
    want_eval, _, _ = naive_cell_sequence(x, lam, lstm_linear_params(cell.i2h), lstm_linear_params(cell.h2h), zeros,
                                          zeros)
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


# --------------------------------------------------------------------------- the official non-STN baseline


@pytest.mark.parametrize("num_hparams", [None, 2])
def test_official_baseline_rnn_model_converts_with_its_dropconnect_layers_left_alone(num_hparams):
    """lstm/model_basic.py's RNNModel: its DropconnectLinear (elem_weight_raw, elem_bias, no hyper path) is not an
    STN layer and is left alone; with num_hparams only the plain nn.Linear decoder becomes a HyperLinear (still
    tied to the encoder). Same seed, same training-mode output and gradients, same RNG state after."""
    torch.manual_seed(0)
    model = BaselineRNNModel(13, 4, 5, 2)
    tokens = torch.randint(0, 13, (6, 3))
    params = list(model.parameters())

    def run():
        torch.manual_seed(7)
        out, hidden = model(tokens, model.init_hidden(3))
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum()
        return out, torch.autograd.grad(loss, params), torch.get_rng_state()

    want_out, want_grads, want_rng = run()
    layers = [cell.h2h for cell in model.rnns] + [cell.i2h for cell in model.rnns]
    assert published_layer_kind(layers[0]) is None
    # The DropconnectLinear layers are left (no hyper form): silently next to a converted decoder (the report lists
    # them), with a warning when nothing at all was converted (without num_hparams the decoder stays too).
    quiet = num_hparams is not None
    with no_warnings() if quiet else pytest.warns(UserWarning, match=r"converted nothing .*rnns.0.i2h \(Dropconnect"):
        assert stn_kernels.convert(model, num_hparams=num_hparams) is model
    assert [cell.h2h for cell in model.rnns] + [cell.i2h for cell in model.rnns] == layers
    assert all(type(layer) is DropconnectLinear for layer in layers)
    assert type(model.decoder) is (nn.Linear if num_hparams is None else HyperLinear)
    assert model.decoder.weight is model.encoder.weight
    assert {id(p) for p in params} <= {id(p) for p in model.parameters()}   # taken over, not copied
    out, grads, rng = run()
    assert torch.equal(out, want_out) and torch.equal(rng, want_rng)
    for got, want in zip(grads, want_grads):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- the embedding's padding_idx = -1


def test_converted_official_embedding_keeps_padding_idx_minus_one():
    """The official HyperEmbedding looks both tables up with padding_idx=-1: row V−1 of each gets no gradient. The
    converted layer keeps that: every gradient equals the published stand-in's in float64, token V−1 included."""
    V, D = 7, 4
    layer = OfficialHyperEmbedding(V, D, H)
    tokens = torch.tensor([[6, 0, 6], [3, 6, 1], [6, 2, 5]])     # token V−1 = 6 occurs
    lam = torch.randn(3, H, dtype=F64)

    def grads(module):
        lam_leaf = lam.clone().requires_grad_()
        out = module(tokens, lam_leaf)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum()
        params = [module.elem_embedding.weight, module.hnet_embedding.weight, module.hnet_tensor_to_scalars.weight] \
            if hasattr(module, "elem_embedding") else [module.weight, module.hyper_weight, module.hparam_weight]
        return out, torch.autograd.grad(loss, [*params, lam_leaf])

    want_out, want = grads(layer)
    assert torch.equal(want[0][V - 1], torch.zeros(D, dtype=F64)) and torch.equal(want[1][V - 1],
                                                                                  torch.zeros(D, dtype=F64))
    converted = stn_kernels.convert(layer)
    assert type(converted) is TimeMajorHyperEmbedding and converted.padding_idx == V - 1
    out, got = grads(converted)
    assert_close_rel(out, want_out, F64, "output")
    for name, g, w in zip(["weight", "hyper_weight", "hparam_weight", "λ"], got, want):
        assert_close_rel(g, w, F64, f"d{name}")
    assert "padding_idx=6" in repr(converted)


@pytest.mark.parametrize("rate_kind", ["tensor", "float"])
def test_converted_official_embedding_dropoute_with_padding_token(rate_kind):
    """Training mode with dropoute and token V−1 (the padding row) in the batch: the published layer applies
    padding_idx=-1 after the row mask, so row V−1 gives no gradient to the tables nor to the tuned rate. The
    converted layer draws the same mask (the RNG state after the call is the same) and every gradient, d(dropoute)
    included, equals the published one in float64."""
    V, D = 7, 4
    layer = OfficialHyperEmbedding(V, D, H)
    tokens = torch.tensor([[6, 0, 6], [3, 6, 1], [6, 2, 5]])     # token V−1 = 6 occurs
    lam = torch.randn(3, H, dtype=F64)

    def run(module):
        rate = torch.tensor(0.3, dtype=F64, requires_grad=True) if rate_kind == "tensor" else 0.3
        lam_leaf = lam.clone().requires_grad_()
        torch.manual_seed(3)   # a mask that keeps row V−1 (checked below: else the test proves nothing)
        out = module(tokens, lam_leaf, dropoute=rate)
        rng = torch.get_rng_state()
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum()
        params = [module.elem_embedding.weight, module.hnet_embedding.weight, module.hnet_tensor_to_scalars.weight] \
            if hasattr(module, "elem_embedding") else [module.weight, module.hyper_weight, module.hparam_weight]
        wanted = [*params, lam_leaf] + ([rate] if rate_kind == "tensor" else [])
        return out, rng, torch.autograd.grad(loss, wanted)

    want_out, want_rng, want = run(layer)
    assert want_out[tokens == V - 1].abs().sum() > 0, "row V−1 was dropped: pick another seed"
    converted = stn_kernels.convert(layer)
    out, rng, got = run(converted)
    assert torch.equal(rng, want_rng)
    assert_close_rel(out, want_out, F64, "output")
    names = ["weight", "hyper_weight", "hparam_weight", "λ", "dropoute"][:len(want)]
    for name, g, w in zip(names, got, want, strict=True):
        assert_close_rel(g, w, F64, f"d{name}")


def test_hyper_embedding_padding_idx_argument():
    layer = HyperEmbedding(5, 3, num_hparams=H, padding_idx=-2, dtype=F64)
    assert layer.padding_idx == 3
    assert torch.equal(layer.weight[3], torch.zeros(3, dtype=F64))           # zeroed as nn.Embedding's row
    assert torch.equal(layer.hyper_weight[3], torch.zeros(3, dtype=F64))
    tokens = torch.tensor([[3, 1], [3, 4]])
    lam = torch.randn(2, H, dtype=F64)
    layer(tokens, lam).sum().backward()
    assert torch.equal(layer.weight.grad[3], torch.zeros(3, dtype=F64))
    assert torch.equal(layer.hyper_weight.grad[3], torch.zeros(3, dtype=F64))
    assert layer.weight.grad[1].abs().sum() > 0 and layer.hyper_weight.grad[4].abs().sum() > 0
    for bad in (5, -6, 1.0, True):
        with pytest.raises(ValueError, match=r"padding_idx: expected None or an int in \[-5, 5\)"):
            HyperEmbedding(5, 3, num_hparams=H, padding_idx=bad)



# --------------------------------------------------------------------------- Delta-STN's parameter lists


def test_delta_stn_parameter_lists_and_their_optimisers_keep_working_after_convert():
    """StnModel's isinstance-based lists keep their 8 / 12 Parameters (the same objects, in order) after convert,
    and the two optimisers, one of them built before convert, train the converted model in lockstep with the
    original: 12 alternating general / response SGD steps in float64, parameters equal to 1e-10 relative."""
    import copy

    torch.manual_seed(3)
    original = DeltaStnSimpleCnn(H)
    model = copy.deepcopy(original)
    general_before = model.get_general_parameters()
    response_optimizer = torch.optim.SGD(model.get_response_parameters(), lr=0.1, momentum=0.9)  # before convert
    assert len(general_before) == 8 and len(model.get_response_parameters()) == 12
    assert stn_kernels.convert(model) is model
    assert all(isinstance(layer, (HyperLinear, HyperConv2d)) for layer in model.get_layers())
    general, response = model.get_general_parameters(), model.get_response_parameters()
    assert len(general) == 8 and len(response) == 12
    assert [id(p) for p in general] == [id(p) for p in general_before]
    assert [id(p) for p in response] == [id(p) for p in response_optimizer.param_groups[0]["params"]]
    assert {id(p) for p in general + response} == {id(p) for p in model.parameters()}
    optimizers = [(torch.optim.SGD(m.get_general_parameters(), lr=0.05, momentum=0.9),
                   torch.optim.SGD(m.get_response_parameters(), lr=0.1, momentum=0.9) if m is original
                   else response_optimizer) for m in (original, model)]
    x, y = torch.randn(5, 1, 8, 8, dtype=F64), torch.randint(0, 3, (5,))
    for step in range(12):
        lam = torch.randn(5, H, dtype=F64)
        for m, opts in zip((original, model), optimizers):
            opt = opts[step % 2]
            opt.zero_grad()
            nn.functional.cross_entropy(m(x, lam), y).backward()
            opt.step()
        pairs = zip(original.get_general_parameters() + original.get_response_parameters(), general + response)
        for i, (want, got) in enumerate(pairs):
            assert_close_rel(got, want, F64, f"step {step}: parameter {i}")


@pytest.mark.parametrize("padding, padding_mode", [(1, "reflect"), ("same", "circular"), ("same", "zeros")])
def test_plain_conv_keeps_its_padding_and_padding_mode(padding, padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, (2, 3), padding=padding, padding_mode=padding_mode, dtype=torch.float64)
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64)
    expected = conv(x)
    model = stn_kernels.convert(nn.Sequential(conv), num_hparams=1)
    layer = model[0]
    assert isinstance(layer, stn_kernels.HyperConv2d)
    assert (layer.padding, layer.padding_mode) == (conv.padding, conv.padding_mode)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- elem_scalar kept, mask_weights draws


@pytest.mark.parametrize("layer_type", ["linear", "conv"])
def test_converted_official_layer_trains_elem_scalar_with_exact_gradients(layer_type):
    """The official elem_scalar a stays the same Parameter: out = a·(W x + b) + s⊙(W_h x) + t⊙b_h, every gradient
    (d/da and dλ included) equal to the naive formula's on the published stand-in's tensors in float64;
    fold_elem_scalar() then gives new Parameters a·W, a·b with the same output and leaves the shared ones alone."""
    torch.manual_seed(0)
    if layer_type == "linear":
        published, x = OfficialHyperLinear(5, 3, H, elem_scalar=0.7), torch.randn(4, 5, dtype=F64)
    else:
        published, x = OfficialHyperConv2d(2, 3, 3, 1, H, stride=2, elem_scalar=0.7), torch.randn(4, 2, 7, 5,
                                                                                                     dtype=F64)
    names = ["elem_weight", "hnet_weight", "elem_bias", "hnet_bias", "elem_scalar"]
    tensors = [getattr(published, n) for n in names] + [published.htensor_to_scalars.weight]
    lam = torch.randn(4, H, dtype=F64, requires_grad=True)
    layer = stn_kernels.convert(published)
    taken = [layer.weight, layer.hyper_weight, layer.bias, layer.hyper_bias, layer.elem_scalar, layer.hparam_weight]
    assert all(a is b for a, b in zip(taken, tensors, strict=True))  # the same Parameters, elem_scalar included
    assert "elem_scalar=True" in repr(layer)

    def naive(W, Wh, b, bh, a, M):
        s = lam @ M.T
        n = W.shape[0]
        if layer_type == "linear":
            return a * (x @ W.T + b) + s[:, :n] * (x @ Wh.T) + s[:, n:] * bh
        conv = nn.functional.conv2d
        return (a * conv(x, W, b, 2, 1) + s[:, :n, None, None] * conv(x, Wh, None, 2, 1)
                + (s[:, n:] * bh)[:, :, None, None])

    weights = torch.linspace(-1, 1, naive(*tensors).numel(), dtype=F64)
    want = naive(*tensors)
    want_grads = torch.autograd.grad((want.flatten() * weights).sum(), [*tensors, lam])
    got = layer(x, lam)
    got_grads = torch.autograd.grad((got.flatten() * weights).sum(), [*tensors, lam])
    assert_close_rel(got, want, F64, "output")
    for name, g, w in zip(names + ["hparam_weight", "lam"], got_grads, want_grads):
        assert_close_rel(g, w, F64, f"d{name}")
    state = layer.state_dict()
    assert "elem_scalar" in state
    folded = stn_kernels.convert(type(published)(*([5, 3, H] if layer_type == "linear" else [2, 3, 3, 1, H]),
                                                 **({} if layer_type == "linear" else {"stride": 2})))
    folded.load_state_dict(state)  # an elem_scalar layer loads a as it is
    assert torch.equal(folded.elem_scalar, layer.elem_scalar) and torch.equal(folded.weight, layer.weight)
    plain = type(layer)(*([5, 3] if layer_type == "linear" else [2, 3, 3]), num_hparams=H, dtype=F64,
                        **({} if layer_type == "linear" else {"stride": 2, "padding": 1}))
    plain.load_state_dict(state)  # a layer without one: a folded into weight and bias
    assert_close_rel(plain(x, lam), want, F64, "loaded with elem_scalar folded in")
    assert layer.fold_elem_scalar() is layer and layer.elem_scalar is None
    assert layer.weight is not tensors[0] and layer.bias is not tensors[2] and torch.equal(published.elem_weight,
                                                                                           tensors[0])
    assert_close_rel(layer(x, lam), want, F64, "after fold_elem_scalar")


@pytest.mark.parametrize("wdrop", [0.0, 0.3, "tensor"])
def test_converted_lstm_linear_draws_the_published_masks(wdrop):
    """mask_weights(p) in training mode draws as the official layer (also for p = 0, and with a 0-dim tensor rate
    as the tuned model passes it): after the same seed, the same mask and the same RNG state; in eval mode neither
    draws."""
    rate = torch.tensor(0.3, dtype=F64) if wdrop == "tensor" else wdrop
    published = OfficialLstmHyperLinear(6, 8, H)
    layer = stn_kernels.convert(OfficialLstmHyperLinear(6, 8, H))
    for training in (True, False):
        published.train(training)
        layer.train(training)
        torch.manual_seed(5)
        published.mask_weights(rate)
        want_rng = torch.get_rng_state()
        torch.manual_seed(5)
        layer.mask_weights(rate)
        assert torch.equal(torch.get_rng_state(), want_rng)
        mask = torch.ones(8, 6, dtype=F64) if layer.weight_mask is None else layer.weight_mask
        assert torch.equal(published.elem_weight, published.elem_weight_raw * mask)
        if not training or wdrop == 0.0:
            assert layer.weight_mask is None
    torch.manual_seed(5)
    before = torch.get_rng_state()
    layer.mask_weights(rate)  # eval
    assert torch.equal(torch.get_rng_state(), before)
