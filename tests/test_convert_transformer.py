"""convert() of nn.MultiheadAttention and of the torch.nn transformers: the same Parameters, the same function at
λ = 0, λ applied in every mode (eval + no_grad included, where PyTorch's fused fast path and nested tensors would
read the weights directly), what is left and why, revert, fold, compile, and a small transformer LM trained as an
STN."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import stn_kernels
from stn_kernels import stn
from stn_kernels.modules import HyperLinear
from stn_kernels.modules_attention import (
    HyperMultiheadAttention,
    HyperTransformerEncoder,
    HyperTransformerEncoderLayer,
)

H = 2
D64 = torch.float64


def _randomize_hyper_paths_(model: nn.Module, seed: int = 0) -> nn.Module:
    """λ-maps (zero after convert) drawn at O(1) scale, so that λ changes the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("hparam_weight"):
                p.copy_(torch.randn(p.shape, dtype=D64, generator=g).to(p.dtype))
    return model


def _grads(out, leaves, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, dtype=out.dtype, generator=g)).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


# ----------------------------------------------------------------------------- nn.MultiheadAttention

MHA_OPTIONS = {
    "packed": {},
    "batch_first": {"batch_first": True, "dropout": 0.2},
    "separate_kdim_vdim": {"kdim": 3, "vdim": 5},
    "no_bias": {"bias": False, "batch_first": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
}


@pytest.mark.parametrize("options", MHA_OPTIONS)
def test_multihead_attention_converts_over_the_same_parameters_and_equals_it_at_lambda_zero(options):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(6, 3, dtype=D64, **MHA_OPTIONS[options]).eval()
    originals = dict(mha.named_parameters())
    converted, report = stn_kernels.convert(mha, num_hparams=H, report=True)
    assert type(converted) is HyperMultiheadAttention and report.converted == [
        ("MultiheadAttention", "MultiheadAttention", "HyperMultiheadAttention")]
    assert not converted.training and converted.context_hparams and converted.dropout == mha.dropout
    ours = dict(converted.named_parameters())
    for name, p in originals.items():
        assert ours[name] is p, name
    assert not ours["in_proj_hparam_weight"].any() and not ours["out_proj.hparam_weight"].any()
    batch_dim = 0 if mha.batch_first else 1
    g = torch.Generator().manual_seed(2)
    query = torch.randn((4, 5, 6) if mha.batch_first else (5, 4, 6), dtype=D64, generator=g).requires_grad_()
    key = torch.randn((4, 7, mha.kdim) if mha.batch_first else (7, 4, mha.kdim), dtype=D64, generator=g)
    value = torch.randn((4, 7, mha.vdim) if mha.batch_first else (7, 4, mha.vdim), dtype=D64, generator=g)
    kpm = torch.zeros(4, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    lam = torch.randn(query.shape[batch_dim], H, dtype=D64, requires_grad=True)
    leaves = [query, *originals.values()]
    for need_weights in (True, False):
        want_out, want_w = mha(query, key, value, key_padding_mask=kpm, need_weights=need_weights)
        with stn_kernels.hparams(lam, batch_dim=1 - batch_dim):  # the block's batch_dim: not the attention's
            got_out, got_w = converted(query, key, value, key_padding_mask=kpm, need_weights=need_weights)
        torch.testing.assert_close(got_out, want_out, rtol=1e-13, atol=1e-13)
        if need_weights:
            torch.testing.assert_close(got_w, want_w, rtol=1e-13, atol=1e-13)
        for got, want in zip(_grads(got_out, leaves), _grads(want_out, leaves)):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    _randomize_hyper_paths_(converted)
    with stn_kernels.hparams(lam):
        out = converted(query, key, value, key_padding_mask=kpm)[0]
    assert not torch.allclose(out, want_out)
    (dlam,) = torch.autograd.grad(out.sum(), lam)
    assert torch.isfinite(dlam).all() and dlam.abs().sum() > 0
    back = stn_kernels.revert(converted)
    assert back is mha and {n: id(p) for n, p in back.named_parameters()} == {n: id(p) for n, p in originals.items()}


class _MyAttention(nn.MultiheadAttention):
    pass


class _MyLinear(nn.Linear):
    pass


def _attention_left():
    """nn.MultiheadAttention that no HyperMultiheadAttention can stand in for, with the reason convert gives."""
    hooked = nn.MultiheadAttention(4, 2)
    hooked.register_forward_hook(lambda module, args, out: out)
    extra = nn.MultiheadAttention(4, 2)
    extra.temperature = nn.Parameter(torch.ones(1))
    other_out = nn.MultiheadAttention(4, 2)
    other_out.out_proj = _MyLinear(4, 4)
    parametrized = nn.MultiheadAttention(4, 2)
    parametrize.register_parametrization(parametrized, "in_proj_weight", nn.Identity())
    out_norm = nn.MultiheadAttention(4, 2)
    torch.nn.utils.parametrizations.weight_norm(out_norm.out_proj)
    one_bias = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    one_bias.bias_v = None
    out_bias = nn.MultiheadAttention(4, 2)
    out_bias.out_proj.bias = None
    mixed = nn.MultiheadAttention(4, 2)
    mixed.out_proj.double()
    return {
        "subclass": (_MyAttention(4, 2), "a subclass of nn.MultiheadAttention, whose forward may differ"),
        "hooked": (hooked, "has forward hooks, which the Hyper layer would not run"),
        "extra": (extra, "has the Parameters ['in_proj_bias', 'in_proj_weight', 'temperature'], not "
                         "nn.MultiheadAttention's ['in_proj_bias', 'in_proj_weight']"),
        "other_out": (other_out, "out_proj is a _MyLinear, not the nn.Linear nn.MultiheadAttention builds"),
        "parametrized": (parametrized, "parametrized ['in_proj_weight'] (torch.nn.utils.parametrize), which the "
                                       "Hyper layer would drop"),
        "out_norm": (out_norm, "out_proj is parametrized ['weight'], which the hyper attention would drop"),
        "one_bias": (one_bias, "has only one of bias_k and bias_v (nn.MultiheadAttention uses them together)"),
        "out_bias": (out_bias, "has one of in_proj_bias and out_proj.bias without the other (bias= sets both)"),
        "mixed": (mixed, "Parameters of several dtypes or devices ['cpu', 'torch.float32', 'torch.float64']"),
    }


def test_attention_it_cannot_reproduce_is_left_whole_reported_and_refused_alone():
    cases = _attention_left()
    model = nn.ModuleDict({name: m for name, (m, _) in cases.items()} | {"fine": nn.MultiheadAttention(4, 2)})
    with pytest.warns(UserWarning, match=r"stn_kernels.convert left 9 module\(s\)"):
        stn_kernels.convert(model, num_hparams=H)
    assert type(model["fine"]) is HyperMultiheadAttention
    for name, (module, _) in cases.items():
        assert model[name] is module and type(module.out_proj) is not HyperLinear, name
    _, report = stn_kernels.convert(nn.ModuleDict({n: m for n, (m, _) in cases.items()}), num_hparams=H,
                                    report=True)
    assert report.left == [(name, type(m).__name__, why) for name, (m, why) in cases.items()]
    for name, (module, why) in cases.items():
        with pytest.raises(ValueError, match=r"model: expected an nn.MultiheadAttention a Hyper layer can stand in"):
            stn_kernels.convert(module, num_hparams=H)
    # Without num_hparams: nothing converted, each left with its reason (or that num_hparams is needed).
    _, report = stn_kernels.convert(nn.ModuleDict({"a": nn.MultiheadAttention(4, 2)}), report=True)
    assert report.left == [("a", "MultiheadAttention", "plain layers are converted only with num_hparams")]


# ----------------------------------------------------------------------------- encoder layers and encoders

def _masks(kind, batch, length):
    kpm = torch.zeros(batch, length, dtype=torch.bool)
    kpm[0, length - 2:] = True   # left-aligned padding: what the nested-tensor path takes
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=D64)
    return {"none": {}, "padding": {"src_key_padding_mask": kpm}, "causal": {"src_mask": causal, "is_causal": True},
            "both": {"src_mask": causal.isinf(), "src_key_padding_mask": kpm}}[kind]


def _encoder_layer(norm_first, batch_first=True):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(8, 2, 12, dropout=0.1, batch_first=batch_first, norm_first=norm_first,
                                      dtype=D64)


@pytest.mark.parametrize("mask", ["none", "padding", "causal", "both"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_converted_encoder_layer_applies_lambda_in_eval_under_no_grad(norm_first, mask):
    layer = _encoder_layer(norm_first)
    x = torch.randn(3, 5, 8, dtype=D64)
    masks = _masks(mask, 3, 5)
    layer.eval()
    with torch.enable_grad():   # torch's own slow path: the reference at λ = 0
        expected = layer(x, **masks).detach()
    converted, report = stn_kernels.convert(layer, num_hparams=H, report=True)
    assert converted is layer and type(layer) is HyperTransformerEncoderLayer
    assert [row[0] for row in report.converted] == ["self_attn", "linear1", "linear2", "TransformerEncoderLayer"]
    with torch.no_grad(), stn_kernels.hparams(torch.full((H,), 3.0, dtype=D64)):
        torch.testing.assert_close(layer(x, **masks), expected, rtol=1e-12, atol=1e-12)
    _randomize_hyper_paths_(layer)
    lams = [torch.zeros(3, H, dtype=D64), torch.randn(3, H, dtype=D64), torch.full((H,), 3.0, dtype=D64)]
    outs = []
    for lam in lams:
        with stn_kernels.hparams(lam):
            with torch.no_grad():
                fast = layer(x, **masks)
            slow = layer(x, **masks)          # with gradients: torch would not take the fast path here either
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
        outs.append(fast)
    torch.testing.assert_close(outs[0], expected, rtol=1e-12, atol=1e-12)   # λ = 0: the hyper path adds nothing
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - outs[2]).abs().max() > 1e-3


@pytest.mark.parametrize("norm_first", [False, True])
def test_converted_encoder_never_takes_the_nested_tensor_path(norm_first):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # enable_nested_tensor with norm_first: torch warns it cannot nest
        encoder = nn.TransformerEncoder(_encoder_layer(norm_first), 2, norm=nn.LayerNorm(8, dtype=D64),
                                        enable_nested_tensor=True)
    x = torch.randn(3, 5, 8, dtype=D64)
    kpm = _masks("padding", 3, 5)["src_key_padding_mask"]
    encoder.eval()
    converted, report = stn_kernels.convert(encoder, num_hparams=H, report=True)
    assert type(converted) is HyperTransformerEncoder and report.converted[-1] == (
        "TransformerEncoder", "TransformerEncoder", "HyperTransformerEncoder")
    assert all(type(layer) is HyperTransformerEncoderLayer for layer in converted.layers)
    _randomize_hyper_paths_(converted)
    outs = []
    for lam in (torch.zeros(3, H, dtype=D64), torch.randn(3, H, dtype=D64)):
        with stn_kernels.hparams(lam):
            with torch.no_grad():
                fast = converted(x, src_key_padding_mask=kpm)
            slow = converted(x, src_key_padding_mask=kpm)
        torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
        outs.append(fast)
    assert (outs[0] - outs[1])[~kpm].abs().max() > 1e-3
    # Causal-mask detection as nn.TransformerEncoder: a causal float mask with is_causal=None is the causal hint.
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=D64)
    with stn_kernels.hparams(torch.randn(3, H, dtype=D64)), torch.no_grad():
        torch.testing.assert_close(converted(x, mask=causal), converted(x, mask=causal, is_causal=True),
                                   rtol=1e-12, atol=1e-12)


def test_a_hand_built_layer_with_hyper_attention_does_not_take_the_fast_path():
    layer = _encoder_layer(False).eval()
    layer.self_attn = _randomize_hyper_paths_(HyperMultiheadAttention(8, 2, batch_first=True, num_hparams=H,
                                                                      dtype=D64))
    layer.self_attn.context_hparams = True
    x = torch.randn(2, 4, 8, dtype=D64)
    with torch.no_grad():
        with stn_kernels.hparams(torch.zeros(H, dtype=D64)):
            zero = layer(x)
        with stn_kernels.hparams(torch.ones(H, dtype=D64)):
            one = layer(x)
    assert (zero - one).abs().max() > 1e-3


def _decoder_layer(norm_first=False):
    torch.manual_seed(1)
    return nn.TransformerDecoderLayer(8, 2, 12, dropout=0.1, batch_first=True, norm_first=norm_first, dtype=D64)


@pytest.mark.parametrize("norm_first", [False, True])
def test_converted_decoder_layer_and_decoder_apply_lambda_in_every_mode(norm_first):
    tgt, memory = torch.randn(3, 4, 8, dtype=D64), torch.randn(3, 6, 8, dtype=D64)
    masks = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(4, dtype=D64), "tgt_is_causal": True,
             "memory_key_padding_mask": torch.tensor([[False] * 6, [False] * 4 + [True] * 2, [False] * 6])}
    for model in (_decoder_layer(norm_first), nn.TransformerDecoder(_decoder_layer(norm_first), 2)):
        model.eval()
        with torch.no_grad():
            expected = model(tgt, memory, **masks)
        converted = stn_kernels.convert(model, num_hparams=H)
        kinds = {type(m) for m in converted.modules()}
        assert HyperMultiheadAttention in kinds and nn.MultiheadAttention not in kinds and nn.Linear not in kinds
        with torch.no_grad(), stn_kernels.hparams(torch.randn(3, H, dtype=D64)):
            torch.testing.assert_close(converted(tgt, memory, **masks), expected, rtol=1e-12, atol=1e-12)
        _randomize_hyper_paths_(converted)
        with torch.no_grad(), stn_kernels.hparams(torch.zeros(3, H, dtype=D64)):
            zero = converted(tgt, memory, **masks)
        with torch.no_grad(), stn_kernels.hparams(torch.randn(3, H, dtype=D64)):
            other = converted(tgt, memory, **masks)
        torch.testing.assert_close(zero, expected, rtol=1e-12, atol=1e-12)
        assert (zero - other).abs().max() > 1e-3


