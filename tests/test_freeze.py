"""stn_kernels.freeze(model, hparams) and the layers' fold(hparams): the plain torch.nn model a converted model
computes at one shared λ. Outputs against the converted model inside ``stn_kernels.hparams(lam)`` (float64, 1e-12),
the folded weights against a naive float64 formula written here, torch.export, and every refusal."""

import copy

import pytest
import torch
from torch import nn

import stn_kernels
from stn_kernels.convert import HyperPathLSTMCell

from _published import OfficialHyperConv2d, OfficialHyperLinear

H = 3
D64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
HYPER_TYPES = (stn_kernels.HyperLinear, stn_kernels.HyperConv2d, stn_kernels.HyperEmbedding, stn_kernels.HyperLSTM,
               stn_kernels.HyperLSTMCell)


def _lam(seed=5, dtype=D64):
    return torch.randn(H, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _converted(plain: nn.Module) -> nn.Module:
    """``convert(plain)`` with every λ map (``hparam_weight``, zero after convert) filled N(0, 1), so that the hyper
    path changes every output by O(1)."""
    model = stn_kernels.convert(plain, num_hparams=H)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] == "hparam_weight":
                param.normal_()
    return model


def _outputs(out):
    """The tensors of a model's output (an LSTM's (out, (h, c))) as a flat list."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _outputs(item)]


def _check_equal_at_lam(model, frozen, inputs, lam):
    """frozen(*inputs) equals model(*inputs) inside hparams(lam) to 1e-12, and is far from the model at λ = 0 (so
    the hyper path counts: a fold that dropped it would fail)."""
    with stn_kernels.hparams(lam):
        expected = _outputs(model(*inputs))
    got = _outputs(frozen(*inputs))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    with stn_kernels.hparams(torch.zeros_like(lam)):
        at_zero = _outputs(model(*inputs))
    assert max((g - z).abs().max().item() for g, z in zip(got, at_zero)) > 1e-3


def _assert_plain(frozen, expected_types):
    """No Hyper module left; the layers at ``expected_types``' names are exactly those torch.nn classes."""
    kinds = {name: type(m) for name, m in frozen.named_modules()}
    for name, m in frozen.named_modules():
        assert not isinstance(m, HYPER_TYPES), name
        assert not hasattr(m, "context_hparams"), name
    for name, cls in expected_types.items():
        assert kinds[name] is cls, (name, kinds[name])


def _snapshot(model):
    return [(name, p, p.detach().clone()) for name, p in model.named_parameters()]


def _assert_untouched(model, snapshot):
    now = list(model.named_parameters())
    assert [(n, id(p)) for n, p in now] == [(n, id(p)) for n, p, _ in snapshot]
    for (_, p, before), (_, q) in zip(snapshot, now):
        assert torch.equal(q.detach(), before)


# --------------------------------------------------------------------------- each layer type in a model


@pytest.mark.parametrize("bias", [True, False])
def test_freeze_linear(bias):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).to(D64)
    model = _converted(plain).eval()
    snap = _snapshot(model)
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    _assert_plain(frozen, {"0": nn.Linear, "2": nn.Linear})
    assert (frozen[0].bias is None) == (not bias) and not frozen.training
    _check_equal_at_lam(model, frozen, (torch.randn(6, 5, dtype=D64),), lam)
    _check_equal_at_lam(model, frozen, (torch.randn(2, 7, 5, dtype=D64),), lam)  # [B, *, K]
    _assert_untouched(model, snap)


