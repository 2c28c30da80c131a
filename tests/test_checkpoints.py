"""Checkpoints of the published STN layers load into ours (strict=True) and give the same outputs.

The published layers (official STN HyperLinear / HyperConv2d / HyperEmbedding / LSTM HyperLinear,
Delta-STN StnLinear, the official HyperLSTMCell) are the stand-ins of ``_published``, written from their
formulas and parameter names.
"""

import pytest
import torch
from torch import nn

import stn_kernels

from _naive import assert_close_rel
from _published import (
    DeltaStnLinear,
    OfficialHyperConv2d,
    OfficialHyperEmbedding,
    OfficialHyperLinear,
    OfficialLstmHyperLinear,
    PublishedHyperLSTMCell,
    randomize,
)

D64 = torch.float64
K, N, H, B = 9, 6, 3, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# name -> (published factory, our factory, input factory, call ours)
LAYERS = {
    "official-HyperLinear": (lambda: OfficialHyperLinear(K, N, H),
                             lambda: stn_kernels.HyperLinear(K, N, num_hparams=H, dtype=D64),
                             lambda: torch.randn(B, K, dtype=D64), {}),
    "official-HyperConv2d": (lambda: OfficialHyperConv2d(3, N, 3, 1, H),
                             lambda: stn_kernels.HyperConv2d(3, N, 3, num_hparams=H, padding=1, dtype=D64),
                             lambda: torch.randn(B, 3, 5, 7, dtype=D64), {}),
    "official-HyperEmbedding": (lambda: OfficialHyperEmbedding(11, N, H),
                                lambda: stn_kernels.HyperEmbedding(11, N, num_hparams=H, dtype=D64),
                                lambda: torch.randint(0, 11, (5, B)), {"batch_dim": 1}),
    "official-LSTM-HyperLinear": (lambda: OfficialLstmHyperLinear(K, N, H),
                                  lambda: stn_kernels.HyperLinear(K, N, num_hparams=H, dtype=D64),
                                  lambda: torch.randn(B, K, dtype=D64), {}),
    "DeltaSTN-StnLinear": (lambda: DeltaStnLinear(K, N, H),
                           lambda: stn_kernels.HyperLinear(K, N, num_hparams=H, dtype=D64),
                           lambda: torch.randn(B, K, dtype=D64), {}),
}


class Net(nn.Module):
    """A parent: layer -> flatten -> nn.Linear head, λ passed to the STN layer."""

    def __init__(self, layer, **call_kwargs):
        super().__init__()
        self.stn = layer
        self.head = nn.Linear(1, 2, dtype=D64)  # replaced by the test once the width is known
        self.call_kwargs = call_kwargs

    def forward(self, x, hparams):
        y = self.stn(x, hparams, **self.call_kwargs).flatten(1)
        return self.head(y)


@pytest.mark.parametrize("name", list(LAYERS), ids=list(LAYERS))
def test_published_layer_uses_every_parameter(name):
    """Sanity: the re-created published layer's output depends on every published parameter."""
    published, _, make_x, _ = LAYERS[name]
    layer = published()
    x, lam = make_x(), torch.randn(B, H, dtype=D64)
    out = layer(x, lam)
    out.sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(LAYERS), ids=list(LAYERS))
def test_load_published_state_dict(name):
    published, ours_factory, make_x, kwargs = LAYERS[name]
    layer, ours = published(), ours_factory()
    state = layer.state_dict()
    keys_before = set(state)
    result = ours.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(state) == keys_before, "load_state_dict must not rename the caller's dict"
    x, lam = make_x(), torch.randn(B, H, dtype=D64)
    assert_close_rel(ours(x, lam, **kwargs), layer(x, lam), D64)