def test_converted_nn_transformer_applies_lambda_in_eval_under_no_grad_and_reverts():
    torch.manual_seed(0)
    model = nn.Transformer(8, 2, 1, 1, 12, dropout=0.1, batch_first=True, dtype=D64).eval()
    src, tgt = torch.randn(2, 5, 8, dtype=D64), torch.randn(2, 3, 8, dtype=D64)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    kwargs = {"src_key_padding_mask": kpm, "memory_key_padding_mask": kpm,
              "tgt_mask": nn.Transformer.generate_square_subsequent_mask(3, dtype=D64)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")          # nested tensors are a prototype, torch says
        fast_plain = model(src, tgt, **kwargs)   # torch's nested-tensor path in the encoder
    with torch.enable_grad():
        slow_plain = model(src, tgt, **kwargs).detach()
    params = dict(model.named_parameters())
    stn_kernels.convert(model, num_hparams=H)
    assert type(model.encoder) is HyperTransformerEncoder and type(model.decoder) is nn.TransformerDecoder
    with torch.no_grad(), stn_kernels.hparams(torch.randn(2, H, dtype=D64)):
        # padded source positions: computed values (as torch's slow path), not the nested path's zeros
        torch.testing.assert_close(model(src, tgt, **kwargs), slow_plain, rtol=1e-12, atol=1e-12)
    _randomize_hyper_paths_(model)
    with torch.no_grad():
        with stn_kernels.hparams(torch.zeros(2, H, dtype=D64)):
            zero = model(src, tgt, **kwargs)
        with stn_kernels.hparams(torch.randn(2, H, dtype=D64)):
            other = model(src, tgt, **kwargs)
    assert (zero - other).abs().max() > 1e-3
    stn_kernels.revert(model)
    fresh = nn.Transformer(8, 2, 1, 1, 12, batch_first=True)
    assert {type(m) for m in model.modules()} == {type(m) for m in fresh.modules()}
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(model(src, tgt, **kwargs), fast_plain, rtol=0, atol=0)


class _MyEncoderLayer(nn.TransformerEncoderLayer):
    pass


class _MyEncoder(nn.TransformerEncoder):
    pass


def test_subclasses_of_the_fast_path_containers_are_left_whole_and_reported():
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "mine": _MyEncoderLayer(8, 2, 12, batch_first=True),
        "encoder": _MyEncoder(nn.TransformerEncoderLayer(8, 2, 12, batch_first=True), 1,
                              enable_nested_tensor=False),
        "plain": nn.TransformerEncoderLayer(8, 2, 12, batch_first=True),
    })
    _, report = stn_kernels.convert(model, num_hparams=H, report=True)
    why = ("a subclass of nn.{}, whose forward may take PyTorch's fused fast path, which reads the weights "
           "directly and would ignore λ: left whole")
    assert ("mine", "_MyEncoderLayer", why.format("TransformerEncoderLayer")) in report.left
    assert ("encoder", "_MyEncoder", why.format("TransformerEncoder")) in report.left
    assert type(model["mine"].self_attn) is nn.MultiheadAttention and type(model["mine"].linear1) is nn.Linear
    assert type(model["encoder"].layers[0]) is nn.TransformerEncoderLayer
    assert type(model["plain"]) is HyperTransformerEncoderLayer
    with pytest.warns(UserWarning, match=r"0 \(_MyEncoderLayer: a subclass of nn.TransformerEncoderLayer"):
        stn_kernels.convert(nn.Sequential(_MyEncoderLayer(8, 2, 12), nn.Linear(8, 2)), num_hparams=H)


