"""The state of an :class:`~stn_kernels.stn.STNTrainer` loop: what ``state_dict()`` holds, how a state is
checked against a trainer before anything is changed, and how it is applied.

Everything the next step depends on: the counters (warm-up, cycle), every optimiser the trainer holds, λ and ρ
of the :class:`HyperparameterSet` with its specs (to check against), the settings the trainer was built with
(``compile`` included), and the random streams: the trainer's ``generator``, torch's default CPU generator,
every CUDA generator where CUDA is in use, and this rank's seed. The model's own weights are not the
trainer's: ``model.state_dict()`` (:func:`~stn_kernels.stn.save_checkpoint` saves both).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from .hyperparameters import HyperparameterSet

STATE_VERSION = 1
OPTIMIZER_NAMES = ("weight_optimizer", "hparam_optimizer", "scale_optimizer", "response_optimizer")
# Settings that make the run what it is: a resumed run differing in one would not continue the same run.
SETTING_NAMES = ("train_steps", "valid_steps", "warmup_steps", "entropy_weight", "tune_scales",
                 "constrained_layer_input", "delta_stn", "linearize", "sync_hyperparameters", "takes_sample",
                 "batch_dim", "compile")


# --------------------------------------------------------------------------- layouts (what must match)


def hparams_layout(hparams: HyperparameterSet) -> List[dict]:
    """What identifies each hyperparameter, in column order: name, range, transform, discreteness, whether
    the perturbation is per example. (``init`` and ``scale`` are starting values only: λ and ρ are saved.)"""
    return [{"name": s.name, "low": float(s.low), "high": float(s.high), "transform": s.kind,
             "discrete": s.discrete, "per_example": s.per_example} for s in hparams.specs]


def optimizer_layout(optimizer: torch.optim.Optimizer) -> dict:
    """The optimiser's class and the shapes of the parameters of each of its groups, in order."""
    return {"class": type(optimizer).__name__,
            "groups": [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups]}


def compile_setting(options: Optional[dict]):
    """``compile=`` as it can be saved and compared: None (eager) or the options by name, a callable
    ``backend`` by its qualified name."""
    if options is None:
        return None

    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        name = getattr(value, "__qualname__", None) or type(value).__qualname__
        return f"{getattr(value, '__module__', '') or ''}.{name}"

    return plain(options)


# --------------------------------------------------------------------------- random streams