CONV_CASES = {
    "same_even_kernel": dict(kernel_size=(2, 4), padding="same"),
    "same_even_kernel_dilated": dict(kernel_size=2, padding="same", dilation=(2, 1)),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular_uneven": dict(kernel_size=3, padding=(2, 1), padding_mode="circular"),
    "groups_no_bias": dict(kernel_size=3, padding=1, groups=2, bias=False),
    "stride_dilation_valid": dict(kernel_size=3, stride=2, dilation=2, padding="valid"),
    "replicate_same": dict(kernel_size=(3, 2), padding="same", padding_mode="replicate"),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # torch's own note
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_freeze_conv2d(case):
    torch.manual_seed(0)
    options = CONV_CASES[case]
    conv = nn.Conv2d(4, 6, **options)
    plain = nn.Sequential(conv, nn.ReLU()).to(D64)
    model = _converted(plain).eval()
    snap = _snapshot(model)
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    _assert_plain(frozen, {"0": nn.Conv2d})
    folded = frozen[0]
    for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(folded, attr) == getattr(conv, attr), attr
    assert (folded.bias is None) == (conv.bias is None)
    _check_equal_at_lam(model, frozen, (torch.randn(2, 4, 7, 9, dtype=D64),), lam)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_freeze_embedding(padding_idx):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Embedding(7, 5, padding_idx=padding_idx), nn.Linear(5, 2)).to(D64)
    model = _converted(plain).train()
    with torch.no_grad():  # a padding row that is not zero (a loaded checkpoint): looked up as it is, folded
        model[0].weight[-1].normal_()
        model[0].hyper_weight[-1].normal_()
    snap = _snapshot(model)
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    _assert_plain(frozen, {"0": nn.Embedding, "1": nn.Linear})
    assert frozen[0].padding_idx == (None if padding_idx is None else padding_idx % 7) and frozen.training
    tokens = torch.tensor([[0, 2, 6, 1], [6, 6, 3, 2], [5, 4, 2, 0]])
    _check_equal_at_lam(model, frozen, (tokens,), lam)
    if padding_idx is not None:  # nn.Embedding's padding row gets no gradient, as the converted layer's
        frozen(tokens).sum().backward()
        assert frozen[0].weight.grad[padding_idx % 7].abs().max() == 0
        assert frozen[0].weight.grad.abs().sum() > 0
    _assert_untouched(model, snap)


@pytest.mark.parametrize("num_layers,batch_first,bias", [(1, False, True), (2, True, True), (2, False, False),
                                                         (1, True, False)])
def test_freeze_lstm(num_layers, batch_first, bias):
    torch.manual_seed(0)
    dropout = 0.25 if num_layers > 1 else 0.0
    lstm = nn.LSTM(3, 4, num_layers, bias=bias, batch_first=batch_first, dropout=dropout).to(D64)
    model = _converted(lstm).eval()  # eval: nn.LSTM's dropout between layers is off, as in the converted layer
    snap = _snapshot(model)
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    assert type(frozen) is nn.LSTM and not frozen.training
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "proj_size",
                 "bidirectional"):
        assert getattr(frozen, attr) == getattr(lstm, attr), attr
    assert [name for name, _ in frozen.named_parameters()] == [name for name, _ in lstm.named_parameters()]
    x = torch.randn(5, 2, 3, dtype=D64)  # [T, B] or [B, T]
    _check_equal_at_lam(model, frozen, (x,), lam)
    hx = tuple(torch.randn(num_layers, 5 if batch_first else 2, 4, dtype=D64) for _ in range(2))
    _check_equal_at_lam(model, frozen, (x, hx), lam)
    _assert_untouched(model, snap)


def test_freeze_lstm_keeps_dropout_between_layers_in_training_mode():
    torch.manual_seed(0)
    model = _converted(nn.LSTM(3, 4, 3, dropout=0.4).to(D64)).train()
    frozen = stn_kernels.freeze(model, _lam())
    assert frozen.training and frozen.dropout == 0.4
    x = torch.randn(6, 2, 3, dtype=D64)
    torch.manual_seed(1)
    a, _ = frozen(x)
    torch.manual_seed(2)
    b, _ = frozen(x)
    assert not torch.allclose(a, b)  # dropout acts between the layers in training mode
    assert torch.allclose(frozen.eval()(x)[0], frozen(x)[0])


# --------------------------------------------------------------------------- a nested model


