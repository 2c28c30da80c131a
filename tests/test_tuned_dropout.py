"""TunedDropout (and its channel forms): nn.Dropout unless the enclosing ``stn_kernels.hparams`` block has a rate of its
name, then dropout at each example's rate (along the stated batch dim, also time-major); ``convert(..., rates=...)``
makes them of a model's dropouts (or refuses, naming ``rates``, before changing anything); revert and fold give the
plain dropouts back."""

import pytest
import torch
from torch import nn

import stn_kernels
from stn_kernels import TunedDropout, TunedDropout1d, TunedDropout2d, TunedDropout3d

H = 2
D64 = torch.float64
RATES = torch.tensor([0.0, 0.5, 0.5, 0.9], dtype=D64)


def _kept_scale(x, y):
    """y / x where y is kept, 0 where dropped (x has no zeros)."""
    return torch.where(y != 0, y / x, torch.zeros_like(y))


def _positive(shape, seed=0):
    return torch.rand(shape, dtype=D64, generator=torch.Generator().manual_seed(seed)) + 0.5


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("tuned, plain, shape", [
    (TunedDropout, nn.Dropout, (4, 3, 5)), (TunedDropout1d, nn.Dropout1d, (4, 3, 5)),
    (TunedDropout2d, nn.Dropout2d, (4, 3, 2, 2)), (TunedDropout3d, nn.Dropout3d, (4, 3, 2, 2, 2))])
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "inplace"])
def test_without_a_rate_of_its_name_it_is_the_torch_dropout_with_the_same_draws(tuned, plain, shape, inplace):
    x = _positive(shape)
    drop, ref = tuned(0.4, inplace, hparam="dropout"), plain(0.4, inplace)
    assert isinstance(drop, plain)
    for block in (None, {"other": 0.9}):  # no block; a block without this rate
        torch.manual_seed(3)
        want = ref(x.clone())
        torch.manual_seed(3)
        if block is None:
            got = drop(x.clone())
        else:
            with stn_kernels.hparams(torch.zeros(4, H), rates=block):
                got = drop(x.clone())
        assert torch.equal(got, want)
        assert (want == 0).any()  # it did drop


def test_eval_mode_returns_the_input_even_with_rates():
    drop = TunedDropout(0.4, hparam="dropout").eval()
    x = _positive((4, 6))
    with stn_kernels.hparams(torch.zeros(4, H), rates={"dropout": RATES}):
        assert drop(x) is x
    assert drop(x) is x


def test_per_example_rates_drop_each_example_at_its_rate_with_inverted_scaling():
    drop = TunedDropout(0.1, hparam="dropout")
    x = _positive((4, 2000), seed=1).requires_grad_()
    torch.manual_seed(0)
    with stn_kernels.hparams(torch.zeros(4, H), rates={"dropout": RATES}):
        y = drop(x)
    assert torch.equal(y[0], x[0])  # rate 0: unchanged
    scale = _kept_scale(x.detach(), y.detach())
    for b, rate in enumerate(RATES.tolist()):
        kept = scale[b] != 0
        torch.testing.assert_close(scale[b][kept], torch.full_like(scale[b][kept], 1 / (1 - rate)))
        # dropped fraction ≈ rate: 2000 draws, standard deviation ≤ 0.0112; 5 of them
        assert abs((~kept).double().mean().item() - rate) < 0.056, (b, rate)
    assert not torch.equal(y[1] == 0, y[2] == 0)  # one mask per example, not one shared
    (grad,) = torch.autograd.grad(y.sum(), x)  # the gradient is the same mask, scaled
    torch.testing.assert_close(grad, scale)


@pytest.mark.parametrize("layer_dim, block_dim", [(1, None), (0, 1)], ids=["layer-time-major", "block-states-1"])
@pytest.mark.parametrize("steps", [600, 4], ids=["T!=B", "T==B"])
def test_time_major_input_takes_the_rates_along_dim_1(layer_dim, block_dim, steps):
    drop = TunedDropout(0.1, hparam="dropout")
    drop.hparams_batch_dim = layer_dim
    x = _positive((steps, 4, 50), seed=2)
    torch.manual_seed(1)
    with stn_kernels.hparams(torch.zeros(4, H), batch_dim=block_dim, rates={"dropout": RATES}):
        y = drop(x)
    assert torch.equal(y[:, 0], x[:, 0])  # column 0 has rate 0
    scale = _kept_scale(x, y)
    for b, rate in enumerate(RATES.tolist()):  # every kept unit of column b scaled by 1/(1 − rate_b)
        kept = scale[:, b] != 0
        torch.testing.assert_close(scale[:, b][kept], torch.full_like(scale[:, b][kept], 1 / (1 - rate)))
    assert (y[:, 3] == 0).double().mean() > 0.8
    with stn_kernels.hparams(torch.zeros(4, H), batch_dim=block_dim, rates={"dropout": RATES}):
        flat = drop(x[0])  # [B, N]: no sequence dim, the examples along dim 0
    assert torch.equal(flat[0], x[0, 0])


