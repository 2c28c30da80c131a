"""Self-tuning attention: :class:`HyperMultiheadAttention` (``nn.MultiheadAttention`` with hyper projections), and
the transformer encoder containers :func:`stn_kernels.convert` swaps in so that PyTorch's fused fast path never runs
over hyper weights (:class:`HyperTransformerEncoderLayer`, :class:`HyperTransformerEncoder`).

User docs: docs/transformers.md.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

from . import functional
from ._validation import (
    REQUIRED,
    any_autocast,
    check_ctor_bool,
    check_ctor_int,
    check_num_hparams,
    check_tensor,
    misread_hint,
)
from .hparams_context import current_hparams, current_rate
from .modules import HyperLinear

__all__ = ["HyperMultiheadAttention", "HyperTransformerEncoder", "HyperTransformerEncoderLayer"]

# The three in-projections, in the order of their rows in the packed weight.
_QKV = ("q", "k", "v")


def _check_optional_dim(value, name: str, hint: str) -> None:
    if value is not None:
        check_ctor_int(value, name, 1, hint)


def _folded_linear(weight: Tensor, hyper_weight: Tensor, bias: Optional[Tensor], hyper_bias: Optional[Tensor],
                   weight_scale: Tensor, bias_scale: Tensor, hparams: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """(W + diag(V·λ)·W_h, b + (C·λ)⊙b_h) for a shared λ [H], computed in the wider of the weights' and λ's dtype
    and returned in the weights' dtype (the forward forms V·λ in λ's dtype, the products in the weights')."""
    wide = torch.promote_types(weight.dtype, hparams.dtype)
    scale = weight_scale.to(wide) @ hparams.to(wide)
    new_weight = (weight.to(wide) + scale[:, None] * hyper_weight.to(wide)).to(weight.dtype)
    if bias is None:
        return new_weight, None
    if hyper_bias is None:
        return new_weight, bias.clone()
    new_bias = (bias.to(wide) + (bias_scale.to(wide) @ hparams.to(wide)) * hyper_bias.to(wide)).to(bias.dtype)
    return new_weight, new_bias


def _new_parameter(value: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=like.requires_grad)


class HyperMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose input and output projections are hyper linear layers:
    each projection computes W·x + (V·λ)⊙(W_h·x) + b + (C·λ)⊙b_h, with λ per example (``hparams`` [B, H]), shared
    ([H]) or None (the elementary path only: exactly ``nn.MultiheadAttention``).

    The constructor is ``nn.MultiheadAttention``'s, argument for argument, plus the required keyword
    ``num_hparams``. Parameters: nn.MultiheadAttention's, under its names (``in_proj_weight`` [3E, E], or
    ``q_proj_weight`` [E, E], ``k_proj_weight`` [E, kdim], ``v_proj_weight`` [E, vdim] when kdim or vdim differ
    from E; ``in_proj_bias`` [3E]; ``bias_k``, ``bias_v`` [1, 1, E] with ``add_bias_kv``; ``out_proj.weight``,
    ``out_proj.bias``), and the hyper path of the in-projection: ``in_proj_hyper_weight`` (or
    ``q_proj_hyper_weight``, ``k_proj_hyper_weight``, ``v_proj_hyper_weight``) shaped as the elementary weights,
    ``in_proj_hyper_bias`` [3E], and ``in_proj_hparam_weight`` [6E, H], the λ-map: rows 0..3E-1 are V and rows
    3E..6E-1 are C, each with the q, k, v rows in that order (as ``HyperLinear.hparam_weight``). ``out_proj`` is
    a :class:`~stn_kernels.HyperLinear` with its own hyper path. ``bias_k`` and ``bias_v`` have none.

    Attention: ``F.scaled_dot_product_attention`` when the weights are not returned and the dropout is
    ``dropout`` (the module's fixed rate, training mode only); an explicit softmax otherwise, as in
    ``nn.MultiheadAttention``. ``dropout_hparam``: the name of a per-example rate in the enclosing
    ``stn_kernels.hparams(..., rates={name: rates})`` block: when set and the block has that rate, attention
    weights are dropped with one rate per example (:func:`stn_kernels.per_example_dropout`, training mode only)
    instead of ``dropout``.

    ``_qkv_same_embed_dim`` is False whatever the layout: torch's fused paths (``nn.TransformerEncoderLayer``'s fast
    path, ``nn.TransformerEncoder``'s nested tensors) read the projection weights directly and would ignore λ; they
    check this flag, and so never run over this module. ``packed_in_proj`` says which layout it holds.
    """

    # True for the layers convert() made: without hparams they take the λ of an enclosing
    # ``stn_kernels.hparams(...)`` block (its batch_dim is ignored: the rows follow ``batch_first``).
    context_hparams = False
    # The name of the per-example attention-dropout rate in the enclosing hparams block, or None.
    dropout_hparam: Optional[str] = None
    _qkv_same_embed_dim = False  # see the class docstring

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, *, num_hparams: int = REQUIRED,
                 device=None, dtype=None) -> None:
        super().__init__()
        name, leading = type(self).__name__, (embed_dim, num_heads)
        check_ctor_int(embed_dim, "embed_dim")
        check_ctor_int(num_heads, "num_heads")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout!r}"
                             + misread_hint(num_hparams, name, leading, dropout))
        for flag, value in (("bias", bias), ("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn),
                            ("batch_first", batch_first)):
            check_ctor_bool(value, flag, misread_hint(num_hparams, name, leading, value))
        _check_optional_dim(kdim, "kdim", misread_hint(num_hparams, name, leading, kdim))
        _check_optional_dim(vdim, "vdim", misread_hint(num_hparams, name, leading, vdim))
        num_hparams = check_num_hparams(num_hparams, name, leading)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.packed_in_proj = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        self.num_hparams = num_hparams
        names = ("in_proj",) if self.packed_in_proj else ("q_proj", "k_proj", "v_proj")
        shapes = ([(3 * embed_dim, embed_dim)] if self.packed_in_proj
                  else [(embed_dim, embed_dim), (embed_dim, self.kdim), (embed_dim, self.vdim)])
        for prefix in ("in_proj", "q_proj", "k_proj", "v_proj"):
            for suffix in ("_weight", "_hyper_weight"):
                if prefix in names:
                    shape = shapes[names.index(prefix)]
                    self.register_parameter(prefix + suffix, nn.Parameter(torch.empty(shape, **factory)))
                else:
                    self.register_parameter(prefix + suffix, None)
        for suffix in ("_bias", "_hyper_bias"):
            self.register_parameter("in_proj" + suffix,
                                    nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None)
        self.in_proj_hparam_weight = nn.Parameter(torch.empty(6 * embed_dim, num_hparams, **factory))
        self.out_proj = HyperLinear(embed_dim, embed_dim, bias, num_hparams=num_hparams, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The elementary path as ``nn.MultiheadAttention`` (Xavier-uniform in-projection, zero biases, Xavier-normal
        ``bias_k``/``bias_v``, ``out_proj.weight`` U(±1/√E)); the hyper path as :class:`~stn_kernels.HyperLinear`'s:
        hyper weights as the elementary ones, hyper biases U(±1/√fan_in) (not zero, or their λ-map would get no
        gradient), λ-maps N(0, 0.01²)."""
        self.out_proj.reset_parameters()
        with torch.no_grad():
            for weight, hyper_weight in self._in_weights():
                nn.init.xavier_uniform_(weight)
                nn.init.xavier_uniform_(hyper_weight)
            if self.in_proj_bias is not None:
                self.in_proj_bias.zero_()
                self.out_proj.bias.zero_()
                for rows, (weight, _) in zip(self.in_proj_hyper_bias.chunk(3), self._separate_in_weights()):
                    bound = 1.0 / math.sqrt(weight.shape[1])
                    rows.uniform_(-bound, bound)
            self.in_proj_hparam_weight.normal_(0.0, 0.01)
            for extra in (self.bias_k, self.bias_v):
                if extra is not None:
                    nn.init.xavier_normal_(extra)

    def _in_weights(self):
        """The (elementary, hyper) weight pairs of the in-projection as stored: one packed pair or three."""
        if self.packed_in_proj:
            return [(self.in_proj_weight, self.in_proj_hyper_weight)]
        return [(getattr(self, f"{p}_proj_weight"), getattr(self, f"{p}_proj_hyper_weight")) for p in _QKV]

    def _separate_in_weights(self):
        """The (elementary, hyper) weight pairs of q, k and v (views of the packed ones when packed)."""
        if self.packed_in_proj:
            return list(zip(self.in_proj_weight.chunk(3), self.in_proj_hyper_weight.chunk(3)))
        return self._in_weights()

    # ------------------------------------------------------------------------------------------------ checks

    def _check_inputs(self, query, key, value) -> bool:
        """Raises for inputs nn.MultiheadAttention cannot take, naming them; returns whether they are batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(t, name)
            if t.is_nested:
                raise TypeError(f"{name}: nested tensors are not supported by {type(self).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query: expected shape [L, E] (unbatched), {self._layout('L')} (batched), got "
                             f"{tuple(query.shape)}")
        batched = query.dim() == 3
        for name, t, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.dim() != query.dim():
                raise ValueError(f"{name}: expected a {query.dim()}-D tensor like query of shape "
                                 f"{tuple(query.shape)}, got shape {tuple(t.shape)}")
            if t.shape[-1] != dim:
                which = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
                raise ValueError(f"{name}: expected {dim} features in the last dim ({which}), got shape "
                                 f"{tuple(t.shape)}")
            if t is not query and t.dtype != query.dtype:
                raise TypeError(f"{name}: expected dtype {query.dtype} (the dtype of query), got {t.dtype}")
        weight = self._in_weights()[0][0]
        if query.dtype != weight.dtype and not any_autocast():
            raise TypeError(f"query: expected dtype {weight.dtype} (the dtype of the module's weights), got "
                            f"{query.dtype}")
        batch_dim = 0 if self.batch_first else 1
        if batched and (key.shape[batch_dim] != query.shape[batch_dim]
                        or value.shape[batch_dim] != query.shape[batch_dim]):
            raise ValueError(f"key, value: expected the batch size of query ({query.shape[batch_dim]}, dim "
                             f"{batch_dim} with batch_first={self.batch_first}), got key {tuple(key.shape)} and "
                             f"value {tuple(value.shape)}")
        seq_dim = (1 if self.batch_first else 0) if batched else 0
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(f"value: expected the sequence length of key ({key.shape[seq_dim]}, dim {seq_dim}), "
                             f"got shape {tuple(value.shape)}")
        return batched

    def _layout(self, length: str) -> str:
        return f"[N, {length}, E] (batch_first=True)" if self.batch_first else f"[{length}, N, E] (batch_first=False)"

    def _check_hparams(self, hparams, query_shape: tuple, batched: bool, batch: int) -> None:
        if hparams is None:
            return
        check_tensor(hparams, "hparams")
        H = self.num_hparams
        if hparams.dim() not in (1, 2) or hparams.shape[-1] != H:
            raise ValueError(f"hparams: expected shape [N, {H}] (one row per example) or [{H}] (shared), got "
                             f"{tuple(hparams.shape)}")
        if hparams.dim() == 2 and not batched:
            raise ValueError(f"hparams: expected shape [{H}] with an unbatched query of shape {query_shape}, got "
                             f"{tuple(hparams.shape)}")
        if hparams.dim() == 2 and hparams.shape[0] != batch:
            raise ValueError(f"hparams: expected {batch} rows (one per example along dim "
                             f"{0 if self.batch_first else 1} of query of shape {query_shape}, batch_first="
                             f"{self.batch_first}), got shape {tuple(hparams.shape)}")

    def _check_masks(self, key_padding_mask, attn_mask, batched: bool, batch: int, tgt_len: int,
                     src_len: int) -> None:
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is None:
                continue
            check_tensor(mask, name, floating=False)
            if mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"{name}: expected a bool or floating-point tensor, got dtype {mask.dtype}")
        if key_padding_mask is not None:
            expected = (batch, src_len) if batched else (src_len,)
            if tuple(key_padding_mask.shape) != expected:
                raise ValueError(f"key_padding_mask: expected shape {expected} ([N, S] batched, [S] unbatched), "
                                 f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            allowed = ((tgt_len, src_len), (batch * self.num_heads, tgt_len, src_len))
            if tuple(attn_mask.shape) not in allowed:
                raise ValueError(f"attn_mask: expected shape {allowed[0]} ([L, S]) or {allowed[1]} "
                                 f"([N·num_heads, L, S]), got {tuple(attn_mask.shape)}")

    # ------------------------------------------------------------------------------------------------ forward

    def _project(self, which: str, x: Tensor, hparams: Optional[Tensor]) -> Tensor:
        """The in-projection of ``x`` [N, *, features] for ``which`` (a subset of "qkv", consecutive rows), as one
        hyper_linear call over those rows; the outputs side by side in the last dim."""
        first, count = "qkv".index(which[0]), len(which)
        E = self.embed_dim
        rows = slice(first * E, (first + count) * E)
        if self.packed_in_proj:
            weight, hyper_weight = self.in_proj_weight[rows], self.in_proj_hyper_weight[rows]
        else:
            weight, hyper_weight = (getattr(self, f"{which}_proj_weight"), getattr(self, f"{which}_proj_hyper_weight"))
        bias = None if self.in_proj_bias is None else self.in_proj_bias[rows]
        hyper_bias = None if self.in_proj_hyper_bias is None else self.in_proj_hyper_bias[rows]
        weight_scale, bias_scale = self.in_proj_hparam_weight.chunk(2)
        return functional.hyper_linear(x, hparams, weight, hyper_weight, bias, hyper_bias, weight_scale[rows],
                                       bias_scale[rows])

    def _in_projection(self, query: Tensor, key: Tensor, value: Tensor, hparams: Optional[Tensor]):
        """q, k, v [N, *, E] from batch-first inputs: one product for self-attention (query, key and value the same
        tensor) or key is value, as nn.MultiheadAttention's packed path (the same function either way)."""
        if self.packed_in_proj and query is key and key is value:
            return self._project("qkv", query, hparams).chunk(3, dim=-1)
        q = self._project("q", query, hparams)
        if self.packed_in_proj and key is value:
            k, v = self._project("kv", key, hparams).chunk(2, dim=-1)
            return q, k, v
        return q, self._project("k", key, hparams), self._project("v", value, hparams)

    def _dropout_rates(self, batch: int) -> Optional[Union[Tensor, float]]:
        """The per-example attention-dropout rates in force (training mode, ``dropout_hparam`` set and given by the
        enclosing hparams block), or None (the fixed ``dropout``)."""
        if not self.training or self.dropout_hparam is None:
            return None
        rates = current_rate(self.dropout_hparam)
        if isinstance(rates, Tensor) and rates.dim() == 1 and rates.shape[0] != batch:
            raise ValueError(f"rates[{self.dropout_hparam!r}]: expected {batch} rates (one per example of query, "
                             f"as {type(self).__name__}.dropout_hparam names it), got shape {tuple(rates.shape)}")
        return rates

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, hparams: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``nn.MultiheadAttention.forward`` (the same arguments, masks, ``is_causal`` rules and return value
        ``(attn_output, attn_weights or None)``, unbatched inputs too) plus ``hparams``: [N, H] with one row per
        example (along dim 0 of query with ``batch_first``, else dim 1), [H] shared, or None: the λ of an enclosing
        ``stn_kernels.hparams`` block for a module made by ``convert``, else the elementary path only."""
        if hparams is None and self.context_hparams:
            hparams = current_hparams()
        batched = self._check_inputs(query, key, value)
        query_shape = tuple(query.shape)
        # Batch first, [N, L, E]; inputs that were the same tensor stay the same tensor (one packed product).
        if not batched or not self.batch_first:
            moved = {id(t): t.unsqueeze(0) if not batched else t.transpose(0, 1) for t in (query, key, value)}
            query, key, value = moved[id(query)], moved[id(key)], moved[id(value)]
        batch, tgt_len = query.shape[:2]
        src_len = key.shape[1]
        self._check_hparams(hparams, query_shape, batched, batch)
        self._check_masks(key_padding_mask, attn_mask, batched, batch, tgt_len, src_len)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal: True needs attn_mask (the causal mask, as nn.MultiheadAttention: "
                             "nn.Transformer.generate_square_subsequent_mask makes one), got attn_mask=None")
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # nn.MultiheadAttention's rule: the hint stands for the mask (the causal one)
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        # A float mask of another dtype is added in the query's (as F.scaled_dot_product_attention does).
        key_padding_mask, attn_mask = (None if m is None else m.to(query.dtype) for m in (key_padding_mask, attn_mask))
        rates = self._dropout_rates(batch)
        q, k, v = self._in_projection(query, key, value, hparams)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, self.embed_dim)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, self.embed_dim)], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))  # [N, heads, *, d]
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        mask = attn_mask
        if mask is not None and mask.dim() == 3:
            mask = mask.view(batch, heads, tgt_len, -1)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        if need_weights or rates is not None:
            out, weights = self._explicit_attention(q, k, v, mask, is_causal, rates)
        else:
            dropout = self.dropout if self.training else 0.0
            out, weights = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal), None
        out = out.transpose(1, 2).flatten(2)  # [N, L, E]
        out_proj = self.out_proj
        weight_scale, bias_scale = out_proj.hparam_weight.chunk(2)
        out = functional.hyper_linear(out, hparams, out_proj.weight, out_proj.hyper_weight, out_proj.bias,
                                      out_proj.hyper_bias, weight_scale, bias_scale)
        if need_weights and average_attn_weights:
            weights = weights.mean(dim=1)
        elif not need_weights:
            weights = None
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool,
                            rates) -> Tuple[Tensor, Tensor]:
        """softmax(q·kᵀ/√d + mask), dropped (per example with ``rates``, else ``dropout`` in training mode), times
        v: (output [N, heads, L, d], weights [N, heads, L, S] after the dropout, as nn.MultiheadAttention)."""
        scores = torch.matmul(q * math.sqrt(1.0 / self.head_dim), k.transpose(-2, -1))
        if mask is not None:
            scores = scores + mask
        elif is_causal:  # no mask left only when nn.MultiheadAttention would take SDPA's causal one
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        if rates is not None:
            weights = functional.per_example_dropout(weights, rates)
        elif self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout)
        return torch.matmul(weights, v), weights

    # ------------------------------------------------------------------------------------------------ fold

    def fold(self, hparams: Tensor, rates: Optional[Mapping[str, Union[Tensor, float]]] = None
             ) -> nn.MultiheadAttention:
        """A new plain ``nn.MultiheadAttention`` computing this module at the shared λ ``hparams`` ([H], as fed to
        the layers): each projection's W' = W + diag(V·λ)·W_h and b' = b + (C·λ)⊙b_h (new Parameters, detached,
        ``requires_grad`` as the originals; ``bias_k``, ``bias_v`` copied). Its ``dropout`` is ``rates[dropout_hparam]``
        when ``rates`` has it (one rate, shared), else this module's. Train/eval mode is kept."""
        check_tensor(hparams, "hparams")
        if hparams.shape != (self.num_hparams,):
            raise ValueError(f"hparams: expected one shared λ of shape [{self.num_hparams}] to fold (per-example λ "
                             f"has no plain equivalent), got shape {tuple(hparams.shape)}")
        dropout = self.dropout
        if rates is not None:
            if not isinstance(rates, Mapping):
                raise TypeError(f"rates: expected a mapping from hyperparameter names to rates, got "
                                f"{type(rates).__name__}")
            if self.dropout_hparam is not None and self.dropout_hparam in rates:
                rate = rates[self.dropout_hparam]
                if isinstance(rate, Tensor) and rate.numel() != 1:
                    raise ValueError(f"rates[{self.dropout_hparam!r}]: expected one shared rate to fold, got shape "
                                     f"{tuple(rate.shape)}")
                dropout = float(rate)
                if not 0.0 <= dropout <= 1.0:
                    raise ValueError(f"rates[{self.dropout_hparam!r}]: expected a rate in [0, 1], got {dropout}")
        hparams = hparams.detach()
        first = self._in_weights()[0][0]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # no init on the meta device: every Parameter is replaced below
            plain = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout, self.in_proj_bias is not None,
                                          self.bias_k is not None, self.add_zero_attn, self.kdim, self.vdim,
                                          self.batch_first, device="meta", dtype=first.dtype)
            weight_scale, bias_scale = self.in_proj_hparam_weight.chunk(2)
            E = self.embed_dim
            biases = [None] * 3 if self.in_proj_bias is None else list(self.in_proj_bias.chunk(3))
            hyper_biases = [None] * 3 if self.in_proj_hyper_bias is None else list(self.in_proj_hyper_bias.chunk(3))
            new_weights, new_biases = [], []
            for i, (weight, hyper_weight) in enumerate(self._separate_in_weights()):
                rows = slice(i * E, (i + 1) * E)
                new_weight, new_bias = _folded_linear(weight, hyper_weight, biases[i], hyper_biases[i],
                                                      weight_scale[rows], bias_scale[rows], hparams)
                new_weights.append(new_weight)
                new_biases.append(new_bias)
            if self.packed_in_proj:
                plain.in_proj_weight = _new_parameter(torch.cat(new_weights), self.in_proj_weight)
            else:
                for which, new_weight in zip(_QKV, new_weights):
                    name = f"{which}_proj_weight"
                    setattr(plain, name, _new_parameter(new_weight, getattr(self, name)))
            if self.in_proj_bias is not None:
                plain.in_proj_bias = _new_parameter(torch.cat(new_biases), self.in_proj_bias)
            out_proj = self.out_proj
            out_scale, out_bias_scale = out_proj.hparam_weight.chunk(2)
            weight, bias = _folded_linear(out_proj.weight, out_proj.hyper_weight, out_proj.bias, out_proj.hyper_bias,
                                          out_scale, out_bias_scale, hparams)
            plain.out_proj.weight = _new_parameter(weight, out_proj.weight)
            if bias is None:
                plain.out_proj.register_parameter("bias", None)
            else:
                plain.out_proj.bias = _new_parameter(bias, out_proj.bias)
            for name in ("bias_k", "bias_v"):
                if getattr(self, name) is not None:
                    setattr(plain, name, _new_parameter(getattr(self, name), getattr(self, name)))
        return plain.train(self.training)

    def extra_repr(self) -> str:
        s = f"{self.embed_dim}, {self.num_heads}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.in_proj_bias is None:
            s += ", bias=False"
        if self.bias_k is not None:
            s += ", add_bias_kv=True"
        if self.add_zero_attn:
            s += ", add_zero_attn=True"
        if not self.packed_in_proj:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout_hparam is not None:
            s += f", dropout_hparam={self.dropout_hparam!r}"
        return s + f", num_hparams={self.num_hparams}"


