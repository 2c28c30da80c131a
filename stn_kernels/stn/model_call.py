"""How :class:`~stn_kernels.stn.STNTrainer` calls the model, which module it switches between train and eval
mode, and where the examples lie in the inputs.

Two call conventions:

* ``model(inputs)``, inside ``with stn_kernels.hparams(sample.layer_input, batch_dim=..., rates=...)``: a
  converted plain model (:func:`stn_kernels.convert`) whose forward is untouched;
* ``model_fn(inputs, sample)``: a model or function that feeds ``sample.layer_input`` to its layers itself.

:func:`takes_sample` decides from the signature (or the user's ``takes_sample=``), :func:`modules_behind` finds
the modules a function hides from the trainer (for the warning), and :func:`layers_batch_dim` reads the batch
dimension that ``convert`` stated on the converted layers.
"""

from __future__ import annotations

import dis
import functools
import inspect
import types
from typing import Dict, List, Optional, Tuple

from torch import nn

from .hyperparameters import HyperparameterSample, HyperparameterSet

# Packages whose functions never hold the user's model: discovery does not look inside them.
_LIBRARIES = ("torch", "stn_kernels", "functools", "builtins", "numpy", "typing", "inspect")
# How far discovery follows functions that call functions (a lambda calling a helper that uses the model).
_MAX_DEPTH = 3
# Items of a list, tuple or dict looked at (a model kept in a small container).
_MAX_ITEMS = 32


def unwrapped(model):
    """The module under DistributedDataParallel / DataParallel (``.module``) and ``torch.compile(module)``
    (``._orig_mod``): wrappers whose own forward takes any arguments and passes them on."""
    seen = set()
    while isinstance(model, nn.Module) and id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def describe(model_fn) -> str:
    """``Net.forward(x, sample)`` or ``model_fn(x, sample)``: what the messages call the user's model."""
    target = unwrapped(model_fn)
    if isinstance(target, nn.Module):
        name, fn = f"{type(target).__name__}.forward", target.forward
    else:
        name = getattr(target, "__qualname__", None) or type(target).__name__
        fn = target
    try:
        return f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return name


class _Arity:
    """The positional arguments a signature can take."""

    def __init__(self, signature: inspect.Signature) -> None:
        params = list(signature.parameters.values())
        kinds = inspect.Parameter
        self.positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        self.required = [p for p in self.positional if p.default is p.empty]
        self.var_positional = any(p.kind == kinds.VAR_POSITIONAL for p in params)
        self.required_keyword = [p.name for p in params if p.kind == kinds.KEYWORD_ONLY and p.default is p.empty]

    def accepts(self, count: int) -> bool:
        return len(self.required) <= count and (len(self.positional) >= count or self.var_positional)

    def names_sample(self) -> bool:
        """The second positional argument is called ``sample`` or annotated as a HyperparameterSample."""
        if len(self.positional) < 2:
            return False
        second = self.positional[1]
        annotation = second.annotation
        return second.name == "sample" or annotation is HyperparameterSample or (
            isinstance(annotation, str) and annotation.split(".")[-1] == "HyperparameterSample")


def _signature(model_fn) -> Optional[inspect.Signature]:
    target = unwrapped(model_fn)
    try:
        return inspect.signature(target.forward if isinstance(target, nn.Module) else target)
    except (TypeError, ValueError):  # a builtin or C function: nothing to read
        return None


def takes_sample(model_fn, requested: Optional[bool]) -> bool:
    """True: the trainer calls ``model_fn(inputs, sample)``; False: ``model_fn(inputs)`` inside the hparams block.

    ``requested`` (the trainer's ``takes_sample=``) wins when the signature allows it, and raises naming itself
    when it does not. With None: two required positional arguments, or a second one called ``sample`` (or
    annotated HyperparameterSample), mean (inputs, sample); one positional argument (others optional) means
    (inputs); a signature that takes any number (``*args``: DDP's own forward is looked through) or none that
    can be read keeps the (inputs, sample) call the trainer always made."""
    if requested is not None and not isinstance(requested, bool):
        raise TypeError(f"takes_sample: expected None (decided from the signature), True (model_fn(inputs, sample)) "
                        f"or False (model(inputs) inside stn_kernels.hparams), got {type(requested).__name__}")
    signature = _signature(model_fn)
    if signature is None:
        return True if requested is None else requested
    arity = _Arity(signature)
    if arity.required_keyword:
        raise TypeError(f"model_fn: expected a model taking (inputs) or (inputs, sample), got {describe(model_fn)}, "
                        f"which requires the keyword argument(s) {arity.required_keyword}")
    if requested is True and not arity.accepts(2):
        raise ValueError(f"takes_sample: True calls model_fn(inputs, sample), but {describe(model_fn)} takes at most "
                         f"{len(arity.positional)} positional argument(s); leave takes_sample=None for model(inputs)")
    if requested is False and not arity.accepts(1):
        raise ValueError(f"takes_sample: False calls model_fn(inputs) inside stn_kernels.hparams(...), but "
                         f"{describe(model_fn)} requires {len(arity.required)} positional arguments")
    if requested is not None:
        return requested
    if len(arity.required) > 2 or (not arity.positional and not arity.var_positional):
        raise TypeError(f"model_fn: expected a model taking (inputs) or (inputs, sample), got {describe(model_fn)}")
    if len(arity.required) == 2 or arity.names_sample():
        return True
    return arity.var_positional and len(arity.positional) <= 1


