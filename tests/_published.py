"""Stand-ins of the published STN layers, for the checkpoint and conversion tests.

Written here from the published formulas and parameter names (the official STN code and
Delta-STN), not imported from either codebase and not sharing code with ``stn_kernels``, so
that test_checkpoints.py (their state dicts load into ours) and test_convert.py
(``stn_kernels.convert`` swaps them for ours) check the package against the published layers:

* official STN HyperLinear / HyperConv2d: ``elem_weight``, ``hnet_weight``, ``elem_bias``, ``hnet_bias``,
  ``htensor_to_scalars`` (nn.Linear(H, 2N, bias=False)) and ``elem_scalar`` a;
  out = a·(x·W_eᵀ + b_e) + s_w ⊙ (x·W_hᵀ) + s_b ⊙ b_h with [s_w, s_b] = htensor_to_scalars(λ);
* official STN (LSTM) HyperEmbedding: ``elem_embedding``, ``hnet_embedding``, ``hnet_tensor_to_scalars``
  (H -> D), time-major [T, B] indices; out = E_e[i] + s ⊙ E_h[i], both lookups with ``padding_idx=-1``
  (the last row of each table gets no gradient);
* official STN LSTM HyperLinear: ``elem_weight_raw``, ``hnet_weight_raw``, ``elem_bias``, ``hnet_bias``,
  ``hnet_tensor_to_scalars``; ``mask_weights(wdrop)`` sets the ``elem_weight`` / ``hnet_weight`` used by
  the forward (no ``elem_scalar``);
* Delta-STN StnLinear / StnConv2d: ``general_weight``, ``response_weight``, ``general_bias``,
  ``response_bias``, ``hyper_bottleneck`` (nn.Linear(H, 2N, bias=False)), same formula with a = 1.

Every layer is float64, and every parameter (the λ maps included) is filled with standard normal
values at construction, so that each path contributes O(1) to the output. ``elem_scalar`` defaults
to 1.7 (≠ 1, so that folding it into the weights is tested).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

D64 = torch.float64


def randomize(module):
    """Fills every parameter of ``module`` with standard normal values, in place; returns ``module``."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


def _weights(module, shape, bias, weight_names, bias_names, out_features):
    """Registers the two weights of ``shape`` and the two [out_features] biases (or None) of a layer."""
    for name in weight_names:
        setattr(module, name, nn.Parameter(torch.empty(shape, dtype=D64)))
    for name in bias_names:
        if bias:
            setattr(module, name, nn.Parameter(torch.empty(out_features, dtype=D64)))
        else:
            module.register_parameter(name, None)


class OfficialHyperLinear(nn.Module):
    """Official STN (CNN) HyperLinear: y = a·(x W_eᵀ + b_e) + s_w ⊙ (x W_hᵀ) + s_b ⊙ b_h, [s_w, s_b] = λ Mᵀ
    (M = htensor_to_scalars.weight)."""

    def __init__(self, in_features, out_features, num_hparams, bias=True, elem_scalar=1.7):
        super().__init__()
        self.out_features = out_features
        _weights(self, (out_features, in_features), bias, ("elem_weight", "hnet_weight"),
                 ("elem_bias", "hnet_bias"), out_features)
        self.htensor_to_scalars = nn.Linear(num_hparams, 2 * out_features, bias=False, dtype=D64)
        self.elem_scalar = nn.Parameter(torch.ones(1, dtype=D64))
        randomize(self)
        with torch.no_grad():
            self.elem_scalar.fill_(elem_scalar)

    def forward(self, input, htensor):
        out = self.elem_scalar * F.linear(input, self.elem_weight, self.elem_bias)
        if htensor is not None:
            s = self.htensor_to_scalars(htensor)
            out = out + s[:, :self.out_features] * F.linear(input, self.hnet_weight)
            if self.hnet_bias is not None:
                out = out + s[:, self.out_features:] * self.hnet_bias
        return out