# ---------------------------------------------------------------------------------------------------- containers

def _is_ours_without_fold(module: nn.Module) -> bool:
    """A module of stn_kernels holding Parameters of its own but no ``fold``: a plain container over it would run a
    plain layer's code over hyper weights, or fail."""
    return (type(module).__module__.startswith("stn_kernels.") and not callable(getattr(module, "fold", None))
            and any(p is not None for p in module._parameters.values()))


def _folded_tree(module: nn.Module, plain_class: type, hparams: Tensor, rates, where: str) -> nn.Module:
    """A shallow copy of ``module`` as ``plain_class`` in which every descendant with a ``fold`` is replaced by what
    its fold returns; modules with nothing to fold below them are shared with ``module``, not copied."""
    children = {}
    for name, child in module._modules.items():
        path = f"{where}.{name}"
        if child is not None and callable(getattr(child, "fold", None)):
            child = child.fold(hparams, rates)
        elif child is not None:
            if _is_ours_without_fold(child):
                raise TypeError(f"fold: {path} ({type(child).__name__}) holds hyper weights and has no fold, so "
                                f"no plain torch.nn module can stand for it")
            if any(callable(getattr(m, "fold", None)) or _is_ours_without_fold(m) for m in child.modules()):
                child = _folded_tree(child, type(child), hparams, rates, path)
        children[name] = child
    new = plain_class.__new__(plain_class)
    # The hook dicts, parameter dict, ... copied: registering on one must not change the other.
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    new.__dict__["_modules"] = children
    return new


class HyperTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """The ``nn.TransformerEncoderLayer`` that :func:`stn_kernels.convert` leaves when it converted something inside
    one (the same object, its class swapped; :func:`stn_kernels.revert` swaps it back). Its forward is the layer's
    own computation without PyTorch's fused fast path (``torch._transformer_encoder_layer_fwd``, taken in eval mode
    under ``torch.no_grad``), which reads ``linear1.weight``, ``self_attn.in_proj_weight``, ... directly and would
    ignore λ. The outputs are what nn.TransformerEncoderLayer computes in training mode or with gradients."""

    _torch_class = nn.TransformerEncoderLayer

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        """``nn.TransformerEncoderLayer.forward`` (the same arguments and masks), never on the fast path."""
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))

    def fold(self, hparams: Tensor, rates: Optional[Mapping[str, Union[Tensor, float]]] = None
             ) -> nn.TransformerEncoderLayer:
        """A plain ``nn.TransformerEncoderLayer`` computing this layer at the shared λ ``hparams`` ([H], as fed to
        the layers): each child with a ``fold`` replaced by what it returns, the others (norms, dropouts) shared."""
        return _folded_tree(self, self._torch_class, hparams, rates, type(self).__name__)


class HyperTransformerEncoder(nn.TransformerEncoder):
    """The ``nn.TransformerEncoder`` that :func:`stn_kernels.convert` leaves when it converted something inside one
    (class swapped in place, as :class:`HyperTransformerEncoderLayer`). Its forward runs the layers on the padded
    input as nn.TransformerEncoder does in training mode: never on nested tensors (its eval-mode path with
    ``src_key_padding_mask``), whose layers would take the fused fast path. Padded positions therefore hold computed
    values, not the zeros of the nested path."""

    _torch_class = nn.TransformerEncoder

    def forward(self, src: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: Optional[bool] = None) -> Tensor:
        """``nn.TransformerEncoder.forward`` (the same arguments, masks and causal-mask detection), never on
        nested tensors."""
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(mask), other_name="mask",
                                                 target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        seq_len = _get_seq_len(src, self.layers[0].self_attn.batch_first)
        is_causal = _detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else self.norm(output)

    def fold(self, hparams: Tensor, rates: Optional[Mapping[str, Union[Tensor, float]]] = None
             ) -> nn.TransformerEncoder:
        """A plain ``nn.TransformerEncoder`` computing this encoder at the shared λ ``hparams`` ([H], as fed to the
        layers): its layers folded (:meth:`HyperTransformerEncoderLayer.fold`), the rest shared."""
        return _folded_tree(self, self._torch_class, hparams, rates, type(self).__name__)
