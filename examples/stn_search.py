"""What the real-data examples (``stn_ptb.py``, ``stn_images.py``) share: the search space, STN against grid search,
random search and Bayesian optimisation (Optuna's TPE) at equal compute, the parallel runner, the table, the plots,
the schedule experiment and the sensitivity table.

Equal compute. Every method gets the same budget of *updates*: a weight update (one optimiser step of the model's
weights on one training batch) or, for STN, a hyperparameter step (one step of λ and σ on one validation batch),
which costs a forward and a backward like a weight update and so is counted in its budget. The baselines spend the
budget on K trials of budget / K weight updates each, K the size of the grid, for all three; STN spends it on one run
whose T_train : T_valid alternation splits it between weight updates and hyperparameter steps. Wall time is accounted
the same way for every method: the sum of its runs' wall times (each run single-threaded, from its first update to
its last validation evaluation, every periodic evaluation included; TPE's own sampling time added), as if the runs
went one after another on one core. Every run is evaluated on the validation set every ``eval_every`` updates (the
same cadence for all) and scored at its best evaluation; the test set is read once per run, at that checkpoint, for
the table only (not counted in the wall time).

A task (the example) gives the search space (:class:`Param`), and ``task.runner(spec)`` returns an object with:
``trainer``/``next_train``/``next_valid`` (STN runs: the :class:`stn_kernels.stn.STNTrainer` and its batch sources),
``fixed_step(values)`` (one weight update of the plain model at fixed hyperparameter values), ``evaluate(split)`` ->
(loss, accuracy or None), ``state()`` / ``load(state)`` (a copy of what evaluation depends on) and ``values()``
(STN: the current λ by name).
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

METHODS = ("stn", "grid", "random", "tpe")
METHOD_LABELS = {"stn": "STN", "grid": "grid", "random": "random", "tpe": "TPE (Bayesian optimisation)"}
COLOURS = {"stn": "tab:red", "grid": "tab:grey", "random": "tab:blue", "tpe": "tab:green"}


# --------------------------------------------------------------------------- the search space


@dataclass(frozen=True)
class Param:
    """One hyperparameter, the same range for every method.

    ``low``, ``high``: the range (integers for a discrete one); STN's transform maps onto it (a stretched sigmoid;
    for a discrete one onto (low, high + 1), floored), the baselines sample from it. ``stn_high``: STN's upper end
    where it differs (``math.inf``: softplus, the published transform of α and β, whose baselines need a finite box).
    ``init``: STN's starting value (also the value of a parameter whose grid axis has no points). ``per_example``:
    STN perturbs it per example (False: one draw per batch, the published ``minibatch=False``). ``group``: the grid
    axis it follows. ``panel``: the schedule plot's panel."""

    name: str
    low: float
    high: float
    init: float
    discrete: bool = False
    per_example: bool = True
    group: str = ""
    panel: str = ""
    stn_high: Optional[float] = None


def stn_hyperparameters(space: Sequence[Param], scale: float):
    """The HyperparameterSet STN tunes over ``space`` (initial σ ``scale`` for every one)."""
    from stn_kernels import stn

    return stn.HyperparameterSet([
        stn.Hyperparameter(p.name, p.init, p.low, p.high if p.stn_high is None else p.stn_high, discrete=p.discrete,
                           per_example=p.per_example, scale=scale) for p in space])


def value_at(p: Param, fraction: float) -> float:
    """The value ``fraction`` of the way through p's range (a discrete one: the integer whose cell holds it)."""
    if p.discrete:
        return float(min(p.high, math.floor(p.low + fraction * (p.high + 1 - p.low))))
    return p.low + fraction * (p.high - p.low)


def grid_fractions(points: int) -> List[float]:
    """``points`` evenly spaced cell midpoints of [0, 1]: (i + ½) / points."""
    return [(i + 0.5) / points for i in range(points)]


def grid_size(grid: Dict[str, int]) -> int:
    return math.prod(n for n in grid.values() if n > 0)


def grid_values(space: Sequence[Param], grid: Dict[str, int], fractions: Dict[str, float]) -> Dict[str, float]:
    """A grid point's values: each parameter at its axis' fraction, or at ``init`` if its axis has no points."""
    return {p.name: value_at(p, fractions[p.group]) if grid.get(p.group, 0) > 0 else float(p.init) for p in space}


