"""The price of self-tuning: ``python -m stn_kernels.bench --price [MODELS] [--quick] [--providers P] [--out DIR]``.

What a user weighs before converting a model: a training step of the converted model against one of their own
plain model, on the same batch. For each model of :mod:`stn_kernels.bench.price_models` (plain ``torch.nn``), in
one process, side by side:

* ``plain`` (a): the plain model's training step: ``zero_grad``, forward, cross-entropy, backward, ``SGD`` step
  (momentum 0.9), eagerly: the user's comparison;
* ``converted`` (b): the model after ``convert(model, num_hparams=3, rates={"dropout": ...})``, one
  ``STNTrainer.train_step``: perturbed per-example λ_b, per-example dropout rates, forward, loss, backward, the same
  optimiser over the converted model's parameters;
* ``stn-cycle`` (c): the whole STN cycle (``STNTrainer.step``: T_train = 2 training steps, T_valid = 1 validation
  step, λ and σ updated) divided by T_train: what one training step costs in an STN run;
* ``plain+compile``, ``converted+compile``, ``stn-cycle+compile``: the same under ``torch.compile`` (the plain
  model's forward and loss as one compiled function, as ``STNTrainer(compile=True)`` compiles its forward half).

Every provider starts from the same weights and runs on the same fixed batch. Timing: warm-up calls (the compiles
happen there, timed apart), then interleaved rounds (providers in a rotated order), each a run of back-to-back
steps of one provider; a round's time per step is its wall time over its steps. Ratios are taken within each
round against ``plain`` of the same round (robust to a load that changes during the run): the table gives their
median over the rounds and the spread (first to third quartile of the per-round ratios).

The FLOP floor of (b)/(a): the FLOPs torch counts in the plain model's training step (``FlopCounterMode``:
matrix products and convolutions, forward and backward; oneDNN off so that the LSTM's are counted), plus once more
those of the layers ``convert`` turns into hyper layers (a hyper layer's products are exactly twice the plain
layer's: W·x and W_hyper·x, and likewise dX, dW, dW_hyper), all over the plain count: 2.0 for a model of hyper
layers only, less where products of other ops (attention's scores and weighted sum) take part. Elementwise work
(normalisation, activations, softmax, the optimiser) counts no FLOPs here; it takes time in both steps alike, so
the ratio of times can go below this floor but a converted step has no way to do its products in less.
"""

from __future__ import annotations

import copy
import csv
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels.stn import Hyperparameter, HyperparameterSet, STNTrainer

from .price_models import MODELS, PriceModel
from .report import machine_info, one_line

PROVIDERS = ("plain", "converted", "stn-cycle", "plain+compile", "converted+compile", "stn-cycle+compile")
EAGER = PROVIDERS[:3]
NUM_HPARAMS = 3
TRAIN_STEPS = 2  # T_train of the cycle (T_valid = 1): the cycle's time is divided by it
LEARNING_RATE = 1e-3
CSV_FIELDS = ("model", "batch", "provider", "ms_per_step", "iqr_pct", "vs_plain", "vs_plain_q1", "vs_plain_q3",
              "vs_plain_compiled", "flop_floor", "rounds", "steps_per_round", "warmup_s", "note")
# Products that a hyper layer doubles; inside a converted attention only its projections (matrix products of the
# weights), not the score and weighted-sum products between activations.
_PROJECTIONS = ("aten.mm", "aten.addmm", "aten.linear")


@dataclass(frozen=True)
class Timing:
    rounds: int
    round_s: float  # seconds of steps per provider and round
    warmup: int  # calls before timing (the compiled providers compile in the first)


FULL = Timing(rounds=9, round_s=0.4, warmup=3)
QUICK = Timing(rounds=2, round_s=0.02, warmup=2)


# ----------------------------------------------------------------------------- the providers

def _hyperparameters() -> HyperparameterSet:
    """The tuned dropout rate and NUM_HPARAMS − 1 more hyperparameters that only enter the layers' λ."""
    specs = [Hyperparameter("dropout", 0.2, 0.0, 0.9)]
    specs += [Hyperparameter(f"other{i}", 0.5, 0.0) for i in range(1, NUM_HPARAMS)]
    return HyperparameterSet(specs)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)


def convert_model(spec: PriceModel, plain: nn.Module) -> nn.Module:
    """``plain`` converted in place as the table converts it: every layer convert takes, the dropouts (and a
    transformer's attention dropout) tuned per example by the hyperparameter "dropout"."""
    return stn_kernels.convert(plain, num_hparams=NUM_HPARAMS, rates={"dropout": spec.rates})


