"""Host overhead: ``python -m stn_kernels.bench --host-overhead [--threads N] [--quick] [--gpu] [--out DIR]``.

Per-call time of each layer at a tiny shape, where the arithmetic costs next to nothing and what is left is
the host's work per call (Python, dispatch, autograd bookkeeping, launches). Three providers per layer:

* ``ours``: the stn_kernels module (``HyperLinear``, ``HyperConv2d``, ``HyperEmbedding``, ``HyperLSTMCell``);
* ``published``: the official STN formulation of the layer as an ``nn.Module`` (written below from the
  published formulas and parameter names, as in the official code: ``htensor_to_scalars`` is an
  ``nn.Linear(H, 2N, bias=False)`` submodule, the epilogue eager ops). The official CNN layers also multiply
  the elementary path by ``elem_scalar``; that op is left out here (as in Delta-STN), which makes
  ``published`` cheaper, never dearer, than the code it stands for;
* ``torch``: the plain layer without hyperparameters (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``,
  ``nn.LSTMCell``), the floor of what a Python-level layer costs.

Modes: ``fwd`` (autograd recording), ``fwd+bwd`` (``torch.autograd.grad`` w.r.t. the float inputs and every
parameter) and ``no_grad`` (forward under ``torch.no_grad()``). Timing: rounds; in each, every (layer, mode,
provider) runs a loop of back-to-back calls, providers in a rotated order; the per-call time of a loop is its
wall time over its calls; the table gives each provider's median over the rounds and the median over the
rounds of ours/published within a round (robust to a load that varies during the run). On the GPU
(``--gpu``: CUDA tensors, ours with ``use_backend("triton")``) the device is synchronised around each loop
only, never per call. The targets (issue 11): ours/published ≤ 0.8 for HyperLinear, ≤ 1.0 for the others, each mode.
"""

from __future__ import annotations

import contextlib
import csv
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels.backends import host

from .report import machine_info

MODES = ("fwd", "fwd+bwd", "no_grad")
PROVIDERS = ("ours", "published", "torch")
TARGETS = {"HyperLinear": 0.8, "HyperConv2d": 1.0, "HyperEmbedding": 1.0, "HyperLSTM step": 1.0}
# ours / the plain torch layer (issue 21: the host side as lean as the plain layer's), where there is a target.
TORCH_TARGETS = {"HyperLinear": 1.5}
CSV_FIELDS = ("layer", "shape", "mode", "ours_us", "published_us", "torch_us", "ratio", "target", "met", "ratio_torch",
              "target_torch", "met_torch")


# ----------------------------------------------------------------------------- published formulations

def _params(module: nn.Module, shape, names) -> None:
    for name in names:
        setattr(module, name, nn.Parameter(torch.randn(shape) * 0.1))


class PublishedHyperLinear(nn.Module):
    """Official STN HyperLinear: out = x·W_eᵀ + b_e + s_w ⊙ (x·W_hᵀ) + s_b ⊙ b_h, [s_w, s_b] = htensor_to_scalars(λ)."""

    def __init__(self, in_features: int, out_features: int, num_hparams: int):
        super().__init__()
        self.out_features = out_features
        _params(self, (out_features, in_features), ("elem_weight", "hnet_weight"))
        _params(self, (out_features,), ("elem_bias", "hnet_bias"))
        self.htensor_to_scalars = nn.Linear(num_hparams, 2 * out_features, bias=False)

    def forward(self, input, hnet_tensor):
        output = F.linear(input, self.elem_weight, self.elem_bias)
        hnet_scalars = self.htensor_to_scalars(hnet_tensor)
        n = self.out_features
        return (output + hnet_scalars[:, :n] * F.linear(input, self.hnet_weight)
                + hnet_scalars[:, n:] * self.hnet_bias)