def suggest_values(trial, space: Sequence[Param]) -> Dict[str, float]:
    """One point of the whole range from an Optuna trial (random search and TPE)."""
    return {p.name: float(trial.suggest_int(p.name, int(p.low), int(p.high))) if p.discrete
            else trial.suggest_float(p.name, p.low, p.high) for p in space}


def format_values(values: Dict[str, float], space: Sequence[Param]) -> str:
    parts = []
    for p in space:
        v = values[p.name]
        parts.append(f"{p.name}={int(v)}" if p.discrete else f"{p.name}={v:.3g}")
    return " ".join(parts)


# --------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    """One training run: ``method`` "stn" (``stn`` holds its settings) or a run of the plain model at fixed
    ``values`` (or replaying ``schedule``: [(training step, values)], each from its step on)."""

    method: str
    index: int
    updates: int
    values: Optional[Dict[str, float]] = None
    schedule: Optional[List[Tuple[int, Dict[str, float]]]] = None
    stn: Optional[dict] = None
    label: str = ""


@dataclass
class RunRecord:
    method: str
    index: int
    label: str
    hparams: Dict[str, float]   # fixed values; STN: λ at its best checkpoint
    val_loss: float
    val_acc: Optional[float]
    test_loss: float
    test_acc: Optional[float]
    best_update: int
    weight_updates: int
    hyper_updates: int
    seconds: float              # training and validation evaluations (what the wall-time accounting counts)
    test_seconds: float
    curve: List[Tuple[int, float, float]] = field(default_factory=list)   # (updates, seconds, val loss)
    schedule: List[dict] = field(default_factory=list)    # STN: λ (and σ) after every cycle, by training step
    stn: Optional[dict] = None
    load: float = math.nan      # the 1-minute load average when the run ended


def train_run(runner, spec: RunSpec, eval_every: int, log: Callable[[str], None]) -> RunRecord:
    """Runs ``spec`` on ``runner`` to its budget of updates, evaluating every ``eval_every`` updates."""
    start = time.perf_counter()
    done, weight_updates, hyper_updates = 0, 0, 0
    best = {"val_loss": math.inf, "val_acc": None, "update": 0, "state": None, "hparams": None}
    curve, schedule = [], []
    next_eval = eval_every
    trainer = getattr(runner, "trainer", None) if spec.method == "stn" else None

    def evaluate_now():
        val_loss, val_acc = runner.evaluate("valid")
        curve.append((done, time.perf_counter() - start, val_loss))
        if val_loss < best["val_loss"] or best["state"] is None:
            values = dict(runner.values()) if trainer is not None else dict(current)
            best.update(val_loss=val_loss, val_acc=val_acc, update=done, state=runner.state(), hparams=values)
        return val_loss

    if trainer is not None:
        schedule.append({"update": 0, "step": 0, **runner.values(), **_scales(trainer)})
        while done < spec.updates:
            for _ in range(trainer.train_steps):
                if done < spec.updates:
                    trainer.train_step(*runner.next_train())
                    done, weight_updates = done + 1, weight_updates + 1
            if not trainer.in_warmup:
                for _ in range(trainer.valid_steps):
                    if done < spec.updates:
                        trainer.valid_step(*runner.next_valid())
                        done, hyper_updates = done + 1, hyper_updates + 1
                schedule.append({"update": done, "step": trainer.train_steps_done, **runner.values(),
                                 **_scales(trainer)})
            if done >= next_eval or done >= spec.updates:
                next_eval += eval_every
                val_loss = evaluate_now()
                if len(curve) % 4 == 0 or done >= spec.updates:
                    log(f"update {done}/{spec.updates}  val loss {val_loss:.4f}  {format_plain(runner.values())}")
    else:
        steps = sorted(spec.schedule or [], key=lambda item: item[0])
        current = dict(spec.values or steps[0][1])
        position = 0
        while done < spec.updates:
            while position < len(steps) and steps[position][0] <= done:
                current = dict(steps[position][1])
                position += 1
            runner.fixed_step(current)
            done, weight_updates = done + 1, weight_updates + 1
            if done >= next_eval or done >= spec.updates:
                next_eval += eval_every
                evaluate_now()
    seconds = time.perf_counter() - start
    runner.load(best["state"])
    test_start = time.perf_counter()
    test_loss, test_acc = runner.evaluate("test")
    return RunRecord(spec.method, spec.index, spec.label or spec.method, best["hparams"], best["val_loss"],
                     best["val_acc"], test_loss, test_acc, best["update"], weight_updates, hyper_updates, seconds,
                     time.perf_counter() - test_start, curve, schedule, spec.stn, os.getloadavg()[0])


def _scales(trainer) -> Dict[str, float]:
    return {f"{name}_scale": value for name, value in trainer.hparams.scales().items()}


def format_plain(values: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3g}" for k, v in values.items())


class Runner:
    """What the two examples' runs share: the STN trainer built from a run's settings, and the best checkpoint's
    copy. A subclass sets ``model`` and ``optimizer`` (the weights'), then calls :meth:`make_trainer` for STN runs,
    and gives ``next_train``, ``next_valid``, ``fixed_step`` and ``evaluate``."""

    trainer = None

    def make_trainer(self, task, spec, model_fn, criterion, seed: int, **options) -> None:
        """``self.hp`` and ``self.trainer``: STN over the task's space with ``spec.stn``'s settings (Adam on λ and σ;
        ``options``: the STNTrainer arguments of the example, e.g. ``batch_dim``)."""
        from stn_kernels import stn

        s = spec.stn
        self.hp = stn_hyperparameters(task.space, s["perturb_scale"])
        self.trainer = stn.STNTrainer(
            model_fn, criterion, self.hp, self.optimizer,
            hparam_optimizer=torch.optim.Adam([self.hp.unconstrained], lr=s["hparam_lr"]),
            scale_optimizer=torch.optim.Adam([self.hp.raw_scale], lr=s["hparam_lr"]),
            train_steps=s["train_steps"], valid_steps=s["valid_steps"], warmup_steps=s["warmup"],
            entropy_weight=s["entropy_weight"], tune_scales=s["tune_scales"],
            generator=torch.Generator().manual_seed(seed), takes_sample=True, module=self.model, **options)

    def values(self) -> Dict[str, float]:
        """STN's current λ by name (constrained values)."""
        return self.hp.values()

    def state(self) -> list:
        """A copy of what evaluation depends on (the model; STN's λ and σ): a run's best checkpoint."""
        return [copy.deepcopy(m.state_dict()) for m in [self.model] + ([self.hp] if self.trainer is not None else [])]

    def load(self, state: list) -> None:
        self.model.load_state_dict(state[0])
        if self.trainer is not None:
            self.hp.load_state_dict(state[1])


# --------------------------------------------------------------------------- running many runs

_WORKER: dict = {}


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")   # one write per line: lines of two workers never interleave mid-line
    sys.stdout.flush()


def _run_item(item):
    """One item of work in a worker process: ("run", spec) or ("tpe", trials, updates per trial)."""
    torch.set_num_threads(1)
    task, args = _WORKER["task"], _WORKER["args"]
    kind = item[0]
    if kind == "run":
        spec = item[1]
        tag = f"[{spec.label or spec.method} {spec.index}]"
        _say(f"{tag} start ({spec.updates} updates) {format_values(spec.values, task.space) if spec.values else ''}")
        record = train_run(task.runner(spec), spec, args.eval_every, lambda line: _say(f"{tag}   {line}"))
        _say(f"{tag} done: best val loss {record.val_loss:.4f} at update {record.best_update}, test loss "
             f"{record.test_loss:.4f} [{record.seconds:.0f} s, load {record.load:.1f}]")
        return [record]
    return _run_tpe(task, args, item[1], item[2])


def _run_tpe(task, args, trials: int, updates: int) -> List[RunRecord]:
    """Bayesian optimisation: Optuna's TPE sampler, one trial after the other (each is told its result)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=args.seed + 3, n_startup_trials=args.tpe_startup)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    records = []
    for index in range(trials):
        sampling = time.perf_counter()
        trial = study.ask()
        values = suggest_values(trial, task.space)
        sampling = time.perf_counter() - sampling
        spec = RunSpec("tpe", index, updates, values=values)
        record = _run_item(("run", spec))[0]
        tell = time.perf_counter()
        study.tell(trial, record.val_loss)
        record.seconds += sampling + time.perf_counter() - tell   # the sampler's time is TPE's
        records.append(record)
    return records


class LoadMonitor:
    """The machine's 1-minute load average, sampled every ``period`` seconds while the runs go (a thread)."""

    def __init__(self, period: float = 30.0) -> None:
        self.samples: List[float] = [os.getloadavg()[0]]
        self.period, self._stop = period, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> "LoadMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"samples": len(self.samples), "min": min(self.samples), "mean": sum(self.samples) / len(self.samples),
                "max": max(self.samples)}


