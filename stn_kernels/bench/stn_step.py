"""The whole STN cycle, eager against compiled: ``python -m stn_kernels.bench --stn-step``.

One cycle is what :meth:`stn_kernels.stn.STNTrainer.step` does (T_train = 2 training steps: perturbed λ_b,
forward, loss, backward, optimiser step; then one validation step: hypergradient of the validation loss and
entropy term, λ and σ optimiser steps), on an STN MLP of HyperLinear layers with per-example dropout:

* ``alexnet-fc`` (the GPU default): AlexNet's STN classifier, 1024 → 4096 → 4096 → 10, B = 128, H = 15;
* ``digits-mlp`` (the CPU default): the digits example's MLP, 64 → 128 → 128 → 10, B = 64, H = 3.

Providers: ``eager`` (``STNTrainer(compile=False)``) and ``compiled`` (``compile=True``: on CUDA
``mode="reduce-overhead"``, CUDA graphs). Both start from the same weights; the first cycles of each are
warm-up (the compiled one compiles there). Then rounds alternate the providers, each timing a run of
cycles with one synchronisation at its end; the table gives the median per cycle over the rounds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from stn_kernels import HyperLinear
from stn_kernels.stn import Hyperparameter, HyperparameterSet, STNTrainer, per_example_dropout


@dataclass(frozen=True)
class StepShape:
    name: str
    batch: int
    num_hparams: int
    widths: Tuple[int, ...]   # input, hidden..., classes


SHAPES = {
    "alexnet-fc": StepShape("alexnet-fc", 128, 15, (1024, 4096, 4096, 10)),
    "digits-mlp": StepShape("digits-mlp", 64, 3, (64, 128, 128, 10)),
}
PROVIDERS = ("eager", "compiled")


class StnMlp(torch.nn.Module):
    """HyperLinear layers, ReLU and per-example dropout at rate ``sample["dropout"]`` after each hidden one."""

    def __init__(self, widths: Tuple[int, ...], num_hparams: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            HyperLinear(i, o, num_hparams=num_hparams) for i, o in zip(widths[:-1], widths[1:]))

    def forward(self, x, sample):
        for index, layer in enumerate(self.layers):
            x = layer(x, sample.layer_input)
            if index < len(self.layers) - 1:
                x = per_example_dropout(torch.relu(x), sample["dropout"], training=sample.regularize)
        return x


def make_trainer(shape: StepShape, device: torch.device, compile_option) -> Tuple[STNTrainer, Callable]:
    """A trainer on fixed random batches (``next_batch()``), its weights drawn from seed 0."""
    torch.manual_seed(0)
    specs = [Hyperparameter("dropout", 0.2, 0.0, 0.9)]
    specs += [Hyperparameter(f"other{i}", 0.5, 0.0) for i in range(1, shape.num_hparams)]
    hp = HyperparameterSet(specs, device=device)
    model = StnMlp(shape.widths, shape.num_hparams).to(device)
    x = torch.randn(shape.batch, shape.widths[0], device=device)
    y = torch.randint(0, shape.widths[-1], (shape.batch,), device=device)
    trainer = STNTrainer(model, F.cross_entropy, hp, torch.optim.Adam(model.parameters(), 1e-4),
                         compile=compile_option)
    return trainer, lambda: (x, y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cycles(shape: StepShape, device: torch.device, rounds: int, cycles: int, warmup: int) -> Dict[str, dict]:
    """Per provider: median ms per cycle over ``rounds`` interleaved rounds of ``cycles`` cycles, and the
    seconds its ``warmup`` cycles took (the compiles included)."""
    trainers = {"eager": make_trainer(shape, device, False), "compiled": make_trainer(shape, device, True)}
    stats = {}
    for name, (trainer, batch) in trainers.items():
        start = time.perf_counter()
        for _ in range(warmup):
            trainer.step(batch, batch)
        _sync(device)
        stats[name] = {"warmup_s": time.perf_counter() - start, "per_cycle_ms": []}
    for _ in range(rounds):
        for name, (trainer, batch) in trainers.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(cycles):
                trainer.step(batch, batch)
            _sync(device)
            stats[name]["per_cycle_ms"].append(1e3 * (time.perf_counter() - start) / cycles)
    return {name: {"median_ms": statistics.median(s["per_cycle_ms"]), **s} for name, s in stats.items()}


def table(results: Dict[str, Dict[str, dict]], device: torch.device) -> List[str]:
    mode = "reduce-overhead (CUDA graphs)" if device.type == "cuda" else "default"
    lines = [f"compiled: STNTrainer(compile=True), torch.compile mode {mode}; one cycle = 2 training + 1 "
             "validation step; medians of interleaved rounds", "",
             "| model | B | H | widths | eager ms/cycle | compiled ms/cycle | eager / compiled | warm-up s "
             "(eager, compiled) |", "|---|---|---|---|---|---|---|---|"]
    for name, by_provider in results.items():
        shape = SHAPES[name]
        eager, compiled = by_provider["eager"], by_provider["compiled"]
        lines.append(f"| {name} | {shape.batch} | {shape.num_hparams} | {'→'.join(map(str, shape.widths))} | "
                     f"{eager['median_ms']:.3f} | {compiled['median_ms']:.3f} | "
                     f"{eager['median_ms'] / compiled['median_ms']:.2f}× | "
                     f"{eager['warmup_s']:.1f}, {compiled['warmup_s']:.1f} |")
    return lines


def run(device: torch.device, shape_names: List[str], quick: bool) -> List[str]:
    rounds, cycles, warmup = (2, 3, 3) if quick else (7, 20, 10)
    results = {name: time_cycles(SHAPES[name], device, rounds, cycles, warmup) for name in shape_names}
    return table(results, device)
