"""How ``"auto"`` chooses between the Triton kernels and the compiled CUDA extension.

On CUDA tensors, when both backends can run an op, ``"auto"`` looks up the shape
class of the call, ``(dtype, M bucket)`` with M the rows of the 2-D problem, in a
small committed table, ``stn_kernels/backends/rules.json``::

    {"format": 1, "measured": true, "default": "triton", "m_buckets": [64, 256, 1024, 4096],
     "rules": {"float16/M<=64": "cuda", ...}, "evidence": {...}, "source": "...", ...}

A class missing from ``rules`` (or a missing or unreadable table) takes ``default``,
``"triton"``. The table is measured, never guessed: :func:`rules_from_results`
derives it from the benchmark's results.csv (``python -m stn_kernels.bench --gpu``,
providers ``stn:triton`` and ``stn:cuda``) and :func:`write_rules` commits it::

    from stn_kernels.backends import rules
    table = rules.rules_from_results(["benchmarks/results/<run>/results.csv"])
    rules.write_rules(table)

The lookup (:func:`auto_choice`) costs about a microsecond: the table is read once.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import warnings
from collections import defaultdict
from typing import Dict, Iterable, Optional, Sequence, Union

import torch

RULES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rules.json")
FORMAT = 1
DEFAULT_BACKEND = "triton"
CHOICES = ("triton", "cuda")
M_BUCKETS = (64, 256, 1024, 4096)  # upper edges of the M classes; the last class is "M>4096"
MARGIN = 0.05  # "cuda" only where it is at least 5 % faster (geometric mean over the class's cases)
# Why float32 gets no rule of its own for TF32 off: recorded in every table (its "float32" entry).
FLOAT32_NOTE = ("float32 classes are timed with PyTorch's default, TF32 off (IEEE fp32), and a float32 rule holds with "
                "TF32 on too. Without a measured rule, IEEE fp32 runs the Triton kernels' FMA tiles, which keep their "
                "accumulators in registers on sm_80 and sm_90 (tests/test_triton_aot.py); a measured float32 class "
                "where cuBLAS (the cuda backend) is faster routes it there.")
EMPTY_TABLE = {"format": FORMAT, "measured": False, "default": DEFAULT_BACKEND, "m_buckets": list(M_BUCKETS),
               "rules": {}}


def m_class(m: int, edges: Sequence[int] = M_BUCKETS) -> str:
    """The M bucket of ``m`` rows: ``"M<=64"``, ..., ``"M>4096"``."""
    for edge in edges:
        if m <= edge:
            return f"M<={edge}"
    return f"M>{edges[-1]}"


def dtype_name(dtype: Union[torch.dtype, str]) -> str:
    return str(dtype).replace("torch.", "")


def shape_class(m: int, dtype: Union[torch.dtype, str], edges: Sequence[int] = M_BUCKETS) -> str:
    """``"<dtype>/<M bucket>"``, e.g. ``"float16/M<=256"``: the key of the rules table."""
    return f"{dtype_name(dtype)}/{m_class(m, edges)}"


def _validated(table) -> dict:
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise ValueError(f"expected a JSON object with \"format\": {FORMAT}")
    edges = table.get("m_buckets", list(M_BUCKETS))
    if not (isinstance(edges, list) and edges and all(isinstance(e, int) and e > 0 for e in edges)
            and edges == sorted(set(edges))):
        raise ValueError(f"m_buckets: expected increasing positive ints, got {edges!r}")
    default = table.get("default", DEFAULT_BACKEND)
    rules = table.get("rules", {})
    if default not in CHOICES or not isinstance(rules, dict) or any(v not in CHOICES for v in rules.values()):
        raise ValueError(f"default and rules: expected backends from {CHOICES}")
    return {**table, "m_buckets": edges, "default": default, "rules": rules}


@functools.lru_cache(maxsize=None)
def load_rules(path: Optional[str] = None) -> dict:
    """The rules table at ``path`` (default: the committed one); the empty table, which chooses
    ``"triton"`` everywhere, when the file is missing or unreadable (with a warning if unreadable)."""
    path = path or RULES_FILE
    try:
        with open(path, encoding="utf-8") as f:
            return _validated(json.load(f))
    except FileNotFoundError:
        return dict(EMPTY_TABLE)
    except (OSError, ValueError) as exc:
        warnings.warn(f"stn_kernels: ignoring the backend rules table {path}: {exc}", RuntimeWarning, stacklevel=2)
        return dict(EMPTY_TABLE)


def auto_choice(m: int, dtype: Union[torch.dtype, str], table: Optional[dict] = None) -> str:
    """``"triton"`` or ``"cuda"``: what ``"auto"`` runs for a problem of ``m`` rows in ``dtype``
    when both backends can run it."""
    table = load_rules() if table is None else table
    return table["rules"].get(shape_class(m, dtype, table["m_buckets"]), table["default"])


def prefers_cuda(m: int, dtype: Union[torch.dtype, str]) -> bool:
    """True where the committed table chooses the compiled extension over Triton."""
    return auto_choice(m, dtype) == "cuda"


def _number(text) -> Optional[float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def rules_from_results(csv_paths: Union[str, Iterable[str]], mode: str = "fwd+bwd", margin: float = MARGIN,
                       edges: Sequence[int] = M_BUCKETS, device: str = "") -> dict:
    """A rules table measured from benchmark results (the CSV that ``python -m stn_kernels.bench``
    writes: columns case, B, dtype, mode, provider, median_ms, note).

    For each case (shape, dtype) timed in ``mode`` by both ``stn:triton`` and ``stn:cuda``
    (rows without a time or whose note reports a mismatch or an error are left out), the ratio
    cuda / triton of the median times; a class (dtype, M bucket, M = B) gets ``"cuda"`` when the
    geometric mean of its ratios is below ``1 - margin``, else ``"triton"``. Classes without a
    paired case get no entry (the default, ``"triton"``). ``device`` names the GPU in the table.
    """
    paths = [csv_paths] if isinstance(csv_paths, str) else list(csv_paths)
    times: Dict[tuple, Dict[str, float]] = defaultdict(dict)
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                provider = row.get("provider", "")
                if row.get("mode") != mode or provider not in ("stn:triton", "stn:cuda"):
                    continue
                note = (row.get("note") or "").lower()
                ms = _number(row.get("median_ms"))
                if ms is None or "mismatch" in note or "error" in note or "fail" in note:
                    continue
                key = (row.get("case", ""), int(row["B"]), row["dtype"])
                times[key][provider.split(":")[1]] = ms
    ratios: Dict[str, list] = defaultdict(list)
    for (case, m, dtype), by in sorted(times.items()):
        if "triton" in by and "cuda" in by:
            ratios[shape_class(m, dtype, edges)].append((case, by["cuda"] / by["triton"]))
    rules, evidence = {}, {}
    for cls, pairs in sorted(ratios.items()):
        geomean = math.exp(sum(math.log(r) for _, r in pairs) / len(pairs))
        rules[cls] = "cuda" if geomean < 1.0 - margin else "triton"
        evidence[cls] = {"cuda_over_triton": round(geomean, 4), "cases": [case for case, _ in pairs]}
    return {
        "format": FORMAT,
        "measured": bool(rules),
        "default": DEFAULT_BACKEND,
        "m_buckets": list(edges),
        "rules": rules,
        "evidence": evidence,
        "mode": mode,
        "margin": margin,
        "device": device,
        "source": [os.path.relpath(p) if not os.path.isabs(p) else p for p in paths],
        "note": ("Measured by stn_kernels.backends.rules.rules_from_results; ratios are geometric means of "
                 "stn:cuda / stn:triton median times. Classes not listed use the default."),
        "float32": FLOAT32_NOTE,
    }


def write_rules(table: dict, path: Optional[str] = None) -> str:
    """Writes ``table`` (validated) as the rules file at ``path`` (default: the committed one)."""
    path = path or RULES_FILE
    _validated(table)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=2, sort_keys=True)
        f.write("\n")
    load_rules.cache_clear()
    return path