def execute(task, args, items: list) -> List[RunRecord]:
    """Runs the items on ``args.workers`` processes (each single-threaded; fork shares the loaded data). The results
    do not depend on which worker ran what: every run seeds its own generators. The load average during the runs
    goes to ``args.load``."""
    _WORKER.update(task=task, args=args)
    records: List[RunRecord] = []
    if args.workers > 1 and len(items) > 1:
        # The pool forks its workers before the monitor's thread starts (a fork copies only the calling thread).
        with multiprocessing.get_context("fork").Pool(args.workers) as pool, LoadMonitor() as monitor:
            for result in pool.imap_unordered(_run_item, items, chunksize=1):
                records += result
    else:
        with LoadMonitor() as monitor:
            for item in items:
                records += _run_item(item)
    args.load = monitor.summary()
    _say(f"load average (1 min) during the runs: min {args.load['min']:.1f}, mean {args.load['mean']:.1f}, max "
         f"{args.load['max']:.1f} ({args.load['samples']} samples)")
    return sorted(records, key=lambda r: (METHODS.index(r.method) if r.method in METHODS else 9, r.index))


def stn_settings(args, **override) -> dict:
    settings = {"train_steps": args.train_steps, "valid_steps": args.valid_steps, "warmup": args.warmup,
                "entropy_weight": args.entropy_weight, "perturb_scale": args.perturb_scale,
                "tune_scales": args.tune_scales, "hparam_lr": args.hparam_lr}
    settings.update(override)
    return settings