# --------------------------------------------------------------------------- modules a function hides


def _global_names(code: types.CodeType):
    """The global names ``code`` (and the functions and comprehensions defined in it) reads."""
    for instruction in dis.get_instructions(code):
        if instruction.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            yield instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _in_library(fn) -> bool:
    return (getattr(fn, "__module__", None) or "").split(".")[0] in _LIBRARIES


def modules_behind(model_fn) -> List[Tuple[str, nn.Module]]:
    """The modules a callable that is not one uses, as (where it was found, module), outermost first: through
    closures, the globals its code reads, default arguments, ``functools.partial`` arguments, a bound method's
    ``__self__``, ``__wrapped__`` and a callable object's attributes, following functions it reaches a few levels
    deep. The hyperparameters (a HyperparameterSet), loss modules and submodules of a found module are left out."""
    found: Dict[int, Tuple[str, nn.Module]] = {}
    seen = set()

    def value(obj, where: str, depth: int) -> None:
        if isinstance(obj, nn.Module):
            # λ and ρ, and a loss module: nothing in them depends on the mode
            if not isinstance(obj, (HyperparameterSet, nn.modules.loss._Loss)):
                found.setdefault(id(obj), (where, obj))
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj[:_MAX_ITEMS]):
                value(item, f"{where}[{i}]", depth)
        elif isinstance(obj, dict):
            for key, item in list(obj.items())[:_MAX_ITEMS]:
                value(item, f"{where}[{key!r}]", depth)
        elif callable(obj) and not isinstance(obj, type) and depth < _MAX_DEPTH:
            function(obj, where, depth + 1)

    def function(fn, where: str, depth: int) -> None:
        if id(fn) in seen:
            return
        seen.add(id(fn))
        if isinstance(fn, functools.partial):
            value(fn.func, f"{where}.func", depth)
            value(fn.args, f"{where}.args", depth)
            value(fn.keywords, f"{where}.keywords", depth)
        elif inspect.ismethod(fn):
            value(fn.__self__, f"{where}.__self__", depth)
            value(fn.__func__, where, depth)
        elif isinstance(fn, types.FunctionType):
            if _in_library(fn):
                return
            cells = fn.__closure__ or ()
            for name, cell in zip(fn.__code__.co_freevars, cells):
                try:
                    value(cell.cell_contents, f"closure variable {name!r}", depth)
                except ValueError:  # an empty cell (a variable not yet assigned)
                    pass
            for name in dict.fromkeys(_global_names(fn.__code__)):
                if name in fn.__globals__:
                    value(fn.__globals__[name], f"global {name!r}", depth)
            value(fn.__defaults__ or (), "default arguments", depth)
            value(fn.__kwdefaults__ or {}, "default arguments", depth)
        elif not _in_library(type(fn)):  # a callable object: the modules it keeps
            attributes = getattr(fn, "__dict__", {})
            value(dict(attributes), f"{type(fn).__name__} attribute", depth)
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            value(wrapped, f"{where}.__wrapped__", depth)

    function(model_fn, "model_fn", 0)
    inner = {id(sub) for _, m in found.values() for sub in m.modules() if sub is not m}
    return [(where, m) for key, (where, m) in found.items() if key not in inner]


# --------------------------------------------------------------------------- the batch dimension


def layers_batch_dim(model: nn.Module) -> int:
    """The batch dimension the converted layers of ``model`` state (``hparams_batch_dim``, set by
    :func:`stn_kernels.convert` on the linear, embedding and dropout layers it converts or tunes); 0 when none
    states one. Layers whose layout is their own (convolutions, a converted ``nn.LSTM`` or attention, which follow
    their ``batch_first``) state none. Raises ValueError naming ``batch_dim`` when they state different ones."""
    stated: Dict[int, List[str]] = {}
    for name, m in model.named_modules():
        if "hparams_batch_dim" in vars(m):
            stated.setdefault(int(m.hparams_batch_dim), []).append(name or type(m).__name__)
    if len(stated) > 1:
        layers = "; ".join(f"{dim}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                           for dim, names in sorted(stated.items()))
        raise ValueError(f"batch_dim: the converted layers of the model state different batch dims ({layers}); "
                         f"pass batch_dim=0 or 1 (where the examples lie in the inputs) to STNTrainer")
    return next(iter(stated), 0)


def reads_hparams(model: nn.Module) -> bool:
    """Whether a layer of ``model`` takes λ from an enclosing ``stn_kernels.hparams`` block (a layer converted
    from a plain torch.nn one)."""
    return any(getattr(m, "context_hparams", False) for m in model.modules())