class OfficialHyperConv2d(nn.Module):
    """Official STN HyperConv2d (the official argument order): the HyperLinear formula per output channel."""

    def __init__(self, in_channels, out_channels, kernel_size, padding, num_hparams, stride=1, bias=True,
                 elem_scalar=1.7):
        super().__init__()
        self.out_channels, self.padding, self.stride = out_channels, padding, stride
        _weights(self, (out_channels, in_channels, kernel_size, kernel_size), bias, ("elem_weight", "hnet_weight"),
                 ("elem_bias", "hnet_bias"), out_channels)
        self.htensor_to_scalars = nn.Linear(num_hparams, 2 * out_channels, bias=False, dtype=D64)
        self.elem_scalar = nn.Parameter(torch.ones(1, dtype=D64))
        randomize(self)
        with torch.no_grad():
            self.elem_scalar.fill_(elem_scalar)

    def forward(self, input, htensor):
        out = self.elem_scalar * F.conv2d(input, self.elem_weight, self.elem_bias, self.stride, self.padding)
        if htensor is not None:
            s = self.htensor_to_scalars(htensor)
            c = self.out_channels
            hyper = F.conv2d(input, self.hnet_weight, None, self.stride, self.padding)
            out = out + s[:, :c, None, None] * hyper
            if self.hnet_bias is not None:
                out = out + (s[:, c:] * self.hnet_bias)[:, :, None, None]
        return out


class OfficialHyperEmbedding(nn.Module):
    """Official STN (LSTM) HyperEmbedding: time-major input [T, B], hnet_tensor [B, H]."""

    def __init__(self, num_embeddings, embedding_dim, num_hparams):
        super().__init__()
        self.elem_embedding = nn.Embedding(num_embeddings, embedding_dim, dtype=D64)
        self.hnet_embedding = nn.Embedding(num_embeddings, embedding_dim, dtype=D64)
        self.hnet_tensor_to_scalars = nn.Linear(num_hparams, embedding_dim, bias=False, dtype=D64)
        randomize(self)

    def forward(self, input, hnet_tensor, dropoute=0):
        # As the official layer: embedding dropout drops whole rows of both tables with one Bernoulli(1 − dropoute)
        # draw of shape [V, 1] (a float or a 0-dim tensor), kept rows scaled by 1/(1 − dropoute); both lookups
        # through F.embedding with padding_idx = the table's, or -1 (the last row: no gradient) when it is None.
        scale = 1.0
        if dropoute:
            weight = self.elem_embedding.weight
            keep = torch.empty(weight.shape[0], 1, dtype=weight.dtype).bernoulli_(1 - dropoute).detach()
            scale = keep.expand_as(weight) / (1 - dropoute)
        out = []
        for table in (self.elem_embedding, self.hnet_embedding):
            pad = -1 if table.padding_idx is None else table.padding_idx
            out.append(F.embedding(input, scale * table.weight, pad))
        return out[0] + self.hnet_tensor_to_scalars(hnet_tensor) * out[1]


class OfficialLstmHyperLinear(nn.Module):
    """Official STN LSTM HyperLinear: the forward uses the weights set by ``mask_weights`` (DropConnect)."""

    def __init__(self, in_features, out_features, num_hparams, bias=True):
        super().__init__()
        self.out_features = out_features
        _weights(self, (out_features, in_features), bias, ("elem_weight_raw", "hnet_weight_raw"),
                 ("elem_bias", "hnet_bias"), out_features)
        self.hnet_tensor_to_scalars = nn.Linear(num_hparams, 2 * out_features, bias=False, dtype=D64)
        randomize(self)
        self.mask_weights(0.0)  # after randomize: the masked weights are copies of the raw ones

    def mask_weights(self, wdrop):
        # As the official layer: in training mode one Bernoulli(1 − wdrop) draw over the raw weight's shape, also for
        # wdrop = 0 (wdrop a float, or a 0-dim tensor when tuned), divided by 1 − wdrop; in eval mode ones, no draw.
        # The masked weights are plain tensors (not Parameters), set here for every forward until the next call.
        if self.training:
            mask = torch.empty_like(self.elem_weight_raw).bernoulli_(1 - wdrop).detach() / (1 - wdrop)
        else:
            mask = torch.ones_like(self.elem_weight_raw)
        self.elem_weight, self.hnet_weight = self.elem_weight_raw * mask, self.hnet_weight_raw * mask

    def forward(self, input, hnet_tensor):
        s = self.hnet_tensor_to_scalars(hnet_tensor)
        n = self.out_features
        out = F.linear(input, self.elem_weight, self.elem_bias) + s[:, :n] * F.linear(input, self.hnet_weight)
        if self.hnet_bias is not None:
            out = out + s[:, n:] * self.hnet_bias
        return out


