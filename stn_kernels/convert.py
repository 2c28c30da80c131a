"""``convert(model)``: swap the layers of an existing STN codebase for stn_kernels layers, in place.

Recognised by parameter and submodule names (the classes themselves live in other people's code):

==========================  ===========================================================  =====================
published layer             names                                                        becomes
==========================  ===========================================================  =====================
STN (CNN) linear / conv     ``elem_weight`` [N,K] / [C,C',kh,kw], ``hnet_weight``,       HyperLinear / HyperConv2d
                            ``htensor_to_scalars.weight``, optional ``elem_bias``,
                            ``hnet_bias``, ``elem_scalar``
STN (LSTM) linear           ``elem_weight_raw``, ``hnet_weight_raw``,                    DropConnectHyperLinear
                            ``hnet_tensor_to_scalars.weight``, opt. biases
STN (LSTM) embedding        ``elem_embedding.weight``, ``hnet_embedding.weight``,        TimeMajorHyperEmbedding
                            ``hnet_tensor_to_scalars.weight``
STN ``HyperLSTMCell``       class name, children ``i2h`` [4N,K] and ``h2h`` [4N,N] (both   HyperLSTMCell (fused
                            STN-LSTM linears, as above)                                  recurrence)
Delta-STN linear / conv     ``general_weight``, ``response_weight``,                     HyperLinear / HyperConv2d
                            ``hyper_bottleneck.weight``, opt. biases
``nn.Linear``/``nn.Conv2d``  (only with ``num_hparams``)                                  HyperLinear / HyperConv2d
``nn.Embedding``            (only with ``num_hparams``)                                  HyperEmbedding
``nn.LSTM``                 (only with ``num_hparams``) not bidirectional, no proj_size  TorchLayoutHyperLSTM
``nn.MultiheadAttention``   (only with ``num_hparams``) packed or separate q/k/v,        HyperMultiheadAttention
                            biases, ``add_bias_kv``, ``add_zero_attn``, ``batch_first``
==========================  ===========================================================  =====================

The new layers take over the *same* ``nn.Parameter`` objects (no copy), so shared and tied
weights stay shared (the LSTM's decoder tied to the embedding), memory does not double, and an
optimiser built before ``convert`` (as the published scripts build theirs) keeps training the
converted model along the same trajectory. That includes the official ``elem_scalar`` a, kept as the
layer's ``elem_scalar`` (out = a·(W x + b) + ...); ``layer.fold_elem_scalar()`` folds it into new
weight and bias Parameters for inference. Forward signatures stay those of the published layers
(``forward(input, htensor)``), so the model's own forward runs unchanged.

Converted Delta-STN layers are also instances of the published classes (see ``_also_instance_of``), so
Delta-STN's ``isinstance``-based parameter lists stay right. The official embedding's ``padding_idx=-1`` (no
gradient into the last row of either table) is kept as ``padding_idx``. Layers with the elementary names but no
hyper path (the official non-STN baseline's ``DropconnectLinear``) are left alone.

Plain ``nn.Linear``/``nn.Conv2d`` get a hyper path whose λ-map ``hparam_weight`` starts at zero
(outputs unchanged at conversion, as Delta-STN initialises its bottleneck) and whose
``hyper_weight``/``hyper_bias`` get the usual U(±1/√fan_in) init (so the gradient w.r.t.
``hparam_weight`` is not zero); your forward must then pass the hyperparameters as the second
argument to use it, or run it inside ``with stn_kernels.hparams(lam):``, which feeds ``lam`` to every layer
converted from a plain one whose forward got none; :func:`revert` puts the original modules back.

A plain ``nn.LSTM`` becomes a :class:`TorchLayoutHyperLSTM` (a :class:`~stn_kernels.HyperLSTM`): its weights and
biases stay the nn.LSTM's own Parameters under their names (``weight_ih_l0``, ...), reordered from torch's gate
order (i, f, g, o) to ours in each forward, so they too are shared, not copied (optimisers built before
converting keep working); outputs, states and gradients are nn.LSTM's without λ, train-mode ``dropout`` between
layers included.

An ``nn.MultiheadAttention`` becomes a :class:`~stn_kernels.HyperMultiheadAttention` over its own Parameters (its
``out_proj`` included). An ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder`` with converted modules inside
gets its class swapped, in place, to one whose forward never takes PyTorch's fused fast path (which reads the weights
directly and would ignore λ); subclasses of those two are left whole. The rules: :mod:`stn_kernels.convert_attention`
and docs/transformers.md.

A plain layer no Hyper layer can stand in for (a bidirectional ``nn.LSTM``, an ``nn.Embedding`` with ``max_norm``, a
subclass, a parametrized or hooked layer, ...: see :func:`convert`) is left as it is and reported with the reason,
the rest of the model converted; converting such a layer on its own (``convert(layer, num_hparams=H)``) raises
ValueError. ``exclude=`` leaves modules by name or type on purpose. Without ``report=True``, one UserWarning lists
the layers of a kind convert takes that it could not take, and every module left when nothing at all was
converted: nothing is skipped without a word (a BatchNorm, or a published model's plain decoder next to
converted layers, is only in the report).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .convert_attention import (
    attention_lacks,
    convert_attention,
    fast_path_subclass,
    restore_fast_path_containers,
    swap_fast_path_container,
)
from .convert_published import (
    DropConnectHyperLinear,
    TimeMajorHyperEmbedding,
    _convert_published,
    _convert_published_cell,
    _is_published_lstm_cell,
    _take,
    published_layer_kind,
)
from .convert_tuning import RatePlan, infer_batch_first
from .modules import HyperConv2d, HyperEmbedding, HyperLinear
from .modules_attention import HyperMultiheadAttention, HyperTransformerEncoder, HyperTransformerEncoderLayer
from .modules_lstm import HyperLSTM, HyperLSTMCell

__all__ = ["convert", "revert", "ConvertReport", "DropConnectHyperLinear", "TimeMajorHyperEmbedding",
           "TorchLayoutHyperLSTM", "published_layer_kind"]


def _in_our_gate_order(param: Optional[Tensor]) -> Optional[Tensor]:
    """nn.LSTM's gate blocks (i, f, g, o) along dim 0 in ours, the official STN's (f, i, o, g)."""
    if param is None:
        return None
    i, f, g, o = param.chunk(4)
    return torch.cat((f, i, o, g))


class HyperPathLSTMCell(HyperLSTMCell):
    """A layer of a :class:`TorchLayoutHyperLSTM`: only the hyper path (its elementary weights are the nn.LSTM's
    Parameters, held by the TorchLayoutHyperLSTM), so it cannot run on its own."""

    def forward(self, *args, **kwargs):
        """Not callable on its own: raises TypeError (call the TorchLayoutHyperLSTM that holds it)."""
        raise TypeError("HyperPathLSTMCell: holds only the hyper path of one layer of an nn.LSTM converted by "
                        "stn_kernels.convert (the weights are the nn.LSTM's, on the TorchLayoutHyperLSTM): "
                        "call the whole TorchLayoutHyperLSTM")


class TorchLayoutHyperLSTM(HyperLSTM):
    """The HyperLSTM that :func:`convert` makes of an ``nn.LSTM``: the nn.LSTM's own Parameters, under its names
    (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``) and in its gate order
    (i, f, g, o), are the elementary weights; ``cells[k]`` (:class:`HyperPathLSTMCell`) hold only the hyper path
    (``i2h`` / ``h2h``: ``hyper_weight``, ``hyper_bias``, ``hparam_weight``; ``weight`` and ``bias`` are None).
    nn.LSTM's ``dropout`` between layers is kept (the same F.dropout draws).

    Why the nn.LSTM's Parameters are not simply the cells' weights: our recurrence takes the gates in the
    official STN's order (f, i, o, g), so the same objects cannot serve as i2h / h2h weights. A copy in our
    order would leave an optimiser built before :func:`convert`, and the nn.LSTM that :func:`revert` puts back,
    with stale tensors; reordering their rows in place would scramble an optimiser's state (Adam's moments) and
    anything else holding them. So the nn.LSTM's Parameters stay the source of truth, and each forward reorders
    their gate blocks (a cat of four views per tensor, differentiable, small next to the recurrence).
    """

    def __init__(self, lstm: nn.LSTM, *, num_hparams: int) -> None:
        weight = lstm.weight_ih_l0
        super().__init__(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
                         num_hparams=num_hparams, device=weight.device, dtype=weight.dtype)
        if lstm.num_layers > 1:  # nn.LSTM ignores it (with a warning) for one layer
            self.dropout = float(lstm.dropout)
        self._elementary_names = []
        for layer, cell in enumerate(self.cells):
            cell.__class__ = HyperPathLSTMCell  # the same module with the hyper path only: see its docstring
            for linear in (cell.i2h, cell.h2h):
                linear.register_parameter("weight", None)
                linear.register_parameter("bias", None)
            names = tuple(f"{name}_l{layer}" if lstm.bias or name.startswith("weight") else None
                          for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh"))
            for name in filter(None, names):
                _take(self, name, getattr(lstm, name))
            self._elementary_names.append(names)

    def _layer_tensors(self, layer: int) -> tuple:
        # The nn.LSTM's own Parameters (in torch's gate order: the shapes are the same) as the elementary weights.
        i2h, h2h, names = super()._layer_tensors(layer)
        weight_ih, bias_ih, weight_hh, bias_hh = (None if name is None else getattr(self, name)
                                                  for name in self._elementary_names[layer])
        i2h = (weight_ih, i2h[1], bias_ih) + i2h[3:]
        h2h = (weight_hh, h2h[1], bias_hh) + h2h[3:]
        for which, (weight_name, bias_name) in enumerate(((0, 1), (2, 3))):
            names[which][0] = self._elementary_names[layer][weight_name]
            names[which][2] = self._elementary_names[layer][bias_name] or names[which][2]
        return i2h, h2h, names

    def _layer_params(self, layer: int, dropconnect):
        elementary = tuple(None if name is None else _in_our_gate_order(getattr(self, name))
                           for name in self._elementary_names[layer])
        return self.cells[layer]._params(dropconnect, elementary)

    def _host_elementary(self, layer: int):
        # The nn.LSTM's Parameters as they are: the host layer reads their gate blocks in torch's order.
        return tuple(None if name is None else getattr(self, name) for name in self._elementary_names[layer]), True

    def reset_parameters(self) -> None:
        """The hyper path as HyperLSTM's, the nn.LSTM's Parameters as ``nn.LSTM.reset_parameters``."""
        super().reset_parameters()
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for names in self._elementary_names:
                for name in filter(None, names):
                    getattr(self, name).uniform_(-bound, bound)


def _convert_plain(module: nn.Module, num_hparams: int, where: str, batch_dim: int = 0) -> nn.Module:
    if isinstance(module, nn.LSTM):
        new = TorchLayoutHyperLSTM(module, num_hparams=num_hparams)
    elif isinstance(module, nn.MultiheadAttention):
        new = convert_attention(module, num_hparams)
    else:
        new = _convert_plain_layer(module, num_hparams)
        if isinstance(new, (HyperLinear, HyperEmbedding)):  # convolutions are batch first
            new.hparams_batch_dim = batch_dim  # λ's rows along dim 1 of a time-major [T, B, ...] input when 1
    with torch.no_grad():  # the hyper path adds (V·λ)⊙(W_h x) + (C·λ)⊙b_h = 0 until V, C learn
        for name, param in new.named_parameters():
            if name.endswith("hparam_weight"):  # also the attention's in_proj_hparam_weight
                param.zero_()
    new.context_hparams = True  # λ from an enclosing stn_kernels.hparams(...) block when the forward gets none
    # Kept outside the module tree (not a submodule: no second copy of its parameters) for revert().
    object.__setattr__(new, "_stn_original", module)
    return new


def _convert_plain_layer(module: nn.Module, num_hparams: int) -> nn.Module:
    weight, bias = module.weight, getattr(module, "bias", None)
    factory = {"dtype": weight.dtype, "device": weight.device}
    if isinstance(module, nn.Embedding):
        new = HyperEmbedding(weight.shape[0], weight.shape[1], module.padding_idx, num_hparams=num_hparams,
                             **factory)
    elif isinstance(module, nn.Conv2d):
        new = HyperConv2d(weight.shape[1] * module.groups, weight.shape[0], tuple(weight.shape[2:]),
                          stride=module.stride, padding=module.padding, dilation=module.dilation,
                          groups=module.groups, bias=bias is not None, padding_mode=module.padding_mode,
                          num_hparams=num_hparams, **factory)
    else:
        # Sizes from the weight, not the attributes: a tied weight may have replaced the one built (the official
        # LSTMs build nn.Linear(nhid, ntoken) and then tie it to the [ntoken, ninp] embedding).
        new = HyperLinear(weight.shape[1], weight.shape[0], bias is not None, num_hparams=num_hparams, **factory)
    _take(new, "weight", weight)
    if not isinstance(module, nn.Embedding):
        _take(new, "bias", bias)
    return new


def revert(model: nn.Module) -> nn.Module:
    """Undoes :func:`convert` for the layers it made from plain ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``,
    ``nn.LSTM`` and ``nn.MultiheadAttention``: each is replaced, in place, by the original module, which holds the
    same weight and bias Parameters (trained since, if they were); the hyper path's own parameters are dropped.
    Transformer encoder layers and encoders get their torch class back. Returns ``model`` (or the original layer if
    ``model`` itself is a converted one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    restore_fast_path_containers(model)

    def original(module: nn.Module) -> Optional[nn.Module]:
        found = module.__dict__.get("_stn_original")
        if found is not None:
            found.train(module.training)
        return found

    top = original(model)
    if top is not None:
        return top
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            back = None if child is None else original(child)
            if back is not None:
                parent._modules[name] = back
    return model


@dataclass
class ConvertReport:
    """What :func:`convert` did: ``converted`` (name, from type, to type) and ``left`` (name, type, why) for the
    modules with parameters that it did not convert (the excluded ones with the reason "excluded (by name 'x')" or
    "excluded (by type T)"); ``tuned`` (name, type, hyperparameter) for the modules that ``rates=`` tuned (a
    dropout made a TunedDropout is also in ``converted``); ``batch_first`` (the layout stated to the converted
    linear and embedding layers) and ``layout`` (where it came from: "stated", "from lstm (LSTM)", "no sequence
    layer"). The model itself, when converted or left, is named by its type."""

    converted: List[Tuple[str, str, str]] = field(default_factory=list)
    left: List[Tuple[str, str, str]] = field(default_factory=list)
    tuned: List[Tuple[str, str, str]] = field(default_factory=list)
    batch_first: bool = True
    layout: str = "no sequence layer"

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}:"] + [f"  {n}: {a} -> {b}" for n, a, b in self.converted]
        lines += [f"left {len(self.left)}:"] + [f"  {n}: {t} ({why})" for n, t, why in self.left]
        if self.tuned:
            lines += [f"tuned {len(self.tuned)}:"] + [f"  {n}: {t} by the rate {h!r}" for n, t, h in self.tuned]
        return "\n".join(lines + [f"batch_first={self.batch_first} ({self.layout})"])