def torch_generator_states() -> dict:
    """torch's default generators: the CPU one, and every CUDA device's where CUDA is initialised (a run that
    never used CUDA has nothing to save there, and asking would start it)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def random_state(trainer=None) -> dict:
    """This rank's random streams: the trainer's ``generator`` and seed (None without a trainer) and torch's
    default generators."""
    generator = None if trainer is None else trainer.generator
    return {"seed": None if trainer is None else trainer.seed,
            "generator": None if generator is None else generator.get_state(),
            "generator_device": None if generator is None else str(generator.device),
            "torch": torch_generator_states()}


def check_random_state(state, generator: Optional[torch.Generator]) -> List[str]:
    """What keeps ``state`` (from :func:`random_state`) from being restored here."""
    problems = []
    saved = state.get("generator") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("torch"), dict) \
            or not isinstance(state["torch"].get("cpu"), Tensor):
        return ["random: the random state is missing or malformed"]
    if (saved is None) != (generator is None):
        problems.append("generator: the checkpoint's trainer " + ("had no generator=, this one has one"
                        if saved is None else "had a generator=, this one has none"))
    elif generator is not None and state.get("generator_device") != str(generator.device):
        problems.append(f"generator: on {state.get('generator_device')} in the checkpoint, on {generator.device} "
                        f"here")
    cuda = state["torch"].get("cuda")
    if cuda is not None:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) != available:
            problems.append(f"random: the checkpoint holds the CUDA generators of {len(cuda)} device(s), this "
                            f"process sees {available}")
    return problems


def apply_random_state(state: dict, trainer=None) -> None:
    """Restores what :func:`random_state` saved (checked first with :func:`check_random_state`)."""
    torch.set_rng_state(state["torch"]["cpu"])
    if state["torch"].get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["torch"]["cuda"])
    if trainer is not None:
        if trainer.generator is not None:
            trainer.generator.set_state(state["generator"])
        trainer.seed = state.get("seed")


# --------------------------------------------------------------------------- the trainer's state


def optimizers_of(trainer) -> Dict[str, Optional[torch.optim.Optimizer]]:
    return {name: getattr(trainer, name) for name in OPTIMIZER_NAMES}


def settings_of(trainer) -> dict:
    settings = {name: getattr(trainer, name) for name in SETTING_NAMES if name != "compile"}
    settings["compile"] = compile_setting(trainer.compile_options)
    return settings


def trainer_state(trainer) -> dict:
    """What ``STNTrainer.state_dict()`` returns (tensors are references, as in ``nn.Module.state_dict``)."""
    hp = trainer.hparams
    optimizers = optimizers_of(trainer)
    return {
        "version": STATE_VERSION,
        "settings": settings_of(trainer),
        "counters": {"train_steps_done": trainer.train_steps_done, "valid_steps_done": trainer.valid_steps_done},
        "hparams": {"specs": hparams_layout(hp), "dtype": str(hp.unconstrained.dtype),
                    "unconstrained": hp.unconstrained.detach(), "raw_scale": hp.raw_scale.detach()},
        "optimizers": {name: None if opt is None else opt.state_dict() for name, opt in optimizers.items()},
        "optimizer_layouts": {name: None if opt is None else optimizer_layout(opt) for name, opt in optimizers.items()},
        "distributed": {"rank": trainer.rank, "world_size": trainer.world_size},
        "random": random_state(trainer),
    }


def _differences(what: str, saved, current) -> List[str]:
    return [] if saved == current else [f"{what}: {saved!r} in the checkpoint, {current!r} here"]


def check_hparams(saved: dict, hparams: HyperparameterSet) -> List[str]:
    """How the saved hyperparameters (``trainer_state(...)["hparams"]``) differ from ``hparams``."""
    specs, current = saved.get("specs"), hparams_layout(hparams)
    if not isinstance(specs, list):
        return ["hparams: the hyperparameter specs are missing"]
    names, current_names = [s.get("name") for s in specs], [s["name"] for s in current]
    if len(specs) != len(current):
        return [f"hparams: {len(specs)} hyperparameters {tuple(names)} in the checkpoint, {len(current)} "
                f"{tuple(current_names)} here"]
    if names != current_names:
        return [f"hparams: names {tuple(names)} in the checkpoint, {tuple(current_names)} here"]
    problems = []
    for spec, now in zip(specs, current):
        for key in ("low", "high", "transform", "discrete", "per_example"):
            a, b = spec.get(key), now[key]
            if not (a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))):
                problems.append(f"hparams: {key} of {spec['name']!r}: {a!r} in the checkpoint, {b!r} here")
    problems += _differences("hparams: dtype", saved.get("dtype"), str(hparams.unconstrained.dtype))
    for key in ("unconstrained", "raw_scale"):
        value = saved.get(key)
        if not isinstance(value, Tensor) or tuple(value.shape) != (len(current),):
            problems.append(f"hparams: {key} is missing or not of shape ({len(current)},)")
    return problems


def check_optimizer(name: str, saved_state, saved_layout, optimizer, *, with_state: bool = True) -> List[str]:
    """How a saved optimiser (its state_dict and :func:`optimizer_layout`) differs from ``optimizer``;
    ``with_state=False``: its state comes from elsewhere, only the layout is checked."""
    if (saved_layout is None) != (optimizer is None):
        return [f"{name}: {'none' if saved_layout is None else 'one'} in the checkpoint, "
                f"{'none' if optimizer is None else 'one'} here"]
    if optimizer is None:
        return []
    current = optimizer_layout(optimizer)
    if saved_layout.get("class") != current["class"]:
        return [f"{name}: {saved_layout.get('class')} in the checkpoint, {current['class']} here"]
    groups, now = saved_layout.get("groups"), current["groups"]
    if not isinstance(groups, list) or len(groups) != len(now):
        return [f"{name}: {len(groups) if isinstance(groups, list) else '?'} parameter group(s) in the checkpoint, "
                f"{len(now)} here"]
    problems = []
    for i, (a, b) in enumerate(zip(groups, now)):
        if a != b:
            problems.append(f"{name}: parameter shapes of group {i}: {a} in the checkpoint, {b} here")
    if with_state and (not isinstance(saved_state, dict) or "param_groups" not in saved_state
                       or "state" not in saved_state):
        problems.append(f"{name}: its state is missing or malformed")
    return problems


def check_trainer_state(trainer, state, *, shared: tuple = ()) -> List[str]:
    """Every way ``state`` does not fit ``trainer``, as messages (empty: it fits). ``shared``: optimisers whose
    state comes from elsewhere (a sharded checkpoint): their layouts are checked, not their states."""
    if not isinstance(state, dict):
        return [f"not an STNTrainer state: expected a dict, got {type(state).__name__}"]
    if state.get("version") != STATE_VERSION:
        return [f"version: STNTrainer state version {state.get('version')!r}, this stn_kernels reads "
                f"{STATE_VERSION}"]
    missing = [k for k in ("settings", "counters", "hparams", "optimizers", "optimizer_layouts", "random",
                           "distributed")
               if not isinstance(state.get(k), dict)]
    if missing:
        return [f"not an STNTrainer state: {missing} missing"]
    problems = []
    where = state.get("distributed") or {}
    if (where.get("rank"), where.get("world_size")) != (trainer.rank, trainer.world_size):
        problems.append(f"world size: the state of rank {where.get('rank')} of {where.get('world_size')}, this "
                        f"trainer is rank {trainer.rank} of {trainer.world_size} (each rank restores its own "
                        f"random streams)")
    settings, current = state["settings"], settings_of(trainer)
    for name in SETTING_NAMES:
        problems += _differences(name, settings.get(name), current[name])
    counters = state["counters"]
    for name in ("train_steps_done", "valid_steps_done"):
        value = counters.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            problems.append(f"{name}: expected an int >= 0, got {value!r}")
    problems += check_hparams(state["hparams"], trainer.hparams)
    for name, optimizer in optimizers_of(trainer).items():
        problems += check_optimizer(name, state["optimizers"].get(name), state["optimizer_layouts"].get(name),
                                    optimizer, with_state=name not in shared)
    problems += check_random_state(state["random"], trainer.generator)
    return problems


def apply_trainer_state(trainer, state: dict, *, shared: tuple = ()) -> None:
    """Sets the trainer from a state :func:`check_trainer_state` accepted (``shared``: optimisers set
    elsewhere)."""
    hp = trainer.hparams
    with torch.no_grad():
        hp.unconstrained.copy_(state["hparams"]["unconstrained"])
        hp.raw_scale.copy_(state["hparams"]["raw_scale"])
    for name, optimizer in optimizers_of(trainer).items():
        if optimizer is not None and name not in shared:
            optimizer.load_state_dict(state["optimizers"][name])
    trainer.train_steps_done = state["counters"]["train_steps_done"]
    trainer.valid_steps_done = state["counters"]["valid_steps_done"]
    apply_random_state(state["random"], trainer)
