"""Drop-in ``torch.nn`` modules for the published STN layers.

Parameters (for a layer with N outputs and H hyperparameters):
``weight`` and ``hyper_weight`` (W_elem, W_hyper), ``bias`` and ``hyper_bias``
(b_elem, b_hyper), and ``hparam_weight`` [2N, H], the bias-free linear map from
λ to the scales: rows 0..N-1 are V (hyper weight path), rows N..2N-1 are C
(hyper bias), stacked as in both published implementations. ``load_state_dict``
also accepts the official STN and the Delta-STN parameter names.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from . import functional

# Published name -> ours. The official CNN layers also carry ``elem_scalar`` a,
# which multiplies the elementary path: it is folded into weight and bias.
_OFFICIAL_NAMES = {
    "elem_weight": "weight", "hnet_weight": "hyper_weight", "elem_bias": "bias", "hnet_bias": "hyper_bias",
    "htensor_to_scalars.weight": "hparam_weight",
    # official LSTM layers
    "elem_weight_raw": "weight", "hnet_weight_raw": "hyper_weight", "hnet_tensor_to_scalars.weight": "hparam_weight",
}
_DELTA_STN_NAMES = {
    "general_weight": "weight", "response_weight": "hyper_weight", "general_bias": "bias",
    "response_bias": "hyper_bias", "hyper_bottleneck.weight": "hparam_weight",
}
_EMBEDDING_NAMES = {
    "elem_embedding.weight": "weight", "hnet_embedding.weight": "hyper_weight",
    "hnet_tensor_to_scalars.weight": "hparam_weight",
}


def _rename_published(state_dict: dict, prefix: str, names: dict) -> None:
    """Rewrite published parameter names under ``prefix`` to ours, in place."""
    scalar = state_dict.pop(prefix + "elem_scalar", None)
    for old, new in names.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    if scalar is not None:
        for name in ("weight", "bias"):
            if state_dict.get(prefix + name) is not None:
                state_dict[prefix + name] = state_dict[prefix + name] * scalar


class _HyperLayer(nn.Module):
    """Shared parts of the layers with an elementary and a hyper path plus biases."""

    out_features: int
    num_hparams: int

    def _init_hyper_params(self, weight_shape, num_outputs, num_hparams, bias, factory):
        self.num_hparams = num_hparams
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.hyper_weight = nn.Parameter(torch.empty(weight_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_outputs, **factory))
            self.hyper_bias = nn.Parameter(torch.empty(num_outputs, **factory))
        else:
            self.register_parameter("bias", None)
            self.register_parameter("hyper_bias", None)
        self.hparam_weight = nn.Parameter(torch.empty(2 * num_outputs, num_hparams, **factory))

    def reset_parameters(self) -> None:
        """As the official STN code: weights and biases U(±1/√fan_in), hparam_weight N(0, 0.01²)."""
        fan_in = self.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            for p in (self.weight, self.hyper_weight, self.bias, self.hyper_bias):
                if p is not None:
                    p.uniform_(-bound, bound)
            self.hparam_weight.normal_(0.0, 0.01)

    def _scales(self):
        # (V, C) as views of the stacked [2N, H] parameter; one chunk op costs half of two slices.
        return self.hparam_weight.chunk(2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_published(state_dict, prefix, _OFFICIAL_NAMES)
        _rename_published(state_dict, prefix, _DELTA_STN_NAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class HyperLinear(_HyperLayer):
    """out = W·x + (V·λ) ⊙ (W_hyper·x) + b + (C·λ) ⊙ b_hyper, with λ per example.

    ``forward(input, hparams=None)``: input [B, in_features] or [B, *, in_features];
    hparams [B, num_hparams] (one row per example), [num_hparams] (shared) or None
    (the elementary path only, i.e. a plain linear layer).
    """

    def __init__(self, in_features: int, out_features: int, num_hparams: int, bias: bool = True, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_hyper_params((out_features, in_features), out_features, num_hparams, bias,
                                {"device": device, "dtype": dtype})
        self.reset_parameters()

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None) -> Tensor:
        weight_scale, bias_scale = self._scales()
        return functional.hyper_linear(input, hparams, self.weight, self.hyper_weight, self.bias, self.hyper_bias,
                                       weight_scale, bias_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_hparams={self.num_hparams}, bias={self.bias is not None}")


class HyperConv2d(_HyperLayer):
    """out[b,c] = conv(x, W)[b,c] + s[b,c]·conv(x, W_hyper)[b,c] + b[c] + t[b,c]·b_hyper[c], s = V·λ_b, t = C·λ_b."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_hparams: int, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, *, device=None, dtype=None) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: expected a divisor of in_channels={in_channels} and "
                             f"out_channels={out_channels}, got {groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self._init_hyper_params((out_channels, in_channels // groups, *self.kernel_size), out_channels, num_hparams,
                                bias, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None) -> Tensor:
        weight_scale, bias_scale = self._scales()
        return functional.hyper_conv2d(input, hparams, self.weight, self.hyper_weight, self.bias, self.hyper_bias,
                                       weight_scale, bias_scale, self.stride, self.padding, self.dilation,
                                       self.groups)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"num_hparams={self.num_hparams}, stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}"


class HyperEmbedding(nn.Module):
    """out[b, ...] = E[i] + (V·λ_b) ⊙ E_hyper[i] for indices i = input[b, ...].

    Parameters ``weight`` and ``hyper_weight`` [num_embeddings, embedding_dim] and
    ``hparam_weight`` V [embedding_dim, num_hparams]. ``forward(input, hparams=None)``:
    hparams [B, H] aligns with dim 0 of input (pass ``batch_dim=1`` for time-major
    [T, B] input as in the published LSTM code), [H] or None.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, num_hparams: int, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_hparams = num_hparams
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        self.hyper_weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        self.hparam_weight = nn.Parameter(torch.empty(embedding_dim, num_hparams, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Tables N(0, 1) as ``nn.Embedding``; hparam_weight N(0, 0.01²) as the official code."""
        with torch.no_grad():
            self.weight.normal_()
            self.hyper_weight.normal_()
            self.hparam_weight.normal_(0.0, 0.01)

    def forward(self, input: Tensor, hparams: Optional[Tensor] = None, batch_dim: int = 0) -> Tensor:
        if batch_dim not in (0, 1):
            raise ValueError(f"batch_dim: expected 0 or 1, got {batch_dim!r}")
        if batch_dim == 1:
            if input.dim() < 2:
                raise ValueError(f"input: expected shape [T, B, ...] with batch_dim=1, got {tuple(input.shape)}")
            out = functional.hyper_embedding(input.transpose(0, 1), hparams, self.weight, self.hyper_weight,
                                             self.hparam_weight)
            return out.transpose(0, 1)
        return functional.hyper_embedding(input, hparams, self.weight, self.hyper_weight, self.hparam_weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _rename_published(state_dict, prefix, _EMBEDDING_NAMES)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, num_hparams={self.num_hparams}"
