"""What :func:`stn_kernels.convert` does with attention and transformers (called from :mod:`stn_kernels.convert`):

* an ``nn.MultiheadAttention`` (exactly that type) becomes a :class:`~stn_kernels.HyperMultiheadAttention` over the
  same Parameters (packed or separate in-projection, biases, ``bias_k``/``bias_v``, ``out_proj``'s weight and bias),
  or is left, with the reason, when it cannot compute the same function (:func:`attention_lacks`);
* an ``nn.TransformerEncoderLayer`` or ``nn.TransformerEncoder`` (exactly those types) with anything of stn_kernels
  inside after conversion gets its class swapped, in place, to :class:`HyperTransformerEncoderLayer` /
  :class:`HyperTransformerEncoder`, whose forward never takes PyTorch's fused fast path (which reads the weights
  directly and would ignore λ); :func:`restore_fast_path_containers` swaps them back for :func:`stn_kernels.revert`;
* a subclass of those two is left whole (:func:`fast_path_subclass`): its inherited forward may take the fast path.

The decoder side (``nn.TransformerDecoderLayer``, ``nn.TransformerDecoder``) and ``nn.Transformer`` have no fused
path: they are walked as any module, their attention and linear layers converted.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize

from .convert_published import _take
from .modules_attention import HyperMultiheadAttention, HyperTransformerEncoder, HyperTransformerEncoderLayer

# torch's containers with a fused path -> the subclass convert swaps in.
FAST_PATH_CONTAINERS = {nn.TransformerEncoderLayer: HyperTransformerEncoderLayer,
                        nn.TransformerEncoder: HyperTransformerEncoder}
_SWAPPED = tuple(FAST_PATH_CONTAINERS.values())


def _expected_parameters(module: nn.MultiheadAttention) -> list:
    """The Parameters an nn.MultiheadAttention built with its own options holds itself (not out_proj's)."""
    packed = module._parameters.get("in_proj_weight") is not None
    names = ["in_proj_weight"] if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    names += ["in_proj_bias"] if module._parameters.get("in_proj_bias") is not None else []
    return names + [name for name in ("bias_k", "bias_v") if getattr(module, name, None) is not None]


def attention_lacks(module: nn.MultiheadAttention) -> Optional[str]:
    """Why no HyperMultiheadAttention can stand in for ``module`` (an nn.MultiheadAttention of exactly that type,
    unhooked and not parametrized: convert checks those), or None when one computes the same function over the same
    Parameters."""
    own = sorted(name for name, p in module._parameters.items() if p is not None)
    expected = _expected_parameters(module)
    if own != sorted(expected):
        return f"has the Parameters {own}, not nn.MultiheadAttention's {sorted(expected)}"
    out_proj = module._modules.get("out_proj")
    if isinstance(out_proj, nn.Module) and parametrize.is_parametrized(out_proj):
        return f"out_proj is parametrized {sorted(out_proj.parametrizations)}, which the hyper attention would drop"
    if type(out_proj) not in (NonDynamicallyQuantizableLinear, nn.Linear):
        return f"out_proj is a {type(out_proj).__name__}, not the nn.Linear nn.MultiheadAttention builds"
    E, heads = module.embed_dim, module.num_heads
    packed = expected[0] == "in_proj_weight"
    if packed != (module.kdim == E and module.vdim == E) or packed != bool(module._qkv_same_embed_dim):
        return (f"its in-projection ({'packed' if packed else 'separate'}) does not fit kdim={module.kdim}, "
                f"vdim={module.vdim}, embed_dim={E}")
    if ("bias_k" in expected) != ("bias_v" in expected):
        return "has only one of bias_k and bias_v (nn.MultiheadAttention uses them together)"
    if ("in_proj_bias" in expected) != (out_proj.bias is not None):
        return "has one of in_proj_bias and out_proj.bias without the other (bias= sets both)"
    shapes = {"in_proj_weight": (3 * E, E), "q_proj_weight": (E, E), "k_proj_weight": (E, module.kdim),
              "v_proj_weight": (E, module.vdim), "in_proj_bias": (3 * E,), "bias_k": (1, 1, E), "bias_v": (1, 1, E)}
    params = [(name, module._parameters[name]) for name in expected]
    params += [(f"out_proj.{name}", p) for name, p in out_proj._parameters.items() if p is not None]
    shapes.update({"out_proj.weight": (E, E), "out_proj.bias": (E,)})
    for name, param in params:
        if tuple(param.shape) != shapes[name]:
            return f"{name} has shape {tuple(param.shape)}, not {shapes[name]} (embed_dim={E})"
    first = params[0][1]
    if not first.is_floating_point():
        return f"{first.dtype} weights (the Hyper layers take floating-point ones)"
    dtypes, devices = {str(p.dtype) for _, p in params}, {str(p.device) for _, p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        return f"Parameters of several dtypes or devices {sorted(dtypes | devices)}"
    if E % heads:
        return f"embed_dim={E} is not a multiple of num_heads={heads}"
    dropout = module.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout <= 1.0:
        return f"dropout={dropout!r} is not a probability"
    return None


def convert_attention(module: nn.MultiheadAttention, num_hparams: int) -> HyperMultiheadAttention:
    """The HyperMultiheadAttention over ``module``'s own Parameters (``attention_lacks(module)`` must be None); its
    hyper path freshly initialised (convert then zeroes the λ-maps, so the function is unchanged)."""
    expected = _expected_parameters(module)
    first = module._parameters[expected[0]]
    new = HyperMultiheadAttention(module.embed_dim, module.num_heads, float(module.dropout),
                                  "in_proj_bias" in expected, "bias_k" in expected, bool(module.add_zero_attn),
                                  module.kdim, module.vdim, bool(module.batch_first), num_hparams=num_hparams,
                                  device=first.device, dtype=first.dtype)
    for name in expected:
        _take(new, name, module._parameters[name])
    _take(new.out_proj, "weight", module.out_proj.weight)
    _take(new.out_proj, "bias", module.out_proj.bias)
    return new


def fast_path_subclass(module: nn.Module) -> Optional[str]:
    """Why ``module`` is left whole when it subclasses a container with a fused path (other than ours), else None."""
    for base in FAST_PATH_CONTAINERS:
        if isinstance(module, base) and type(module) is not base and not isinstance(module, _SWAPPED):
            return (f"a subclass of nn.{base.__name__}, whose forward may take PyTorch's fused fast path, which "
                    f"reads the weights directly and would ignore λ: left whole")
    return None


def swap_fast_path_container(module: nn.Module) -> Optional[Tuple[str, str]]:
    """Swaps the class of an nn.TransformerEncoderLayer / nn.TransformerEncoder (exactly) that holds a module of
    stn_kernels to ours, in place; returns (old type name, new type name), or None when nothing was swapped."""
    new_class = FAST_PATH_CONTAINERS.get(type(module))
    if new_class is None or not any(type(m).__module__.startswith("stn_kernels.") for m in module.modules()):
        return None
    old_name = type(module).__name__
    module.__class__ = new_class
    return old_name, new_class.__name__


def restore_fast_path_containers(model: nn.Module) -> None:
    """Swaps every container :func:`swap_fast_path_container` swapped in ``model`` back to torch's class."""
    for module in model.modules():
        if type(module) in _SWAPPED:
            module.__class__ = module._torch_class