class Mixed(nn.Module):
    """Conv → BatchNorm → pooled features + an embedding of a token sequence through an LSTM → a shared head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same", padding_mode="reflect"), nn.BatchNorm2d(4),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Embedding(9, 4, padding_idx=0)
        self.lstm = nn.LSTM(4, 4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Tanh()])

    def forward(self, images, tokens):
        seq, _ = self.lstm(self.embed(tokens))
        h = self.features(images) + seq[:, -1]
        for block in self.blocks:
            h = block(h)
        return self.head(h) + self.head(seq).mean(1)  # the head used twice


def _mixed():
    torch.manual_seed(0)
    plain = Mixed().to(D64)
    expected_types = {name: type(m) for name, m in plain.named_modules()}
    model = _converted(plain)
    with torch.no_grad():  # running statistics that are not the defaults
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(4, 3, 6, 6, dtype=D64, generator=g), torch.randint(0, 9, (4, 5), generator=g))
    return model, expected_types, inputs


def test_freeze_nested_model_eval():
    model, expected_types, inputs = _mixed()
    model.eval()
    model.features[1].train()  # one module in another mode: kept per module
    model.head.weight.requires_grad_(False)  # a frozen parameter stays frozen
    snap = _snapshot(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    _assert_plain(frozen, expected_types)
    assert {name: m.training for name, m in frozen.named_modules()} == \
        {name: m.training for name, m in model.named_modules() if name in expected_types}
    assert not frozen.head.weight.requires_grad and frozen.head.bias.requires_grad
    model.features[1].eval()
    frozen.features[1].eval()
    _check_equal_at_lam(model, frozen, inputs, lam)
    _assert_untouched(model, snap)
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    # New tensors: leaves, no storage shared with the converted model; the shared head stays one module.
    model_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for name, p in frozen.named_parameters():
        assert p.is_leaf and p.grad_fn is None and p.untyped_storage().data_ptr() not in model_storage, name
    for name, b in frozen.named_buffers():
        assert b.untyped_storage().data_ptr() != dict(model.named_buffers())[name].untyped_storage().data_ptr()


def test_freeze_nested_model_training_mode_and_independence():
    """In training mode (BatchNorm on batch statistics, no dropout) the frozen model computes what the converted one
    does and updates its own running statistics the same way; training the converted model afterwards leaves
    the frozen one as it was."""
    model, _, inputs = _mixed()
    model.train()
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    assert all(m.training for m in frozen.modules())
    with stn_kernels.hparams(lam):
        expected = model(*inputs)
    torch.testing.assert_close(frozen(*inputs), expected, **TOL)
    for (name, a), (_, b) in zip(model.named_buffers(), frozen.named_buffers()):  # one update each, alike
        torch.testing.assert_close(a, b, **TOL, msg=name)
    frozen_before = {name: p.detach().clone() for name, p in frozen.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with stn_kernels.hparams(lam):
        model(*inputs).square().sum().backward()
    opt.step()
    for name, p in frozen.named_parameters():
        assert p.grad is None and torch.equal(p.detach(), frozen_before[name]), name


def test_freeze_keeps_shared_modules_shared():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4).to(D64)
    plain = nn.Sequential(shared, nn.Tanh(), shared)
    model = _converted(plain)
    assert model[0] is model[2]
    frozen = stn_kernels.freeze(model, _lam())
    assert frozen[0] is frozen[2] and type(frozen[0]) is nn.Linear
    _check_equal_at_lam(model, frozen, (torch.randn(3, 4, dtype=D64),), _lam())


def test_freeze_of_a_converted_layer_itself_and_of_a_model_without_any():
    torch.manual_seed(0)
    layer = _converted(nn.Linear(4, 2).to(D64))
    frozen = stn_kernels.freeze(layer, _lam())
    assert type(frozen) is nn.Linear
    _check_equal_at_lam(layer, frozen, (torch.randn(3, 4, dtype=D64),), _lam())
    plain = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
    with pytest.warns(UserWarning, match="no layer made by stn_kernels.convert"):
        copied = stn_kernels.freeze(plain, _lam())
    assert copied is not plain and copied[0].weight is not plain[0].weight
    assert torch.equal(copied[0].weight, plain[0].weight)


# --------------------------------------------------------------------------- torch.export


def test_torch_export_of_frozen_model():
    model, _, inputs = _mixed()
    model.eval()
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    with pytest.warns(UserWarning, match="_flat_weights"):  # torch's own, for any nn.LSTM
        exported = torch.export.export(frozen, inputs)
    names = {node.target.__name__ for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("stn_kernels" in name for name in names)
    with stn_kernels.hparams(lam):
        expected = model(*inputs)
    torch.testing.assert_close(exported.module()(*inputs), expected, **TOL)


# --------------------------------------------------------------------------- the folding formula, naively


def _naive_rows(weight, hyper_weight, scale_map, lam, a=1.0):
    """a·W[j] + (Σ_h M[j, h]·λ[h])·W_hyper[j] row by row, in float64 Python arithmetic on the scales."""
    weight, hyper_weight, scale_map, lam = (t.detach() for t in (weight, hyper_weight, scale_map, lam))
    out = torch.empty(weight.shape, dtype=D64)
    for j in range(weight.shape[0]):
        s = sum(float(scale_map[j, h]) * float(lam[h]) for h in range(lam.shape[0]))
        out[j] = a * weight[j].double() + s * hyper_weight[j].double()
    return out


def test_fold_formula_against_naive_float64():
    torch.manual_seed(0)
    lam = _lam()
    linear = stn_kernels.HyperLinear(5, 4, num_hparams=H, dtype=D64)
    conv = stn_kernels.HyperConv2d(4, 6, 3, groups=2, num_hparams=H, dtype=D64)
    embedding = stn_kernels.HyperEmbedding(7, 5, num_hparams=H, dtype=D64)
    for layer in (linear, conv, embedding):
        with torch.no_grad():
            layer.hparam_weight.normal_()
    for layer in (linear, conv):
        folded = layer.fold(lam)
        v, c = layer.hparam_weight.chunk(2)
        torch.testing.assert_close(folded.weight, _naive_rows(layer.weight, layer.hyper_weight, v, lam), **TOL)
        naive_bias = _naive_rows(layer.bias[:, None], layer.hyper_bias[:, None], c, lam)[:, 0]
        torch.testing.assert_close(folded.bias, naive_bias, **TOL)
    folded = embedding.fold(lam)  # per column: the transposed tables, row by row
    naive = _naive_rows(embedding.weight.T, embedding.hyper_weight.T, embedding.hparam_weight, lam).T
    torch.testing.assert_close(folded.weight, naive, **TOL)


# Gate block k of nn.LSTM (i, f, g, o) is block OURS[k] of ours (f, i, o, g).
OURS = (1, 0, 3, 2)


def test_lstm_fold_formula_and_gate_order_against_naive_float64():
    torch.manual_seed(0)
    lam = _lam()
    n = 4
    lstm = stn_kernels.HyperLSTM(3, n, 2, num_hparams=H, dtype=D64)
    with torch.no_grad():
        for cell in lstm.cells:
            cell.i2h.hparam_weight.normal_()
            cell.h2h.hparam_weight.normal_()
    folded = lstm.fold(lam)
    for layer, cell in enumerate(lstm.cells):
        for suffix, linear in (("ih", cell.i2h), ("hh", cell.h2h)):
            v, c = linear.hparam_weight[:4 * n], linear.hparam_weight[4 * n:]
            ours_w = _naive_rows(linear.weight, linear.hyper_weight, v, lam)
            ours_b = _naive_rows(linear.bias[:, None], linear.hyper_bias[:, None], c, lam)[:, 0]
            torch_w = getattr(folded, f"weight_{suffix}_l{layer}")
            torch_b = getattr(folded, f"bias_{suffix}_l{layer}")
            for k in range(4):
                rows = slice(k * n, (k + 1) * n)
                ours = slice(OURS[k] * n, (OURS[k] + 1) * n)
                torch.testing.assert_close(torch_w[rows], ours_w[ours], **TOL)
                torch.testing.assert_close(torch_b[rows], ours_b[ours], **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fold_rounds_once_to_the_layer_dtype(dtype):
    """The fold is computed in float64 and rounded once: bit for bit the naive float64 fold cast to the dtype."""
    torch.manual_seed(0)
    layer = stn_kernels.HyperLinear(6, 5, num_hparams=H)
    with torch.no_grad():
        layer.hparam_weight.normal_()
    layer = layer.to(dtype)
    lam = _lam(dtype=torch.float32)
    folded = layer.fold(lam)
    assert folded.weight.dtype == dtype and folded.bias.dtype == dtype
    v, c = layer.hparam_weight.double().chunk(2)
    assert torch.equal(folded.weight, _naive_rows(layer.weight, layer.hyper_weight, v, lam.double()).to(dtype))
    naive_bias = _naive_rows(layer.bias[:, None], layer.hyper_bias[:, None], c, lam.double())[:, 0]
    assert torch.equal(folded.bias, naive_bias.to(dtype))


# --------------------------------------------------------------------------- fold on each layer directly


def _directly_built():
    torch.manual_seed(0)
    layers = {
        "linear": (stn_kernels.HyperLinear(5, 4, num_hparams=H, dtype=D64), torch.randn(3, 5, dtype=D64)),
        "linear_no_bias": (stn_kernels.HyperLinear(5, 4, bias=False, num_hparams=H, dtype=D64),
                           torch.randn(3, 5, dtype=D64)),
        "conv": (stn_kernels.HyperConv2d(2, 4, 2, padding="same", padding_mode="reflect", num_hparams=H, dtype=D64),
                 torch.randn(3, 2, 5, 5, dtype=D64)),
        "embedding": (stn_kernels.HyperEmbedding(6, 4, padding_idx=1, num_hparams=H, dtype=D64),
                      torch.tensor([[1, 0, 5], [2, 1, 4]])),
        "lstm": (stn_kernels.HyperLSTM(3, 4, 2, batch_first=True, num_hparams=H, dtype=D64),
                 torch.randn(2, 5, 3, dtype=D64)),
        "lstm_cell": (stn_kernels.HyperLSTMCell(3, 4, num_hparams=H, dtype=D64), torch.randn(5, 2, 3, dtype=D64)),
    }
    with torch.no_grad():
        for layer, _ in layers.values():
            for name, p in layer.named_parameters():
                if name.endswith("hparam_weight"):
                    p.normal_()
    return layers


EXPECTED_FOLD = {"linear": nn.Linear, "linear_no_bias": nn.Linear, "conv": nn.Conv2d, "embedding": nn.Embedding,
                 "lstm": nn.LSTM, "lstm_cell": nn.LSTM}


@pytest.mark.parametrize("kind", list(EXPECTED_FOLD))
def test_fold_each_layer_directly(kind):
    layer, x = _directly_built()[kind]
    layer.eval()
    lam = _lam()
    folded = layer.fold(lam)
    assert type(folded) is EXPECTED_FOLD[kind] and not folded.training
    expected = _outputs(layer(x, hparams=lam) if kind.startswith("lstm") else layer(x, lam))
    got = _outputs(folded(x))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    at_zero = _outputs(layer(x, hparams=torch.zeros(H, dtype=D64)) if kind.startswith("lstm")
                       else layer(x, torch.zeros(H, dtype=D64)))
    assert (got[0] - at_zero[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"hparams: expected one λ shared by every example, shape \[3\]"):
        layer.fold(lam.expand(2, H))


@pytest.mark.parametrize("published", ["linear", "conv"])
def test_fold_of_a_published_layer_with_elem_scalar(published):
    """The official CNN layers' elem_scalar a folds into a·W + ..., a·b + ...; against the published layer itself."""
    torch.manual_seed(0)
    if published == "linear":
        original, x = OfficialHyperLinear(5, 4, H), torch.randn(3, 5, dtype=D64)
    else:
        original, x = OfficialHyperConv2d(2, 4, 3, 1, H), torch.randn(3, 2, 5, 5, dtype=D64)
    lam = _lam()
    expected = original(x, lam.expand(3, H))
    layer = stn_kernels.convert(copy.deepcopy(original))
    assert layer.elem_scalar is not None and float(layer.elem_scalar.detach()) == pytest.approx(1.7)
    folded = layer.fold(lam)
    assert type(folded) is (nn.Linear if published == "linear" else nn.Conv2d)
    torch.testing.assert_close(folded(x), expected, **TOL)
    # freeze refuses it inside a model: the model's forward passes λ to it.
    model = nn.Sequential(nn.Identity(), layer)
    with pytest.raises(ValueError, match=r"hyper layer 1 .*not made by stn_kernels.convert.*1\.fold\(hparams\)"):
        stn_kernels.freeze(model, lam)