def plan(task, args) -> list:
    """The comparison's items: STN's run, TPE's sequential trials, the grid's and random search's trials (points
    drawn by Optuna's GridSampler and RandomSampler over the same ranges). Longest first."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = grid_size(args.grid)
    per_trial = args.budget // trials
    items = []
    if "stn" in args.methods:
        items.append(("run", RunSpec("stn", 0, args.budget, stn=stn_settings(args))))
    if "tpe" in args.methods:
        items.append(("tpe", trials, per_trial))
    if "grid" in args.methods:
        axes = {group: grid_fractions(n) for group, n in args.grid.items() if n > 0}
        study = optuna.create_study(sampler=optuna.samplers.GridSampler(axes, seed=args.seed + 1))
        for index in range(trials):
            trial = study.ask()
            fractions = {group: trial.suggest_float(group, 0.0, 1.0) for group in axes}
            items.append(("run", RunSpec("grid", index, per_trial, values=grid_values(task.space, args.grid,
                                                                                       fractions))))
    if "random" in args.methods:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=args.seed + 2))
        for index in range(trials):
            items.append(("run", RunSpec("random", index, per_trial, values=suggest_values(study.ask(), task.space))))
    return items


# --------------------------------------------------------------------------- outputs


def machine() -> dict:
    """What ran it: CPU model and count, threads per run, versions, the load average when asked."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "load_average": os.getloadavg()}


def best_of(records: List[RunRecord], method: str) -> Optional[RunRecord]:
    runs = [r for r in records if r.method == method]
    return min(runs, key=lambda r: r.val_loss) if runs else None


def summary_rows(records: List[RunRecord], task) -> List[dict]:
    """One row per method: its best run (by validation loss) and the method's totals."""
    rows = []
    for method in METHODS:
        runs = [r for r in records if r.method == method]
        if not runs:
            continue
        best = best_of(records, method)
        rows.append({"method": METHOD_LABELS[method], "key": method, "val": task.metric(best.val_loss),
                     "test": task.metric(best.test_loss), "val_acc": best.val_acc, "test_acc": best.test_acc,
                     "hparams": best.hparams, "runs": len(runs), "weight_updates": sum(r.weight_updates for r in runs),
                     "hyper_updates": sum(r.hyper_updates for r in runs),
                     "seconds": sum(r.seconds for r in runs)})
    return rows


