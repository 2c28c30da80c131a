"""Every input check of the public functions and modules (the one validation boundary: the ops below
trust their inputs). Each error names the argument and shows what was expected and what was given."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_tensor(value, name: str, *, floating: bool = True) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    return value


def check_same_device(reference: Tensor, reference_name: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{name}: expected device {reference.device} (the device of {reference_name}), "
                             f"got {t.device}")


def check_dtype(expected: torch.dtype, expected_from: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype != expected:
            raise TypeError(f"{name}: expected dtype {expected} (the dtype of {expected_from}), got {t.dtype}")


def check_shape(t: Optional[Tensor], name: str, expected: tuple) -> None:
    if t is not None and t.shape != expected:
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(t.shape)}")


def hparams_dtypes(data_dtype: torch.dtype) -> tuple:
    """The dtypes λ, and the λ map (``hparam_weight``, V and C), may have for data (input, weights) of
    ``data_dtype``: that dtype, or float32 when it is half precision."""
    return (data_dtype, torch.float32) if data_dtype in HALF_DTYPES else (data_dtype,)


def check_hparams_dtype(hparams: Tensor, data: Tensor, data_name: str, name: str = "hparams") -> None:
    """``hparams`` (or the λ map called ``name``) in the dtype of ``data`` (the input, or the embedding table), or
    float32 when that is half."""
    allowed = hparams_dtypes(data.dtype)
    if hparams.dtype not in allowed:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, allowed))} (from {data_name} dtype "
                        f"{data.dtype}), got {hparams.dtype}")


def check_hparams(hparams: Optional[Tensor], data: Tensor, data_name: str, num_hparams: int, batch: Optional[int],
                  batch_of: str = "input's first dim") -> None:
    """hparams is [B, H] (per example, B from ``batch_of``) or [H] (shared by the batch), in the dtype of ``data``
    (the input, or the embedding table) or float32 when that is half precision (any floating dtype under
    autocast, which runs the λ side in float32), on data's device."""
    if hparams is None:
        return
    check_tensor(hparams, "hparams")
    if hparams.dim() not in (1, 2):
        raise ValueError(f"hparams: expected shape [B, {num_hparams}] or [{num_hparams}], got {tuple(hparams.shape)}")
    if hparams.shape[-1] != num_hparams:
        raise ValueError(f"hparams: expected {num_hparams} hyperparameters in the last dim, got shape "
                         f"{tuple(hparams.shape)}")
    if hparams.dim() == 2 and hparams.shape[0] != batch:
        raise ValueError(f"hparams: expected batch size {batch} ({batch_of}), got shape {tuple(hparams.shape)}")
    if autocast_dtype(data.device.type) is None:
        check_hparams_dtype(hparams, data, data_name)
    check_same_device(data, data_name, hparams=hparams)


def check_scales_dtype(data: Tensor, data_name: str, **scales: Optional[Tensor]) -> None:
    """The λ map (V, C) in a dtype λ may have for ``data`` (:func:`hparams_dtypes`)."""
    for name, t in scales.items():
        if t is not None:
            check_hparams_dtype(t, data, data_name, name)


def hparams_side(hparams: Optional[Tensor], *scales: Optional[Tensor]) -> list:
    """[λ, *scales] in one dtype, the wider of theirs (λ·Vᵀ, λ·Cᵀ and their gradients run in it): λ in float32
    with a half V (a layer after ``.to(torch.bfloat16)``) uses V in float32, and the reverse; a cast is an autograd
    op, so each gradient returns in its tensor's own dtype. Their dtypes are those :func:`hparams_dtypes` allows
    (the same, or a half one and float32)."""
    if hparams is None:
        return [None, *scales]
    dtype = hparams.dtype
    for t in scales:
        if t is not None and t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in (hparams, *scales)]


def check_data_like(t: Tensor, name: str, like: Tensor, like_name: str) -> None:
    """A module's input (or hidden state) ``t`` on the device of its parameters (``like``) and in their dtype, or
    in any floating dtype under autocast (which casts it)."""
    check_tensor(t, name)
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {t.device}")
    if t.dtype != like.dtype and autocast_dtype(t.device.type) is None:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}; convert the one or the "
                        f"other with .to()), got {t.dtype}")