def test_fold_lstm_refusals():
    torch.manual_seed(0)
    lam = _lam()
    uneven = stn_kernels.HyperLSTM(3, [4, 5], 2, num_hparams=H)
    with pytest.raises(ValueError, match=r"hidden_size: nn.LSTM has one hidden size .*\[4, 5\].*cells\[l\]\.fold"):
        uneven.fold(lam)
    assert type(uneven.cells[1].fold(lam)) is nn.LSTM  # each layer on its own
    dropconnect = stn_kernels.HyperLSTM(3, 4, 1, num_hparams=H, dropconnect=0.3)
    with pytest.raises(ValueError, match=r"HyperLSTM layer 0: DropConnect .*layer\.eval\(\)"):
        dropconnect.fold(lam)
    cell = stn_kernels.HyperLSTMCell(3, 4, num_hparams=H, dropconnect=0.3)
    with pytest.raises(ValueError, match=r"HyperLSTMCell: DropConnect"):
        cell.fold(lam)
    assert type(dropconnect.eval().fold(lam)) is nn.LSTM and type(cell.eval().fold(lam)) is nn.LSTM
    converted = _converted(nn.LSTM(3, 4))
    assert isinstance(converted.cells[0], HyperPathLSTMCell)
    with pytest.raises(TypeError, match="holds only the hyper path.*fold the whole TorchLayoutHyperLSTM"):
        converted.cells[0].fold(lam)
    with pytest.raises(TypeError, match="holds only the hyper path.*fold the whole TorchLayoutHyperLSTM"):
        converted.cells[0].i2h.fold(lam)