def format_table(rows: List[dict], task, markdown: bool = False) -> str:
    """The comparison table (plain text, or markdown with the hyperparameters found in a column)."""
    name = task.metric_name
    accuracy = any(r["val_acc"] is not None for r in rows)
    head = ["method", f"best val {name}", f"test {name}"] + (["val acc", "test acc"] if accuracy else []) + \
        ["runs", "updates (weight + λ)", "wall time"]
    body = []
    for r in rows:
        cells = [r["method"], f"{r['val']:.{task.digits}f}", f"{r['test']:.{task.digits}f}"]
        if accuracy:
            cells += [f"{r['val_acc']:.2%}", f"{r['test_acc']:.2%}"]
        cells += [str(r["runs"]), f"{r['weight_updates']} + {r['hyper_updates']}", f"{r['seconds'] / 60:.1f} min"]
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(head + ["hyperparameters found"]) + " |", "|" + " --- |" * (len(head) + 1)]
        for cells, r in zip(body, rows):
            lines.append("| " + " | ".join(cells + [format_values(r["hparams"], task.space)]) + " |")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in body]
    lines.append("hyperparameters found (STN: λ at its best checkpoint; the others: their best run's values):")
    lines += [f"  {r['method']:28} {format_values(r['hparams'], task.space)}" for r in rows]
    return "\n".join(lines)