def check_groups(groups, out_channels: int) -> None:
    if not isinstance(groups, int) or groups < 1 or out_channels % groups:
        raise ValueError(f"groups: expected a positive int dividing out_channels={out_channels}, got {groups!r}")


def check_conv_geometry(stride, padding, dilation) -> Tuple[list, list, list]:
    """stride, padding, dilation (an int or a pair each) as lists of two ints, stride and dilation >= 1."""
    stride, padding, dilation = (list(_pair(v)) for v in (stride, padding, dilation))
    for name, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if any(not isinstance(v, int) or v < low for v in values):
            raise ValueError(f"{name}: expected ints >= {low}, got {values}")
    return stride, padding, dilation


def rows_of_hparams(hparams: Optional[Tensor], batch: int, rows_per_example: int) -> Optional[Tensor]:
    """hparams as one row per flattened input row: [H] and [B, H] become [B·rows_per_example, H]."""
    if hparams is None:
        return None
    if hparams.dim() == 1:
        return hparams.expand(batch * rows_per_example, hparams.shape[0])
    if rows_per_example == 1:
        return hparams
    return hparams.unsqueeze(1).expand(batch, rows_per_example, hparams.shape[1]).reshape(-1, hparams.shape[1])


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast compute dtype in force for this device type, or None."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


# One C call for "is autocast on for any device" (a private torch function; the public per-device check, a
# fifth of a µs, where it is missing): the fast module paths leave autocast to the full path.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def any_autocast() -> bool:
    if _any_autocast is not None:
        return _any_autocast()
    return autocast_dtype("cpu") is not None or autocast_dtype("cuda") is not None