# --------------------------------------------------------------------------- refusals of freeze


def _small_model():
    torch.manual_seed(0)
    return _converted(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))


@pytest.mark.parametrize("hparams,error,pattern", [
    (torch.zeros(4, H), ValueError, r"hparams: expected one λ shared by every example, shape \[H\].*per-example λ "
                                    r"of shape \(4, 3\)"),
    (torch.zeros(1, H), ValueError, r"hparams: .*per-example λ of shape \(1, 3\).*\(one row: hparams\[0\]\)"),
    (torch.zeros(()), ValueError, r"hparams: expected one shared λ of shape \[H\], got shape \(\)"),
    (torch.zeros(H + 1), ValueError, r"hparams: expected shape \[3\] \(num_hparams of the layer 0\), got shape "
                                     r"\(4,\)"),
    ([0.0] * H, TypeError, r"hparams: expected a torch.Tensor, got list"),
    (torch.zeros(H, dtype=torch.int64), TypeError, r"hparams: expected a floating-point tensor, got dtype "
                                                   r"torch.int64"),
    (torch.tensor([0.0, float("nan"), 1.0]), ValueError, r"hparams: expected finite values, got \[0.0, nan, 1.0\]"),
])
def test_freeze_refuses_bad_hparams(hparams, error, pattern):
    with pytest.raises(error, match=pattern):
        stn_kernels.freeze(_small_model(), hparams)