def best_so_far(records: List[RunRecord], method: str) -> Tuple[list, list, list]:
    """(cumulative updates, cumulative seconds, best validation loss so far) over a method's runs in order."""
    updates, seconds, best = [], [], []
    spent_updates, spent_seconds, lowest = 0, 0.0, math.inf
    for r in sorted((r for r in records if r.method == method), key=lambda r: r.index):
        for u, s, v in r.curve:
            lowest = min(lowest, v)
            updates.append(spent_updates + u)
            seconds.append(spent_seconds + s)
            best.append(lowest)
        spent_updates += r.weight_updates + r.hyper_updates
        spent_seconds += r.seconds
    return updates, seconds, best


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_best_so_far(records: List[RunRecord], task, path: str, title: str) -> None:
    """Best validation metric so far against cumulative wall time and against cumulative updates."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in METHODS:
        updates, seconds, best = best_so_far(records, method)
        if not best:
            continue
        values = [task.metric(v) for v in best]
        for ax, x in ((axes[0], [s / 60 for s in seconds]), (axes[1], updates)):
            ax.step(x, values, where="post", color=COLOURS[method], label=METHOD_LABELS[method])
            ax.plot(x, values, "o", color=COLOURS[method], markersize=2.5)
    axes[0].set_xlabel("cumulative wall time (minutes, runs one after another on one core)")
    axes[1].set_xlabel("cumulative updates (weight updates + STN's hyperparameter steps)")
    for ax in axes:
        ax.set_ylabel(f"best validation {task.metric_name} so far")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(records: List[RunRecord], task, path: str, title: str) -> None:
    """The hyperparameters STN found over its training steps, one panel per kind; dashed: the best baseline run's
    fixed values."""
    plt = _pyplot()
    run = best_of(records, "stn")
    baselines = [r for r in records if r.method in ("grid", "random", "tpe")]
    reference = min(baselines, key=lambda r: r.val_loss) if baselines else None
    panels = list(dict.fromkeys(p.panel for p in task.space))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    steps = [s["step"] for s in run.schedule]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes[:, 0], panels):
        for i, p in enumerate(q for q in task.space if q.panel == panel):
            colour = colours[i % len(colours)]
            draw = ax.step if p.discrete else ax.plot
            kwargs = {"where": "post"} if p.discrete else {}
            draw(steps, [s[p.name] for s in run.schedule], color=colour, label=p.name, **kwargs)
            if reference is not None:
                ax.axhline(reference.hparams[p.name], color=colour, linestyle="--", linewidth=0.8)
        if run.stn and run.stn.get("warmup"):
            ax.axvline(run.stn["warmup"], color="black", linestyle=":", linewidth=0.8)
        ax.set_ylabel(panel)
        ax.legend(fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("training step (weight updates of the STN run); dotted: end of the warm-up")
    label = f"; dashed: the best baseline run ({METHOD_LABELS[reference.method]} {reference.index})" \
        if reference else ""
    fig.suptitle(title + label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_text(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text + "\n")
    os.replace(path + ".tmp", path)


def write_json(path: str, payload: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1, default=float)
    os.replace(path + ".tmp", path)


def compare(task, args) -> dict:
    """The comparison: every method at the same budget; the table, the two plots, results.json under args.out."""
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    items = plan(task, args)
    trials = grid_size(args.grid)
    _say(f"{task.describe()}\nbudget: {args.budget} updates per method; grid, random and TPE: {trials} trials of "
         f"{args.budget // trials} weight updates; STN: one run, T_train:T_valid = {args.train_steps}:"
         f"{args.valid_steps}, warm-up {args.warmup} updates, τ={args.entropy_weight}, σ₀={args.perturb_scale}"
         f"{'' if args.tune_scales else ' (fixed)'}; validation every {args.eval_every} updates; {args.workers} "
         f"workers")
    records = execute(task, args, items)
    rows = summary_rows(records, task)
    table = format_table(rows, task)
    _say("\n" + table)
    plot_best_so_far(records, task, os.path.join(args.out, "best_so_far.png"), task.describe())
    if any(r.method == "stn" for r in records):
        plot_schedules(records, task, os.path.join(args.out, "stn_schedules.png"), "Hyperparameter schedules STN found")
    payload = {"task": task.config(), "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
               "machine": machine(), "load_during_runs": getattr(args, "load", None),
               "elapsed_seconds": time.perf_counter() - started, "table": table,
               "markdown": format_table(rows, task, markdown=True), "rows": rows, "runs": [asdict(r) for r in records]}
    write_json(os.path.join(args.out, "results.json"), payload)
    write_text(os.path.join(args.out, "results.md"), payload["markdown"])
    _say(f"wrote best_so_far.png, stn_schedules.png and results.json to {args.out} "
         f"({time.perf_counter() - started:.0f} s)")
    return payload


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


# --------------------------------------------------------------------------- the schedule experiment


def load_comparison(path: str, task) -> dict:
    """A comparison's results.json (or the folder holding it), checked to be this task's configuration."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        saved = json.load(f)
    if saved["task"] != task.config():
        differ = {k: (saved["task"].get(k), v) for k, v in task.config().items() if saved["task"].get(k) != v}
        raise SystemExit(f"--load-schedule: {path} was made with another configuration: "
                         + ", ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differ.items()))
    return saved


def schedule_experiment(task, args) -> dict:
    """The plain model (no hyper path) trained for as many weight updates as STN's run took, with STN's λ schedule
    replayed, with STN's final values fixed, with its starting values fixed and with the best baseline run's values
    fixed; the table beside STN's own row."""
    saved = load_comparison(args.load_schedule, task)
    runs = [RunRecord(**r) for r in saved["runs"]]
    stn_run = best_of(runs, "stn")
    if stn_run is None:
        raise SystemExit(f"--load-schedule: {args.load_schedule} holds no STN run")
    names = [p.name for p in task.space]
    steps = [(s["step"], {n: s[n] for n in names}) for s in stn_run.schedule]
    final = steps[-1][1]
    baselines = [r for r in runs if r.method in ("grid", "random", "tpe")]
    length = stn_run.weight_updates
    specs = [RunSpec("schedule", 0, length, schedule=steps, label="plain, STN schedule"),
             RunSpec("schedule", 1, length, values=final, label="plain, STN final values fixed"),
             RunSpec("schedule", 2, length, values=steps[0][1], label="plain, STN start values fixed")]
    if baselines:
        best = min(baselines, key=lambda r: r.val_loss)
        specs.append(RunSpec("schedule", 3, length, values=best.hparams,
                             label=f"plain, best fixed values ({METHOD_LABELS[best.method]} run {best.index})"))
    started = time.perf_counter()
    _say(f"schedule experiment: the plain model for {length} weight updates (STN's run), {len(specs)} runs")
    records = execute(task, args, [("run", s) for s in specs])
    rows = [(f"STN ({stn_run.weight_updates} weight + {stn_run.hyper_updates} λ updates)", stn_run, None)]
    rows += [(r.label, r, r.hparams) for r in sorted(records, key=lambda r: r.index)]
    name = task.metric_name
    lines = [f"| run | val {name} | test {name} | hyperparameters (fixed) |", "| --- | --- | --- | --- |"]
    for label, r, values in rows:
        shown = "λ schedule replayed" if r.method == "schedule" and r.index == 0 else \
            ("tuned during the run" if values is None else format_values(values, task.space))
        lines.append(f"| {label} | {task.metric(r.val_loss):.{task.digits}f} | "
                     f"{task.metric(r.test_loss):.{task.digits}f} | {shown} |")
    table = "\n".join(lines)
    _say("\n" + table)
    payload = {"task": task.config(), "source": os.path.abspath(args.load_schedule), "machine": machine(),
               "load_during_runs": getattr(args, "load", None), "elapsed_seconds": time.perf_counter() - started,
               "table": table,
               "runs": [asdict(r) for r in records]}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "schedule_experiment.json"), payload)
    write_text(os.path.join(args.out, "schedule_experiment.md"), table)
    return payload