# The plain torch.nn layers convert() swaps when num_hparams is given: of exactly these types (a subclass's forward
# may differ), with exactly their own Parameters and no hooks.
_PLAIN_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding, nn.LSTM, nn.MultiheadAttention)
# What convert makes: never converted again, never reported as left.
_OURS = (HyperLinear, HyperConv2d, HyperEmbedding, HyperLSTMCell, HyperLSTM, HyperMultiheadAttention,
         HyperTransformerEncoderLayer, HyperTransformerEncoder)
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_EXCLUDED = "excluded"


def _plain_base(module: nn.Module) -> Optional[type]:
    """The one of ``_PLAIN_LAYERS`` that ``module`` is an instance of (its type or a base), else None."""
    return next((base for base in _PLAIN_LAYERS if isinstance(module, base)), None)


def _lstm_lacks(module: nn.Module) -> Optional[str]:
    """The options of an nn.LSTM that HyperLSTM has no form of ("bidirectional=True, proj_size=2"), or None."""
    options = [f"bidirectional={module.bidirectional}"] if module.bidirectional else []
    options += [f"proj_size={module.proj_size}"] if module.proj_size else []
    return ", ".join(options) or None


def _plain_lacks(module: nn.Module, base: type) -> Optional[str]:
    """Why no Hyper layer can stand in for ``module`` (an instance of ``base``, one of ``_PLAIN_LAYERS``), or None
    when one can (computing the same function over the same Parameters)."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "an uninitialised lazy module: run one forward before convert"
    if parametrize.is_parametrized(module):
        return (f"parametrized {sorted(module.parametrizations)} (torch.nn.utils.parametrize), which the Hyper "
                f"layer would drop")
    if type(module) is not base:
        return f"a subclass of nn.{base.__name__}, whose forward may differ"
    hooks = [name[1:].replace("_", " ") for name in _HOOKS if getattr(module, name)]
    if hooks:  # also torch.nn.utils.weight_norm / spectral_norm, which recompute the weight in a forward pre-hook
        return f"has {', '.join(hooks)}, which the Hyper layer would not run"
    if base is nn.MultiheadAttention:
        return attention_lacks(module)
    own = [name for name, param in module._parameters.items() if param is not None]
    if base is nn.LSTM:
        expected = module._flat_weights_names
        fits = sorted(own) == sorted(expected)
    else:  # weight, and a bias unless bias=False (registered as None)
        expected = ["weight"] if base is nn.Embedding else ["weight", "bias"]
        fits = "weight" in own and set(own) <= set(expected)
    if not fits:
        return f"has the Parameters {own}, not nn.{base.__name__}'s {expected}"
    weight = module._parameters[expected[0]]
    if not weight.is_floating_point():
        return f"{weight.dtype} weights (the Hyper layers take floating-point ones)"
    if base is nn.LSTM and _lstm_lacks(module):
        return f"HyperLSTM has no {_lstm_lacks(module)}"
    if base is nn.Embedding:
        options = [f"{name}={getattr(module, name)}" for name in ("max_norm", "scale_grad_by_freq", "sparse")
                   if getattr(module, name) not in (None, False)]
        if options:
            return f"HyperEmbedding has no {', '.join(options)}"
    return None


# Why a module is left when it is nothing convert takes: reported, never warned about (a BatchNorm, the plain
# decoder of a published model converted without num_hparams).
NO_HYPER_FORM = "no hyper form in stn_kernels"
NEEDS_NUM_HPARAMS = "plain layers are converted only with num_hparams"


def _why_left(module: nn.Module, num_hparams: Optional[int]) -> str:
    base = _plain_base(module)
    if base is None:
        return NO_HYPER_FORM
    # A plain layer no Hyper layer can stand in for says why, also without num_hparams (giving it would not help).
    return _plain_lacks(module, base) or NEEDS_NUM_HPARAMS


def _describe(item) -> str:
    if isinstance(item, nn.Module):
        cls = type(item).__name__
        return f"a {cls} instance (exclude it by its name, or all like it by the class {cls})"
    if isinstance(item, type):
        return f"the class {item.__name__}, not an nn.Module subclass"
    return f"{item!r} ({type(item).__name__})"


def _exclusions(exclude) -> Tuple[set, tuple]:
    """``exclude`` as (module names, module types). A single name or type counts as one, as ``isinstance`` takes one
    class or a tuple of them: ``exclude="decoder"`` can only mean that module, never the letters d, e, c, ..."""
    if exclude is None:  # as the default (): nothing excluded
        exclude = ()
    elif isinstance(exclude, (str, type)):
        exclude = (exclude,)
    if isinstance(exclude, nn.Module) or not hasattr(exclude, "__iter__"):
        raise TypeError(f"exclude: expected a module name (str), an nn.Module subclass or an iterable of them, got "
                        f"{_describe(exclude)}")
    items = list(exclude)
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(f"exclude: expected module names (str) or nn.Module subclasses, got {_describe(item)}")
    return {item for item in items if isinstance(item, str)}, tuple(item for item in items if isinstance(item, type))


_Matches = Union[None, str, Type[nn.Module], Iterable[Union[str, Type[nn.Module]]]]


def convert(model: nn.Module, num_hparams: Optional[int] = None, *, batch_first: Optional[bool] = None,
            rates: Optional[Mapping[str, _Matches]] = None, exclude: _Matches = (), report: bool = False):
    """Replaces, in place, every published STN / Delta-STN layer in ``model`` with the stn_kernels layer
    computing the same function, and, when ``num_hparams`` is given, every plain ``nn.Linear``, ``nn.Conv2d``,
    ``nn.Embedding``, ``nn.LSTM`` and ``nn.MultiheadAttention`` with a Hyper layer whose hyper path starts at zero
    (see the module docstring); transformer encoders holding converted layers never take torch's fused fast path.

    A plain layer no Hyper layer can stand in for is left as it is, with its children, and reported: a subclass
    (``nn.LazyLinear`` not yet initialised, QAT or ``NonDynamicallyQuantizableLinear``, a parametrized layer, your
    own), hooks (``torch.nn.utils.weight_norm``, ``spectral_norm``, yours), Parameters other than its own,
    non-floating-point weights, an ``nn.Embedding`` with ``max_norm``, ``scale_grad_by_freq`` or ``sparse``, an
    ``nn.LSTM`` bidirectional or with ``proj_size``, an ``nn.MultiheadAttention`` whose Parameters or ``out_proj`` are
    not the ones it builds, a subclass of ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder`` (left whole,
    children included). Converting such a layer itself (``model`` is that layer, with
    ``num_hparams``) raises ValueError instead. Any ``padding``, ``padding_mode``, ``dilation`` and ``groups`` of
    ``nn.Conv2d`` and ``padding_idx`` of ``nn.Embedding`` are converted.

    ``exclude``: modules to leave as they are, together with their children: qualified names (as in
    ``model.named_modules()``; a shared module is left everywhere it occurs) and module types (matched as
    ``isinstance``, so subclasses too), in any iterable, or a single name or type (None: none), e.g.
    ``exclude=("decoder", nn.Embedding)``. Modules shared between several places are converted once and stay
    shared; train/eval mode is kept. Returns ``model``, or the new layer if ``model`` itself is one. Published
    layers must agree with ``num_hparams`` when it is given.

    ``batch_first``: the layout of the sequences the converted ``nn.Linear`` and ``nn.Embedding`` layers see, for
    the rows of λ from ``stn_kernels.hparams`` (their ``hparams_batch_dim``: 0, or 1 for time-major ``[T, B, ...]``
    input). None reads it from the model's ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, ``nn.MultiheadAttention`` and
    ``nn.Transformer*`` layers (ValueError when they disagree; batch first when there are none); True or False
    states it. Convolutions are batch first; a converted nn.LSTM follows its own ``batch_first``.

    ``rates``: ``{hyperparameter name: module names or types}`` (one name or type, or an iterable, as ``exclude``)
    whose rates an STN tunes per example through ``stn_kernels.hparams(lam, rates={name: [B] rates})``: matched
    ``nn.Dropout`` (and ``nn.Dropout1d/2d/3d``) become :class:`~stn_kernels.TunedDropout` (``1d/2d/3d``); a converted
    layer with a ``dropout_hparam`` (an attention) reads the rate of that name. A module's name beats its type
    (``{"dropout": nn.Dropout, "emb_dropout": "embed_drop"}``). Anything else matched, a module matched by two
    hyperparameters, or one matching nothing raises ValueError naming ``rates`` before the model changes. See
    :mod:`stn_kernels.convert_tuning`; ``report.tuned`` lists what reads which rate.

    With ``report=True`` it returns ``(model, ConvertReport)``: what was converted, and which modules with
    parameters were left, and why (excluded by name or type; a plain layer without num_hparams; one no Hyper layer
    can stand in for; no hyper form). With ``report=False``, one UserWarning lists the plain layers no Hyper layer
    can stand in for, and every module left (but excluded ones) when nothing was converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if num_hparams is not None and (isinstance(num_hparams, bool) or not isinstance(num_hparams, int)
                                    or num_hparams < 1):
        raise ValueError(f"num_hparams: expected an int >= 1 or None, got {num_hparams!r}")
    excluded_names, excluded_types = _exclusions(exclude)
    batch_first, layout = infer_batch_first(model, batch_first)
    batch_dim = 0 if batch_first else 1
    # Each path of a shared module (remove_duplicate=False): it may be excluded by any of its names.
    excluded_by_name = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name in excluded_names:
            excluded_by_name.setdefault(id(module), name)
    unknown = sorted(excluded_names - {name for name, _ in model.named_modules(remove_duplicate=False)})
    if unknown:
        raise ValueError(f"exclude: expected names of modules in the model, got unknown {unknown}")
    converted: Dict[int, nn.Module] = {}
    done = ConvertReport(batch_first=batch_first, layout=layout)

    def exclusion(module: nn.Module) -> Optional[str]:
        if id(module) in excluded_by_name:
            return f"{_EXCLUDED} (by name {excluded_by_name[id(module)]!r})"
        by_type = next((cls for cls in excluded_types if isinstance(module, cls)), None)
        return None if by_type is None else f"{_EXCLUDED} (by type {by_type.__name__})"

    plan = None if rates is None else RatePlan(model, rates, lambda module: exclusion(module) is not None)

    def replacement(module: nn.Module, where: str) -> Optional[nn.Module]:
        if id(module) in converted:
            return converted[id(module)]
        if isinstance(module, _OURS):
            return None
        kind = published_layer_kind(module)
        base = _plain_base(module)
        if kind is None and _is_published_lstm_cell(module):
            new = _convert_published_cell(module, num_hparams, where)
        elif kind is not None:
            new = _convert_published(module, kind, num_hparams, where)
        elif num_hparams is not None and base is not None:
            lacks = _plain_lacks(module, base)
            if lacks is not None:
                if module is model:  # converting this very layer was asked for: an error, not a silent no-op
                    raise ValueError(f"model: expected an nn.{base.__name__} a Hyper layer can stand in for, got "
                                     f"{type(module).__name__}: {lacks}")
                return None  # left, with the reason in the report
            new = _convert_plain(module, num_hparams, where, batch_dim)
        else:
            return None
        new.train(module.training)
        converted[id(module)] = new
        done.converted.append((where, type(module).__name__, type(new).__name__))
        return new

    def leave(module: nn.Module, where: str) -> bool:
        """Reports ``module`` as left when it has parameters and is not ours; True to look into its children (not
        those of an excluded module or a plain layer left whole)."""
        why = exclusion(module) or (None if num_hparams is None else fast_path_subclass(module))
        whole = why is not None or _plain_base(module) is not None
        if not isinstance(module, _OURS) and any(True for _ in module.parameters(recurse=whole)):
            done.left.append((where, type(module).__name__, why or _why_left(module, num_hparams)))
        return not whole

    # (parent, name, new module): made once the whole model is converted and the rates plan checked, so that an
    # error leaves the model as it was.
    swaps: List[Tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            where = f"{prefix}.{name}" if prefix else name
            new = None if exclusion(child) else replacement(child, where)
            if new is not None:
                swaps.append((parent, name, new))
            elif leave(child, where):
                visit(child, where)
                containers.append((child, where))

    # The modules looked into, children before parents: a transformer encoder (layer) among them that holds
    # converted modules once the swaps are made never takes torch's fused fast path (which would read the weights
    # directly and ignore λ). Decided after the swaps, which are what put converted modules inside it.
    containers: List[Tuple[nn.Module, str]] = []
    top = None if exclusion(model) else replacement(model, type(model).__name__)
    if top is None and leave(model, type(model).__name__):
        visit(model, "")
        containers.append((model, type(model).__name__))
    result = model if top is None else top
    tuning = None
    if plan is not None:
        tuning = plan.changes(result, lambda child: None if exclusion(child) else converted.get(id(child), child),
                              batch_dim)
    for parent, name, new in swaps:
        parent._modules[name] = new
    if tuning is not None:
        result = tuning.apply(result)
        done.converted += tuning.converted
        done.tuned += tuning.tuned
    for container, where in containers:
        swapped = swap_fast_path_container(container)
        if swapped is not None:
            done.converted.append((where, *swapped))
    if report:
        return result, done
    # Warned about, so that nothing is skipped silently: the layers of a kind convert takes that it could not take
    # (an nn.Embedding with max_norm, a bidirectional nn.LSTM, a hooked or parametrized layer, ...), and every
    # module left when convert changed nothing at all. Not: a BatchNorm or a published model's plain decoder
    # next to converted layers (the report lists them).
    left = [(name, kind, why) for name, kind, why in done.left if not why.startswith(_EXCLUDED)]
    unasked = [f"{name} ({kind}: {why})" for name, kind, why in left
               if not done.converted or why not in (NO_HYPER_FORM, NEEDS_NUM_HPARAMS)]
    if unasked:
        what = "converted nothing and left" if not done.converted else "left"
        warnings.warn(f"stn_kernels.convert {what} {len(unasked)} module(s) with parameters as they were: "
                      f"{'; '.join(unasked)}. Leave modules on purpose with exclude= (names or types), or pass "
                      f"report=True to get this list in a ConvertReport instead of this warning",
                      UserWarning, stacklevel=2)
    return result