def _plain_step(model: nn.Module, inputs, targets, compiled: bool) -> Callable[[], None]:
    optimizer = _optimizer(model)

    def loss_of(x, y):
        return F.cross_entropy(model(x), y)

    loss_fn = torch.compile(loss_of) if compiled else loss_of

    def step():
        optimizer.zero_grad()
        loss_fn(inputs, targets).backward()
        optimizer.step()

    return step


def _trainer(spec: PriceModel, model: nn.Module, compiled: bool) -> STNTrainer:
    model = convert_model(spec, model)
    return STNTrainer(model, F.cross_entropy, _hyperparameters(), _optimizer(model), batch_dim=spec.batch_dim,
                      train_steps=TRAIN_STEPS, valid_steps=1, compile=compiled)


def build(provider: str, spec: PriceModel, base: nn.Module, inputs, targets) -> Tuple[Callable[[], None], int]:
    """(one call, the training steps it makes) of ``provider`` on a copy of ``base``."""
    model = copy.deepcopy(base).train()
    compiled = provider.endswith("+compile")
    kind = provider.split("+")[0]
    if kind == "plain":
        return _plain_step(model, inputs, targets, compiled), 1
    trainer = _trainer(spec, model, compiled)
    if kind == "converted":
        return (lambda: trainer.train_step(inputs, targets)), 1

    def batch():
        return inputs, targets

    return (lambda: trainer.step(batch, batch)), TRAIN_STEPS


# ----------------------------------------------------------------------------- the FLOP floor

def converted_names(spec: PriceModel, base: nn.Module) -> List[str]:
    """Names (in ``base``) of the outermost modules that :func:`convert_model` replaces by hyper layers."""
    converted = dict(convert_model(spec, copy.deepcopy(base)).named_modules())
    hyper = (stn_kernels.HyperLinear, stn_kernels.HyperConv2d, stn_kernels.HyperEmbedding, stn_kernels.HyperLSTM,
             stn_kernels.HyperMultiheadAttention)
    names: List[str] = []
    for name, module in base.named_modules():
        new = converted.get(name)
        if name and isinstance(new, hyper) and type(new) is not type(module) \
                and not any(name.startswith(outer + ".") for outer in names):
            names.append(name)
    return names