def _delta_lists(layer):
    """Delta-STN's per-layer lists: general [W_g, b_g], response [W_r, b_r, hyper_bottleneck.weight]."""
    layer.general_parameters = [p for p in (layer.general_weight, layer.general_bias) if p is not None]
    layer.response_parameters = [p for p in (layer.response_weight, layer.response_bias) if p is not None]
    layer.response_parameters.append(layer.hyper_bottleneck.weight)


class DeltaStnLinear(nn.Module):
    """Delta-STN StnLinear: y = x W_gᵀ + b_g + s_w ⊙ (x W_rᵀ) + s_b ⊙ b_r, [s_w, s_b] = hyper_bottleneck(λ)."""

    def __init__(self, in_features, out_features, num_hyper, bias=True):
        super().__init__()
        self.out_features = out_features
        _weights(self, (out_features, in_features), bias, ("general_weight", "response_weight"),
                 ("general_bias", "response_bias"), out_features)
        self.hyper_bottleneck = nn.Linear(num_hyper, 2 * out_features, bias=False, dtype=D64)
        randomize(self)  # non-zero bottleneck (Delta-STN starts it at zero)
        _delta_lists(self)

    def forward(self, inputs, h_net):
        s = self.hyper_bottleneck(h_net)
        n = self.out_features
        out = F.linear(inputs, self.general_weight, self.general_bias) + s[:, :n] * F.linear(inputs,
                                                                                           self.response_weight)
        if self.response_bias is not None:
            out = out + s[:, n:] * self.response_bias
        return out


class DeltaStnConv2d(nn.Module):
    """Delta-STN StnConv2d: the StnLinear formula per output channel, with stride/padding/groups/dilation."""

    def __init__(self, in_channels, out_channels, kernel_size, num_hyper, stride=1, padding=0, groups=1, dilation=1,
                 bias=False):
        super().__init__()
        self.out_channels, self.stride, self.padding, self.groups, self.dilation = (
            out_channels, stride, padding, groups, dilation)
        _weights(self, (out_channels, in_channels // groups, kernel_size, kernel_size), bias,
                 ("general_weight", "response_weight"), ("general_bias", "response_bias"), out_channels)
        self.hyper_bottleneck = nn.Linear(num_hyper, 2 * out_channels, bias=False, dtype=D64)
        randomize(self)
        _delta_lists(self)

    def forward(self, inputs, h_net):
        conv = dict(stride=self.stride, padding=self.padding, groups=self.groups, dilation=self.dilation)
        s = self.hyper_bottleneck(h_net)
        c = self.out_channels
        out = (F.conv2d(inputs, self.general_weight, self.general_bias, **conv)
               + s[:, :c, None, None] * F.conv2d(inputs, self.response_weight, **conv))
        if self.response_bias is not None:
            out = out + (s[:, c:] * self.response_bias)[:, :, None, None]
        return out


class PublishedHyperLSTMCell(nn.Module):
    """Stand-in of the official HyperLSTMCell (i2h, h2h = official LSTM HyperLinear), from its formulas."""

    def __init__(self, ninp, nhid, num_hparams):
        super().__init__()
        self.nhid = nhid
        self.i2h = OfficialLstmHyperLinear(ninp, 4 * nhid, num_hparams)
        self.h2h = OfficialLstmHyperLinear(nhid, 4 * nhid, num_hparams)
        with torch.no_grad():  # O(1) pre-activations
            for m, fan_in in ((self.i2h, ninp), (self.h2h, nhid)):
                for p in m.parameters():
                    p.mul_(fan_in ** -0.5 if p.dim() == 2 else 0.5)
        self.i2h.mask_weights(0.0)
        self.h2h.mask_weights(0.0)

    def forward(self, input, hidden, hparams):
        n = self.nhid
        h, cell = hidden[0].squeeze(0), hidden[1].squeeze(0)
        hs = []
        for t in range(len(input)):
            pre = self.i2h(input[t], hparams) + self.h2h(h, hparams)
            gates = torch.sigmoid(pre[:, :3 * n])
            cell = gates[:, :n] * cell + gates[:, n:2 * n] * torch.tanh(pre[:, 3 * n:])
            h = gates[:, 2 * n:] * torch.tanh(cell)
            hs.append(h)
        return torch.stack(hs), (h.unsqueeze(0), cell.unsqueeze(0))


class HyperLSTMCell(PublishedHyperLSTMCell):
    """The stand-in under the official class name, which stn_kernels.convert recognises."""


class PublishedLanguageModelCore(nn.Module):
    """The published model's loop over its cells: DropConnect drawn by h2h.mask_weights(wdrop) before each."""

    def __init__(self, K, N, H, layers, wdrop=0.0, cell=HyperLSTMCell):
        super().__init__()
        self.rnns = nn.ModuleList([cell(K if layer == 0 else N, N, H) for layer in range(layers)])
        self.wdrop = wdrop

    def forward(self, x, hidden, lam):
        new_hidden = []
        for layer, rnn in enumerate(self.rnns):
            rnn.h2h.mask_weights(self.wdrop)
            rnn.i2h.mask_weights(0)
            x, state = rnn(x, hidden[layer], lam)
            new_hidden.append(state)
        return x, new_hidden


# --------------------------------------------------------------------------- the official non-STN LSTM baseline


def locked_dropout(x, p, training=True):
    """The official LSTM's LockedDropout: in training mode one Bernoulli(1 − p) mask per (example, unit) of a
    time-major x [T, B, N], shared by all steps, scaled by 1/(1 − p), drawn also for p = 0; p a float, or a
    tensor [B, 1] of per-example rates (then drawn with ``bernoulli()`` on the detached keep probabilities).
    Identity in eval mode."""
    if not training:
        return x
    if isinstance(p, torch.Tensor):
        keep = (1 - p.unsqueeze(0).expand(1, x.shape[1], x.shape[2])).detach()
        return keep.bernoulli() / keep * x
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - p) / (1 - p)
    return x * mask