class PublishedHyperConv2d(nn.Module):
    """Official STN HyperConv2d: the HyperLinear formula per output channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int, num_hparams: int):
        super().__init__()
        self.out_channels, self.padding = out_channels, padding
        _params(self, (out_channels, in_channels, kernel_size, kernel_size), ("elem_weight", "hnet_weight"))
        _params(self, (out_channels,), ("elem_bias", "hnet_bias"))
        self.htensor_to_scalars = nn.Linear(num_hparams, 2 * out_channels, bias=False)

    def forward(self, input, htensor):
        output = F.conv2d(input, self.elem_weight, self.elem_bias, padding=self.padding)
        hnet_scalars = self.htensor_to_scalars(htensor)
        c = self.out_channels
        hnet_out = hnet_scalars[:, :c, None, None] * F.conv2d(input, self.hnet_weight, padding=self.padding)
        return output + hnet_out + (hnet_scalars[:, c:] * self.hnet_bias)[:, :, None, None]


class PublishedHyperEmbedding(nn.Module):
    """Official STN (LSTM) HyperEmbedding: time-major indices [T, B], λ [B, H]."""

    def __init__(self, num_embeddings: int, embedding_dim: int, num_hparams: int):
        super().__init__()
        self.elem_embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.hnet_embedding = nn.Embedding(num_embeddings, embedding_dim)
        self.hnet_tensor_to_scalars = nn.Linear(num_hparams, embedding_dim, bias=False)

    def forward(self, input, hnet_tensor):
        return self.elem_embedding(input) + self.hnet_tensor_to_scalars(hnet_tensor) * self.hnet_embedding(input)


class PublishedHyperLSTMCell(nn.Module):
    """Official STN HyperLSTMCell: i2h and h2h are HyperLinear layers, gates (forget, input, output, cell) per
    step of the time-major input [T, B, K], states [1, B, N]. (The DropConnect ``mask_weights`` call the
    published model makes before each forward is left out: cheaper published.)"""

    def __init__(self, ninp: int, nhid: int, num_hparams: int):
        super().__init__()
        self.nhid = nhid
        self.i2h = PublishedHyperLinear(ninp, 4 * nhid, num_hparams)
        self.h2h = PublishedHyperLinear(nhid, 4 * nhid, num_hparams)

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


# ----------------------------------------------------------------------------- the cases

@dataclass
class Provider:
    """One provider of one layer: ``call()`` runs a forward; ``inputs`` are what fwd+bwd differentiates."""

    module: nn.Module
    call: Callable[[], torch.Tensor]
    inputs: Sequence[torch.Tensor]
    scope: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class LayerCase:
    layer: str
    shape: str
    providers: Dict[str, Provider]


def _provider(module, args, inputs_first, scope=contextlib.nullcontext) -> Provider:
    inputs = list(inputs_first) + list(module.parameters())
    return Provider(module, lambda: module(*args), inputs, scope)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def make_cases(device: torch.device, ours_backend: Optional[str] = None) -> List[LayerCase]:
    """The four layers at their tiny shapes, every provider on the same input tensors."""
    gen = torch.Generator().manual_seed(0)

    def randn(*size, grad=True):
        return torch.randn(size, generator=gen).to(device).requires_grad_(grad)

    ours_scope = (lambda: stn_kernels.use_backend(ours_backend)) if ours_backend else contextlib.nullcontext
    H = 3
    cases = []

    B, K, N = 8, 16, 16
    x, lam = randn(B, K), randn(B, H)
    cases.append(LayerCase("HyperLinear", f"B={B}, {K}→{N}, H={H}", {
        "ours": _provider(stn_kernels.HyperLinear(K, N, num_hparams=H).to(device), (x, lam), (x, lam), ours_scope),
        "published": _provider(PublishedHyperLinear(K, N, H).to(device), (x, lam), (x, lam)),
        "torch": _provider(nn.Linear(K, N).to(device), (x,), (x,)),
    }))

    B, C_in, C_out, S = 4, 3, 8, 8
    x, lam = randn(B, C_in, S, S), randn(B, H)
    cases.append(LayerCase("HyperConv2d", f"B={B}, {C_in}→{C_out} ch, {S}×{S}, 3×3 pad 1, H={H}", {
        "ours": _provider(stn_kernels.HyperConv2d(C_in, C_out, 3, padding=1, num_hparams=H).to(device), (x, lam),
                          (x, lam), ours_scope),
        "published": _provider(PublishedHyperConv2d(C_in, C_out, 3, 1, H).to(device), (x, lam), (x, lam)),
        "torch": _provider(nn.Conv2d(C_in, C_out, 3, padding=1).to(device), (x,), (x,)),
    }))

    T, B, V, D = 4, 8, 50, 16
    tokens = torch.randint(0, V, (T, B), generator=gen).to(device)
    lam = randn(B, H)
    ours_embedding = stn_kernels.HyperEmbedding(V, D, num_hparams=H).to(device)
    cases.append(LayerCase("HyperEmbedding", f"[T={T}, B={B}] of {V}, D={D}, H={H}", {
        # Default arguments bind this case's tensors (the names are reused by the cases below).
        "ours": Provider(ours_embedding, lambda m=ours_embedding, t=tokens, lam=lam: m(t, lam, batch_dim=1),
                         [lam] + list(ours_embedding.parameters()), ours_scope),
        "published": _provider(PublishedHyperEmbedding(V, D, H).to(device), (tokens, lam), (lam,)),
        "torch": _provider(nn.Embedding(V, D).to(device), (tokens,), ()),
    }))

    B, K, N = 8, 16, 16
    x, lam, h, c = randn(1, B, K), randn(B, H), randn(1, B, N, grad=False), randn(1, B, N, grad=False)
    ours_cell, published_cell, torch_cell = (stn_kernels.HyperLSTMCell(K, N, num_hparams=H).to(device),
                                             PublishedHyperLSTMCell(K, N, H).to(device),
                                             nn.LSTMCell(K, N).to(device))
    cases.append(LayerCase("HyperLSTM step", f"B={B}, {K}→{N}, H={H}, one step", {
        "ours": Provider(ours_cell, lambda: ours_cell(x, (h, c), lam)[0], [x, lam] + list(ours_cell.parameters()),
                         ours_scope),
        "published": Provider(published_cell, lambda: published_cell(x, (h, c), lam)[0],
                              [x, lam] + list(published_cell.parameters())),
        "torch": Provider(torch_cell, lambda: torch_cell(x[0], (h[0], c[0]))[0], [x] + list(torch_cell.parameters())),
    }))
    return cases


def mode_fn(p: Provider, mode: str) -> Callable[[], object]:
    """The callable timed for ``mode`` (its output kept alive by nothing)."""
    if mode == "fwd":
        return p.call
    if mode == "no_grad":
        def no_grad():
            with torch.no_grad():
                return p.call()
        return no_grad
    grad = torch.ones_like(_first(p.call()))

    def fwd_bwd():
        return torch.autograd.grad(p.call(), p.inputs, grad)

    return fwd_bwd


# ----------------------------------------------------------------------------- timing and the table

@dataclass
class Result:
    layer: str
    shape: str
    mode: str
    us: Dict[str, float]  # median per-call µs of each provider
    ratio: Optional[float]  # median over the rounds of ours/published within a round
    ratio_torch: Optional[float] = None  # the same of ours/torch

    @property
    def target(self) -> float:
        return TARGETS[self.layer]

    @property
    def met(self) -> Optional[bool]:
        return None if self.ratio is None else self.ratio <= self.target

    @property
    def target_torch(self) -> Optional[float]:
        return TORCH_TARGETS.get(self.layer)

    @property
    def met_torch(self) -> Optional[bool]:
        if self.ratio_torch is None or self.target_torch is None:
            return None
        return self.ratio_torch <= self.target_torch


def measure(cases: Sequence[LayerCase], device: torch.device, rounds: int, loop_s: float) -> List[Result]:
    """Median per-call µs of every (layer, mode, provider), loops interleaved round-robin."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    groups = []
    for case in cases:
        for mode in MODES:
            fns = {}
            for name in PROVIDERS:
                p = case.providers[name]
                with p.scope():
                    fn = mode_fn(p, mode)
                    fn()  # warm-up (and first-use imports, compiles)
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(3):
                        fn()
                    sync()
                    per_call = (time.perf_counter() - t0) / 3
                fns[name] = (fn, p.scope, max(5, min(2000, int(loop_s / max(per_call, 1e-7)))))
            groups.append((case, mode, fns))
    samples = {(id(case), mode, name): [] for case, mode, fns in groups for name in fns}
    for r in range(rounds):
        for case, mode, fns in groups:
            names = list(fns)
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, scope, calls = fns[name]
                with scope():
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    sync()
                    samples[(id(case), mode, name)].append((time.perf_counter() - t0) / calls * 1e6)
    results = []
    for case, mode, fns in groups:
        ours, published = samples[(id(case), mode, "ours")], samples[(id(case), mode, "published")]
        plain = samples[(id(case), mode, "torch")]
        results.append(Result(case.layer, case.shape, mode,
                              {name: statistics.median(samples[(id(case), mode, name)]) for name in fns},
                              statistics.median(a / b for a, b in zip(ours, published)),
                              statistics.median(a / b for a, b in zip(ours, plain))))
    return results


