"""Self-Tuning Networks on the handwritten digits that ship with scikit-learn.

Tunes, during a single training run, the dropout rate of every layer and five data augmentation
hyperparameters, applied per example on the batch (the published CNN's kinds: continuous and discrete):
Gaussian input noise (std in pixel units of the [0, 1]-scaled images), brightness and contrast jitter
(torchvision's ColorJitter strengths, on the single channel) and cutout (number of holes 0..4 and their
length 0..8, discrete), through ``stn.augment`` (one ``stn_kernels::augment`` op: jitter, then cutout),
then the noise, of

* an MLP of HyperLinear layers, 64 → 128 → 128 → 10, dropout after each hidden layer;
* a small CNN of HyperConv2d layers, 1 → 16 → 32 channels (3×3, each followed by 2×2 max-pool and
  per-example *channel* dropout), then a HyperLinear 128 → 10;

and compares them with the same models trained with fixed hyperparameters from a grid (one dropout
rate for all layers, the augmentation at STN's starting values) and from random search (every
hyperparameter drawn independently). Every run gets the same number of weight updates; STN's
validation steps (one per two training steps) update only λ and σ. Every run is scored at its
checkpoint with the lowest validation loss (evaluated every ``--eval-every`` training steps), and
the test set is used only for the table.

    python examples/stn_digits.py            # < 5 min on 2 CPU cores
    python examples/stn_digits.py --quick    # < 1 min
    torchrun --nproc-per-node 2 examples/stn_digits.py --quick   # data parallel, 2 processes (gloo)

Under torchrun (WORLD_SIZE > 1) every run is data parallel: each rank trains on its own shard of the
training and validation splits with a per-rank batch of batch-size / ranks (the global batch stays the
same), the model is wrapped in DistributedDataParallel, STNTrainer keeps λ and σ identical on every
rank, and each rank draws its own perturbations, dropout masks and noise. The runs go one after
another (the ranks are the parallelism); only rank 0 prints and writes files.

Writes ``stn_digits_schedules.png`` (the hyperparameter schedules STN found) and ``results.json``
to ``--out`` (default examples/out/). Seeded and deterministic: single-threaded, deterministic
algorithms, explicit generators.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import stn_kernels
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import stn_kernels
from stn_kernels import stn

HPARAM_NAMES = ("dropout1", "dropout2", "noise", "bright", "contrast", "cutholes", "cutlength")
DROPOUT_RANGE = (0.0, 0.9)   # the published code caps dropout at 0.9 for stability
NOISE_RANGE = (0.0, 1.0)
JITTER_RANGE = (0.0, 1.0)    # brightness, contrast: the published ranges
HOLES_RANGE = (0, 4)         # discrete, the published range
LENGTH_RANGE = (0, 8)        # discrete: at most the whole 8×8 image
MAX_HOLES = HOLES_RANGE[1]
# The published starting dropout, 0.05; the augmentation starts weak (one hole of side 2·⌊2/2⌋ = 2).
START = {"dropout1": 0.05, "dropout2": 0.05, "noise": 0.05, "bright": 0.05, "contrast": 0.05, "cutholes": 1,
         "cutlength": 2}


# --------------------------------------------------------------------------- data


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


def load_digits_splits(seed: int):
    """1797 8×8 images, pixels scaled to [0, 1]; stratified 60/20/20 train/validation/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=0.25, stratify=y_rest,
                                                      random_state=seed)
    as_split = lambda a, b: Split(torch.from_numpy(a), torch.from_numpy(b))  # noqa: E731
    return as_split(x_train, y_train), as_split(x_val, y_val), as_split(x_test, y_test)


class BatchStream:
    """Endless shuffled mini-batches (a new permutation per epoch from its own generator)."""

    def __init__(self, split: Split, batch_size: int, seed: int) -> None:
        self.split, self.batch_size = split, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.empty(0, dtype=torch.int64), 0

    def __call__(self):
        if self.position + self.batch_size > len(self.order):
            self.order, self.position = torch.randperm(len(self.split.y), generator=self.generator), 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.split.x[index], self.split.y[index]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


# --------------------------------------------------------------------------- models