class DropconnectLinear(nn.Module):
    """Official baseline (``lstm/model_basic.py``) DropConnect linear: ``elem_weight_raw``, ``elem_bias`` and no
    hyper path; ``mask_weights(wdrop)`` draws a Bernoulli(1 − wdrop) mask over the weight in training mode (even
    for wdrop = 0) and sets ``elem_weight``; forward(input) only."""

    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.elem_weight_raw = nn.Parameter(torch.empty(output_dim, input_dim, dtype=D64))
        self.elem_bias = nn.Parameter(torch.empty(output_dim, dtype=D64))
        with torch.no_grad():
            bound = input_dim ** -0.5
            self.elem_weight_raw.uniform_(-bound, bound)
            self.elem_bias.uniform_(-bound, bound)

    def mask_weights(self, wdrop):
        if self.training:
            mask = torch.empty_like(self.elem_weight_raw).bernoulli_(1 - wdrop) / (1 - wdrop)
        else:
            mask = torch.ones_like(self.elem_weight_raw)
        self.elem_weight = self.elem_weight_raw * mask.detach()

    def forward(self, input):
        return F.linear(input, self.elem_weight, self.elem_bias)


class DropconnectCell(nn.Module):
    """Official baseline LSTM cell over two DropconnectLinear (gates forget, input, output, then candidate)."""

    def __init__(self, ninp, nhid):
        super().__init__()
        self.nhid = nhid
        self.i2h = DropconnectLinear(ninp, 4 * nhid)
        self.h2h = DropconnectLinear(nhid, 4 * nhid)

    def forward(self, input, hidden):
        n = self.nhid
        h, cell = hidden[0].squeeze(0), hidden[1].squeeze(0)
        hs = []
        for t in range(len(input)):
            pre = self.i2h(input[t]) + self.h2h(h)
            gates = torch.sigmoid(pre[:, :3 * n])
            cell = gates[:, :n] * cell + gates[:, n:2 * n] * torch.tanh(pre[:, 3 * n:])
            h = gates[:, 2 * n:] * torch.tanh(cell)
            hs.append(h)
        return torch.stack(hs), (h.unsqueeze(0), cell.unsqueeze(0))


