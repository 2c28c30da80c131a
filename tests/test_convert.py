"""``stn_kernels.convert``: published-style STN / Delta-STN layers (written here from their documented
formulas and parameter names) are swapped for ours with the outputs unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels import HyperConv2d, HyperEmbedding, HyperLinear
from stn_kernels.convert import DropConnectHyperLinear, TimeMajorHyperEmbedding, published_layer_kind

F64 = torch.float64
H = 2


# --------------------------------------------------------------------------- published-style layers


class OfficialHyperLinear(nn.Module):
    """Official STN (CNN): y = a·(x W_eᵀ + b_e) + s_w ⊙ (x W_hᵀ) + s_b ⊙ b_h, s = λ Mᵀ."""

    def __init__(self, in_features, out_features, num_hparams, bias=True):
        super().__init__()
        self.out_features = out_features
        self.elem_weight = nn.Parameter(torch.randn(out_features, in_features, dtype=F64))
        self.hnet_weight = nn.Parameter(torch.randn(out_features, in_features, dtype=F64))
        self.elem_bias = nn.Parameter(torch.randn(out_features, dtype=F64)) if bias else None
        self.hnet_bias = nn.Parameter(torch.randn(out_features, dtype=F64)) if bias else None
        self.htensor_to_scalars = nn.Linear(num_hparams, 2 * out_features, bias=False, dtype=F64)
        self.elem_scalar = nn.Parameter(torch.tensor([1.7], dtype=F64))  # ≠ 1 so that folding it is tested

    def forward(self, input, htensor):
        out = self.elem_scalar * F.linear(input, self.elem_weight, self.elem_bias)
        if htensor is not None:
            s = self.htensor_to_scalars(htensor)
            out = out + s[:, :self.out_features] * F.linear(input, self.hnet_weight)
            if self.hnet_bias is not None:
                out = out + s[:, self.out_features:] * self.hnet_bias
        return out


class OfficialHyperConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, padding, num_hparams, stride=1):
        super().__init__()
        self.out_channels, self.padding, self.stride = out_channels, padding, stride
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.elem_weight = nn.Parameter(torch.randn(shape, dtype=F64))
        self.hnet_weight = nn.Parameter(torch.randn(shape, dtype=F64))
        self.elem_bias = nn.Parameter(torch.randn(out_channels, dtype=F64))
        self.hnet_bias = nn.Parameter(torch.randn(out_channels, dtype=F64))
        self.htensor_to_scalars = nn.Linear(num_hparams, 2 * out_channels, bias=False, dtype=F64)
        self.elem_scalar = nn.Parameter(torch.tensor([0.6], dtype=F64))

    def forward(self, input, htensor):
        out = self.elem_scalar * F.conv2d(input, self.elem_weight, self.elem_bias, self.stride, self.padding)
        s = self.htensor_to_scalars(htensor)
        hyper = F.conv2d(input, self.hnet_weight, None, self.stride, self.padding)
        c = self.out_channels
        return out + s[:, :c, None, None] * hyper + (s[:, c:] * self.hnet_bias)[:, :, None, None]


class DeltaStnLinear(nn.Module):
    def __init__(self, in_features, out_features, num_hyper):
        super().__init__()
        self.out_features = out_features
        self.general_weight = nn.Parameter(torch.randn(out_features, in_features, dtype=F64))
        self.response_weight = nn.Parameter(torch.randn(out_features, in_features, dtype=F64))
        self.general_bias = nn.Parameter(torch.randn(out_features, dtype=F64))
        self.response_bias = nn.Parameter(torch.randn(out_features, dtype=F64))
        self.hyper_bottleneck = nn.Linear(num_hyper, 2 * out_features, bias=False, dtype=F64)  # non-zero here

    def forward(self, inputs, h_net):
        s = self.hyper_bottleneck(h_net)
        n = self.out_features
        return (F.linear(inputs, self.general_weight, self.general_bias)
                + s[:, :n] * F.linear(inputs, self.response_weight) + s[:, n:] * self.response_bias)


class DeltaStnConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, num_hyper, stride=1, padding=0, groups=1, dilation=1):
        super().__init__()
        self.out_channels, self.stride, self.padding, self.groups, self.dilation = (
            out_channels, stride, padding, groups, dilation)
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.general_weight = nn.Parameter(torch.randn(shape, dtype=F64))
        self.response_weight = nn.Parameter(torch.randn(shape, dtype=F64))
        self.register_parameter("general_bias", None)
        self.register_parameter("response_bias", None)
        self.hyper_bottleneck = nn.Linear(num_hyper, 2 * out_channels, bias=False, dtype=F64)

    def forward(self, inputs, h_net):
        conv = dict(stride=self.stride, padding=self.padding, groups=self.groups, dilation=self.dilation)
        s = self.hyper_bottleneck(h_net)[:, :self.out_channels, None, None]
        return F.conv2d(inputs, self.general_weight, **conv) + s * F.conv2d(inputs, self.response_weight, **conv)


class LstmHyperLinear(nn.Module):
    """Official STN LSTM layer: DropConnect mask set by mask_weights() before the forward."""

    def __init__(self, in_features, out_features, num_hparams):
        super().__init__()
        self.out_features = out_features
        self.elem_weight_raw = nn.Parameter(torch.randn(out_features, in_features, dtype=F64))
        self.hnet_weight_raw = nn.Parameter(torch.randn(out_features, in_features, dtype=F64))
        self.elem_bias = nn.Parameter(torch.randn(out_features, dtype=F64))
        self.hnet_bias = nn.Parameter(torch.randn(out_features, dtype=F64))
        self.hnet_tensor_to_scalars = nn.Linear(num_hparams, 2 * out_features, bias=False, dtype=F64)
        self.mask_weights(0.0)

    def mask_weights(self, wdrop):
        self.elem_weight, self.hnet_weight = self.elem_weight_raw * 1.0, self.hnet_weight_raw * 1.0

    def forward(self, input, hnet_tensor):
        s = self.hnet_tensor_to_scalars(hnet_tensor)
        n = self.out_features
        return (F.linear(input, self.elem_weight, self.elem_bias) + s[:, :n] * F.linear(input, self.hnet_weight)
                + s[:, n:] * self.hnet_bias)


class LstmHyperEmbedding(nn.Module):
    """Official STN LSTM embedding: time-major input [T, B], hnet_tensor [B, H]."""

    def __init__(self, num_embeddings, embedding_size, num_hparams):
        super().__init__()
        self.elem_embedding = nn.Embedding(num_embeddings, embedding_size, dtype=F64)
        self.hnet_embedding = nn.Embedding(num_embeddings, embedding_size, dtype=F64)
        self.hnet_tensor_to_scalars = nn.Linear(num_hparams, embedding_size, bias=False, dtype=F64)

    def forward(self, input, hnet_tensor, dropoute=0):
        return self.elem_embedding(input) + self.hnet_tensor_to_scalars(hnet_tensor) * self.hnet_embedding(input)


class PublishedCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = OfficialHyperConv2d(3, 4, 3, padding=1, num_hparams=H, stride=2)
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
        self.encoder = LstmHyperEmbedding(vocab, dim, H)
        self.i2h = LstmHyperLinear(dim, 4 * dim, H)
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

    assert stn_kernels.convert(model) is model
    assert type(model.conv) is HyperConv2d and type(model.delta_conv) is HyperConv2d
    assert type(model.block["fc"]) is HyperLinear and type(model.block["delta_fc"]) is HyperLinear
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
    stn_kernels.convert(model)
    assert type(model.encoder) is TimeMajorHyperEmbedding and type(model.i2h) is DropConnectHyperLinear
    assert model.decoder.weight is model.encoder.weight   # still tied
    torch.testing.assert_close(model(tokens, h), before, rtol=1e-12, atol=1e-12)


def test_converted_lstm_layer_applies_dropconnect_shared_by_both_weights():
    layer = stn_kernels.convert(LstmHyperLinear(40, 50, H))
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
    model = nn.Sequential(HyperLinear(3, 4, H), HyperEmbedding(5, 3, H))
    layers = list(model)
    stn_kernels.convert(model, num_hparams=H)
    assert list(model) == layers


def test_recognition():
    assert published_layer_kind(OfficialHyperLinear(2, 3, H)) == "stn"
    assert published_layer_kind(LstmHyperLinear(2, 3, H)) == "stn_lstm"
    assert published_layer_kind(LstmHyperEmbedding(4, 3, H)) == "stn_embedding"
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
    with pytest.raises(ValueError, match=r"padding_mode='zeros'.*'reflect'"):
        stn_kernels.convert(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")), num_hparams=1)
    with pytest.raises(TypeError, match="model: expected an nn.Module, got dict"):
        stn_kernels.convert({})
    with pytest.raises(ValueError, match="num_hparams: expected an int >= 1 or None, got 0"):
        stn_kernels.convert(nn.Linear(2, 2), num_hparams=0)
