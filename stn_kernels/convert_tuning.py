"""What :func:`stn_kernels.convert`'s ``batch_first=`` and ``rates=`` do: the layout of λ's rows for the converted
linear and embedding layers, and which dropouts an STN tunes per example.

``batch_first=None`` reads the layout from the model's sequence layers (``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``,
``nn.MultiheadAttention`` (also inside ``nn.Transformer*`` layers), ``nn.Transformer``, ``HyperLSTM``): all
batch first, all time-major, or none (batch first); when they disagree nothing is guessed (ValueError).

``rates={hyperparameter name: module names or types}`` (one name or type, or an iterable of them, as ``exclude=``)
tunes the matched modules: exactly ``nn.Dropout`` / ``nn.Dropout1d`` / ``nn.Dropout2d`` / ``nn.Dropout3d`` become
:class:`~stn_kernels.TunedDropout` (``1d``, ``2d``, ``3d``); a converted module with a ``dropout_hparam``
attribute (a converted attention) gets it set to the name. A module's name is more specific than its type:
``{"dropout": nn.Dropout, "emb_dropout": "embed_drop"}`` tunes ``embed_drop`` by ``emb_dropout`` and every other
nn.Dropout by ``dropout``. Anything else matched, a module matched by two hyperparameters (two by name, or two by
type), an unknown module name, or a hyperparameter matching nothing is a ValueError naming ``rates``, raised before
the model is changed. Modules that ``exclude=`` leaves are never tuned (a name in ``rates`` that exclude leaves is
an error).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Tuple

from torch import nn

from .modules_dropout import TUNED_DROPOUTS, tuned_form
from .modules_lstm import HyperLSTM

# Modules whose ``batch_first`` says how the model lays out its sequences (a transformer layer's is its attention's).
_SEQUENCE_LAYERS = (nn.RNNBase, nn.MultiheadAttention, nn.Transformer, HyperLSTM)


def infer_batch_first(model: nn.Module, batch_first) -> Tuple[bool, str]:
    """(batch_first, where it came from) for ``convert(model, batch_first=...)``."""
    if batch_first is not None and not isinstance(batch_first, bool):
        raise TypeError(f"batch_first: expected None (read from the model's sequence layers), True or False, got "
                        f"{batch_first!r}")
    if batch_first is not None:
        return batch_first, "stated"
    found: Dict[bool, List[str]] = {True: [], False: []}
    for name, module in model.named_modules():
        if isinstance(module, _SEQUENCE_LAYERS):
            found[bool(module.batch_first)].append(f"{name or type(model).__name__} ({type(module).__name__})")
    if found[True] and found[False]:
        raise ValueError(f"batch_first: the model's sequence layers disagree (batch_first=True: "
                         f"{', '.join(found[True])}; batch_first=False: {', '.join(found[False])}); state the "
                         f"layout of the inputs of its linear and embedding layers with convert(..., "
                         f"batch_first=True or False)")
    if found[False]:
        return False, f"from {', '.join(found[False])}"
    if found[True]:
        return True, f"from {', '.join(found[True])}"
    return True, "no sequence layer"


def _describe(item) -> str:
    if isinstance(item, type):
        return item.__name__
    return f"{item!r} ({type(item).__name__})"


def _parse_rates(rates) -> Tuple[Dict[str, List[str]], List[Tuple[type, str]]]:
    """``rates`` as ({module name: [hyperparameter names]}, [(module type, hyperparameter name)])."""
    if not isinstance(rates, Mapping):
        raise TypeError(f"rates: expected a mapping from hyperparameter names to module names or types, got "
                        f"{type(rates).__name__}")
    by_name: Dict[str, List[str]] = {}
    by_type: List[Tuple[type, str]] = []
    for hparam, items in rates.items():
        if not isinstance(hparam, str) or not hparam:
            raise TypeError(f"rates: expected hyperparameter names (non-empty str) as keys, got {hparam!r}")
        if isinstance(items, (str, type)):
            items = (items,)
        if isinstance(items, nn.Module) or not hasattr(items, "__iter__"):
            raise TypeError(f"rates[{hparam!r}]: expected a module name (str), an nn.Module subclass or an iterable "
                            f"of them, got {_describe(items)}")
        for item in items:
            if isinstance(item, str):
                by_name.setdefault(item, []).append(hparam)
            elif isinstance(item, type) and issubclass(item, nn.Module):
                by_type.append((item, hparam))
            else:
                raise TypeError(f"rates[{hparam!r}]: expected module names (str) or nn.Module subclasses, got "
                                f"{_describe(item)}")
    return by_name, by_type


class RatePlan:
    """Which module reads which rate: ``rates`` matched against the modules of ``model`` that ``excluded`` does not
    leave (by identity, so a shared module is one entry). Built before convert changes anything."""

    def __init__(self, model: nn.Module, rates, excluded: Callable[[nn.Module], bool]) -> None:
        by_name, by_type = _parse_rates(rates)
        all_names = {name for name, _ in model.named_modules(remove_duplicate=False)}
        unknown = sorted(set(by_name) - all_names)
        if unknown:
            raise ValueError(f"rates: expected names of modules in the model, got unknown {unknown}")
        self.hparam_of: Dict[int, str] = {}
        self.name_of: Dict[int, str] = {}
        # Per module (by identity, over all its names): the matches by name, and by type.
        named: Dict[int, set] = {}
        typed: Dict[int, set] = {}
        modules: Dict[int, nn.Module] = {}
        reached = set()

        def match(module: nn.Module, name: str) -> None:
            reached.add(name)
            modules[id(module)] = module
            self.name_of.setdefault(id(module), name)
            named.setdefault(id(module), set()).update(
                (hparam, f"by name {name!r}") for hparam in by_name.get(name, ()))
            typed.setdefault(id(module), set()).update(
                (hparam, f"by type {cls.__name__}") for cls, hparam in by_type if isinstance(module, cls))

        def walk(parent: nn.Module, prefix: str) -> None:
            for child_name, child in parent._modules.items():
                name = f"{prefix}.{child_name}" if prefix else child_name
                if child is not None and not excluded(child):
                    match(child, name)
                    walk(child, name)

        if not excluded(model):
            match(model, "")
            walk(model, "")
        for key, module in modules.items():
            found = named[key] or typed[key]  # a module's name is more specific than its type
            hparams = sorted({hparam for hparam, _ in found})
            if len(hparams) > 1:
                how = ", ".join(f"{hparam!r} {way}" for hparam, way in sorted(found))
                raise ValueError(f"rates: module {self.name_of[key]!r} ({type(module).__name__}) is matched by more "
                                 f"than one hyperparameter: {how}")
            if hparams:
                self.hparam_of[key] = hparams[0]
        left = sorted(set(by_name) - reached)
        if left:
            raise ValueError(f"rates: expected modules that convert may change, got {left}, which exclude= leaves "
                             f"(or which lie inside a module it leaves)")
        matched = set(self.hparam_of.values())
        idle = [hparam for hparam in rates if hparam not in matched]
        if idle:
            raise ValueError(f"rates: {idle} match(es) no module of the model (that exclude= does not leave)")

    def changes(self, root: nn.Module, actual: Callable[[nn.Module], Optional[nn.Module]], batch_dim: int
                ) -> "TuningChanges":
        """The changes that tune the planned modules in the converted model: ``root`` (the model, or what convert
        made of it) and ``actual(child)``: what convert put in place of an original child (itself if unchanged),
        None if excluded. Raises ValueError naming ``rates`` for a planned module that cannot be tuned; changes
        nothing itself."""
        todo = TuningChanges()
        seen = set()
        made: Dict[int, nn.Module] = {}

        def tune(parent: Optional[nn.Module], key: Optional[str], module: nn.Module, where: str) -> None:
            origin = module if id(module) in self.hparam_of else module.__dict__.get("_stn_original", module)
            hparam = self.hparam_of.get(id(origin))
            if hparam is None:
                return
            seen.add(id(origin))
            what = f"rates[{hparam!r}]: module {where!r} ({type(origin).__name__})"
            if isinstance(module, TUNED_DROPOUTS) or getattr(module, "dropout_hparam", None) is not None:
                already = module.hparam if isinstance(module, TUNED_DROPOUTS) else module.dropout_hparam
                if already != hparam:  # tuned by an earlier convert
                    raise ValueError(f"{what} is already tuned by the rate {already!r}")
                return
            tuned = made.get(id(module)) or (tuned_form(module, hparam) if module is origin else None)
            if tuned is not None:
                tuned.hparams_batch_dim = batch_dim
                made[id(module)] = tuned
                todo.replace.append((parent, key, tuned))
                todo.converted.append((where, type(module).__name__, type(tuned).__name__))
            elif hasattr(module, "dropout_hparam"):
                todo.attributes.append((module, hparam))
            else:
                became = "" if module is origin else f", made {type(module).__name__} by convert,"
                raise ValueError(f"{what}{became} has no tuned form: convert tunes exactly nn.Dropout, nn.Dropout1d, "
                                 f"nn.Dropout2d and nn.Dropout3d without hooks, and converted layers with a "
                                 f"dropout_hparam (a converted attention)")
            todo.tuned.append((where, type(origin).__name__, hparam))

        def walk(module: nn.Module, prefix: str) -> None:
            for key, child in module._modules.items():
                child = None if child is None else actual(child)
                if child is not None:
                    where = f"{prefix}.{key}" if prefix else key
                    tune(module, key, child, where)
                    walk(child, where)

        tune(None, None, root, type(root).__name__)
        walk(root, "")
        missed = [self.name_of[i] for i in self.hparam_of if i not in seen]
        if missed:
            raise ValueError(f"rates: expected modules that remain in the converted model, got {missed}, which convert "
                             f"replaced together with the module holding them")
        return todo


class TuningChanges:
    """What :meth:`RatePlan.changes` found: dropouts to replace, converted modules whose ``dropout_hparam`` to set,
    and the report's lines: ``tuned`` (name, type, hyperparameter), ``converted`` (name, from type, to type)."""

    def __init__(self) -> None:
        self.replace: List[Tuple[Optional[nn.Module], Optional[str], nn.Module]] = []
        self.attributes: List[Tuple[nn.Module, str]] = []
        self.tuned: List[Tuple[str, str, str]] = []
        self.converted: List[Tuple[str, str, str]] = []

    def apply(self, root: nn.Module) -> nn.Module:
        """Makes the changes; returns ``root``, or its tuned form when the root itself is a tuned dropout."""
        for module, hparam in self.attributes:
            module.dropout_hparam = hparam
        for parent, key, tuned in self.replace:
            if parent is None:
                root = tuned
            else:
                parent._modules[key] = tuned
        return root