def test_exclusions_and_no_num_hparams_leave_the_fast_path_where_nothing_is_converted():
    layer = _encoder_layer(False)
    stn_kernels.convert(layer, num_hparams=H, exclude="self_attn")
    assert type(layer) is HyperTransformerEncoderLayer and type(layer.self_attn) is nn.MultiheadAttention
    assert type(layer.linear1) is HyperLinear
    _, again = stn_kernels.convert(layer, num_hparams=H, exclude="self_attn", report=True)   # again: nothing new
    assert not again.converted and type(layer) is HyperTransformerEncoderLayer
    layer = _encoder_layer(False)
    _, report = stn_kernels.convert(nn.Sequential(layer), num_hparams=H, exclude=nn.TransformerEncoderLayer,
                                    report=True)
    assert type(layer) is nn.TransformerEncoderLayer and not report.converted
    _, report = stn_kernels.convert(layer, report=True)
    assert type(layer) is nn.TransformerEncoderLayer and not report.converted
    assert ("self_attn", "MultiheadAttention", "plain layers are converted only with num_hparams") in report.left


# ----------------------------------------------------------------------------- fold, compile, dropout, training

@pytest.fixture
def linear_fold(monkeypatch):
    """HyperLinear.fold where this branch has none yet (another part of issue 19 adds it): the same formula."""
    if not callable(getattr(HyperLinear, "fold", None)):
        def fold(self, hparams, rates=None):
            V, C = self.hparam_weight.detach().chunk(2)
            plain = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta",
                              dtype=self.weight.dtype)
            plain.weight = nn.Parameter(self.weight.detach() + (V @ hparams)[:, None] * self.hyper_weight.detach())
            if self.bias is not None:
                plain.bias = nn.Parameter(self.bias.detach() + (C @ hparams) * self.hyper_bias.detach())
            return plain.train(self.training)

        monkeypatch.setattr(HyperLinear, "fold", fold, raising=False)