class BaselineRNNModel(nn.Module):
    """Official baseline ``RNNModel`` (LSTM): nn.Embedding encoder with embedding dropout (whole rows), locked
    dropout on the input, between layers and on the output, DropconnectCell layers (h2h.mask_weights(wdrop),
    i2h.mask_weights(0) before each), a decoder tied to the encoder (the last layer then has ninp units)."""

    def __init__(self, ntoken, ninp, nhid, nlayers, dropouto=0.4, dropouth=0.3, dropouti=0.2, dropoute=0.1,
                 wdrop=0.5):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp, dtype=D64)
        sizes = [nhid if layer != nlayers - 1 else ninp for layer in range(nlayers)]
        self.rnns = nn.ModuleList([DropconnectCell(ninp if layer == 0 else nhid, sizes[layer])
                                   for layer in range(nlayers)])
        self.decoder = nn.Linear(nhid, ntoken, dtype=D64)
        self.decoder.weight = self.encoder.weight
        self.sizes = sizes
        self.dropouto, self.dropouth, self.dropouti, self.dropoute, self.wdrop = (
            dropouto, dropouth, dropouti, dropoute, wdrop)

    def init_hidden(self, batch):
        return [(torch.zeros(1, batch, n, dtype=D64), torch.zeros(1, batch, n, dtype=D64)) for n in self.sizes]

    def forward(self, input, hidden):
        weight = self.encoder.weight
        if self.training and self.dropoute:
            rows = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - self.dropoute) / (1 - self.dropoute)
            weight = weight * rows
        x = F.embedding(input, weight)
        x = locked_dropout(x, self.dropouti, self.training)
        new_hidden = []
        for layer, rnn in enumerate(self.rnns):
            rnn.h2h.mask_weights(self.wdrop)
            rnn.i2h.mask_weights(0)
            x, state = rnn(x, hidden[layer])
            new_hidden.append(state)
            if layer != len(self.rnns) - 1:
                x = locked_dropout(x, self.dropouth, self.training)
        x = locked_dropout(x, self.dropouto, self.training)
        return self.decoder(x.reshape(-1, x.shape[2])).view(x.shape[0], x.shape[1], -1), new_hidden


# --------------------------------------------------------------------------- Delta-STN's model base


class StnModel(nn.Module):
    """Delta-STN's StnModel: the two parameter lists its trainers build their optimisers from, picked from
    ``get_layers()`` with ``isinstance(layer, (DeltaStnLinear, DeltaStnConv2d))``; any other layer puts all its
    parameters in the general list."""

    def get_layers(self):
        return self.layers

    def get_response_parameters(self):
        return [p for layer in self.get_layers() if isinstance(layer, (DeltaStnLinear, DeltaStnConv2d))
                for p in layer.response_parameters]

    def get_general_parameters(self):
        params = []
        for layer in self.get_layers():
            if isinstance(layer, (DeltaStnLinear, DeltaStnConv2d)):
                params += layer.general_parameters
            else:
                params += list(layer.parameters())
        return params


class DeltaStnSimpleCnn(StnModel):
    """Delta-STN's SimpleCNN layout (two convs, two linears, in ``self.layers``), small, with biases."""

    def __init__(self, num_hyper):
        super().__init__()
        self.conv1 = DeltaStnConv2d(1, 3, 3, num_hyper, padding=1, bias=True)
        self.conv2 = DeltaStnConv2d(3, 4, 3, num_hyper, padding=1, bias=True)
        self.fc1 = DeltaStnLinear(4 * 2 * 2, 6, num_hyper)
        self.fc2 = DeltaStnLinear(6, 3, num_hyper)
        self.layers = nn.ModuleList([self.conv1, self.conv2, self.fc1, self.fc2])
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(0.3)

    def forward(self, x, h_net):
        x = F.max_pool2d(torch.tanh(self.conv1(x, h_net)), 2)
        x = F.max_pool2d(torch.tanh(self.conv2(x, h_net)), 2)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1), h_net)), h_net)


# --------------------------------------------------------------------------- the published training procedures
# Stand-ins of the official STN scripts (cnn/hypertrain.py's optimization_step, lstm/train.py's train_params and
# train_hyperparams, with stn_utils/hyperparameter.py) and of Delta-STN's DeltaStnStepOptimizer.step, written from
# reading them, for the lockstep trajectory tests (test_published_training.py).