def test_freeze_refuses_a_directly_built_hyper_layer_naming_it():
    model = _small_model()
    model.add_module("extra", nn.Sequential(nn.ReLU(), stn_kernels.HyperLinear(2, 2, num_hparams=H)))
    with pytest.raises(ValueError, match=r"hyper layer extra\.1 \(HyperLinear\) was not made by stn_kernels.convert"
                                         r".*extra\.1\.fold\(hparams\)"):
        stn_kernels.freeze(model, torch.zeros(H))
    model.extra = stn_kernels.HyperLSTM(2, 2, num_hparams=H)
    with pytest.raises(ValueError, match=r"hyper layer extra \(HyperLSTM\)"):
        stn_kernels.freeze(model, torch.zeros(H))


def test_freeze_refuses_other_arguments():
    model = _small_model()
    with pytest.raises(TypeError, match="model: expected an nn.Module, got function"):
        stn_kernels.freeze(lambda x: x, torch.zeros(H))
    with pytest.raises(TypeError, match="rates: expected a mapping from hyperparameter names .*got list"):
        stn_kernels.freeze(model, torch.zeros(H), rates=[0.1])
    with pytest.raises(TypeError, match="rates: expected hyperparameter names"):
        stn_kernels.freeze(model, torch.zeros(H), rates={0: 0.1})
    with pytest.raises(ValueError, match=r"rates\['dropout'\]: expected one rate for the frozen model .*shape \(4,\)"):
        stn_kernels.freeze(model, torch.zeros(H), rates={"dropout": torch.full((4,), 0.1)})
    with pytest.raises(ValueError, match=r"rates\['dropout'\]: expected a rate in \[0, 1\)"):
        stn_kernels.freeze(model, torch.zeros(H), rates={"dropout": 1.5})
    with pytest.raises(ValueError, match=r"rates\['dropout'\]: expected a rate in \[0, 1\), got 1.5"):
        stn_kernels.freeze(model, torch.zeros(H), rates={"dropout": torch.tensor(1.5)})
    with pytest.raises(ValueError, match=r"rates\['dropout'\]: expected a rate in \[0, 1\)"):
        stn_kernels.freeze(model, torch.zeros(H), rates={"dropout": "0.1"})
    with pytest.raises(TypeError, match=r"rates\['dropout'\]: expected a floating-point tensor"):
        stn_kernels.freeze(model, torch.zeros(H), rates={"dropout": torch.tensor(0)})
    model[2].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"the layer 2 \(HyperLinear\) has forward hooks"):
        stn_kernels.freeze(model, torch.zeros(H))