def test_a_float_rate_is_every_examples_and_inplace_writes_the_input():
    drop = TunedDropout(0.1, inplace=True, hparam="dropout")
    x = _positive((3, 400)) * 1  # not a leaf: in-place is allowed under autograd
    torch.manual_seed(0)
    with stn_kernels.hparams(torch.zeros(H), rates={"dropout": 0.75}):
        y = drop(x)
    assert y is x
    scale = _kept_scale(_positive((3, 400)), y)
    torch.testing.assert_close(scale[scale != 0], torch.full_like(scale[scale != 0], 4.0))
    assert abs((scale == 0).double().mean().item() - 0.75) < 0.06


def test_channel_dropout_drops_whole_channels_per_example():
    drop = TunedDropout2d(0.1, hparam="drop2d")
    x = _positive((4, 300, 2, 3))
    torch.manual_seed(0)
    with stn_kernels.hparams(torch.zeros(4, H), rates={"drop2d": RATES}):
        y = drop(x)
    assert torch.equal(y[0], x[0])
    scale = _kept_scale(x, y)
    for b, rate in enumerate(RATES.tolist()):
        dropped = (y[b] == 0).flatten(1)
        assert (dropped == dropped[:, :1]).all()  # a channel is kept or dropped whole
        kept = scale[b][~dropped.reshape(y[b].shape)]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - rate)))
    with stn_kernels.hparams(torch.zeros(4, H), rates={"drop2d": RATES}), \
            pytest.raises(ValueError, match=r"input: expected a batched input of 4 dims \[N, C, \.\.\.\] for "
                                            r"TunedDropout2d's per-example rates \(rates\['drop2d'\]\), got shape"):
        drop(x[:, :, 0])


@pytest.mark.parametrize("rates, error, words", [
    ({"dropout": torch.full((3,), 0.5)}, ValueError,  # (λ [H] shared: the block takes rates of any batch)
     ["rates['dropout']", "expected 4 rows", "along dim 1", "(6, 4, 5)", "got shape (3,)"]),
    ({"dropout": torch.full((4, 1), 0.5)}, ValueError, ["rates['dropout']", "(4, 1)"]),
    ({"dropout": 1.0}, ValueError, ["rates['dropout']", "[0, 1)", "1.0"]),
    ({"dropout": torch.tensor([0.1, 0.2, 1.5, 0.0])}, ValueError, ["rates", "[0, 1)", "1.5"]),
    ({"dropout": torch.ones(4, dtype=torch.int64)}, TypeError, ["rates['dropout']", "floating-point"]),
])
def test_bad_rates_raise_naming_them(rates, error, words):
    drop = TunedDropout(0.1, hparam="dropout")
    drop.hparams_batch_dim = 1
    x = _positive((6, 4, 5))
    with pytest.raises(error) as info:
        with stn_kernels.hparams(torch.zeros(H), rates=rates):
            drop(x)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_constructor_and_fold():
    with pytest.raises(TypeError, match="hparam: expected the hyperparameter's name"):
        TunedDropout(0.2, hparam="")
    with pytest.raises(TypeError, match="hparam"):
        TunedDropout(0.2)
    with pytest.raises(ValueError, match="dropout probability"):  # nn.Dropout's own check
        TunedDropout(1.5, hparam="dropout")
    drop = TunedDropout(0.2, True, hparam="dropout").eval()
    assert repr(drop) == "TunedDropout(p=0.2, inplace=True, hparam='dropout')"
    folded = drop.fold(torch.zeros(H), {"dropout": torch.tensor(0.25)})
    assert type(folded) is nn.Dropout and folded.p == 0.25 and folded.inplace and not folded.training
    assert drop.fold(torch.zeros(H)).p == 0.2 and drop.fold(None, {"other": 0.5}).p == 0.2
    assert type(TunedDropout2d(0.3, hparam="d").fold(None, {"d": 0.5})) is nn.Dropout2d
    with pytest.raises(ValueError, match=r"rates\['dropout'\]: expected one rate .* got shape \(4,\)"):
        drop.fold(None, {"dropout": RATES})
    with pytest.raises(ValueError, match=r"rates\['dropout'\]: expected a rate in \[0, 1\), got 1.0"):
        drop.fold(None, {"dropout": 1.0})
    with pytest.raises(TypeError, match="rates: expected a mapping"):
        drop.fold(None, [0.5])