@pytest.mark.parametrize("norm_first", [False, True])
def test_fold_of_converted_encoder_gives_the_plain_encoder_at_lambda(norm_first, linear_fold):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = nn.TransformerEncoder(_encoder_layer(norm_first), 2, norm=nn.LayerNorm(8, dtype=D64))
    converted = _randomize_hyper_paths_(stn_kernels.convert(encoder, num_hparams=H)).eval()
    lam = torch.randn(H, dtype=D64)
    plain = converted.fold(lam)
    assert type(plain) is nn.TransformerEncoder and plain is not converted
    assert all(type(m).__module__.startswith("torch.") for m in plain.modules())
    assert type(converted) is HyperTransformerEncoder and plain.norm is converted.norm   # untouched, shared
    x = torch.randn(3, 5, 8, dtype=D64)
    kpm = _masks("padding", 3, 5)["src_key_padding_mask"]
    with torch.no_grad(), stn_kernels.hparams(lam):
        want = converted(x, src_key_padding_mask=kpm)
        torch.testing.assert_close(plain(x), converted(x), rtol=1e-12, atol=1e-12)
        got = plain(x, src_key_padding_mask=kpm)   # the plain encoder's own (nested) fast path where it takes it
    torch.testing.assert_close(got[~kpm], want[~kpm], rtol=1e-12, atol=1e-12)
    layer = converted.layers[0].fold(lam)
    assert type(layer) is nn.TransformerEncoderLayer and type(layer.self_attn) is nn.MultiheadAttention