class _TunedLike(nn.Module):
    """A converted module of another kind (as a tuned dropout): takes λ from the context, folds with the rates."""

    context_hparams = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        return x

    def fold(self, hparams, rates=None):
        self.seen.append((hparams, rates))
        return nn.Dropout(rates.get("dropout", 0.5))


def test_freeze_passes_rates_to_every_fold_and_refuses_a_converted_module_without_fold():
    model = _small_model()
    model.add_module("drop", _TunedLike())
    lam = torch.zeros(H)
    frozen = stn_kernels.freeze(model, lam, rates={"dropout": torch.tensor(0.25), "other": 0})
    assert model.drop.seen == [(lam, {"dropout": 0.25, "other": 0.0})]
    assert type(frozen.drop) is nn.Dropout and frozen.drop.p == 0.25
    model.drop.fold = None  # this instance has no fold
    with pytest.raises(ValueError, match=r"the layer drop \(_TunedLike\) takes λ from stn_kernels.hparams but has no "
                                         r"fold method"):
        stn_kernels.freeze(model, lam)


@pytest.mark.gpu
def test_freeze_on_cuda_with_lambda_on_the_cpu():
    """A model on the GPU folds with λ given on the CPU (moved to each layer's device); the folded nn.LSTM's
    weights are cuDNN's flattened ones."""
    model, expected_types, (images, tokens) = _mixed()
    model = model.cuda().eval()
    inputs = (images.cuda(), tokens.cuda())
    lam = _lam()
    frozen = stn_kernels.freeze(model, lam)
    _assert_plain(frozen, expected_types)
    assert all(p.device.type == "cuda" for p in frozen.parameters())
    _check_equal_at_lam(model, frozen, inputs, lam.cuda())