@pytest.mark.parametrize("name", list(LAYERS), ids=list(LAYERS))
def test_load_published_state_dict_nested(name):
    """Inside a parent and an nn.Sequential: keys like '0.stn.elem_weight' are renamed under their prefix."""
    published, ours_factory, make_x, kwargs = LAYERS[name]
    x, lam = make_x(), torch.randn(B, H, dtype=D64)
    pub_net, our_net = Net(published()), Net(ours_factory(), **kwargs)
    width = pub_net.stn(x, lam).flatten(1).shape[1]
    pub_net.head = randomize(nn.Linear(width, 2, dtype=D64))
    our_net.head = nn.Linear(width, 2, dtype=D64)
    pub_seq, our_seq = nn.Sequential(pub_net), nn.Sequential(our_net)
    state = pub_seq.state_dict()
    assert any(k.startswith("0.stn.") for k in state)
    our_seq.load_state_dict(state, strict=True)
    assert_close_rel(our_seq[0](x, lam), pub_seq[0](x, lam), D64)
    # the head was loaded too, and the STN layer holds our names only
    assert torch.equal(our_net.head.weight, pub_net.head.weight)
    assert set(our_net.stn.state_dict()) <= {"weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight"}


def test_elem_scalar_is_folded_not_dropped():
    """a = 1.7 changes the output; the loaded layer reproduces a·(x·W_eᵀ + b_e), not x·W_eᵀ + b_e."""
    layer, ours = OfficialHyperLinear(K, N, H, elem_scalar=1.7), stn_kernels.HyperLinear(K, N, num_hparams=H, dtype=D64)
    ours.load_state_dict(layer.state_dict())
    x, lam = torch.randn(B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    assert_close_rel(ours(x, lam), layer(x, lam), D64)
    assert_close_rel(ours.weight, 1.7 * layer.elem_weight, D64)
    assert_close_rel(ours.bias, 1.7 * layer.elem_bias, D64)
    assert torch.equal(ours.hyper_weight, layer.hnet_weight)
    assert torch.equal(ours.hparam_weight, layer.htensor_to_scalars.weight)


@pytest.mark.parametrize("name", list(LAYERS), ids=list(LAYERS))
def test_own_state_dict_round_trip(name):
    _, ours_factory, make_x, kwargs = LAYERS[name]
    a, b = ours_factory(), ours_factory()
    randomize(a)
    state = a.state_dict()
    expected_keys = ({"weight", "hyper_weight", "hparam_weight"} if name.endswith("Embedding")
                     else {"weight", "hyper_weight", "bias", "hyper_bias", "hparam_weight"})
    assert set(state) == expected_keys
    b.load_state_dict(state, strict=True)
    for k, v in b.state_dict().items():
        assert torch.equal(v, state[k]), k
    x, lam = make_x(), torch.randn(B, H, dtype=D64)
    assert torch.equal(a(x, lam, **kwargs), b(x, lam, **kwargs))


def test_round_trip_through_file(tmp_path):
    net = nn.Sequential(stn_kernels.HyperLinear(K, N, num_hparams=H), nn.ReLU())
    path = tmp_path / "ckpt.pt"
    torch.save(net.state_dict(), path)
    other = nn.Sequential(stn_kernels.HyperLinear(K, N, num_hparams=H), nn.ReLU())
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, lam = torch.randn(B, K), torch.randn(B, H)
    assert torch.equal(net[0](x, lam), other[0](x, lam))


def test_strict_load_still_reports_missing_and_unexpected():
    layer = OfficialHyperLinear(K, N, H)
    state = layer.state_dict()
    del state["hnet_bias"]
    state["bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="(?s)Missing key.*hyper_bias.*Unexpected key.*bogus"):
        stn_kernels.HyperLinear(K, N, num_hparams=H, dtype=D64).load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- HyperLSTM

def test_published_cell_checkpoint_loads_strict():
    T, B, K, N, H = 3, 2, 5, 3, 2
    published = PublishedHyperLSTMCell(K, N, H)
    keys = set(published.state_dict())
    assert {"i2h.elem_weight_raw", "h2h.hnet_weight_raw", "h2h.hnet_tensor_to_scalars.weight"} <= keys
    ours = stn_kernels.HyperLSTMCell(K, N, num_hparams=H, dtype=D64)
    ours.load_state_dict(published.state_dict(), strict=True)
    x, lam = torch.randn(T, B, K, dtype=D64), torch.randn(B, H, dtype=D64)
    hidden = (torch.randn(1, B, N, dtype=D64), torch.randn(1, B, N, dtype=D64))
    want, (h_w, c_w) = published(x, hidden, lam)
    got, (h, c) = ours(x, hidden, lam)
    assert_close_rel(got, want, D64, "output")
    assert_close_rel(h, h_w, D64, "h")
    assert_close_rel(c, c_w, D64, "c")


def test_published_model_rnns_load_into_stack():
    """The published model's rnns.{l}.* entries load into a HyperLSTM used as its ``rnns``."""
    T, B, N, H = 3, 2, 4, 2

    class Published(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnns = nn.ModuleList([PublishedHyperLSTMCell(N, N, H) for _ in range(2)])

    class Ours(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnns = stn_kernels.HyperLSTM(N, N, 2, num_hparams=H, dtype=D64)

    published, ours = Published(), Ours()
    ours.load_state_dict(published.state_dict(), strict=True)
    x, lam = torch.randn(T, B, N, dtype=D64), torch.randn(B, H, dtype=D64)
    zeros = (torch.zeros(1, B, N, dtype=D64), torch.zeros(1, B, N, dtype=D64))
    y = x
    for cell in published.rnns:
        y, _ = cell(y, zeros, lam)
    got, _ = ours.rnns(x, None, lam)
    assert_close_rel(got, y, D64, "output")


def test_published_tied_model_with_emsize_not_nhid_loads_into_per_layer_stack():
    """The published tied-weights configuration (emsize 4, nhid 5: layers 4->5, 5->5, 5->4) loads strict into
    HyperLSTM(4, [5, 5, 4], 3); output, per-layer final states and the gradients w.r.t. input, λ and initial states
    equal the published cells' in float64, batched and unbatched."""
    T, B, E, N, H = 3, 2, 4, 5, 2
    sizes = [N, N, E]

    class Published(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnns = nn.ModuleList([PublishedHyperLSTMCell(E if layer == 0 else N, sizes[layer], H)
                                       for layer in range(3)])

    torch.manual_seed(0)
    published = Published()
    ours = stn_kernels.HyperLSTM(E, sizes, 3, num_hparams=H, dtype=D64)
    assert ours.hidden_sizes == (5, 5, 4) and "[5, 5, 4]" in repr(ours)
    ours.load_state_dict({k.replace("rnns.", "", 1): v for k, v in published.state_dict().items()}, strict=True)
    x, lam = torch.randn(T, B, E, dtype=D64, requires_grad=True), torch.randn(B, H, dtype=D64, requires_grad=True)
    h0 = [torch.randn(B, n, dtype=D64, requires_grad=True) for n in sizes]
    c0 = [torch.randn(B, n, dtype=D64, requires_grad=True) for n in sizes]
    y, want_h, want_c = x, [], []
    for layer, cell in enumerate(published.rnns):
        y, (h, c) = cell(y, (h0[layer].unsqueeze(0), c0[layer].unsqueeze(0)), lam)
        want_h.append(h.squeeze(0))
        want_c.append(c.squeeze(0))
    got, (h_n, c_n) = ours(x, (h0, c0), lam)
    assert_close_rel(got, y, D64, "output")
    for layer in range(3):
        assert_close_rel(h_n[layer], want_h[layer], D64, f"h_n[{layer}]")
        assert_close_rel(c_n[layer], want_c[layer], D64, f"c_n[{layer}]")
    leaves_ = [x, lam, *h0, *c0]

    def grads(out, hs, cs):
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=D64).view_as(out)).sum()
        loss = loss + sum((t * (i + 2)).sum() for i, t in enumerate([*hs, *cs]))
        return torch.autograd.grad(loss, leaves_)

    for i, (g, w) in enumerate(zip(grads(got, h_n, c_n), grads(y, want_h, want_c))):
        assert_close_rel(g, w, D64, f"gradient {i}")
    got_one, (h_one, _) = ours(x[:, 0], ([t[0] for t in h0], [t[0] for t in c0]), lam[0])
    want_one, _ = ours(x[:, :1], ([t[:1] for t in h0], [t[:1] for t in c0]), lam[:1])
    assert_close_rel(got_one, want_one[:, 0], D64, "unbatched output")
    assert [tuple(t.shape) for t in h_one] == [(5,), (5,), (4,)]
    with pytest.raises(ValueError, match=r"hidden_size: expected an int or a list of num_layers=3"):
        stn_kernels.HyperLSTM(E, [5, 4], 3, num_hparams=H)
    with pytest.raises(ValueError, match=r"hx\[0\]\[2\]: expected shape"):
        ours(x, (h0[:2] + [h0[1]], c0), lam)