class Hparam:
    """One tuned hyperparameter: its column in htensor, its range (0, 1) (stretched sigmoid) or (0, inf)
    (softplus), the map to the hypernet input, and whether all examples of a batch share one perturbation."""

    def __init__(self, index, bounded=True, hnet_fcn=torch.sigmoid, minibatch=True):
        self.index, self.bounded, self.hnet_fcn, self.minibatch = index, bounded, hnet_fcn, minibatch


def perturb(htensor, hscale, batch_size, hdict=None):
    """htensor [H] + softplus(hscale)·ε, ε [B, H] standard normal (one draw); the hyperparameters that are not
    per-example take row 0's value in every row."""
    out = htensor + F.softplus(hscale) * htensor.new_empty(batch_size, htensor.shape[0]).normal_()
    for info in (hdict or {}).values():
        if not info.minibatch:
            out[:, info.index] = out[0, info.index]
    return out


def hparam_transform(htensor, hdict):
    """[B, H] unconstrained -> the hyperparameters' values (sigmoid into (0, 1), softplus into (0, inf))."""
    cols = [htensor[:, i.index] for i in hdict.values()]
    return torch.stack([torch.sigmoid(c) if i.bounded else F.softplus(c) for c, i in zip(cols, hdict.values())], 1)


def hnet_transform(htensor, hdict):
    return torch.stack([info.hnet_fcn(htensor[:, info.index]) for info in hdict.values()], 1)


def entropy(hscale):
    """Entropy of the Gaussian perturbation: Σ log(softplus(hscale)·√(2πe))."""
    return torch.log(F.softplus(hscale) * math.sqrt(2 * math.pi * math.e)).sum()


def dropout_2d(x, probs, training):
    """Published per-example channel dropout: probs [B] (detached), one Bernoulli draw per (example, channel)."""
    if not training:
        return x
    keep = (1 - probs.unsqueeze(1).repeat(1, x.shape[1]).detach())
    return x * (keep.bernoulli() / keep)[:, :, None, None]


def dropout(x, probs, training):
    """Published per-example elementwise dropout of x [B, ...] (as the official CNN's input dropout)."""
    if not training:
        return x
    flat = x.reshape(x.shape[0], -1)
    keep = (1 - probs.unsqueeze(1).repeat(1, flat.shape[1]).detach())
    return (flat * (keep.bernoulli() / keep)).view(x.shape)


class OfficialSmallCnn(nn.Module):
    """The official SmallCNN, small: HyperConv2d (padding 1, elem_scalar) -> relu -> 2x2 max pool -> per-layer
    dropout_2d (hyperparameter 'dropout{layer}') per layer, then a plain nn.Linear."""

    def __init__(self, filters, num_classes, num_hparams, size):
        super().__init__()
        self.convs = nn.ModuleList([OfficialHyperConv2d(filters[i], filters[i + 1], 3, 1, num_hparams,
                                                        elem_scalar=1.3 + 0.2 * i) for i in range(len(filters) - 1)])
        with torch.no_grad():
            for i, conv in enumerate(self.convs):
                for p in (conv.elem_weight, conv.hnet_weight):
                    p.mul_((9 * filters[i]) ** -0.5)
        self.fc = nn.Linear(filters[-1] * (size >> len(self.convs)) ** 2, num_classes, dtype=D64)

    def forward(self, x, hnet_tensor, hparam_tensor, hdict):
        for layer, conv in enumerate(self.convs):
            x = F.max_pool2d(F.relu(conv(x, hnet_tensor)), 2)
            if f"dropout{layer}" in hdict:
                x = dropout_2d(x, hparam_tensor[:, hdict[f"dropout{layer}"].index], self.training)
        return self.fc(x.flatten(1))


def official_cnn_optimization_step(cnn, htensor, hscale, hdict, optimizers, images, labels, hyper,
                                   entropy_weight=1e-3, tune_scales=True):
    """The official optimization_step: zero every optimiser's gradients; perturb λ (the hyper step without
    tune_scales uses λ itself); input dropout on the training step only; cross-entropy minus the weighted
    entropy; the training step steps the SGD over all of cnn.parameters() (elem_scalar included), the hyper
    step steps the Adam optimisers of htensor and hscale."""
    cnn_optimizer, hyper_optimizer, scale_optimizer = optimizers
    for opt in optimizers:
        opt.zero_grad()
    batch = images.shape[0]
    batch_htensor = perturb(htensor, hscale, batch) if (not hyper or tune_scales) else htensor.repeat(batch, 1)
    hparam_tensor = hparam_transform(batch_htensor, hdict)
    hnet_tensor = hnet_transform(batch_htensor, hdict)
    if "indropout" in hdict and not hyper:
        images = dropout(images, hparam_tensor[:, hdict["indropout"].index], True)
    loss = F.cross_entropy(cnn(images, hnet_tensor, hparam_tensor, hdict), labels) - entropy_weight * entropy(hscale)
    loss.backward()
    if not hyper:
        cnn_optimizer.step()
    else:
        hyper_optimizer.step()
        if tune_scales:
            scale_optimizer.step()