def autocast_operands(device_type: str, tensors: Sequence[Optional[Tensor]],
                      hyper_tensors: Sequence[Optional[Tensor]]) -> Tuple[list, list]:
    """Under torch.autocast: input, weights and biases in the autocast dtype, λ, V, C in float32."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return list(tensors), list(hyper_tensors)
    return ([None if t is None else t.to(dtype) for t in tensors],
            [None if t is None else t.float() for t in hyper_tensors])


def check_hyper_params(hparams, weight_scale, bias_scale, hyper_bias, out_features: int) -> int:
    """weight_scale (and bias_scale with a hyper bias) must come with hparams; returns H."""
    if hparams is None:
        return weight_scale.shape[-1] if isinstance(weight_scale, Tensor) else 0
    if weight_scale is None:
        raise ValueError("weight_scale: required when hparams is given, got None")
    check_tensor(weight_scale, "weight_scale")
    if weight_scale.dim() != 2 or weight_scale.shape[0] != out_features:
        raise ValueError(f"weight_scale: expected shape [{out_features}, H], got {tuple(weight_scale.shape)}")
    if hyper_bias is not None and bias_scale is None:
        raise ValueError("bias_scale: required when hparams and hyper_bias are given, got None")
    if bias_scale is not None:
        check_tensor(bias_scale, "bias_scale")
        check_shape(bias_scale, "bias_scale", weight_scale.shape)
    return weight_scale.shape[1]


# ----------------------------------------------------------------------------- HyperLSTM

def check_hidden_params(weight, hyper_weight, bias, hyper_bias, weight_scale, bias_scale, hparams, prefix=""):
    """h2h parameters: weight, hyper_weight [4N, N], biases [4N], scales [4N, H]; returns N."""
    check_tensor(weight, prefix + "weight")
    if weight.dim() != 2 or weight.shape[0] != 4 * weight.shape[1]:
        raise ValueError(f"{prefix}weight: expected shape [4·hidden_size, hidden_size], got {tuple(weight.shape)}")
    G, N = weight.shape
    check_tensor(hyper_weight, prefix + "hyper_weight")
    check_shape(hyper_weight, prefix + "hyper_weight", (G, N))
    _check_biases_and_scales(G, bias, hyper_bias, weight_scale, bias_scale, hparams, prefix)
    return N


def _check_biases_and_scales(G, bias, hyper_bias, weight_scale, bias_scale, hparams, prefix):
    for name, b in (("bias", bias), ("hyper_bias", hyper_bias)):
        if b is not None:
            check_tensor(b, prefix + name)
            check_shape(b, prefix + name, (G,))
    if hparams is None:
        return
    if weight_scale is None:
        raise ValueError(f"{prefix}weight_scale: required when hparams is given, got None")
    check_tensor(weight_scale, prefix + "weight_scale")
    H = hparams.shape[-1]
    check_shape(weight_scale, prefix + "weight_scale", (G, H))
    if hyper_bias is not None:
        if bias_scale is None:
            raise ValueError(f"{prefix}bias_scale: required when hparams and hyper_bias are given, got None")
    if bias_scale is not None:
        check_tensor(bias_scale, prefix + "bias_scale")
        check_shape(bias_scale, prefix + "bias_scale", (G, H))


def check_lstm_hparams(hparams, batch: int, like: Tensor, like_name: str) -> Optional[Tensor]:
    """hparams [B, H] or [H] (expanded to [B, H]) or None, on like's device, like's dtype (or float32 for half)."""
    if hparams is None:
        return None
    check_tensor(hparams, "hparams")
    if hparams.dim() not in (1, 2) or (hparams.dim() == 2 and hparams.shape[0] != batch):
        raise ValueError(f"hparams: expected shape [B, H] with B = {batch} (the batch size) or [H], "
                         f"got {tuple(hparams.shape)}")
    check_hparams_dtype(hparams, like, like_name)
    check_same_device(like, like_name, hparams=hparams)
    return hparams.expand(batch, hparams.shape[-1]) if hparams.dim() == 1 else hparams


# ----------------------------------------------------------------------------- HyperEmbedding

def check_indices(input: Tensor, num_embeddings: int) -> None:
    """Indices in [0, num_embeddings): a ValueError with the range found on the CPU; on accelerators a device
    assert (as nn.Embedding's), since reading the range on the host would wait for the device."""
    if torch.compiler.is_compiling() or not input.numel():
        return
    if input.device.type == "cpu":
        low, high = (int(v) for v in input.aminmax())
        if low < 0 or high >= num_embeddings:
            raise ValueError(f"input: expected indices in [0, {num_embeddings - 1}], got values in [{low}, {high}]")
    else:
        torch._assert_async(((input >= 0) & (input < num_embeddings)).all(),
                            f"input: expected indices in [0, {num_embeddings - 1}]")


# ----------------------------------------------------------------------------- per-example dropout

_MAX_SEED = 2**63 - 1


def check_rates(rates, x: Tensor) -> Tensor:
    """rates as a float32-or-wider [B] tensor without grad: a float for every example, a 0-d tensor
    (expanded) or one rate per example [B], all in [0, 1) (checked on the device for CUDA tensors)."""
    batch = x.shape[0]
    if isinstance(rates, (int, float)) and not isinstance(rates, bool):
        if not 0.0 <= rates < 1.0:
            raise ValueError(f"rates: expected values in [0, 1), got {rates}")
        # float64 for float64 x, so that the scale 1/(1 − p) is formed in x's precision.
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.full((batch,), float(rates), dtype=dtype, device=x.device)
    if not isinstance(rates, Tensor):
        raise TypeError(f"rates: expected a float or a torch.Tensor of shape [{batch}], got {type(rates).__name__}")
    if not rates.is_floating_point():
        raise TypeError(f"rates: expected a floating-point tensor, got dtype {rates.dtype}")
    rates = _one_per_example(rates, "rates", "rate", x, "x", "x's").detach()
    if not torch.compiler.is_compiling():
        _require_in_range(rates, (rates >= 0) & (rates < 1), "rates", "[0, 1)")
    return rates


def _one_per_example(value: Tensor, name: str, noun: str, data: Tensor, data_name: str, possessive: str) -> Tensor:
    """``value`` (a tensor on ``data``'s device) as one entry per example of ``data`` [B]: a 0-d tensor
    expanded, else exactly [B]; a ValueError naming ``name`` otherwise (check_rates, check_strength)."""
    batch = data.shape[0]
    if value.device != data.device:
        raise ValueError(f"{name}: expected device {data.device} (the device of {data_name}), got {value.device}")
    if value.dim() == 0:
        return value.expand(batch)
    if tuple(value.shape) != (batch,):
        raise ValueError(f"{name}: expected shape [{batch}] (one {noun} per example, {possessive} first dim) or [], "
                         f"got {tuple(value.shape)}")
    return value


def _require_in_range(values: Tensor, in_range: Tensor, name: str, expected: str) -> None:
    """A ValueError naming ``name`` with how many ``values`` are outside ``expected`` on the CPU; on
    accelerators a device assert, since reading the mask on the host would wait for the device."""
    if values.device.type == "cpu":
        if not bool(in_range.all()):
            bad = values[~in_range]
            raise ValueError(f"{name}: expected values in {expected}, got {bad.numel()} outside, e.g. {bad[0].item()}")
    else:
        torch._assert_async(in_range.all(), f"{name}: expected values in {expected}")


def seed_offset_tensor(seed, offset, device: torch.device, generator: Optional[torch.Generator]) -> Tensor:
    """The op's int64 [seed, offset] on ``device``: the given seed, or one drawn from torch's generator."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset: expected an int >= 0, got {offset!r}")
    if seed is None:
        # A fresh seed per call from torch's generator: torch.manual_seed makes runs reproducible.
        if generator is not None:
            drawn = torch.randint(_MAX_SEED, (1,), generator=generator, device=generator.device)
            drawn = drawn.to(device)
        else:
            drawn = torch.randint(_MAX_SEED, (1,), device=device)
        return torch.cat([drawn, torch.full((1,), offset, dtype=torch.int64, device=device)])
    if generator is not None:
        raise ValueError("generator: expected None when seed is given (the seed fixes the mask), got a Generator")
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed: expected an int or a one-element int64 tensor, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)}")
        # non_blocking: a host seed is staged at once, and the host does not wait for the device (a
        # blocking host-to-device copy would).
        return torch.cat([seed.reshape(1).to(device, non_blocking=True),
                          torch.full((1,), offset, dtype=torch.int64, device=device)])
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"seed: expected an int in [0, 2**63 - 1], got {seed!r}")
    return torch.tensor([seed, offset], dtype=torch.int64).to(device, non_blocking=True)


# ----------------------------------------------------------------------------- data augmentation

IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_images(images, *, color: bool, allow_uint8: bool = False) -> Tensor:
    """images [B, C, H, W] float (3 channels for the colour stages); uint8 too where ``allow_uint8``."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype not in IMAGE_DTYPES and not (allow_uint8 and images.dtype == torch.uint8):
        raise TypeError(f"images: expected dtype uint8, float16, bfloat16, float32 or float64 (values in [0, 1]), "
                        f"got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images: expected shape [B, C, H, W], got {tuple(images.shape)}")
    if color and images.shape[1] != 3:
        raise ValueError(f"images: expected 3 channels (RGB) for the colour jitter, got shape {tuple(images.shape)}")
    return images


def check_strength(value, name: str, images: Tensor, low: float, high: float) -> Tensor:
    """A per-example strength as a detached float32 [B] tensor: a number for every example, a 0-d
    tensor (expanded) or one value per example [B], all in [low, high] (checked on the device for
    accelerator tensors, not under torch.compile)."""
    batch = images.shape[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not low <= value <= high:
            raise ValueError(f"{name}: expected values in [{low}, {high}], got {value}")
        return torch.full((batch,), float(value), dtype=torch.float32, device=images.device)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a number or a torch.Tensor of shape [{batch}], got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name}: expected a real tensor, got dtype {value.dtype}")
    value = _one_per_example(value, name, "value", images, "images", "images'").detach().to(torch.float32)
    if not torch.compiler.is_compiling():
        _require_in_range(value, (value >= low) & (value <= high), name, f"[{low}, {high}]")
    return value


def check_max_holes(max_holes, holes, limit: int) -> int:
    """The number of hole slots: ``max_holes``, or ⌊holes⌋ for a number, or ⌊max(holes)⌋ for a tensor
    (a host synchronisation; pass max_holes to avoid it, and under torch.compile)."""
    if max_holes is None:
        if isinstance(holes, (int, float)) and not isinstance(holes, bool):
            max_holes = int(holes)
        elif torch.compiler.is_compiling():
            raise ValueError("max_holes: expected an int when holes is a tensor under torch.compile, got None")
        else:
            max_holes = int(holes.detach().max().floor()) if holes.numel() else 0
    if isinstance(max_holes, bool) or not isinstance(max_holes, int) or not 0 <= max_holes <= limit:
        raise ValueError(f"max_holes: expected an int in [0, {limit}], got {max_holes!r}")
    return max_holes


def check_holes_fit(holes: Tensor, max_holes: int) -> None:
    """⌊holes_b⌋ ≤ max_holes for every example (CPU tensors; skipped under torch.compile)."""
    if holes.device.type == "cpu" and not torch.compiler.is_compiling():
        most = int(holes.max().floor()) if holes.numel() else 0
        if most > max_holes:
            raise ValueError(f"holes: expected at most max_holes = {max_holes} holes per example, got {most}")


# ----------------------------------------------------------------------------- module constructors

class _Required:
    """The default of a required keyword-only argument, so that the positional arguments are checked (and a
    misread one explained) before its absence is reported."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}"


def keyword_hint(cls_name: str, leading: Sequence, value="H") -> str:
    """`` (num_hparams is keyword-only: HyperLinear(8, 5, num_hparams=3))``: the call with the keyword."""
    args = ", ".join([*map(repr, leading), f"num_hparams={value}"])
    return f" (num_hparams is keyword-only: {cls_name}({args}))"


def check_ctor_int(value, name: str, low: int = 1, hint: str = "") -> int:
    """An int >= ``low`` (bool rejected): TypeError for another type, ValueError below ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {low}, got {_kind(value)}{hint}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}{hint}")
    return value