def test_fold_refuses_a_hyper_layer_it_cannot_fold(monkeypatch):
    layer = stn_kernels.convert(_encoder_layer(False), num_hparams=H)
    monkeypatch.setattr(HyperLinear, "fold", None, raising=False)
    with pytest.raises(TypeError, match=r"fold: HyperTransformerEncoderLayer.linear1 \(HyperLinear\) holds hyper "
                                        r"weights and has no fold"):
        layer.fold(torch.zeros(H, dtype=D64))


def test_compiled_converted_encoder_layer_inside_an_hparams_block_matches_eager():
    layer = _randomize_hyper_paths_(stn_kernels.convert(_encoder_layer(True), num_hparams=H)).eval()
    x = torch.randn(2, 5, 8, dtype=D64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=D64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    lam = torch.randn(2, H, dtype=D64, requires_grad=True)
    results = []
    for run in (layer, compiled):
        with stn_kernels.hparams(lam):
            out = run(x, src_mask=causal, is_causal=True)
        results.append((out, torch.autograd.grad(out.square().sum(), lam)[0]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)
    with torch.no_grad(), stn_kernels.hparams(lam.detach()):
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-12, atol=1e-12)


def test_per_example_attention_dropout_in_a_converted_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True, dtype=D64)
    layer = _randomize_hyper_paths_(stn_kernels.convert(layer, num_hparams=H))
    layer.self_attn.dropout_hparam = "attention_dropout"
    x, lam = torch.randn(3, 5, 8, dtype=D64), torch.randn(3, H, dtype=D64)
    with stn_kernels.hparams(lam):
        clean = layer(x)
    with stn_kernels.hparams(lam, rates={"attention_dropout": torch.tensor([0.0, 0.8, 0.0], dtype=D64)}):
        dropped = layer(x)
    # rate 0 keeps examples 0 and 2 (through the explicit softmax instead of SDPA: rounding only)
    torch.testing.assert_close(dropped[[0, 2]], clean[[0, 2]], rtol=1e-12, atol=1e-12)
    assert (dropped[1] - clean[1]).abs().max() > 1e-3
    layer.eval()
    with stn_kernels.hparams(lam, rates={"attention_dropout": torch.tensor([0.0, 0.8, 0.0], dtype=D64)}):
        torch.testing.assert_close(layer(x), clean, rtol=1e-12, atol=1e-12)


