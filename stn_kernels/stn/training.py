"""Algorithm 1 of the STN paper (and the Delta-STN variant) as steps for your own loop.

The model is either a model :func:`stn_kernels.convert` made from a plain one, called as ``model(inputs)``
inside ``with sample.hparams():`` (λ for its converted layers, per-example rates for the dropouts it tuned),
or any callable ``model_fn(inputs, sample) -> output`` where ``sample`` is a
:class:`~stn_kernels.stn.HyperparameterSample`: feed ``sample.layer_input`` to the hyper
layers, use ``sample[name]`` for the regularisers and apply them only when
``sample.regularize`` is True (``stn/model_call.py`` tells the two apart). ``criterion(output, targets)``
gives the loss. The module the trainer can see is in train mode for training steps and in eval mode for
validation steps (dropout off, batch-norm statistics left alone), and back in its own modes after each step.

Training step (T_train of them per cycle)
    λ_b = λ + σ ⊙ ε_b (detached), regularisers on, one step of the weight optimiser on the
    training loss. Warm-up steps are training steps before any validation step.
Validation step (T_valid per cycle)
    regularisers off (dropout off, no augmentation, as in the published code); λ_b perturbed
    when the scales are tuned (else λ itself); the objective is the validation loss − τ·entropy;
    one step of the hyperparameter optimiser (λ) and of the scale optimiser (ρ, σ = softplus(ρ)).
    Only λ and ρ are differentiated: the weights get no gradient here.
Delta-STN (``delta_stn=True``)
    the layers see λ_b − λ (centred); a training step first updates the general weights at the
    current λ (centred input 0), then the response parameters (``hyper_weight``, ``hyper_bias``,
    ``hparam_weight``) on perturbed λ_b, optionally through the linearised response
    out(0) + J·(λ_b − λ) with J = ∂out/∂(layer input), a Jacobian-vector product computed by
    double backward through the layers (``linearize=True``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..modules import HyperConv2d, HyperEmbedding, HyperLinear
from . import distributed, model_call, trainer_state
from .batches import cycle_batches  # noqa: F401  (its home before batches.py)
from .hyperparameters import HyperparameterSample, HyperparameterSet

# Parameters of our layers that make up the response (the part that depends on λ).
_RESPONSE_NAMES = ("hyper_weight", "hyper_bias", "hparam_weight")


def split_stn_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(general, response) parameters of ``model`` for Delta-STN's two optimisers.

    Response: ``hyper_weight``, ``hyper_bias`` and ``hparam_weight`` of every HyperLinear,
    HyperConv2d and HyperEmbedding; general: every other parameter (each listed once).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    response_ids = set()
    response = []
    for module in model.modules():
        if isinstance(module, (HyperLinear, HyperConv2d, HyperEmbedding)):
            for name in _RESPONSE_NAMES:
                p = getattr(module, name, None)
                if p is not None and id(p) not in response_ids:
                    response_ids.add(id(p))
                    response.append(p)
    general = [p for p in model.parameters() if id(p) not in response_ids]
    return general, response


def linearized_output(model_fn: Callable, inputs, sample: HyperparameterSample, direction: Tensor) -> Tensor:
    """out(x, 0) + J·direction, with J the Jacobian of the output w.r.t. the centred layer input at 0.

    The JVP uses the double-backward trick (differentiate the vector-Jacobian product w.r.t. its
    vector), so it needs only reverse mode, which the layers support to any order. The result is
    differentiable w.r.t. the model's parameters.
    """
    anchor = torch.zeros_like(sample.layer_input, requires_grad=True)
    anchored = HyperparameterSample(sample.unconstrained, anchor, sample.values, sample.regularize, sample.names)
    with torch.enable_grad():
        out = model_fn(inputs, anchored)
        if not isinstance(out, Tensor):
            raise TypeError(f"model_fn: expected a Tensor output for linearize=True, got {type(out).__name__}")
        # The VJP is linear in its vector, so the vector's value does not matter; zeros keep it cheap.
        vector = torch.zeros_like(out, requires_grad=True)
        (vjp,) = torch.autograd.grad(out, anchor, vector, create_graph=True)
        (jvp,) = torch.autograd.grad(vjp, vector, direction, create_graph=True)
    return out + jvp


class _ShapeOnly:
    """A tensor as its repr shows it in a StepResult: shape and dtype."""

    def __init__(self, tensor: Tensor) -> None:
        self.text = f"Tensor(shape={tuple(tensor.shape)}, dtype={tensor.dtype})"

    def __repr__(self) -> str:
        return self.text


@dataclass
class StepResult:
    """What one step did: ``kind`` is "warmup", "train", "response" (Delta-STN) or "valid";
    ``loss_tensor`` the data loss (without the entropy term), detached; ``output`` the model output,
    detached. ``loss`` is the loss as a float, read only when asked: on a GPU that read waits for the
    step to finish, so a loop that never looks at it never stalls the host."""

    kind: str
    loss_tensor: Tensor
    output: Tensor  # or the tuple, list or dict of tensors the model returned

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    def __repr__(self) -> str:
        # The loss as a number and the output's shape, never whole tensors (a batch of logits would fill a screen).
        output = _map_tensors(_ShapeOnly, self.output)
        return f"StepResult(kind={self.kind!r}, loss={self.loss:.6g}, output={output})"


def _optimizer_params(optimizer: torch.optim.Optimizer) -> List[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _trainable(params: Iterable[Tensor]) -> List[Tensor]:
    """The parameters a step differentiates: frozen ones (``requires_grad=False``) get no gradient, as with a plain
    ``loss.backward()``."""
    return [p for p in params if p.requires_grad]


def _describe_batch(batch) -> str:
    if isinstance(batch, Tensor):
        return f"a Tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} item(s)"
    return f"a {type(batch).__name__}"


def _next_batch(next_batch: Callable[[], tuple], name: str) -> tuple:
    batch = next_batch()
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{name}: expected it to return an (inputs, targets) pair, got {_describe_batch(batch)}")
    return batch


def _checked_loss(loss):
    """The criterion's loss: a scalar tensor (a per-example loss, ``reduction='none'``, cannot be differentiated
    as one)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"criterion: expected criterion(output, targets) to return a scalar loss tensor, got "
                        f"{type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"criterion: expected criterion(output, targets) to return a scalar loss tensor (reduction "
                         f"'mean' or 'sum'), got shape {tuple(loss.shape)}")
    return loss