def check_ctor_bool(value, name: str, hint: str = "") -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {_kind(value)}{hint}")
    return value


def check_num_hparams(num_hparams, cls_name: str, leading: Sequence) -> int:
    """num_hparams: given (keyword-only), an int >= 1; each error shows the call with the keyword."""
    if num_hparams is REQUIRED:
        raise TypeError(f"num_hparams: missing, the number of hyperparameters is a required keyword-only "
                        f"argument{keyword_hint(cls_name, leading)}")
    return check_ctor_int(num_hparams, "num_hparams", 1, keyword_hint(cls_name, leading))


def misread_hint(num_hparams, cls_name: str, leading: Sequence, value) -> str:
    """The keyword hint for a positional argument that may be a num_hparams given by position (the published
    order): only when num_hparams is missing and ``value`` is an int."""
    if num_hparams is REQUIRED and isinstance(value, int) and not isinstance(value, bool):
        return keyword_hint(cls_name, leading, value)
    return ""


def check_ctor_pair(value, name: str, low: int, hint: str = "") -> Tuple[int, int]:
    """An int >= ``low`` or a pair of them (nn.Conv2d's kernel_size, stride, padding, dilation), as a tuple."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected an int >= {low} or a pair of them, got {value!r}{hint}")
        items = tuple(value)
    else:
        items = (value, value)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int >= {low} or a pair of them, got {_kind(value)}{hint}")
        if v < low:
            raise ValueError(f"{name}: expected an int >= {low} or a pair of them, got {value!r}{hint}")
    return items


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_padding(padding, padding_mode, kernel_size, stride, dilation):
    """nn.Conv2d's ``padding`` (an int, a pair, "same" or "valid") and ``padding_mode`` checked, as (padding as
    stored: the string or a pair, padding_mode, the op's symmetric padding pair, the F.pad of the input before
    the op as (left, right, top, bottom) or None). "same" pads d·(k − 1) in all, the odd one at the end, as torch."""
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode: expected one of {list(PADDING_MODES)}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same', 'valid', an int >= 0 or a pair of them, got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding: 'same' is not supported for strided convolutions (as in nn.Conv2d), got "
                             f"stride={stride}")
        totals = [0, 0] if padding == "valid" else [dilation[i] * (kernel_size[i] - 1) for i in (0, 1)]
        before = [t // 2 for t in totals]
        after = [t - b for t, b in zip(totals, before)]
    else:
        before = after = list(check_ctor_pair(padding, "padding", 0))
    if padding_mode == "zeros" and before == after:
        return padding if isinstance(padding, str) else tuple(before), padding_mode, tuple(before), None
    stored = padding if isinstance(padding, str) else tuple(before)
    return stored, padding_mode, (0, 0), (before[1], after[1], before[0], after[0])


def check_probability(value, name: str) -> float:
    """A rate in [0, 1) (a float or an int, bool rejected), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a probability in [0, 1), got {_kind(value)}")
    if not 0 <= value < 1:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)