class OfficialHyperLstmLm(nn.Module):
    """The official lstm/hyperlstm.py HyperLSTM language model (tied weights): HyperEmbedding encoder, HyperLSTMCell
    layers (the last with ninp units), LockedDropout on the embedding, between layers and on the output, DropConnect
    through h2h.mask_weights(wdrop) and i2h.mask_weights(0) before each layer, embedding dropout in training mode,
    a plain nn.Linear decoder tied to the elementary embedding. Tuned rates come from hparam_tensor: 'wdrop' and
    'dropoute' as 0-dim tensors (row 0), 'dropouti'/'dropouth'/'dropouto' as per-example [B, 1] tensors."""

    def __init__(self, ntoken, ninp, nhid, nlayers, num_hparams, dropouto=0.0, dropouth=0.0, dropouti=0.0,
                 dropoute=0.0, wdrop=0.0):
        super().__init__()
        self.encoder = OfficialHyperEmbedding(ntoken, ninp, num_hparams)
        with torch.no_grad():
            for p in self.encoder.parameters():
                p.mul_(0.3)
        self.decoder = nn.Linear(nhid, ntoken, dtype=D64)
        self.decoder.weight = self.encoder.elem_embedding.weight
        self.sizes = [nhid if layer != nlayers - 1 else ninp for layer in range(nlayers)]
        self.rnns = nn.ModuleList([HyperLSTMCell(ninp if layer == 0 else nhid, self.sizes[layer], num_hparams)
                                   for layer in range(nlayers)])
        self.rates = {"dropouto": dropouto, "dropouth": dropouth, "dropouti": dropouti, "dropoute": dropoute,
                      "wdrop": wdrop}

    def init_hidden(self, batch):
        return [(torch.zeros(1, batch, n, dtype=D64), torch.zeros(1, batch, n, dtype=D64)) for n in self.sizes]

    def forward(self, input, hidden, hnet_tensor, hparam_tensor, hdict):
        rate = {}
        for name, default in self.rates.items():
            if name not in hdict:
                rate[name] = default
            elif name in ("wdrop", "dropoute"):
                rate[name] = hparam_tensor[:, hdict[name].index][0]
            else:
                rate[name] = hparam_tensor[:, hdict[name].index].unsqueeze(1)
        x = self.encoder(input, hnet_tensor, dropoute=rate["dropoute"] if self.training else 0)
        x = locked_dropout(x, rate["dropouti"], self.training)
        new_hidden, raw_outputs = [], []
        for layer, rnn in enumerate(self.rnns):
            rnn.h2h.mask_weights(rate["wdrop"])
            rnn.i2h.mask_weights(0)
            x, state = rnn(x, hidden[layer], hnet_tensor)
            new_hidden.append(state)
            raw_outputs.append(x)
            if layer != len(self.rnns) - 1:
                x = locked_dropout(x, rate["dropouth"], self.training)
        x = locked_dropout(x, rate["dropouto"], self.training)
        decoded = self.decoder(x.reshape(-1, x.shape[2]))
        return decoded.view(x.shape[0], x.shape[1], -1), new_hidden, raw_outputs, x


def _lm_loss(model, data, targets, hidden, batch_htensor, hdict, alpha, beta):
    out, hidden, raw_outputs, dropped = model(data, hidden, hnet_transform(batch_htensor, hdict),
                                              hparam_transform(batch_htensor, hdict), hdict)
    last = raw_outputs[-1]
    loss = (F.cross_entropy(out.reshape(-1, out.shape[2]), targets.reshape(-1)) + alpha * dropped.pow(2).mean()
            + beta * (last[1:] - last[:-1]).pow(2).mean())
    return loss, [tuple(t.detach() for t in state) for state in hidden]