def _map_tensors(fn: Callable, out):
    """``fn`` applied to the tensors of a model output: a tensor, or a tuple, list or dict of outputs (an RNN's
    ``(output, hidden)``); anything else as it is."""
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        items = [_map_tensors(fn, item) for item in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, dict):
        return type(out)((key, _map_tensors(fn, item)) for key, item in out.items())
    return out


def _check_optimizer(value, name: str, required: bool = True) -> None:
    if value is None and not required:
        return
    if isinstance(value, type) and issubclass(value, torch.optim.Optimizer):
        raise TypeError(f"{name}: expected a torch.optim.Optimizer, got the class {value.__name__} (build it over "
                        f"the parameters: {value.__name__}(params, lr=...))")
    if not isinstance(value, torch.optim.Optimizer):
        raise TypeError(f"{name}: expected a torch.optim.Optimizer, got {type(value).__name__}")


# torch.compile modes that capture CUDA graphs on a GPU: their outputs are overwritten by the next replay.
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _compile_options(value) -> Optional[dict]:
    """``compile=`` as torch.compile keyword arguments (None: eager), with unknown keys refused up front."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"compile: expected False, True or a dict of torch.compile options, got {type(value).__name__}")
    allowed = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ValueError(f"compile: expected torch.compile options among {sorted(allowed)}, got {unknown}")
    return dict(value)


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _batch_tensor(inputs, targets):
    """What the batch size is read from: the inputs if a tensor, else the first item of a tuple or list of
    inputs if a tensor, else the targets."""
    if isinstance(inputs, Tensor):
        return inputs, "inputs"
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], Tensor):
        return inputs[0], "inputs[0]"
    return targets, "targets"


class STNTrainer:
    """The steps of Algorithm 1 around your model, data and optimisers.

    Arguments:
        model_fn: the model. A model :func:`stn_kernels.convert` made from a plain one (its forward takes the
            inputs only) is called as ``model(inputs)`` inside ``with sample.hparams(batch_dim=...):``, i.e.
            ``stn_kernels.hparams(sample.layer_input, batch_dim=..., rates=...)`` (the rates: every
            hyperparameter's per-example constrained values by name, in training steps only, read by the
            dropouts ``convert`` tuned). A model or function taking ``(inputs, sample)`` is called as
            ``model_fn(inputs, sample)`` and feeds λ to its layers itself. Which one is read from the signature
            (see ``takes_sample``). The module the trainer can see (``model_fn`` if it is an ``nn.Module``,
            else ``module``) is put in train mode for training steps and in eval mode for validation steps
            (dropout off, batch-norm running statistics untouched, as in the published code), and every
            submodule is back in its own mode after the step. A function that uses a module it does not name
            (a lambda over the model) gets one warning: pass the module itself, or ``module=``.
        criterion: ``criterion(output, targets) -> scalar loss``.
        hparams: the :class:`HyperparameterSet` being tuned.
        weight_optimizer: the model's weights (for Delta-STN: the general weights only, see
            :func:`split_stn_parameters`).
        hparam_optimizer: λ (``hparams.unconstrained``); default Adam(lr=3e-3), the published default.
        scale_optimizer: ρ (``hparams.raw_scale``); default Adam(lr=3e-3). Unused if tune_scales=False.
        response_optimizer: Delta-STN only: the response parameters.
        train_steps, valid_steps: T_train and T_valid per cycle (published: 2 and 1; Delta-STN 5 and 1).
        warmup_steps: training steps before the first validation step (warm-up epochs × batches per
            epoch); λ stays at its initial value meanwhile.
        entropy_weight: τ in loss − τ·entropy (1e-3, a typical published value; the official CNN script
            defaults to 1e-5).
        tune_scales: learn σ in validation steps (else validation steps use λ unperturbed).
        constrained_layer_input: feed T(λ_b) to the layers instead of λ_b.
        delta_stn: the Delta-STN variant (centred layer input, separate response step).
        linearize: Delta-STN's linearised response in the response step.
        generator: for the perturbations ε (default: torch's default generator; dropout seeds come from the
            regularisers' own calls). In a distributed run, seed it per rank yourself.
        seed: seeds torch's default generator (ε, dropout masks, the model's own noise) once, here, with this
            rank's stream (:func:`~stn_kernels.stn.seed_rank_streams`: ``torch.manual_seed(seed)`` in one process
            and on rank 0). Default None: a single process leaves the generator alone; a distributed run draws
            the seed from the generator, so ranks seeded alike still draw different perturbations and masks.
        sync_hyperparameters: with torch.distributed initialised and more than one rank, broadcast λ and ρ from
            rank 0 here and average their gradients over the ranks in every validation step, so that they stay
            identical on every rank (the weights are DDP's or FSDP's business). False if you do it yourself.
        process_group: the group of ranks sharing the hyperparameters (default: the default group).
        compile: run each step's forward half (λ_b = λ + σ ⊙ ε_b, the sample, the model, the loss and,
            in validation steps, the entropy term) as one ``torch.compile`` graph, and so its backward
            as one compiled graph too: ``True``, or a dict of ``torch.compile`` options. On CUDA the mode
            defaults to ``"reduce-overhead"`` (CUDA graphs). ε is drawn outside the graph (one eager
            ``randn``), so it is the same draw as in eager mode; dropout seeds drawn inside the graph come
            from the compiled RNG unless ``torch._inductor.config.fallback_random`` is set. Delta-STN's
            linearised response step (``linearize=True``) differentiates inside its forward and stays eager.
        takes_sample: the call convention. None (default) reads it from the signature (of the forward for a
            module; DDP, DataParallel and ``torch.compile`` wrappers are looked through): two required
            positional arguments, or a second one named ``sample`` (or annotated ``HyperparameterSample``),
            mean ``model_fn(inputs, sample)``; one positional argument (the rest optional) means
            ``model(inputs)`` in the hparams block; ``*args`` alone, or a signature that cannot be read, keeps
            ``(inputs, sample)``. True or False states it (ValueError if the signature cannot take that call).
        module: the ``nn.Module`` to switch between train and eval mode when ``model_fn`` is a function that
            uses it (and whose converted layers state the batch dimension). Default: ``model_fn`` if it is one.
        batch_dim: where the examples lie in the inputs: 0 (``[B, ...]``) or 1 (time-major ``[T, B, ...]``,
            ``nn.LSTM``'s default layout). The batch size B (the rows of λ_b) is the inputs' size along it (the
            first item of a tuple or list of inputs; the targets when the inputs hold no tensor first), and the
            hparams block gets it. None (default): for a model called as ``model(inputs)``, the dimension its
            converted layers state (``hparams_batch_dim``, set by ``convert``; 0 if none states one; ValueError
            if they differ); for ``model_fn(inputs, sample)``, B is the targets' first dim, as before this
            option existed. Time-major models with ``[T, B]`` or flattened ``[T·B]`` targets need it.
    """

    def __init__(self, model_fn: Callable, criterion: Callable, hparams: HyperparameterSet,
                 weight_optimizer: torch.optim.Optimizer, *,
                 hparam_optimizer: Optional[torch.optim.Optimizer] = None,
                 scale_optimizer: Optional[torch.optim.Optimizer] = None,
                 response_optimizer: Optional[torch.optim.Optimizer] = None,
                 train_steps: int = 2, valid_steps: int = 1, warmup_steps: int = 0,
                 entropy_weight: float = 1e-3, tune_scales: bool = True, constrained_layer_input: bool = False,
                 delta_stn: bool = False, linearize: bool = False,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 sync_hyperparameters: bool = True, process_group=None,
                 compile=False, takes_sample: Optional[bool] = None, module: Optional[nn.Module] = None,
                 batch_dim: Optional[int] = None) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn: expected an nn.Module or a callable (inputs, sample) -> output, "
                            f"got {type(model_fn).__name__}")
        if not callable(criterion):
            raise TypeError(f"criterion: expected a callable (output, targets) -> loss, got {type(criterion).__name__}")
        if not isinstance(hparams, HyperparameterSet):
            raise TypeError(f"hparams: expected a HyperparameterSet, got {type(hparams).__name__}")
        _check_optimizer(weight_optimizer, "weight_optimizer")
        _check_optimizer(hparam_optimizer, "hparam_optimizer", required=False)
        _check_optimizer(scale_optimizer, "scale_optimizer", required=False)
        _check_optimizer(response_optimizer, "response_optimizer", required=False)
        for flag, value in (("sync_hyperparameters", sync_hyperparameters), ("tune_scales", tune_scales),
                            ("constrained_layer_input", constrained_layer_input), ("delta_stn", delta_stn),
                            ("linearize", linearize)):
            if not isinstance(value, bool):  # a string such as "no" would read as True
                raise TypeError(f"{flag}: expected a bool, got {type(value).__name__} {value!r}")
        if delta_stn and response_optimizer is None:
            raise ValueError("response_optimizer: required with delta_stn=True (the response parameters from "
                             "split_stn_parameters), got None")
        if not delta_stn and response_optimizer is not None:
            raise ValueError("response_optimizer: only used with delta_stn=True, got an optimizer with delta_stn=False")
        if linearize and not delta_stn:
            raise ValueError("linearize: the linearised response is part of Delta-STN; expected delta_stn=True "
                             "with linearize=True, got delta_stn=False")
        if isinstance(entropy_weight, bool) or not isinstance(entropy_weight, (int, float)) \
                or not math.isfinite(entropy_weight) or entropy_weight < 0:
            raise ValueError(f"entropy_weight: expected a finite float >= 0, got {entropy_weight!r}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module: expected the nn.Module whose train/eval mode the trainer switches, "
                            f"got {type(module).__name__}")
        if batch_dim is not None and (isinstance(batch_dim, bool) or batch_dim not in (0, 1)):
            raise ValueError(f"batch_dim: expected None, 0 or 1 (1: time-major [T, B, ...] inputs), got {batch_dim!r}")
        self.model_fn = model_fn
        self._take_model(model_fn, takes_sample, module, batch_dim)
        self.criterion = criterion
        self.hparams = hparams
        self.weight_optimizer = weight_optimizer
        self.hparam_optimizer = hparam_optimizer or torch.optim.Adam([hparams.unconstrained], lr=3e-3)
        self.scale_optimizer = (scale_optimizer or torch.optim.Adam([hparams.raw_scale], lr=3e-3)) \
            if tune_scales else scale_optimizer
        self.response_optimizer = response_optimizer
        self.train_steps = _check_count(train_steps, "train_steps", 1)
        self.valid_steps = _check_count(valid_steps, "valid_steps", 0)
        self.warmup_steps = _check_count(warmup_steps, "warmup_steps", 0)
        self.entropy_weight = float(entropy_weight)
        self.tune_scales = bool(tune_scales)
        self.constrained_layer_input = bool(constrained_layer_input)
        self.delta_stn = bool(delta_stn)
        self.linearize = bool(linearize)
        self.generator = generator
        self.compile_options = _compile_options(compile)
        self._compiled_loss: Optional[Callable] = None
        self._cuda_graphs = False
        self.train_steps_done = 0
        self.valid_steps_done = 0
        # Data parallel: per-rank random streams and the same λ, ρ on every rank (stn/distributed.py).
        self.process_group = process_group
        self.rank, self.world_size = distributed.distributed_rank(process_group)
        self.sync_hyperparameters = sync_hyperparameters
        self.seed = None
        if seed is not None or self.world_size > 1:
            self.seed = distributed.seed_rank_streams(seed, process_group=process_group)
        if self.world_size > 1 and sync_hyperparameters:
            distributed.sync_hyperparameters(hparams, process_group=process_group)
        # DDP and FSDP2 reduce the weight gradients in hooks on the parameters they hold (FSDP2: unsharded
        # copies no optimizer holds), so a backward restricted to the optimizer's parameters would skip them
        # (DDP: an error at the next step; FSDP2: silently no update). Under torch.distributed, training steps
        # differentiate every parameter; each optimizer still steps only its own.
        dist = torch.distributed
        self._restrict_backward = not (dist.is_available() and dist.is_initialized())

    # -- helpers

    @property
    def in_warmup(self) -> bool:
        return self.train_steps_done < self.warmup_steps

    def _take_model(self, model_fn, takes_sample: Optional[bool], module: Optional[nn.Module],
                    batch_dim: Optional[int]) -> None:
        """The call convention, the module to switch between train and eval mode, and the batch dimension (None:
        the targets' first dim, the (inputs, sample) call's rule before ``batch_dim`` existed); warns (stack level
        of the user's ``STNTrainer(...)``) where the trainer cannot do what the user most likely expects."""
        self.takes_sample = model_call.takes_sample(model_fn, takes_sample)
        self.module = module if module is not None else model_fn if isinstance(model_fn, nn.Module) else None
        hidden = model_call.modules_behind(model_fn) if self.module is None else []
        if hidden:
            found = ", ".join(f"{type(m).__name__} ({where})" for where, m in hidden[:3])
            warnings.warn(f"STNTrainer: model_fn is not an nn.Module, so the trainer cannot switch train/eval mode "
                          f"for the module(s) it uses: {found}; validation steps would run with dropout on and update "
                          f"batch-norm statistics. Pass the module itself as model_fn (a converted model is called as "
                          f"model(inputs) inside stn_kernels.hparams), or name it: STNTrainer(..., module=model)",
                          stacklevel=3)
        self.batch_dim = batch_dim
        if self.takes_sample:
            return
        if batch_dim is None:
            self.batch_dim = 0 if self.module is None else model_call.layers_batch_dim(self.module)
        if self.module is not None and not model_call.reads_hparams(self.module):
            warnings.warn(f"STNTrainer: {model_call.describe(model_fn)} is called as model(inputs) inside "
                          f"stn_kernels.hparams(...), but no layer of {type(self.module).__name__} takes λ from that "
                          f"block (none was converted by stn_kernels.convert(model, num_hparams=H)), so λ gets no "
                          f"gradient; convert the model first, or pass a model_fn(inputs, sample)", stacklevel=3)

    @contextlib.contextmanager
    def _mode(self, training: bool) -> Iterator[None]:
        """The module in train (training steps) or eval mode (validation steps) for the block, then every
        submodule back in the mode it had (a batch norm kept in eval mode by the user stays so)."""
        if self.module is None:
            yield
            return
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.train(training)
        try:
            yield
        finally:
            for m, was_training in modes:
                m.training = was_training

    def _sample(self, batch: Tensor, regularize: bool) -> HyperparameterSample:
        return self.hparams.make_sample(batch, regularize=regularize, constrained=self.constrained_layer_input,
                                        centre=self.delta_stn)

    def _call_model(self, inputs, sample: HyperparameterSample):
        """The model's output on ``inputs`` under ``sample``, in the model's call convention."""
        if self.takes_sample:
            return self.model_fn(inputs, sample)
        with sample.hparams(batch_dim=self.batch_dim):
            return self.model_fn(inputs)

    def _batch_size(self, inputs, targets) -> int:
        if self.batch_dim is None:
            if isinstance(targets, Tensor) and targets.dim() > 0:
                return targets.shape[0]
            shape = f" of shape {tuple(targets.shape)}" if isinstance(targets, Tensor) else ""
            raise TypeError(f"targets: expected a tensor whose first dim is the batch (or state where the examples "
                            f"lie in the inputs with STNTrainer(..., batch_dim=0 or 1)), got "
                            f"{type(targets).__name__}{shape}")
        source, name = _batch_tensor(inputs, targets)
        if not isinstance(source, Tensor) or source.dim() <= self.batch_dim:
            shape = f" of shape {tuple(source.shape)}" if isinstance(source, Tensor) else ""
            raise ValueError(f"{name}: expected a tensor with the examples along dim {self.batch_dim} "
                             f"(batch_dim={self.batch_dim}), got {type(source).__name__}{shape}")
        return source.shape[self.batch_dim]

    def evaluation_sample(self, batch_size: int) -> HyperparameterSample:
        """The current λ for every example, regularisers off: what evaluation uses."""
        with torch.no_grad():
            return self._sample(self.hparams.repeat(batch_size).detach(), regularize=False)

    def tuned_layer_input(self) -> Tensor:
        """The [H] layer input at the current λ, unperturbed, as this trainer feeds the layers: λ itself,
        T(λ) with ``constrained_layer_input=True``, zeros with ``delta_stn=True`` (the centred input λ − λ).
        Detached. ``with stn_kernels.hparams(trainer.tuned_layer_input()): model(x)`` is the model at the tuned
        λ (every example alike, as :meth:`evaluation_sample`), and :func:`stn_kernels.freeze` folds it in."""
        with torch.no_grad():
            return self.evaluation_sample(1).layer_input[0].clone()

    def _loss(self, inputs, targets, noise: Optional[Tensor], regularize: bool, differentiate_hparams: bool,
              entropy_term: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(objective, loss, output) at λ_b = λ + σ ⊙ noise (λ itself if noise is None); what ``compile``
        turns into one graph. Training steps do not differentiate the hyperparameters."""
        batch_size = self._batch_size(inputs, targets)
        batch = self.hparams.repeat(batch_size) if noise is None else self.hparams.perturb(batch_size, noise=noise)
        if not differentiate_hparams:
            batch = batch.detach()
        out = self._call_model(inputs, self._sample(batch, regularize=regularize))
        loss = _checked_loss(self.criterion(out, targets))
        objective = loss - self.entropy_weight * self.hparams.entropy() if entropy_term else loss
        return objective, loss, out

    def _run_loss(self, inputs, targets, noise, regularize, differentiate_hparams, entropy_term):
        if self.compile_options is None:
            return self._loss(inputs, targets, noise, regularize, differentiate_hparams, entropy_term)
        if self._compiled_loss is None:
            options = dict(self.compile_options)
            if self.hparams.unconstrained.device.type == "cuda":
                options.setdefault("mode", "reduce-overhead")
            self._cuda_graphs = (self.hparams.unconstrained.device.type == "cuda"
                                 and options.get("mode") in _CUDA_GRAPH_MODES)
            self._compiled_loss = torch.compile(self._loss, **options)
        if self._cuda_graphs:
            # A new iteration for CUDA graph trees: the previous step's graph outputs may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        objective, loss, out = self._compiled_loss(inputs, targets, noise, regularize, differentiate_hparams,
                                                   entropy_term)
        if self._cuda_graphs:
            # The next replay overwrites graph outputs; what the caller keeps must be its own copy.
            loss, out = loss.clone(), _map_tensors(Tensor.clone, out)
        return objective, loss, out

    def _noise(self, batch_size: int) -> Tensor:
        with torch.no_grad():
            return self.hparams.noise(batch_size, generator=self.generator)

    def _update(self, optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
        """``loss.backward(); optimizer.step()`` for the optimizer's trainable parameters: frozen ones
        (``requires_grad=False``) get no gradient and do not move, as with a plain loop; with every one frozen
        there is nothing to differentiate."""
        trainable = _trainable(_optimizer_params(optimizer))
        if self._restrict_backward:
            if trainable:
                loss.backward(inputs=trainable)
        elif trainable or loss.requires_grad:
            loss.backward()
        optimizer.step()

    # -- resuming

    def state_dict(self) -> dict:
        """Everything the next step depends on, besides the model's weights (``model.state_dict()``) and the data
        position (:func:`cycle_batches`' ``state_dict()``): the step counters, every optimiser the trainer holds,
        λ and ρ with the hyperparameters' specs, the settings it was built with (``compile`` included), the
        trainer's ``generator``, torch's default CPU (and, where initialised, CUDA) generators, and this rank's
        seed; a format version. Tensors are references, as in ``nn.Module.state_dict()``. Under
        torch.distributed it is this rank's state (its own random streams);
        :func:`~stn_kernels.stn.save_checkpoint` gathers every rank's. docs/checkpoints.md."""
        return trainer_state.trainer_state(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a :meth:`state_dict`, after checking all of it against this trainer (the settings, the
        hyperparameters' names, ranges and dtype, every optimiser's class and parameter shapes, the generators,
        the rank and world size): a state that does not fit raises a ValueError naming every difference and
        changes nothing."""
        problems = trainer_state.check_trainer_state(self, state_dict)
        if problems:
            raise ValueError("state_dict: does not fit this trainer: " + "; ".join(problems))
        trainer_state.apply_trainer_state(self, state_dict)

    # -- the steps

    def train_step(self, inputs, targets) -> List[StepResult]:
        """One training step on perturbed λ_b (two updates, general then response, for Delta-STN)."""
        batch_size = self._batch_size(inputs, targets)
        with self._mode(True):
            results = self._train_step(inputs, targets, batch_size)
        self.train_steps_done += 1
        return results

    def _train_step(self, inputs, targets, batch_size: int) -> List[StepResult]:
        kind = "warmup" if self.in_warmup else "train"
        noise = self._noise(batch_size)
        self.weight_optimizer.zero_grad()
        if not self.delta_stn:
            loss, _, out = self._run_loss(inputs, targets, noise, True, False, False)
            self._update(self.weight_optimizer, loss)
            return [StepResult(kind, loss.detach(), _map_tensors(Tensor.detach, out))]
        # Delta-STN. General weights at the current λ: centred input 0, regularisers at λ itself.
        loss, _, out = self._run_loss(inputs, targets, None, True, False, False)
        self._update(self.weight_optimizer, loss)
        results = [StepResult(kind, loss.detach(), _map_tensors(Tensor.detach, out))]
        # Response parameters on perturbed λ_b.
        self.response_optimizer.zero_grad()
        if self.linearize:
            with torch.no_grad():
                perturbed = self.hparams.perturb(batch_size, noise=noise)
            sample = self._sample(perturbed, regularize=True)
            out = linearized_output(self._call_model, inputs, sample, sample.layer_input.detach())
            loss = _checked_loss(self.criterion(out, targets))
        else:
            loss, _, out = self._run_loss(inputs, targets, noise, True, False, False)
        self._update(self.response_optimizer, loss)
        results.append(StepResult("response", loss.detach(), _map_tensors(Tensor.detach, out)))
        return results

    def valid_step(self, inputs, targets) -> StepResult:
        """One hyperparameter step: validation loss − τ·entropy, regularisers off, the module in eval mode."""
        batch_size = self._batch_size(inputs, targets)
        with self._mode(False):
            noise = self._noise(batch_size) if self.tune_scales else None
            objective, loss, out = self._run_loss(inputs, targets, noise, False, True, self.tune_scales)
        optimizers = [self.hparam_optimizer] + ([self.scale_optimizer] if self.tune_scales else [])
        # Only the (trainable) hyperparameters are differentiated: no weight gradient is formed or accumulated.
        params = _trainable(p for opt in optimizers for p in _optimizer_params(opt))
        grads = torch.autograd.grad(objective, params, allow_unused=True) if params and objective.requires_grad \
            else [None] * len(params)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        if self.world_size > 1 and self.sync_hyperparameters:
            # Each rank's gradient is the mean over its own validation batch: their average is the gradient
            # of the whole (all ranks') batch, and every rank then takes the same step.
            distributed.average_gradients(params, process_group=self.process_group)
        for opt in optimizers:
            opt.step()
        self.valid_steps_done += 1
        return StepResult("valid", loss.detach(), _map_tensors(Tensor.detach, out))

    def step(self, next_train_batch: Callable[[], tuple], next_valid_batch: Callable[[], tuple]) -> List[StepResult]:
        """One cycle of Algorithm 1: T_train training steps, then T_valid validation steps once the warm-up
        is over. ``next_*_batch()`` return ``(inputs, targets)`` (e.g. :func:`cycle_batches` of a DataLoader)."""
        for source, name in ((next_train_batch, "next_train_batch"), (next_valid_batch, "next_valid_batch")):
            if not callable(source):
                raise TypeError(f"{name}: expected a callable returning (inputs, targets), e.g. "
                                f"stn.cycle_batches(loader), got {type(source).__name__}")
        results = []
        for _ in range(self.train_steps):
            results += self.train_step(*_next_batch(next_train_batch, "next_train_batch"))
        if not self.in_warmup:
            for _ in range(self.valid_steps):
                results.append(self.valid_step(*_next_batch(next_valid_batch, "next_valid_batch")))
        return results