def augment_input(x: torch.Tensor, sample: stn.HyperparameterSample) -> torch.Tensor:
    """x [B, 1, 8, 8]: per example, brightness and contrast jitter (random order) and cutout by the sample's
    ``bright``, ``contrast``, ``cutholes``, ``cutlength`` (one op), then Gaussian noise of std
    ``noise``; only while regularising (validation and evaluation see the images as they are)."""
    if not sample.regularize:
        return x
    x = stn.augment(x, sample, max_holes=MAX_HOLES)  # seed drawn from torch's generator
    std = sample["noise"].view(-1, 1, 1, 1)
    return x + std * torch.randn_like(x)


class DigitsMLP(nn.Module):
    def __init__(self, num_hparams: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = stn_kernels.HyperLinear(64, hidden, num_hparams=num_hparams)
        self.fc2 = stn_kernels.HyperLinear(hidden, hidden, num_hparams=num_hparams)
        self.fc3 = stn_kernels.HyperLinear(hidden, 10, num_hparams=num_hparams)

    def forward(self, x, sample: stn.HyperparameterSample):
        lam = sample.layer_input
        h = augment_input(x.view(-1, 1, 8, 8), sample).flatten(1)
        h = torch.relu(self.fc1(h, lam))
        h = stn.per_example_dropout(h, sample["dropout1"], training=sample.regularize)
        h = torch.relu(self.fc2(h, lam))
        h = stn.per_example_dropout(h, sample["dropout2"], training=sample.regularize)
        return self.fc3(h, lam)


class DigitsCNN(nn.Module):
    def __init__(self, num_hparams: int) -> None:
        super().__init__()
        self.conv1 = stn_kernels.HyperConv2d(1, 16, 3, num_hparams=num_hparams, padding=1)
        self.conv2 = stn_kernels.HyperConv2d(16, 32, 3, num_hparams=num_hparams, padding=1)
        self.fc = stn_kernels.HyperLinear(32 * 2 * 2, 10, num_hparams=num_hparams)

    def forward(self, x, sample: stn.HyperparameterSample):
        lam = sample.layer_input
        h = augment_input(x.view(-1, 1, 8, 8), sample)
        h = F.max_pool2d(torch.relu(self.conv1(h, lam)), 2)
        h = stn.per_example_channel_dropout(h, sample["dropout1"], training=sample.regularize)
        h = F.max_pool2d(torch.relu(self.conv2(h, lam)), 2)
        h = stn.per_example_channel_dropout(h, sample["dropout2"], training=sample.regularize)
        return self.fc(h.flatten(1), lam)


MODELS = {"mlp": DigitsMLP, "cnn": DigitsCNN}


def make_hparams(values: Dict[str, float], scale: float) -> stn.HyperparameterSet:
    return stn.HyperparameterSet([
        stn.Hyperparameter("dropout1", values["dropout1"], *DROPOUT_RANGE, scale=scale),
        stn.Hyperparameter("dropout2", values["dropout2"], *DROPOUT_RANGE, scale=scale),
        stn.Hyperparameter("noise", values["noise"], *NOISE_RANGE, scale=scale),
        stn.Hyperparameter("bright", values["bright"], *JITTER_RANGE, scale=scale),
        stn.Hyperparameter("contrast", values["contrast"], *JITTER_RANGE, scale=scale),
        stn.Hyperparameter("cutholes", int(values["cutholes"]), *HOLES_RANGE, discrete=True, scale=scale),
        stn.Hyperparameter("cutlength", int(values["cutlength"]), *LENGTH_RANGE, discrete=True, scale=scale),
    ])


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    model: str
    method: str
    hparams: Dict[str, float]          # at the best checkpoint (STN: its current λ there)
    val_loss: float
    val_acc: float
    test_loss: float
    test_acc: float
    best_step: int
    seconds: float
    schedule: List[dict] = field(default_factory=list)  # STN only: λ and σ after validation steps
    cycle_ms: float = math.nan  # STN only: median wall time of one cycle (2 training + 1 validation step)


@torch.no_grad()
def evaluate(model, hp: stn.HyperparameterSet, split: Split):
    model.eval()
    sample = hp.sample(len(split.y), perturb=False, regularize=False)
    logits = model(split.x, sample)
    return F.cross_entropy(logits, split.y).item(), (logits.argmax(1) == split.y).float().mean().item()


def shard(split: Split, rank: int, world: int) -> Split:
    """This rank's share of a split (every world-th example)."""
    return Split(split.x[rank::world], split.y[rank::world])


def check_ranks_agree(model: nn.Module, hp: stn.HyperparameterSet) -> None:
    """Raises unless every rank holds the same weights, λ and σ (what DDP and STNTrainer promise)."""
    with torch.no_grad():
        mine = (list(hp.values().values()), list(hp.scales().values()),
                [float(p.double().sum()) for p in model.parameters()])
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    if any(other != mine for other in everyone):
        raise RuntimeError(f"ranks disagree on the weights or hyperparameters: {everyone}")


def train_run(kind: str, method: str, values: Dict[str, float], data, args, log=print,
              checkpoint: Optional[str] = None) -> RunResult:
    """Trains one model for args.steps weight updates: with STN (method "stn") or fixed hyperparameters.
    Under torchrun, data parallel over the ranks (the same result on every rank). ``checkpoint``: the file this
    run saves itself to every args.checkpoint_every weight updates (and resumes from, with args.resume)."""
    train, val, test = data
    rank, world = stn.distributed_rank()
    torch.manual_seed(args.seed)  # the same initial weights for every run of one model
    model = MODELS[kind](len(HPARAM_NAMES))
    # DDP averages the weight gradients over the ranks (and broadcasts rank 0's initial weights).
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # Dropout seeds and input noise: torch.manual_seed(seed + 1) in one process, each rank its own stream.
    stn.seed_rank_streams(args.seed + 1)
    hp = make_hparams(values, scale=args.perturb_scale)
    weight_optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    # Each rank its own shard; per-rank batches of batch_size / world keep the global batch.
    next_train = BatchStream(shard(train, rank, world), args.batch_size // world, args.seed + 2)
    next_val = BatchStream(shard(val, rank, world), args.batch_size // world, args.seed + 3)
    trainer = None
    if method == "stn":
        trainer = stn.STNTrainer(
            net, F.cross_entropy, hp, weight_optimizer,
            hparam_optimizer=torch.optim.Adam([hp.unconstrained], lr=args.hparam_lr),
            scale_optimizer=torch.optim.Adam([hp.raw_scale], lr=args.hparam_lr),
            train_steps=2, valid_steps=1, warmup_steps=args.warmup_steps, entropy_weight=args.entropy_weight,
            seed=args.seed + 1, generator=torch.Generator().manual_seed(stn.rank_seed(args.seed + 4, rank)),
            compile=args.compile)
    # Everything of the loop's own that the next step depends on (with the trainer's state, the model's, the
    # random streams and the data positions, what a checkpoint holds).
    progress = {"step": 0, "best": {"val_loss": math.inf}, "next_eval": args.eval_every,
                "next_report": args.steps // 4, "next_save": args.checkpoint_every, "schedule": [],
                "cycle_seconds": [], "seconds": 0.0}
    streams = (next_train, next_val)
    if checkpoint is not None and args.resume:
        progress = resume_run(checkpoint, trainer, net, weight_optimizer, streams) or progress
        if progress["step"]:
            log(f"        resumed at step {progress['step']} from {checkpoint}")
    start = time.perf_counter() - progress["seconds"]
    schedule, cycle_seconds, best = progress["schedule"], progress["cycle_seconds"], progress["best"]
    step, next_eval, next_report = progress["step"], progress["next_eval"], progress["next_report"]
    while step < args.steps:
        if method == "stn":
            cycle_start = time.perf_counter()
            trainer.step(next_train, next_val)
            cycle_seconds.append(time.perf_counter() - cycle_start)
            step = trainer.train_steps_done
            schedule.append({"step": step, **hp.values(), **{f"{k}_scale": v for k, v in hp.scales().items()}})
        else:
            net.train()
            x, y = next_train()
            weight_optimizer.zero_grad()
            loss = F.cross_entropy(net(x, hp.sample(len(y), perturb=False)), y)
            loss.backward()
            weight_optimizer.step()
            step += 1
        if step >= next_eval or step >= args.steps:
            next_eval += args.eval_every
            val_loss, val_acc = evaluate(model, hp, val)
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "val_acc": val_acc, "step": step,
                        "model": copy.deepcopy(model.state_dict()), "hp": copy.deepcopy(hp.state_dict())}
            if method == "stn" and step >= next_report:
                next_report += args.steps // 4
                shown = ", ".join(f"{k}={v:.3f}" for k, v in hp.values().items())
                log(f"        step {step:5d}/{args.steps}  val loss {val_loss:.4f}  {shown}")
        if checkpoint is not None and step >= progress["next_save"] and step < args.steps:
            progress.update(step=step, best=best, next_eval=next_eval, next_report=next_report,
                            next_save=progress["next_save"] + args.checkpoint_every,
                            seconds=time.perf_counter() - start)
            save_run(checkpoint, trainer, net, weight_optimizer, streams, progress)
    if world > 1:
        check_ranks_agree(model, hp)
    model.load_state_dict(best["model"])
    hp.load_state_dict(best["hp"])
    test_loss, test_acc = evaluate(model, hp, test)
    # Cycles after the warm-up (whose cycles have no validation step) and after the first compiles.
    tuned = sorted(cycle_seconds[args.warmup_steps // 2 + 2:])
    cycle_ms = 1e3 * tuned[len(tuned) // 2] if tuned else math.nan
    return RunResult(kind, method, dict(hp.values()), best["val_loss"], best["val_acc"], test_loss, test_acc,
                     best["step"], time.perf_counter() - start, schedule, cycle_ms)


def save_run(path: str, trainer, net, weight_optimizer, streams, progress: dict) -> None:
    """The run so far: the model, the STN trainer's state (``trainer=None`` for a run with fixed hyperparameters:
    its weight optimizer goes with the rest), the random streams, the batch streams' positions, ``progress``."""
    extra = {"progress": progress, "streams": [s.state_dict() for s in streams],
             "weight_optimizer": weight_optimizer.state_dict() if trainer is None else None}
    stn.save_checkpoint(path, trainer, net, extra=extra)


def resume_run(path: str, trainer, net, weight_optimizer, streams) -> Optional[dict]:
    """Restores what :func:`save_run` saved; returns its ``progress``, or None where nothing was saved yet."""
    try:
        extra = stn.load_checkpoint(path, trainer, net)
    except FileNotFoundError:
        return None
    if trainer is None:
        weight_optimizer.load_state_dict(extra["weight_optimizer"])
    for stream, state in zip(streams, extra["streams"]):
        stream.load_state_dict(state)
    return extra["progress"]


# --------------------------------------------------------------------------- experiment


def grid_points(args) -> List[Dict[str, float]]:
    return [{**START, "dropout1": p, "dropout2": p} for p in args.grid]


def random_points(args) -> List[Dict[str, float]]:
    generator = torch.Generator().manual_seed(args.seed + 100)
    points = []
    for _ in range(args.random_runs):
        u = torch.rand(7, generator=generator, dtype=torch.float64).tolist()
        points.append({"dropout1": 0.02 + 0.83 * u[0], "dropout2": 0.02 + 0.83 * u[1],
                       # log-uniform noise std in [0.01, 0.5]
                       "noise": math.exp(math.log(0.01) + (math.log(0.5) - math.log(0.01)) * u[2]),
                       "bright": 0.5 * u[3], "contrast": 0.5 * u[4],
                       "cutholes": math.floor(u[5] * (HOLES_RANGE[1] + 1)),
                       "cutlength": math.floor(u[6] * (LENGTH_RANGE[1] + 1))})
    return points


HPARAM_HEADER = "dropout1 / 2 / noise / bright / contrast / holes / length"


def format_hparams(values: Dict[str, float]) -> str:
    return (f"{values['dropout1']:.2f} / {values['dropout2']:.2f} / {values['noise']:.3f} / {values['bright']:.2f} / "
            f"{values['contrast']:.2f} / {int(values['cutholes'])} / {int(values['cutlength'])}")


def format_table(results: List[RunResult], args) -> str:
    header = (f"{'model':5}  {'method':22}  {HPARAM_HEADER:56}  {'val loss':>8}  {'val acc':>7}  "
              f"{'test loss':>9}  {'test acc':>8}  {'runs':>4}")
    lines = [header, "-" * len(header)]
    for kind in args.models:
        for method, label in (("stn", "STN (1 run)"), ("grid", "grid search, best"), ("random", "random search, best")):
            runs = [r for r in results if r.model == kind and r.method == method]
            if not runs:
                continue
            best = min(runs, key=lambda r: r.val_loss)
            lines.append(f"{kind.upper():5}  {label:22}  {format_hparams(best.hparams):56}  {best.val_loss:8.4f}  "
                         f"{best.val_acc:7.2%}  {best.test_loss:9.4f}  {best.test_acc:8.2%}  {len(runs):4d}")
    return "\n".join(lines)


def plot_schedules(results: List[RunResult], args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stn_runs = [r for r in results if r.method == "stn"]
    fig, axes = plt.subplots(3, len(stn_runs), figsize=(5.5 * len(stn_runs), 9.5), squeeze=False, sharex=True)
    for column, run in enumerate(stn_runs):
        steps = [s["step"] for s in run.schedule]
        top, middle, bottom = axes[0][column], axes[1][column], axes[2][column]
        for name, colour in (("dropout1", "tab:blue"), ("dropout2", "tab:orange")):
            top.plot(steps, [s[name] for s in run.schedule], color=colour, label=f"STN {name}")
        grid = [r for r in results if r.model == run.model and r.method == "grid"]
        if grid:
            best_grid = min(grid, key=lambda r: r.val_loss)
            top.axhline(best_grid.hparams["dropout1"], color="grey", linestyle="--",
                        label=f"best grid dropout ({best_grid.hparams['dropout1']:.2f})")
        top.axvline(args.warmup_steps, color="black", linewidth=0.8, linestyle=":", label="end of warm-up")
        top.set_ylabel("dropout rate")
        top.set_title(f"{run.model.upper()}: hyperparameter schedules found by STN")
        top.legend(fontsize=8)
        for name, colour, label in (("noise", "tab:green", "input noise std"), ("bright", "tab:red", "brightness"),
                                    ("contrast", "tab:purple", "contrast")):
            middle.plot(steps, [s[name] for s in run.schedule], color=colour, label=f"STN {label}")
        middle.axvline(args.warmup_steps, color="black", linewidth=0.8, linestyle=":")
        middle.set_ylabel("strength (pixels in [0, 1])")
        middle.legend(fontsize=8)
        for name, colour, label in (("cutholes", "tab:brown", "cutout holes"), ("cutlength", "tab:cyan",
                                                                               "cutout length")):
            bottom.step(steps, [s[name] for s in run.schedule], where="post", color=colour, label=f"STN {label}")
        bottom.axvline(args.warmup_steps, color="black", linewidth=0.8, linestyle=":")
        bottom.set_ylabel("cutout (discrete, floored)")
        bottom.set_xlabel("training step")
        bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help does not already say its default and there is one to say."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and search runs (< 1 min)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                        help="output directory")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split, the initial weights, the perturbations and the search points")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--steps", type=int, default=None, help="weight updates per run (default 1000, quick 150)")
    parser.add_argument("--grid", default=None,
                        help="comma-separated grid of dropout rates (default 0.05,0.25,0.45,0.65; quick 0.1,0.5)")
    parser.add_argument("--random-runs", type=int, default=None, help="random-search runs (default 3, quick 1)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="examples per step, over all ranks under torchrun")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the weights")
    parser.add_argument("--hparam-lr", type=float, default=0.03, help="Adam learning rate of λ and σ")
    parser.add_argument("--entropy-weight", type=float, default=1e-3, help="τ")
    parser.add_argument("--perturb-scale", type=float, default=0.5, help="initial σ")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="share of the steps before tuning starts")
    parser.add_argument("--compile", action="store_true",
                        help="run STN's steps through torch.compile (STNTrainer(compile=True))")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel runs (processes; results do not depend on it)")
    parser.add_argument("--checkpoint", default=None, metavar="DIR",
                        help="save every run to DIR every --checkpoint-every weight updates, and its result when done")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="weight updates between checkpoints")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs saved in --checkpoint DIR (after a kill): finished runs are read "
                             "back, the others go on from their last checkpoint, to the same results")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if m not in MODELS:
            parser.error(f"--models: expected names from {sorted(MODELS)}, got {m!r}")
    args.steps = args.steps or (150 if args.quick else 1000)
    args.grid = [float(p) for p in (args.grid or ("0.1,0.5" if args.quick else "0.05,0.25,0.45,0.65")).split(",")]
    for p in args.grid:
        if not DROPOUT_RANGE[0] < p < DROPOUT_RANGE[1]:
            parser.error(f"--grid: expected rates inside {DROPOUT_RANGE}, got {p}")
    args.random_runs = args.random_runs if args.random_runs is not None else (1 if args.quick else 3)
    if args.workers < 1:
        parser.error(f"--workers: expected an int >= 1, got {args.workers}")
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every: expected an int >= 1, got {args.checkpoint_every}")
    if args.resume and not args.checkpoint:
        parser.error("--resume: continues the runs saved in --checkpoint DIR; give --checkpoint DIR")
    if args.batch_size < int(os.environ.get("WORLD_SIZE", "1")):
        parser.error(f"--batch-size: expected at least one example per rank, got {args.batch_size}")
    args.eval_every = max(args.steps // 30, 2)
    args.warmup_steps = int(args.warmup_fraction * args.steps)
    return args


_WORKER_STATE: dict = {}


def _say(line: str) -> None:
    if stn.distributed_rank()[0] != 0:
        return  # under torchrun every rank computes the same; rank 0 speaks for all
    # One write per line, so that lines from two worker processes never interleave mid-line.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run_planned(item):
    number, kind, method, values = item
    torch.set_num_threads(1)
    total, args = _WORKER_STATE["total"], _WORKER_STATE["args"]
    stem = os.path.join(args.checkpoint, f"run-{number:02d}-{kind}-{method}") if args.checkpoint else None
    if stem is not None and args.resume and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            _say(f"[{number:2d}/{total}] {kind.upper()} {method:6}  finished before: {stem}.json")
            return number, RunResult(**json.load(f))
    _say(f"[{number:2d}/{total}] {kind.upper()} {method:6}  start {format_hparams(values)}")
    log = lambda line: _say(f"[{number:2d}/{total}]   {line.strip()}")  # noqa: E731
    result = train_run(kind, method, values, _WORKER_STATE["data"], args, log=log,
                       checkpoint=None if stem is None else stem + ".pt")
    if stem is not None and stn.distributed_rank()[0] == 0:
        _write_atomically(stem + ".json", json.dumps(result.__dict__))
        if os.path.exists(stem + ".pt"):
            os.remove(stem + ".pt")     # the result stands for the run now
    return number, result


def _write_atomically(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# What makes the runs what they are: a resumed experiment must be the same experiment.
PLAN_KEYS = ("seed", "models", "steps", "grid", "random_runs", "batch_size", "lr", "hparam_lr", "entropy_weight",
             "perturb_scale", "warmup_fraction", "compile")


def prepare_checkpoints(args, world: int) -> None:
    """--checkpoint DIR: records the plan (PLAN_KEYS and the world size) in DIR/plan.json; with --resume, refuses
    a DIR saved by other settings; without, refuses a DIR that already holds an experiment."""
    plan = {**{key: getattr(args, key) for key in PLAN_KEYS}, "world_size": world}
    path = os.path.join(args.checkpoint, "plan.json")
    saved = None
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    if world > 1:
        torch.distributed.barrier()     # every rank has looked before rank 0 writes
    if saved is not None:
        if not args.resume:
            raise SystemExit(f"--checkpoint: {args.checkpoint} holds the checkpoints of an experiment: continue it "
                             f"with --resume, or give another DIR")
        differ = {key: (saved.get(key), value) for key, value in plan.items() if saved.get(key) != value}
        if differ:
            shown = ", ".join(f"{key}: {old!r} saved, {new!r} now" for key, (old, new) in differ.items())
            raise SystemExit(f"--resume: {args.checkpoint} was saved with other settings ({shown})")
    elif stn.distributed_rank()[0] == 0:
        os.makedirs(args.checkpoint, exist_ok=True)
        _write_atomically(path, json.dumps(plan))
    if world > 1:
        torch.distributed.barrier()


def _print_done(number, total, result, started):
    _say(f"[{number:2d}/{total}] {result.model.upper()} {result.method:6}  done: best val loss {result.val_loss:.4f} "
         f"(acc {result.val_acc:.2%}) at step {result.best_step}, hparams {format_hparams(result.hparams)}  "
         f"[{result.seconds:.1f} s; {time.perf_counter() - started:.0f} s elapsed]"
         + (f"  STN cycle {result.cycle_ms:.2f} ms (median)" if result.method == "stn" else ""))


def init_distributed() -> int:
    """Joins the process group torchrun describes in the environment (WORLD_SIZE > 1); returns the world size.
    The example's tensors live on the CPU, hence gloo; a CUDA model would take nccl and
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return world


def main(argv=None) -> List[RunResult]:
    args = parse_args(argv)
    world = init_distributed()
    try:
        return _main(args, world)
    finally:
        if world > 1:
            # Free the DDP wrappers (their reducers hold the group and gloo's pending work) while the
            # interpreter is alive, then leave together: a group torn down at interpreter exit, or while
            # another rank still works, can abort in gloo's threads ("terminate called without an active
            # exception").
            gc.collect()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _main(args, world: int) -> List[RunResult]:
    rank = stn.distributed_rank()[0]
    if world > 1:
        args.workers = 1  # the ranks are the parallelism: every rank takes part in every run, in order
    # Tiny matrices: one thread is faster than two here, and a fixed thread count keeps every
    # reduction in the same order, so the run is bit-for-bit repeatable.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = load_digits_splits(args.seed)
    if args.checkpoint:
        prepare_checkpoints(args, world)
    parallel = f" ({world} ranks × {args.batch_size // world}, DDP)" if world > 1 else ""
    _say(f"digits: {len(data[0].y)} train / {len(data[1].y)} validation / {len(data[2].y)} test images; "
         f"{args.steps} weight updates per run, batch {args.batch_size // world * world}{parallel}; STN: T_train=2, "
         f"T_valid=1, warm-up {args.warmup_steps} steps, τ={args.entropy_weight}")
    # The STN runs first: they are the longest, so two workers finish at about the same time.
    plan = [(kind, "stn", dict(START)) for kind in args.models]
    for kind in args.models:
        plan += [(kind, "grid", point) for point in grid_points(args)]
        plan += [(kind, "random", point) for point in random_points(args)]
    plan = [(number, *run) for number, run in enumerate(plan, 1)]
    started = time.perf_counter()
    results = {}
    _WORKER_STATE.update(data=data, args=args, total=len(plan))
    if args.workers > 1:
        # Independent runs, each seeded and single-threaded: the results do not depend on which worker
        # runs what. fork shares the loaded data and needs no re-import.
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            for number, result in pool.imap_unordered(_run_planned, plan, chunksize=1):
                results[number] = result
                _print_done(number, len(plan), result, started)
    else:
        for item in plan:
            number, result = _run_planned(item)
            results[number] = result
            _print_done(number, len(plan), result, started)
    results = [results[number] for number in sorted(results)]

    if world > 1:
        _say(f"checked: weights, λ and σ identical on all {world} ranks at the end of every run")
    if rank != 0:
        return results
    os.makedirs(args.out, exist_ok=True)
    table = format_table(results, args)
    print("\n" + table)
    for kind in args.models:
        stn_loss = min(r.val_loss for r in results if r.model == kind and r.method == "stn")
        grid_loss = min((r.val_loss for r in results if r.model == kind and r.method == "grid"), default=math.inf)
        verdict = "at least as low as" if stn_loss <= grid_loss else "HIGHER than"
        print(f"{kind.upper()}: STN validation loss {stn_loss:.4f} is {verdict} the best fixed-dropout grid point "
              f"({grid_loss:.4f}) with the same number of weight updates per run.")
    plot_path = os.path.join(args.out, "stn_digits_schedules.png")
    plot_schedules(results, args, plot_path)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "table": table,
                   "runs": [r.__dict__ for r in results]}, f, indent=1)
    print(f"wrote {plot_path} and results.json ({time.perf_counter() - started:.0f} s)")
    return results


if __name__ == "__main__":
    main()