# --------------------------------------------------------------------------- sensitivity


SENSITIVITY = (("T_train:T_valid 2:1, τ=1e-3 (default)", {}),
               ("T_train:T_valid 1:1", {"train_steps": 1, "valid_steps": 1}),
               ("T_train:T_valid 5:1", {"train_steps": 5, "valid_steps": 1}),
               ("T_train:T_valid 10:1", {"train_steps": 10, "valid_steps": 1}),
               ("τ=0 (no entropy term)", {"entropy_weight": 0.0}),
               ("τ=1e-2", {"entropy_weight": 1e-2}),
               ("σ fixed at σ₀ (scales not tuned)", {"tune_scales": False}))


def _comparison_run(task, args, spec: RunSpec) -> Optional[RunRecord]:
    """The STN run of the comparison in ``args.out`` when it is ``spec``'s run (the same task, settings and budget:
    deterministic, so running it again would give the same record), relabelled as ``spec``; else None."""
    path = os.path.join(args.out, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    runs = [RunRecord(**r) for r in saved.get("runs", []) if r["method"] == "stn"]
    if saved.get("task") != task.config() or not runs or runs[0].stn != spec.stn \
            or runs[0].weight_updates + runs[0].hyper_updates != spec.updates:
        return None
    runs[0].label, runs[0].index = spec.label + " (the comparison's run)", spec.index
    return runs[0]


def sensitivity(task, args) -> dict:
    """STN's result at the comparison's budget against the alternation T_train:T_valid, the entropy weight τ and σ
    left untuned (each varied alone from the defaults)."""
    specs = [RunSpec("stn", i, args.budget, stn=stn_settings(args, **override), label=label)
             for i, (label, override) in enumerate(SENSITIVITY)]
    reused = _comparison_run(task, args, specs[0])
    if reused is not None:
        specs = specs[1:]
    started = time.perf_counter()
    _say(f"sensitivity: {len(specs)} STN runs of {args.budget} updates"
         + (f" (the default setting's run read from {args.out}/results.json)" if reused is not None else ""))
    records = execute(task, args, [("run", s) for s in specs]) + ([reused] if reused is not None else [])
    name = task.metric_name
    accuracy = records[0].val_acc is not None
    head = f"| setting | val {name} | test {name} |" + (" val acc | test acc |" if accuracy else "") + \
        " updates (weight + λ) | mean σ at the end | hyperparameters at the best checkpoint |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in sorted(records, key=lambda r: r.index):
        scales = [v for k, v in r.schedule[-1].items() if k.endswith("_scale")]
        acc = f" {r.val_acc:.2%} | {r.test_acc:.2%} |" if accuracy else ""
        lines.append(f"| {r.label} | {task.metric(r.val_loss):.{task.digits}f} | "
                     f"{task.metric(r.test_loss):.{task.digits}f} |{acc} {r.weight_updates} + {r.hyper_updates} | "
                     f"{sum(scales) / len(scales):.3f} | {format_values(r.hparams, task.space)} |")
    table = "\n".join(lines)
    _say("\n" + table)
    payload = {"task": task.config(), "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
               "machine": machine(), "load_during_runs": getattr(args, "load", None),
               "elapsed_seconds": time.perf_counter() - started, "table": table, "runs": [asdict(r) for r in records]}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "sensitivity.json"), payload)
    write_text(os.path.join(args.out, "sensitivity.md"), table)
    return payload


# --------------------------------------------------------------------------- the command line