# --------------------------------------------------------------------------- convert(..., rates=...)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.embed_drop = nn.Dropout(0.1)
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.2), nn.Linear(4, 4), nn.Dropout(0.3))
        self.maps = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Dropout2d(0.25))

    def forward(self, tokens):
        h = self.body(self.embed_drop(self.embed(tokens)))
        return h + self.maps(h[:, None, :, None]).mean(1)[..., 0]


def test_convert_tunes_the_matched_dropouts_and_revert_puts_them_back():
    model = Net()
    originals = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))}
    model, report = stn_kernels.convert(model, num_hparams=H, report=True, rates={
        "dropout": nn.Dropout, "emb_dropout": ["embed_drop"], "map_dropout": "maps.1"})
    kinds = {name: (type(m).__name__, m.hparam, m.p) for name, m in model.named_modules() if hasattr(m, "hparam")}
    assert kinds == {"embed_drop": ("TunedDropout", "emb_dropout", 0.1), "body.2": ("TunedDropout", "dropout", 0.2),
                     "body.4": ("TunedDropout", "dropout", 0.3), "maps.1": ("TunedDropout2d", "map_dropout", 0.25)}
    assert sorted(report.tuned) == [("body.2", "Dropout", "dropout"), ("body.4", "Dropout", "dropout"),
                                    ("embed_drop", "Dropout", "emb_dropout"), ("maps.1", "Dropout2d", "map_dropout")]
    assert ("maps.1", "Dropout2d", "TunedDropout2d") in report.converted
    assert "embed_drop: Dropout by the rate 'emb_dropout'" in str(report)
    tokens = torch.randint(0, 11, (3,))
    with stn_kernels.hparams(torch.zeros(3, H), rates={"dropout": torch.tensor([0.0, 0.5, 0.9]),
                                                       "emb_dropout": 0.5, "map_dropout": 0.0}):
        assert model(tokens).shape == (3, 4)
    back = stn_kernels.revert(model)
    assert {name: m for name, m in back.named_modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))} == originals
    assert all(type(m) in (nn.Dropout, nn.Dropout2d) for m in originals.values())


def test_a_shared_dropout_is_tuned_once_everywhere_and_the_layout_reaches_it():
    drop = nn.Dropout(0.3)
    model = nn.ModuleDict({"a": drop, "b": nn.Sequential(drop), "lstm": nn.LSTM(2, 2)})
    model = stn_kernels.convert(model, rates={"dropout": "a"})
    assert model["a"] is model["b"][0] and isinstance(model["a"], TunedDropout)
    assert model["a"].hparams_batch_dim == 1  # time-major, from the nn.LSTM
    top = stn_kernels.convert(nn.Dropout(0.4), rates={"dropout": nn.Dropout})
    assert type(top) is TunedDropout and top.p == 0.4 and top.hparams_batch_dim == 0


def test_a_converted_layer_with_a_dropout_hparam_gets_the_name():
    class Attention(nn.Module):  # stands in for a converted attention (a dropout_hparam attribute)
        dropout_hparam = None

    model = nn.ModuleDict({"attn": Attention(), "drop": nn.Dropout()})
    model, report = stn_kernels.convert(model, rates={"attn_dropout": Attention, "dropout": "drop"}, report=True)
    assert model["attn"].dropout_hparam == "attn_dropout"
    assert ("attn", "Attention", "attn_dropout") in report.tuned
    # Converting again with the same rates changes nothing; with another name it refuses.
    again, report = stn_kernels.convert(model, rates={"attn_dropout": Attention, "dropout": "drop"}, report=True)
    assert report.tuned == [] and again["drop"] is model["drop"]
    with pytest.raises(ValueError, match=r"rates\['p'\]: module 'drop' \(TunedDropout\) is already tuned by the "
                                         r"rate 'dropout'"):
        stn_kernels.convert(model, rates={"p": "drop"})