def official_lstm_train_step(model, htensor, hscale, hdict, param_optimizer, data, targets, hidden, alpha=0.5,
                             beta=0.5, clip=0.25):
    """The official train_params step: training mode, λ perturbed per example (wdrop/dropoute shared), the loss with
    the activation (alpha) and temporal activation (beta) penalties, gradients clipped, SGD over
    model.parameters(). Returns the detached hidden state for the next chunk."""
    model.train()
    loss, hidden = _lm_loss(model, data, targets, hidden, perturb(htensor, hscale, data.shape[1], hdict), hdict,
                            alpha, beta)
    param_optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    param_optimizer.step()
    return hidden


def official_lstm_hyper_step(model, htensor, hdict, hparam_optimizer, data, targets, hidden, alpha=0.5, beta=0.5):
    """The official train_hyperparams step: eval mode (no dropout, no DropConnect draw), λ itself for every example,
    the same loss, Adam on htensor."""
    model.eval()
    hparam_optimizer.zero_grad()
    loss, hidden = _lm_loss(model, data, targets, hidden, htensor.repeat(data.shape[1], 1), hdict, alpha, beta)
    loss.backward()
    hparam_optimizer.step()
    return hidden


class DeltaStnDropoutCnn(DeltaStnSimpleCnn):
    """Delta-STN's SimpleCNN forward(x, h_net, h_param): per-example dropout_2d of the input and after each conv,
    with rates sigmoid(h_param[:, i]) for the hyperparameters 'dropout0', 'dropout1', 'dropout2'."""

    def forward(self, x, h_net, h_param):
        x = dropout_2d(x, torch.sigmoid(h_param[:, 0]), self.training)
        x = F.max_pool2d(torch.tanh(self.conv1(x, h_net)), 2)
        x = dropout_2d(x, torch.sigmoid(h_param[:, 1]), self.training)
        x = F.max_pool2d(torch.tanh(self.conv2(x, h_net)), 2)
        x = dropout_2d(x, torch.sigmoid(h_param[:, 2]), self.training)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1), h_net)), h_net)


def _jvp(model, inputs, h_tensor, h_param, direction):
    """Delta-STN's linearisation: out(x, 0) and J·direction through the double-backward trick (the model called with
    h_net = h − h.detach(), the JVP as the gradient of the VJP w.r.t. its zero cotangent)."""
    out = model(inputs, h_tensor - h_tensor.detach(), h_param)
    cotangent = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, h_tensor, cotangent, create_graph=True)
    (jvp,) = torch.autograd.grad(vjp, cotangent, direction, create_graph=True)
    return out, jvp


def delta_stn_step(model, h_tensor, h_scale, optimizers, inputs, labels, tune_hyper, linearize=True,
                   entropy_weight=1e-3):
    """DeltaStnStepOptimizer.step with tune_scales: the training step does a general step at the current λ (h_net
    centred at zero) and then a response step at a perturbed λ (linearised when ``linearize``), each after zeroing
    every optimiser; the hyper step, in eval mode, steps λ and its scale on the loss minus the weighted entropy."""
    general_opt, response_opt, hyper_opt, scale_opt = optimizers
    batch = inputs.shape[0]
    perturbed = perturb(h_tensor, h_scale, batch)
    current = h_tensor.unsqueeze(0).repeat(batch, 1)
    if not tune_hyper:
        model.train()
        for opt in optimizers:
            opt.zero_grad()
        F.cross_entropy(model(inputs, current - current.detach(), current), labels).backward()
        general_opt.step()
        for opt in optimizers:
            opt.zero_grad()
        current = h_tensor.unsqueeze(0).repeat(batch, 1)
        direction = perturbed - current.detach()
        if linearize:
            out, jvp = _jvp(model, inputs, current, perturbed, direction)
            pred = out + jvp
        else:
            pred = model(inputs, direction, perturbed)
        F.cross_entropy(pred, labels).backward()
        response_opt.step()
    else:
        model.eval()
        for opt in optimizers:
            opt.zero_grad()
        pred = model(inputs, perturbed - current.detach(), perturbed.detach())
        (F.cross_entropy(pred, labels) - entropy_weight * entropy(h_scale)).backward()
        hyper_opt.step()
        scale_opt.step()