def add_search_args(parser, defaults: dict) -> None:
    """The options both examples share (``defaults``: the example's values for its CPU configuration)."""
    parser.add_argument("--quick", action="store_true", help="a few tiny steps on a slice of the data (tests)")
    parser.add_argument("--paper", action="store_true",
                        help="the published configuration (for a GPU; see the docs page for what it sets)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                      defaults["name"]), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the data order and the samplers")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--budget", type=int, default=None,
                        help="updates per method (weight updates + STN's hyperparameter steps); rounded down to a "
                             "multiple of the number of trials")
    parser.add_argument("--grid", default=None,
                        help="grid points per axis, e.g. " + defaults["grid"] + " (the baselines' trial count is their "
                             "product; an axis with 0 points holds its parameters at STN's start values)")
    parser.add_argument("--tpe-startup", type=int, default=None,
                        help="TPE's random trials before its model is used (default: a third of the trials, at "
                             "least 2)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="updates between validation evaluations (default: a quarter of a baseline trial)")
    parser.add_argument("--train-steps", type=int, default=2, help="STN's T_train (training steps per cycle)")
    parser.add_argument("--valid-steps", type=int, default=1, help="STN's T_valid (hyperparameter steps per cycle)")
    parser.add_argument("--warmup", type=int, default=None, help="STN's warm-up, in weight updates")
    parser.add_argument("--entropy-weight", type=float, default=defaults["entropy_weight"], help="τ")
    parser.add_argument("--perturb-scale", type=float, default=defaults["perturb_scale"], help="STN's initial σ")
    parser.add_argument("--tune-scales", action=__import__("argparse").BooleanOptionalAction,
                        default=defaults["tune_scales"], help="learn σ in the hyperparameter steps")
    parser.add_argument("--hparam-lr", type=float, default=defaults["hparam_lr"], help="Adam learning rate of λ and σ")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel runs (processes, one thread each; the results do not depend on it)")
    parser.add_argument("--load-schedule", default=None, metavar="RESULTS",
                        help="the schedule experiment: a comparison's results.json (or its folder); trains the plain "
                             "model on STN's λ schedule, on its final and start values and on the best fixed values")
    parser.add_argument("--sensitivity", action="store_true",
                        help="STN alone at the budget: T_train:T_valid 1:1, 2:1, 5:1, 10:1; τ 0, 1e-3, 1e-2; σ fixed")


def finish_args(parser, args, defaults: dict) -> None:
    """Fills the defaults that depend on --quick/--paper and checks the shared options."""
    mode = "quick" if args.quick else "paper" if args.paper else "cpu"
    if args.quick and args.paper:
        parser.error("--quick and --paper: choose one")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            parser.error(f"--methods: expected names from {list(METHODS)}, got {m!r}")
    grid = args.grid or defaults["grids"][mode]
    try:
        args.grid = {axis: int(n) for axis, n in (part.split("=") for part in grid.split(","))}
    except ValueError:
        parser.error(f"--grid: expected axis=points pairs such as {defaults['grid']}, got {grid!r}")
    if set(args.grid) != set(defaults["axes"]) or min(args.grid.values()) < 0 or grid_size(args.grid) < 1:
        parser.error(f"--grid: expected points >= 0 for each of the axes {list(defaults['axes'])} (at least one > 0), "
                     f"got {grid!r}")
    trials = grid_size(args.grid)
    budget = args.budget if args.budget is not None else defaults["budgets"][mode]
    if budget < trials:
        parser.error(f"--budget: expected at least one update per trial ({trials} trials), got {budget}")
    args.budget = budget // trials * trials
    per_trial = args.budget // trials
    args.eval_every = args.eval_every or max(1, per_trial // 4)
    args.tpe_startup = args.tpe_startup if args.tpe_startup is not None else max(2, trials // 3)
    if args.warmup is None:   # the published warm-up under --paper; else a share of the budget
        args.warmup = defaults.get("paper_warmup", 0) if mode == "paper" else \
            int(defaults["warmup_fraction"] * args.budget)
    for name in ("train_steps", "eval_every", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.valid_steps < 0 or args.warmup < 0:
        parser.error("--valid-steps, --warmup: expected ints >= 0")
    args.mode = mode


def main(make_task, args, script: str) -> dict:
    """The example's run: its task (its data loaded; missing or wrong data stops it with the loader's message), then
    --load-schedule, --sensitivity or the comparison. One thread per run."""
    import stn_data

    torch.set_num_threads(1)
    try:
        task = make_task(args)
    except (stn_data.DataUnavailable, stn_data.DataCorrupt) as error:
        raise SystemExit(f"{script}: {error}") from None
    if args.load_schedule:
        return schedule_experiment(task, args)
    if args.sensitivity:
        return sensitivity(task, args)
    return compare(task, args)