def test_multihead_attention_is_tuned_by_rates():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2, dropout=0.1)})
    converted, report = stn_kernels.convert(model, num_hparams=H, rates={"attn_dropout": nn.MultiheadAttention},
                                            report=True)
    assert isinstance(converted["attn"], stn_kernels.HyperMultiheadAttention)
    assert converted["attn"].dropout_hparam == "attn_dropout"
    assert any(name == "attn" for name, *_ in report.tuned)


def test_an_encoder_layer_s_dropouts_and_attention_are_tuned_by_type():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2)
    converted = stn_kernels.convert(layer, num_hparams=H, rates={"dropout": nn.Dropout,
                                                                 "attn_dropout": nn.MultiheadAttention})
    assert converted.self_attn.dropout_hparam == "attn_dropout"
    for name in ("dropout", "dropout1", "dropout2"):
        assert isinstance(getattr(converted, name), stn_kernels.TunedDropout), name
    converted.eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad(), stn_kernels.hparams(torch.zeros(5, H)):
        at_zero = converted(x)
    with torch.no_grad(), stn_kernels.hparams(torch.ones(5, H)):
        converted.self_attn.in_proj_hparam_weight.fill_(0.5)
        at_one = converted(x)
    assert (at_zero - at_one).abs().max() > 1e-3  # the fast path would have ignored λ


def _unchanged(model, before):
    return {name: m for name, m in model.named_modules()} == before


class MyDropout(nn.Dropout):
    pass


def _hooked():
    drop = nn.Dropout()
    drop.register_forward_hook(lambda *args: None)
    return drop


@pytest.mark.parametrize("rates, words", [
    ({"dropout": nn.Linear}, ["rates['dropout']: module 'body.0' (Linear)", "made HyperLinear by convert",
                              "has no tuned form"]),
    ({"dropout": "mine"}, ["rates['dropout']: module 'mine' (MyDropout)", "has no tuned form"]),
    ({"dropout": "hooked"}, ["rates['dropout']: module 'hooked' (Dropout)", "without hooks"]),
    ({"dropout": "nowhere"}, ["rates: expected names of modules in the model, got unknown ['nowhere']"]),
    ({"dropout": "body.2", "other": ["body.2"]}, ["rates: module 'body.2' (Dropout) is matched by more than one",
                                                  "'dropout' by name 'body.2'", "'other' by name 'body.2'"]),
    ({"dropout": nn.Dropout, "other": nn.Module}, ["rates: module 'embed_drop' (Dropout) is matched by more than",
                                                   "'dropout' by type Dropout", "'other' by type Module"]),
    ({"dropout": nn.Dropout, "idle": nn.AlphaDropout}, ["rates: ['idle'] match(es) no module"]),
    ({"dropout": "embed_drop", "excluded": "maps.1"}, ["rates: expected modules that convert may change, got "
                                                       "['maps.1'], which exclude= leaves"]),
])
def test_what_convert_cannot_tune_raises_naming_rates_and_changes_nothing(rates, words):
    model = Net()
    model.mine, model.hooked = MyDropout(), _hooked()
    before = dict(model.named_modules())
    with pytest.raises(ValueError) as info:
        stn_kernels.convert(model, num_hparams=H, rates=rates, exclude="maps")
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert _unchanged(model, before)


@pytest.mark.parametrize("rates, words", [
    ([nn.Dropout], ["rates: expected a mapping", "list"]),
    ({1: nn.Dropout}, ["rates: expected hyperparameter names", "1"]),
    ({"dropout": 3}, ["rates['dropout']: expected a module name", "3 (int)"]),
    ({"dropout": [nn.Dropout, 2.0]}, ["rates['dropout']: expected module names", "2.0 (float)"]),
    ({"dropout": nn.Dropout(0.5)}, ["rates['dropout']: expected a module name", "Dropout"]),
])
def test_rates_of_the_wrong_type_raise_naming_rates(rates, words):
    with pytest.raises(TypeError) as info:
        stn_kernels.convert(Net(), num_hparams=H, rates=rates)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_excluded_dropouts_are_left_when_matched_by_type():
    model = stn_kernels.convert(Net(), num_hparams=H, rates={"dropout": nn.Dropout}, exclude="body")
    assert type(model.body[2]) is nn.Dropout and type(model.embed_drop) is TunedDropout