def table(results: Sequence[Result]) -> List[str]:
    lines = ["| layer | shape | mode | ours µs | published µs | torch µs | ours / published | target | | "
             "ours / torch | target | |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def verdict(met):
        return "" if met is None else ("met" if met else "not met")

    for r in results:
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}"
        ratio_torch = "–" if r.ratio_torch is None else f"{r.ratio_torch:.2f}"
        target_torch = "" if r.target_torch is None else f"≤ {r.target_torch:.1f}"
        lines.append(f"| {r.layer} | {r.shape} | {r.mode} | {r.us['ours']:.1f} | {r.us['published']:.1f} | "
                     f"{r.us['torch']:.1f} | {ratio} | ≤ {r.target:.1f} | {verdict(r.met)} | {ratio_torch} | "
                     f"{target_torch} | {verdict(r.met_torch)} |")
    return lines


def run(gpu: bool = False, threads: int = 1, quick: bool = False, out: Optional[str] = None) -> List[Result]:
    """Measure, print the markdown table and, with ``out``, write host_overhead.md and host_overhead.csv there."""
    if gpu and not torch.cuda.is_available():
        raise SystemExit("stn_kernels.bench --host-overhead --gpu needs a CUDA device; torch.cuda.is_available() "
                         "is False here")
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    # Many short rounds: a machine shared with other jobs slows whole seconds at a time, which then hit the
    # providers of a round alike (the ratio is taken within each round, its median reported).
    rounds, loop_s = (3, 0.002) if quick else (41, 0.015)
    t0 = time.monotonic()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)  # restored after: a caller in the same process (the tests) keeps its own
    try:
        results = measure(make_cases(device, "triton" if gpu else None), device, rounds, loop_s)
        info = machine_info(device)
    finally:
        torch.set_num_threads(threads_before)
    backend = "triton" if gpu else "auto (reference)"
    if not gpu:  # the reference's ops issued from C++ (stn_kernels/backends/host.py), or why not
        used = host.host_ops(device, torch.float32, torch.float32) is not None
        backend += (", compiled host path" if used else
                    f", Python path (host extension: {host.HOST.load_error() or 'off: STN_KERNELS_HOST=0'})")
    lines = (["# stn_kernels host overhead", ""] + [f"- {line}" for line in info]
             + [f"- run: device {device}, {threads} thread(s), ours on backend {backend}, float32, {rounds} "
                f"interleaved rounds (median per-call µs; ratio: median of the per-round ratios)"
                f"{', quick' if quick else ''}; {time.monotonic() - t0:.0f} s", ""]
             + table(results))
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "host_overhead.md"), "w") as f:
            f.write(text)
        with open(os.path.join(out, "host_overhead.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            for r in results:
                writer.writerow({"layer": r.layer, "shape": r.shape, "mode": r.mode, "ours_us": f"{r.us['ours']:.2f}",
                                 "published_us": f"{r.us['published']:.2f}", "torch_us": f"{r.us['torch']:.2f}",
                                 "ratio": "" if r.ratio is None else f"{r.ratio:.3f}", "target": r.target,
                                 "met": "" if r.met is None else r.met,
                                 "ratio_torch": "" if r.ratio_torch is None else f"{r.ratio_torch:.3f}",
                                 "target_torch": "" if r.target_torch is None else r.target_torch,
                                 "met_torch": "" if r.met_torch is None else r.met_torch})
    return results