def flop_floor(spec: PriceModel, base: nn.Module, inputs, targets) -> Tuple[float, float]:
    """(FLOP floor of converted/plain, GFLOPs of the plain training step): see the module docstring."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(base).train()
    root = type(model).__name__
    with warnings.catch_warnings():  # (flags() warns about oneDNN's TF32 on Intel GPUs, which do not matter here)
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(inputs), targets).backward()
    total = counter.get_total_flops()
    by_module = counter.get_flop_counts()
    doubled = 0
    for name in converted_names(spec, base):
        ops = by_module.get(f"{root}.{name}", {})
        attention = isinstance(base.get_submodule(name), nn.MultiheadAttention)
        doubled += sum(flops for op, flops in ops.items() if not attention or str(op) in _PROJECTIONS)
    return (total + doubled) / total, total / 1e9


# ----------------------------------------------------------------------------- timing

@dataclass
class Result:
    model: str
    ms: Dict[str, float] = field(default_factory=dict)  # median ms per training step
    iqr_pct: Dict[str, float] = field(default_factory=dict)
    ratios: Dict[str, List[float]] = field(default_factory=dict)  # per round, against plain of that round
    warmup_s: Dict[str, float] = field(default_factory=dict)
    steps: Dict[str, int] = field(default_factory=dict)
    rounds: int = 0
    floor: Optional[float] = None
    gflops: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    def ratio(self, provider: str) -> Optional[Tuple[float, float, float]]:
        """(median, first quartile, third quartile) of the per-round ratios provider/plain, or None."""
        values = self.ratios.get(provider)
        if not values:
            return None
        if len(values) < 2:
            return values[0], values[0], values[0]
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return statistics.median(values), q1, q3


def _quartile_spread(samples: Sequence[float]) -> Optional[float]:
    if len(samples) < 4:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return 100.0 * (q3 - q1) / statistics.median(samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(spec: PriceModel, providers: Sequence[str], timing: Timing, tiny: bool = False,
            device: torch.device = torch.device("cpu")) -> Result:
    """Build and time ``providers`` (``plain`` always among them) on one model."""
    result = Result(spec.name)
    sizes = spec.tiny if tiny else spec.sizes
    torch.manual_seed(0)
    base = spec.make(sizes)
    inputs, targets = spec.batch(sizes, torch.Generator().manual_seed(0))
    try:  # on the CPU copy: FLOPs do not depend on the device, and cuDNN's LSTM is not counted
        result.floor, result.gflops = flop_floor(spec, base, inputs, targets)
    except Exception as exc:  # the floor is a column, not a reason to lose the timings
        result.notes.append(f"FLOP floor not counted: {type(exc).__name__}: {one_line(exc)}")
    base, inputs, targets = base.to(device), inputs.to(device), targets.to(device)
    calls: Dict[str, Tuple[Callable[[], None], int]] = {}
    estimate: Dict[str, float] = {}
    for provider in providers:
        try:
            call, steps = build(provider, spec, base, inputs, targets)
            start = time.perf_counter()
            for _ in range(timing.warmup):
                call()
            _sync(device)
            result.warmup_s[provider] = time.perf_counter() - start
            start = time.perf_counter()
            call()
            _sync(device)
            estimate[provider] = time.perf_counter() - start
            calls[provider] = (call, steps)
        except Exception as exc:
            result.notes.append(f"{provider} failed: {type(exc).__name__}: {one_line(exc)}")
    if "plain" not in calls:
        return result
    names = list(calls)
    repeats = {p: max(1, round(timing.round_s / max(estimate[p], 1e-6))) for p in names}
    samples: Dict[str, List[float]] = {p: [] for p in names}
    for r in range(timing.rounds):
        for provider in names[r % len(names):] + names[:r % len(names)]:
            call, steps = calls[provider]
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats[provider]):
                call()
            _sync(device)
            samples[provider].append(1e3 * (time.perf_counter() - start) / (repeats[provider] * steps))
    result.rounds = timing.rounds
    for provider in names:
        result.ms[provider] = statistics.median(samples[provider])
        result.steps[provider] = repeats[provider] * calls[provider][1]
        spread = _quartile_spread(samples[provider])
        if spread is not None:
            result.iqr_pct[provider] = spread
        result.ratios[provider] = [t / p for t, p in zip(samples[provider], samples["plain"])]
    return result


# ----------------------------------------------------------------------------- the tables

def _ratio_text(result: Result, provider: str) -> str:
    found = result.ratio(provider)
    if found is None:
        return "–"
    median, q1, q3 = found
    return f"{median:.2f}× [{q1:.2f}–{q3:.2f}]"


def summary_table(results: Sequence[Result]) -> List[str]:
    lines = ["| model | batch | FLOP floor | (b)/(a) | (c)/(a) | (b)/(a) compiled | (c)/(a) compiled | "
             "plain ms/step (eager, compiled) | (b)/floor |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        spec = MODELS[r.model]
        floor = "–" if r.floor is None else f"{r.floor:.2f}"
        plain = ", ".join(f"{r.ms[p]:.1f}" if p in r.ms else "–" for p in ("plain", "plain+compile"))
        b = r.ratio("converted")
        to_floor = f"{b[0] / r.floor:.2f}" if b and r.floor else "–"
        lines.append(f"| {r.model} | {spec.shape} | {floor} | {_ratio_text(r, 'converted')} | "
                     f"{_ratio_text(r, 'stn-cycle')} | {_ratio_text(r, 'converted+compile')} | "
                     f"{_ratio_text(r, 'stn-cycle+compile')} | {plain} | {to_floor} |")
    return lines


def detail_table(results: Sequence[Result]) -> List[str]:
    lines = ["| model | provider | ms per training step | IQR % | vs plain (median [q1–q3]) | steps per round | "
             "warm-up s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for provider in PROVIDERS:
            if provider not in r.ms:
                continue
            iqr = r.iqr_pct.get(provider)
            lines.append(f"| {r.model} | {provider} | {r.ms[provider]:.2f} | {'' if iqr is None else f'{iqr:.0f}'} "
                         f"| {_ratio_text(r, provider)} | {r.steps[provider]} | {r.warmup_s[provider]:.1f} |")
    return lines


LEGEND = ("(a) plain: the plain torch.nn model's training step (forward, cross-entropy, backward, SGD step), eager; "
          "(b) converted: STNTrainer.train_step of the converted model (per-example λ and dropout rates); (c) "
          "stn-cycle: STNTrainer.step (2 training + 1 validation step) / 2. Ratios: per round against (a) of the same "
          "round, eager (a) also for the compiled columns (the user's comparison), median [first–third quartile] "
          "over the rounds. FLOP floor: (FLOPs of (a) + FLOPs of the layers convert makes hyper layers) / FLOPs of "
          "(a), counted by torch's FlopCounterMode (see stn_kernels/bench/price.py); (b)/floor: how far (b)/(a) is "
          "from it.")


def _write_csv(results: Sequence[Result], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for r in results:
            for provider in PROVIDERS:
                if provider not in r.ms:
                    continue
                median, q1, q3 = r.ratio(provider)
                vs_compiled = ""
                if provider.endswith("+compile") and "plain+compile" in r.ms:
                    vs_compiled = f"{r.ms[provider] / r.ms['plain+compile']:.4f}"
                writer.writerow({
                    "model": r.model, "batch": MODELS[r.model].shape, "provider": provider,
                    "ms_per_step": f"{r.ms[provider]:.4f}",
                    "iqr_pct": "" if provider not in r.iqr_pct else f"{r.iqr_pct[provider]:.1f}",
                    "vs_plain": f"{median:.4f}", "vs_plain_q1": f"{q1:.4f}", "vs_plain_q3": f"{q3:.4f}",
                    "vs_plain_compiled": vs_compiled, "flop_floor": "" if r.floor is None else f"{r.floor:.4f}",
                    "rounds": r.rounds, "steps_per_round": r.steps[provider],
                    "warmup_s": f"{r.warmup_s[provider]:.2f}", "note": "; ".join(r.notes)})


def write_plot(results: Sequence[Result], path: str) -> Optional[str]:
    """Bars of (b)/(a) and (c)/(a), eager and compiled, with the quartiles and each model's FLOP floor; returns a
    note if not written. matplotlib is imported here only."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "price.png not written: matplotlib is not installed"
    try:
        shown = [p for p in PROVIDERS if p != "plain" and any(p in r.ms for r in results)]
        fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(results)), 4.0))
        width = 0.8 / max(len(shown), 1)
        for j, provider in enumerate(shown):
            xs, ys, errs = [], [], [[], []]
            for i, r in enumerate(results):
                found = r.ratio(provider)
                if found:
                    xs.append(i + (j - (len(shown) - 1) / 2) * width)
                    ys.append(found[0])
                    errs[0].append(found[0] - found[1])
                    errs[1].append(found[2] - found[0])
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=provider)
        for i, r in enumerate(results):
            if r.floor:
                ax.hlines(r.floor, i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                          label="FLOP floor" if i == 0 else None)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(results)))
        ax.set_xticklabels([r.model for r in results])
        ax.set_ylabel("time per training step / plain eager")
        ax.set_title("the price of self-tuning")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as exc:  # a plot must never lose the measurements
        return f"price.png not written: {type(exc).__name__}: {one_line(exc)}"
    return None


