"""Input checks at the public boundary: each error names the argument and shows
what was expected and what was given."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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


def check_hparams(hparams: Optional[Tensor], data: Tensor, data_name: str, num_hparams: int, batch: Optional[int],
                  weight_scale: Optional[Tensor], bias_scale: Optional[Tensor]) -> None:
    """hparams is [B, H] (per example) or [H] (shared by the batch), in the dtype of ``data`` (the
    input, or the embedding table) or float32 when that is half precision, on data's device."""
    if hparams is None:
        return
    check_tensor(hparams, "hparams")
    if hparams.dim() not in (1, 2):
        raise ValueError(f"hparams: expected shape [B, {num_hparams}] or [{num_hparams}], got {tuple(hparams.shape)}")
    if hparams.shape[-1] != num_hparams:
        raise ValueError(f"hparams: expected {num_hparams} hyperparameters in the last dim, got shape "
                         f"{tuple(hparams.shape)}")
    if hparams.dim() == 2 and hparams.shape[0] != batch:
        raise ValueError(f"hparams: expected batch size {batch} (input's first dim), got shape {tuple(hparams.shape)}")
    allowed = (data.dtype, torch.float32) if data.dtype in HALF_DTYPES else (data.dtype,)
    if hparams.dtype not in allowed:
        raise TypeError(f"hparams: expected dtype {' or '.join(map(str, allowed))} (from {data_name} dtype "
                        f"{data.dtype}), got {hparams.dtype}")
    check_dtype(hparams.dtype, "hparams", weight_scale=weight_scale, bias_scale=bias_scale)
    check_same_device(data, data_name, hparams=hparams)


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