class _TinyLM(nn.Module):
    """Embedding -> TransformerEncoder (causal mask) -> Linear, plain torch.nn."""

    def __init__(self, vocab=13, width=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder = nn.Linear(width, vocab)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.decoder(self.encoder(self.embed(tokens), mask=mask, is_causal=True))


def test_a_converted_transformer_language_model_trains_as_an_stn():
    torch.manual_seed(0)
    hp = stn.HyperparameterSet([stn.Hyperparameter("attention_dropout", init=0.2, low=0.0, high=0.9),
                                stn.Hyperparameter("extra", init=0.5, low=0.0, high=1.0)])
    model, report = stn_kernels.convert(_TinyLM(), num_hparams=len(hp), report=True,
                                        rates={"attention_dropout": nn.MultiheadAttention})
    assert {kind for _, _, kind in report.converted} == {"HyperEmbedding", "HyperMultiheadAttention", "HyperLinear",
                                                         "HyperTransformerEncoderLayer", "HyperTransformerEncoder"}
    assert all(layer.self_attn.dropout_hparam == "attention_dropout" for layer in model.encoder.layers)

    def criterion(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    # The module itself: called as model(tokens) inside the hparams block with the sample's λ and rates.
    trainer = stn.STNTrainer(model, criterion, hp, torch.optim.Adam(model.parameters(), 1e-2),
                             hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.05), train_steps=2,
                             valid_steps=1, warmup_steps=2)
    g = torch.Generator().manual_seed(1)

    def batch():
        tokens = torch.randint(0, 13, (6, 7), generator=g)
        return tokens, (tokens + 1) % 13   # next token: a pattern to learn

    start = hp.unconstrained.detach().clone()
    scales = model.encoder.layers[0].self_attn.in_proj_hparam_weight
    losses = [result.loss for _ in range(4) for result in trainer.step(batch, batch)]
    grad = hp.unconstrained.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not torch.equal(hp.unconstrained.detach(), start) and scales.abs().sum() > 0
    assert len(losses) == 4 * (2 + 1) and all(math.isfinite(loss) for loss in losses)