def _load() -> str:
    try:
        return "%.2f" % os.getloadavg()[0]
    except (AttributeError, OSError):
        return "unknown"


def run(names: Sequence[str], providers: Optional[Sequence[str]] = None, quick: bool = False,
        out: Optional[str] = None, tiny: bool = False, threads: int = 1,
        device: torch.device = torch.device("cpu")) -> List[Result]:
    """Measure ``names`` (keys of :data:`MODELS`) on ``device``, print the tables and, with ``out``, write price.md,
    price.csv and price.png there. ``tiny``: the models' smoke-test sizes. On CUDA the device is synchronised around
    each run of steps (never per step); ``STNTrainer(compile=True)`` runs as CUDA graphs there."""
    import torch._dynamo

    providers = list(providers or PROVIDERS)
    if "plain" not in providers:
        providers.insert(0, "plain")  # every ratio is taken against it
    timing = QUICK if quick else FULL
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    start, load_before = time.monotonic(), _load()
    results = []
    try:
        info = machine_info(device)
        for name in names:
            t0 = time.monotonic()
            results.append(measure(MODELS[name], providers, timing, tiny, device))
            torch._dynamo.reset()  # each model's compiled code (and its recompile budget) to itself
            print(f"[bench] price of {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(threads_before)
    lines = ["# stn_kernels benchmark: the price of self-tuning", ""] + [f"- {line}" for line in info] + [
        f"- run: {device}, {threads} thread(s), float32, {timing.rounds} interleaved rounds of about "
        f"{timing.round_s:g} s per provider, {timing.warmup} warm-up calls{', quick' if quick else ''}"
        f"{', tiny sizes' if tiny else ''}; load average {load_before} at the start, {_load()} at the end; "
        f"{time.monotonic() - start:.0f} s",
        "- models: " + "; ".join(f"{r.model}: {MODELS[r.model].description}, {MODELS[r.model].shape}"
                                  + ("" if r.gflops is None else f", {r.gflops:.2f} GFLOP per plain step")
                                  for r in results), ""]
    lines += summary_table(results) + ["", LEGEND, ""] + detail_table(results)
    notes = [f"{r.model}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        why = write_plot(results, os.path.join(out, "price.png"))
        if why:
            text += f"\n- {why}\n"
        with open(os.path.join(out, "price.md"), "w", encoding="utf-8") as f:
            f.write(text)
        _write_csv(results, os.path.join(out, "price.csv"))
    return results
