"""Bad inputs a user is likely to give, beyond the layers' forward (tests/test_layer_errors.py): convert, revert, the
hparams block, freeze, STNTrainer, the hyperparameters, augmentation, tuned dropout, the attention, the layers'
constructors and the benchmark's command line. Each case is data: the bad call, the exception type, the argument the
message must name first (the package's ``name: expected ..., got ...``, or ``name (qualifier): ...``), and words
showing the expected and the actual value. The most likely mistakes come first in each area: the published
argument order, λ of the wrong shape or dtype, a loader passed instead of ``next_batch``, a [B, H] λ to freeze, the
layout of time-major input. Every case runs in milliseconds (tiny shapes, no compilation, at most one step)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

import stn_kernels
from stn_kernels import HyperConv2d, HyperEmbedding, HyperLinear, HyperLSTM, HyperMultiheadAttention, stn
from stn_kernels.stn import Hyperparameter, HyperparameterSet, STNTrainer

from _published import OfficialHyperLinear

H, B, T, K = 3, 2, 4, 5   # T != B: a time-major [T, B] input is never square
# Names the user never gave (the public functions' names for what a module passes them).
INTERNAL = re.compile(r"\b(weight_scale|bias_scale|x_proj|h0|c0|htensor|_stn_original|unconstrained_batch)\b")


@dataclass(frozen=True)
class Bad:
    call: Callable[[], object]
    exc: type
    name: str                  # the argument the message names first
    fragments: Tuple[str, ...]  # the expected and the actual value, in the message's words


CASES: Dict[str, Bad] = {}
# The area of a case, from the first word of its key; the cases' ids are "area/key".
AREAS = {"convert": "convert", "revert": "convert", "hparams": "hparams", "freeze": "freeze", "fold": "freeze",
         "trainer": "trainer", "step": "trainer", "train": "trainer", "valid": "trainer",
         "hyperparameter": "hyperparameters", "set": "hyperparameters", "sample": "hyperparameters",
         "perturb": "hyperparameters", "constrain": "hyperparameters", "augment": "augmentation",
         "color": "augmentation", "cutout": "augmentation", "input": "augmentation", "affine": "augmentation",
         "dropout": "augmentation", "channel": "augmentation", "tuned": "augmentation", "attention": "attention",
         "linear": "constructors", "conv": "constructors", "embedding": "constructors", "lstm": "constructors"}


def case(key: str, call: Callable[[], object], exc: type, name: str, *fragments: str) -> None:
    key = f"{AREAS[key.split('-')[0]]}/{key}"
    assert key not in CASES, key
    CASES[key] = Bad(call, exc, name, fragments)


# ----------------------------------------------------------------------------- tiny models and data

class TinyLM(nn.Module):
    """PyTorch's word_language_model layout: tokens [T, B] (time-major unless batch_first), Embedding -> LSTM ->
    Linear decoder."""

    def __init__(self, batch_first: bool = False, vocab: int = 7) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.lstm = nn.LSTM(4, 5, batch_first=batch_first)
        self.drop = nn.Dropout(0.1)
        self.decoder = nn.Linear(5, vocab)

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.decoder(self.drop(out))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, 6), nn.ReLU(), nn.Dropout(0.1), nn.Linear(6, 2))


def converted_mlp() -> nn.Module:
    return stn_kernels.convert(mlp(), num_hparams=H)


def converted_lm(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return stn_kernels.convert(TinyLM(**kwargs), num_hparams=H)


def lam(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


def tokens(*shape):
    return torch.randint(0, 7, shape)


def images(b=B, c=3, dtype=torch.float32):
    return torch.rand(b, c, 6, 6, dtype=dtype)


def run_in_block(model, x, lam_value, **block):
    with stn_kernels.hparams(lam_value, **block):
        return model(x)


def hp_set(*names: str) -> HyperparameterSet:
    return HyperparameterSet([Hyperparameter(n, init=0.1, low=0.0, high=0.9) for n in names or ("dropout",)])


def sample(*names: str, batch: int = B, regularize: bool = True):
    return hp_set(*names).sample(batch, regularize=regularize)


# ----------------------------------------------------------------------------- convert and revert

def _bidirectional():
    return nn.LSTM(4, 5, bidirectional=True)


def _disagreeing_lstms():
    return nn.ModuleDict({"a": nn.LSTM(4, 5, batch_first=True), "b": nn.LSTM(4, 5)})


case("convert-model-and-H-swapped", lambda: stn_kernels.convert(H, mlp()), TypeError, "model", "nn.Module", "int")
case("convert-state-dict", lambda: stn_kernels.convert(mlp().state_dict(), num_hparams=H), TypeError, "model",
     "nn.Module", "OrderedDict")
case("convert-H-zero", lambda: stn_kernels.convert(mlp(), 0), ValueError, "num_hparams", "int >= 1", "0")
case("convert-H-float", lambda: stn_kernels.convert(mlp(), 3.0), ValueError, "num_hparams", "int >= 1", "3.0")
case("convert-H-bool", lambda: stn_kernels.convert(mlp(), True), ValueError, "num_hparams", "int >= 1", "True")
case("convert-H-tensor-of-lam", lambda: stn_kernels.convert(mlp(), lam(B, H)), ValueError, "num_hparams",
     "int >= 1", "tensor")
case("convert-exclude-unknown-name", lambda: stn_kernels.convert(mlp(), H, exclude="decoder"), ValueError, "exclude",
     "names of modules in the model", "'decoder'")
case("convert-exclude-instance", lambda: stn_kernels.convert(mlp(), H, exclude=nn.Linear(2, 2)), TypeError,
     "exclude", "nn.Module subclass", "a Linear instance")
case("convert-exclude-int", lambda: stn_kernels.convert(mlp(), H, exclude=3), TypeError, "exclude", "module name",
     "3 (int)")
case("convert-exclude-item", lambda: stn_kernels.convert(mlp(), H, exclude=["0", 1]), TypeError, "exclude",
     "module names (str)", "1 (int)")
case("convert-batch-first-string", lambda: stn_kernels.convert(converted_lm(), H, batch_first="False"), TypeError,
     "batch_first", "True or False", "'False'")
case("convert-batch-first-int", lambda: stn_kernels.convert(TinyLM(), H, batch_first=0), TypeError, "batch_first",
     "True or False", "got 0")
case("convert-batch-first-disagreeing", lambda: stn_kernels.convert(_disagreeing_lstms(), H), ValueError,
     "batch_first", "disagree", "batch_first=True: a", "batch_first=False: b")
case("convert-rates-list", lambda: stn_kernels.convert(mlp(), H, rates=["dropout"]), TypeError, "rates", "mapping",
     "list")
case("convert-rates-key", lambda: stn_kernels.convert(mlp(), H, rates={0: nn.Dropout}), TypeError, "rates",
     "non-empty str", "0")
case("convert-rates-value", lambda: stn_kernels.convert(mlp(), H, rates={"dropout": 2}), TypeError,
     "rates['dropout']", "module name", "2 (int)")
case("convert-rates-unknown-name", lambda: stn_kernels.convert(mlp(), H, rates={"dropout": "drop"}), ValueError,
     "rates", "names of modules in the model", "'drop'")
case("convert-rates-no-tuned-form", lambda: stn_kernels.convert(mlp(), H, rates={"dropout": nn.ReLU}), ValueError,
     "rates['dropout']", "'1' (ReLU)", "no tuned form")
case("convert-rates-matching-nothing", lambda: stn_kernels.convert(nn.Linear(2, 2), H, rates={"d": nn.Dropout}),
     ValueError, "rates", "['d']", "no module")
case("convert-rates-twice", lambda: stn_kernels.convert(mlp(), H, rates={"a": nn.Dropout, "b": nn.Dropout}),
     ValueError, "rates", "'2' (Dropout)", "more than one hyperparameter")
case("convert-rates-excluded", lambda: stn_kernels.convert(mlp(), H, rates={"d": "2"}, exclude="2"), ValueError,
     "rates", "['2']", "exclude= leaves")
case("convert-published-H-mismatch", lambda: stn_kernels.convert(OfficialHyperLinear(4, 3, 2), num_hparams=H),
     ValueError, "num_hparams", "2", "3")
case("convert-alone-bidirectional", lambda: stn_kernels.convert(_bidirectional(), num_hparams=H), ValueError, "model",
     "nn.LSTM", "bidirectional=True")
case("convert-alone-max-norm", lambda: stn_kernels.convert(nn.Embedding(5, 3, max_norm=1.0), H), ValueError,
     "model", "nn.Embedding", "max_norm=1.0")
case("convert-alone-subclass", lambda: stn_kernels.convert(nn.LazyLinear(3), H), ValueError, "model", "nn.Linear",
     "lazy module")
case("convert-alone-weight-norm", lambda: stn_kernels.convert(weight_norm(nn.Linear(3, 2)), H), ValueError,
     "model", "nn.Linear", "parametrized")
case("revert-not-a-module", lambda: stn_kernels.revert(converted_mlp().state_dict()), TypeError, "model",
     "nn.Module", "OrderedDict")
case("revert-none", lambda: stn_kernels.revert(None), TypeError, "model", "nn.Module", "NoneType")


# ----------------------------------------------------------------------------- the hparams block

case("hparams-lam-list", lambda: run_in_block(converted_mlp(), torch.randn(B, K), [[0.1] * H] * B), TypeError,
     "lam", "torch.Tensor", "list")
case("hparams-lam-sample-not-layer-input", lambda: run_in_block(converted_mlp(), torch.randn(B, K), sample()),
     TypeError, "lam", "torch.Tensor", "HyperparameterSample")
case("hparams-lam-3d", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(1, B, H)), ValueError, "lam",
     "[B, H] or [H]", "(1, 2, 3)")
case("hparams-lam-int", lambda: run_in_block(converted_mlp(), torch.randn(B, K), torch.ones(B, H, dtype=torch.long)),
     TypeError, "lam", "floating-point", "torch.int64")
case("hparams-rows", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B + 1, H)), ValueError, "hparams",
     f"expected {B} rows", f"({B + 1}, {H})")
case("hparams-columns", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H + 1)), ValueError,
     "hparams", f"{H} hyperparameters", f"({B}, {H + 1})")
case("hparams-dtype", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H, dtype=torch.float64)),
     TypeError, "hparams", "torch.float32", "torch.float64")
# Time-major [T, B] tokens: λ has one row per sequence (B), along dim 1.
case("hparams-time-major-rows-per-step", lambda: run_in_block(converted_lm(), tokens(T, B), lam(T, H)), ValueError,
     "hparams", f"expected {B} rows", "along dim 1", f"({T}, {B})", f"got shape ({T}, {H})")
case("hparams-time-major-stated-batch-first", lambda: run_in_block(converted_lm(), tokens(T, B), lam(B, H),
                                                                     batch_dim=0),
     ValueError, "hparams", f"expected {T} rows", "along dim 0", "batch_dim")
case("hparams-batch-first-model-time-major-input", lambda: run_in_block(converted_lm(batch_first=True), tokens(T, B),
                                                                          lam(B, H)),
     ValueError, "hparams", f"expected {T} rows", "batch_first")
case("hparams-batch-dim-2", lambda: run_in_block(converted_lm(), tokens(T, B), lam(B, H), batch_dim=2), ValueError,
     "batch_dim", "None, 0 or 1", "2")
case("hparams-batch-dim-bool", lambda: run_in_block(converted_lm(), tokens(T, B), lam(B, H), batch_dim=True),
     ValueError, "batch_dim", "None, 0 or 1", "True")
case("hparams-rates-list", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H), rates=[0.1]),
     TypeError, "rates", "mapping", "list")
case("hparams-rates-key", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H), rates={0: 0.1}),
     TypeError, "rates", "names (str)", "0 (int)")
case("hparams-rate-one", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H), rates={"d": 1.0}),
     ValueError, "rates['d']", "[0, 1)", "1.0")
case("hparams-rate-nan", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H),
                                              rates={"d": float("nan")}),
     ValueError, "rates['d']", "[0, 1)", "nan")
case("hparams-rate-string", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H), rates={"d": "0.1"}),
     ValueError, "rates['d']", "[0, 1)", "'0.1'")
case("hparams-rate-rows", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H),
                                               rates={"d": torch.full((B + 1,), 0.1)}),
     ValueError, "rates['d']", f"[{B}]", f"({B + 1},)")
case("hparams-rate-int-tensor", lambda: run_in_block(converted_mlp(), torch.randn(B, K), lam(B, H),
                                                     rates={"d": torch.zeros(B, dtype=torch.long)}),
     TypeError, "rates['d']", "floating-point", "torch.int64")


# ----------------------------------------------------------------------------- freeze

def _tuned_mlp():
    return stn_kernels.convert(mlp(), num_hparams=H, rates={"dropout": nn.Dropout})


def _direct_hyper_layer_inside():
    return nn.Sequential(converted_mlp(), HyperLinear(2, 2, num_hparams=H))


case("freeze-per-example", lambda: stn_kernels.freeze(converted_mlp(), lam(B, H)), ValueError, "hparams",
     "one λ shared by every example", "per-example", f"({B}, {H})")
case("freeze-one-row", lambda: stn_kernels.freeze(converted_mlp(), lam(1, H)), ValueError, "hparams", "hparams[0]",
     f"(1, {H})")
case("freeze-wrong-H", lambda: stn_kernels.freeze(converted_mlp(), lam(H + 1)), ValueError, "hparams", f"[{H}]",
     f"({H + 1},)")
case("freeze-args-swapped", lambda: stn_kernels.freeze(lam(H), converted_mlp()), TypeError, "model", "nn.Module",
     "Tensor")
case("freeze-list", lambda: stn_kernels.freeze(converted_mlp(), [0.1] * H), TypeError, "hparams", "torch.Tensor",
     "list")
case("freeze-sample", lambda: stn_kernels.freeze(converted_mlp(), sample()), TypeError, "hparams", "torch.Tensor",
     "HyperparameterSample")
case("freeze-int", lambda: stn_kernels.freeze(converted_mlp(), torch.ones(H, dtype=torch.long)), TypeError,
     "hparams", "floating-point", "torch.int64")
case("freeze-nan", lambda: stn_kernels.freeze(converted_mlp(), torch.tensor([0.1, float("nan"), 0.2])), ValueError,
     "hparams", "finite", "nan")
case("freeze-scalar", lambda: stn_kernels.freeze(converted_mlp(), torch.tensor(0.5)), ValueError, "hparams",
     "[H]", "()")
case("freeze-rates-list", lambda: stn_kernels.freeze(_tuned_mlp(), lam(H), rates=[0.1]), TypeError, "rates",
     "mapping", "list")
case("freeze-rate-per-example", lambda: stn_kernels.freeze(_tuned_mlp(), lam(H), rates={"dropout": torch.rand(B)}),
     ValueError, "rates['dropout']", "one rate", f"({B},)")
case("freeze-rate-one", lambda: stn_kernels.freeze(_tuned_mlp(), lam(H), rates={"dropout": 1.0}), ValueError,
     "rates['dropout']", "[0, 1)", "1.0")
case("freeze-direct-hyper-layer", lambda: stn_kernels.freeze(_direct_hyper_layer_inside(), lam(H)), ValueError,
     "model", "hyper layer 1 (HyperLinear)", "not made by stn_kernels.convert")
case("fold-per-example", lambda: HyperLinear(4, 3, num_hparams=H).fold(lam(B, H)), ValueError, "hparams",
     f"[{H}]", f"({B}, {H})")


# ----------------------------------------------------------------------------- STNTrainer: construction

WEIGHT = nn.Parameter(torch.ones(K, 1))


def _fn(x, sample):
    return (x @ WEIGHT) * sample.layer_input[:, :1]


def _opt():
    return torch.optim.SGD([WEIGHT], lr=0.0)


def trainer(model_fn=_fn, criterion=F.mse_loss, hparams=None, optimizer=None, **kwargs) -> STNTrainer:
    return STNTrainer(model_fn, criterion, hparams if hparams is not None else hp_set(),
                      optimizer if optimizer is not None else _opt(), **kwargs)


def lm_trainer(**kwargs) -> STNTrainer:
    """A converted time-major LM given as it is (called as model(tokens) in the hparams block)."""
    model = converted_lm()

    def loss(out, targets):
        return F.cross_entropy(out.flatten(0, 1), targets.flatten())

    return STNTrainer(model, loss, HyperparameterSet([Hyperparameter(f"h{i}", 0.1, 0.0, 0.9) for i in range(H)]),
                      torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def _batch(b=B):
    return torch.randn(b, K), torch.randn(b, 1)


case("trainer-model-not-callable", lambda: trainer(model_fn=torch.zeros(1)), TypeError, "model_fn", "nn.Module",
     "Tensor")
case("trainer-hparams-and-optimizer-swapped", lambda: STNTrainer(_fn, F.mse_loss, _opt(), hp_set()), TypeError,
     "hparams", "HyperparameterSet", "SGD")
case("trainer-hparams-list", lambda: trainer(hparams=[Hyperparameter("d", 0.1, 0.0, 0.9)]), TypeError, "hparams",
     "HyperparameterSet", "list")
case("trainer-criterion-not-callable", lambda: trainer(criterion="mse"), TypeError, "criterion", "callable", "str")
case("trainer-optimizer-params", lambda: trainer(optimizer=[nn.Parameter(torch.zeros(1))]), TypeError,
     "weight_optimizer", "torch.optim.Optimizer", "list")
case("trainer-optimizer-class", lambda: trainer(optimizer=torch.optim.Adam), TypeError, "weight_optimizer",
     "torch.optim.Optimizer", "Adam")
case("trainer-hparam-optimizer", lambda: trainer(hparam_optimizer="adam"), TypeError, "hparam_optimizer",
     "torch.optim.Optimizer", "str")
case("trainer-delta-without-response", lambda: trainer(delta_stn=True), ValueError, "response_optimizer",
     "required with delta_stn=True", "None")
case("trainer-response-without-delta", lambda: trainer(response_optimizer=_opt()), ValueError, "response_optimizer",
     "delta_stn=True", "delta_stn=False")
case("trainer-linearize-without-delta", lambda: trainer(linearize=True), ValueError, "linearize", "delta_stn=True",
     "delta_stn=False")
case("trainer-train-steps-zero", lambda: trainer(train_steps=0), ValueError, "train_steps", "int >= 1", "0")
case("trainer-valid-steps-float", lambda: trainer(valid_steps=1.0), ValueError, "valid_steps", "int >= 0", "1.0")
case("trainer-warmup-negative", lambda: trainer(warmup_steps=-1), ValueError, "warmup_steps", "int >= 0", "-1")
case("trainer-entropy-negative", lambda: trainer(entropy_weight=-1e-3), ValueError, "entropy_weight", ">= 0",
     "-0.001")
case("trainer-entropy-nan", lambda: trainer(entropy_weight=float("nan")), ValueError, "entropy_weight", "finite",
     "nan")
case("trainer-entropy-string", lambda: trainer(entropy_weight="1e-3"), ValueError, "entropy_weight", "float",
     "'1e-3'")
case("trainer-compile-string", lambda: trainer(compile="max-autotune"), TypeError, "compile", "dict", "str")
case("trainer-compile-option", lambda: trainer(compile={"modee": "default"}), ValueError, "compile",
     "torch.compile options", "'modee'")
case("trainer-batch-dim-2", lambda: trainer(batch_dim=2), ValueError, "batch_dim", "None, 0 or 1", "2")
case("trainer-takes-sample-string", lambda: trainer(takes_sample="yes"), TypeError, "takes_sample", "None (decided",
     "True (model_fn(inputs, sample))", "str")
case("trainer-takes-sample-true-for-one-argument", lambda: lm_trainer(takes_sample=True), ValueError,
     "takes_sample", "model_fn(inputs, sample)", "at most 1 positional")
case("trainer-module-string", lambda: trainer(module="model"), TypeError, "module", "nn.Module", "str")
case("trainer-model-three-arguments", lambda: trainer(model_fn=lambda x, sample, extra: x), TypeError, "model_fn",
     "(inputs) or (inputs, sample)", "extra")
case("trainer-model-required-keyword", lambda: trainer(model_fn=lambda x, *, sample: x), TypeError, "model_fn",
     "(inputs) or (inputs, sample)", "['sample']")
case("trainer-sync-string", lambda: trainer(sync_hyperparameters="no"), TypeError, "sync_hyperparameters", "bool",
     "str")
case("trainer-tune-scales-string", lambda: trainer(tune_scales="no"), TypeError, "tune_scales", "bool", "str")
case("trainer-criterion-per-example", lambda: trainer(criterion=nn.MSELoss(reduction="none")).train_step(*_batch()),
     ValueError, "criterion", "scalar loss", "reduction", f"({B}, 1)")
case("trainer-criterion-float", lambda: trainer(criterion=lambda out, y: 0.5).train_step(*_batch()), TypeError,
     "criterion", "scalar loss tensor", "float")
case("trainer-seed-float", lambda: trainer(seed=1.5), ValueError, "seed", "int", "1.5")


# ----------------------------------------------------------------------------- STNTrainer: steps

class _Loader:
    """A DataLoader stand-in: iterable, not callable."""

    def __iter__(self):
        return iter([_batch()])


def _step(next_train=None, next_valid=None, **kwargs):
    t = trainer(train_steps=1, **kwargs)
    return t.step(next_train or _batch, next_valid or _batch)


case("step-loader-not-next-batch", lambda: _step(_Loader(), _Loader()), TypeError, "next_train_batch", "callable",
     "cycle_batches", "_Loader")
case("step-iterator-not-next-batch", lambda: _step(iter([_batch()])), TypeError, "next_train_batch", "callable",
     "list_iterator")
case("step-valid-loader", lambda: _step(_batch, [_batch()]), TypeError, "next_valid_batch", "callable", "list")
case("step-batch-a-tensor", lambda: _step(lambda: torch.randn(B, K)), TypeError, "next_train_batch",
     "(inputs, targets) pair", f"Tensor of shape ({B}, {K})")
case("step-batch-three-items", lambda: _step(lambda: (*_batch(), torch.ones(B))), TypeError, "next_train_batch",
     "(inputs, targets) pair", "tuple of 3")
case("step-batch-dict", lambda: _step(lambda: {"x": torch.randn(B, K)}), TypeError, "next_train_batch",
     "(inputs, targets) pair", "dict")
case("step-valid-batch-none", lambda: _step(_batch, lambda: None), TypeError, "next_valid_batch",
     "(inputs, targets) pair", "NoneType")
case("train-step-scalar-targets", lambda: trainer().train_step(torch.randn(B, K), torch.tensor(1.0)), TypeError,
     "targets", "first dim is the batch", "()")
case("train-step-list-targets", lambda: trainer().train_step(torch.randn(B, K), [0.0, 1.0]), TypeError, "targets",
     "first dim is the batch", "list")
case("train-step-time-major-inputs-1d", lambda: trainer(batch_dim=1).train_step(torch.randn(B), torch.randn(B)),
     ValueError, "inputs", "along dim 1", f"({B},)")
case("train-step-time-major-no-tensor", lambda: trainer(batch_dim=1).train_step(["a"], [0.0]), ValueError, "targets",
     "along dim 1", "list")
case("valid-step-scalar-targets", lambda: trainer().valid_step(torch.randn(B, K), torch.tensor(1.0)), TypeError,
     "targets", "first dim is the batch", "()")
case("train-step-time-major-model-stated-batch-first", lambda: lm_trainer(batch_dim=0).train_step(tokens(T, B),
                                                                                                   tokens(T, B)),
     ValueError, "hparams", f"batch size {B}", "time-major", f"({T}, {H})")


# ----------------------------------------------------------------------------- Hyperparameter, HyperparameterSet

case("hyperparameter-low-high-swapped", lambda: Hyperparameter("dropout", 0.1, 0.9, 0.0), ValueError, "low, high",
     "low < high", "low=0.9, high=0.0")
case("hyperparameter-init-outside", lambda: Hyperparameter("dropout", 1.2, 0.0, 0.9), ValueError, "init",
     "(0.0, 0.9)", "1.2")
case("hyperparameter-init-string", lambda: Hyperparameter("dropout", "0.1", 0.0, 0.9), TypeError, "init", "float",
     "str")
case("hyperparameter-name-empty", lambda: Hyperparameter("", 0.1, 0.0, 0.9), TypeError, "name", "non-empty str",
     "''")
case("hyperparameter-transform", lambda: Hyperparameter("d", 0.1, 0.0, 0.9, transform="logit"), ValueError,
     "transform", "'sigmoid'", "'logit'")
case("hyperparameter-transform-range", lambda: Hyperparameter("d", 0.1, 0.0, 0.9, transform="softplus"), ValueError,
     "transform", "'sigmoid'", "'softplus'")
case("hyperparameter-scale-zero", lambda: Hyperparameter("d", 0.1, 0.0, 0.9, scale=0.0), ValueError, "scale", "> 0",
     "0.0")
case("hyperparameter-discrete-init", lambda: Hyperparameter("holes", 1.5, 0, 4, discrete=True), ValueError, "init",
     "integer", "1.5")
case("hyperparameter-per-example-string", lambda: Hyperparameter("d", 0.1, 0.0, 0.9, per_example="False"), TypeError,
     "per_example", "bool", "'False'")
case("hyperparameter-discrete-string", lambda: Hyperparameter("d", 1, 0, 4, discrete="yes"), TypeError, "discrete",
     "bool", "'yes'")
case("set-one-hyperparameter-not-a-list", lambda: HyperparameterSet(Hyperparameter("d", 0.1, 0.0, 0.9)), TypeError,
     "hyperparameters", "iterable of Hyperparameter", "a Hyperparameter")
case("set-names-not-hyperparameters", lambda: HyperparameterSet(["dropout"]), TypeError, "hyperparameters[0]",
     "Hyperparameter", "str")
case("set-empty", lambda: HyperparameterSet([]), ValueError, "hyperparameters", "at least one", "none")
case("set-duplicates", lambda: HyperparameterSet([Hyperparameter("d", 0.1, 0.0, 0.9)] * 2), ValueError,
     "hyperparameters", "unique names", "['d']")
case("set-dtype-int", lambda: HyperparameterSet([Hyperparameter("d", 0.1, 0.0, 0.9)], dtype=torch.int64), TypeError,
     "dtype", "floating-point", "torch.int64")
case("set-dtype-string", lambda: HyperparameterSet([Hyperparameter("d", 0.1, 0.0, 0.9)], dtype="float32"),
     TypeError, "dtype", "torch.dtype", "'float32'")
case("sample-batch-zero", lambda: hp_set().sample(0), ValueError, "batch_size", "int >= 1", "0")
case("sample-batch-tensor", lambda: hp_set().sample(torch.tensor(B)), ValueError, "batch_size", "int >= 1",
     "tensor")
case("sample-unknown-name", lambda: sample()["dropuot"], KeyError, "name", "('dropout',)", "'dropuot'")
case("perturb-noise-shape", lambda: hp_set().perturb(B, noise=torch.randn(B)), ValueError, "noise", f"({B}, 1)",
     f"({B},)")
case("perturb-noise-and-generator", lambda: hp_set().perturb(B, noise=torch.randn(B, 1),
                                                            generator=torch.Generator()),
     ValueError, "generator", "None when noise is given", "Generator")
case("set-values-unknown", lambda: hp_set().set_values(dropuot=0.2), KeyError, "name", "('dropout',)", "'dropuot'")
case("set-values-outside", lambda: hp_set().set_values(dropout=0.95), ValueError, "dropout", "(0.0, 0.9)", "0.95")
case("set-values-string", lambda: hp_set().set_values(dropout="0.2"), TypeError, "dropout", "number", "'0.2'")
case("set-values-discrete", lambda: HyperparameterSet([Hyperparameter("holes", 1, 0, 4, discrete=True)]).set_values(
    holes=2.5), ValueError, "holes", "integer in [0, 4]", "2.5")
case("set-scales-zero", lambda: hp_set().set_scales(dropout=0.0), ValueError, "dropout", "scale > 0", "0.0")
case("set-scales-string", lambda: hp_set().set_scales(dropout="1"), TypeError, "dropout", "number", "'1'")
case("constrain-columns", lambda: hp_set().constrain(torch.zeros(B, 2)), ValueError, "unconstrained", "[..., 1]",
     f"({B}, 2)")


# ----------------------------------------------------------------------------- augmentation

case("augment-arguments-swapped", lambda: stn.augment(sample("bright"), images()), TypeError, "images",
     "torch.Tensor", "HyperparameterSample")
case("augment-set-not-sample", lambda: stn.augment(images(), hp_set("bright")), TypeError, "sample",
     "HyperparameterSample", "HyperparameterSet")
case("augment-layer-input-not-sample", lambda: stn.augment(images(), lam(B, 1)), TypeError, "sample",
     "HyperparameterSample", "Tensor")
case("augment-sample-batch", lambda: stn.augment(images(B + 1), sample("bright")), ValueError, "sample",
     f"batch size {B + 1}", f"{B}")
case("augment-mean-only", lambda: stn.augment(images(), sample("bright"), mean=[0.5] * 3), ValueError, "mean, std",
     "both or neither", "only one")
case("augment-mean-channels", lambda: stn.augment(images(), sample("bright"), mean=[0.5, 0.5], std=[0.2] * 3),
     ValueError, "mean", "3 values", "2")
case("augment-std-zero", lambda: stn.augment(images(), sample("bright"), mean=[0.5] * 3, std=[0.2, 0.0, 0.2]),
     ValueError, "std", "nonzero", "[0.2, 0.0, 0.2]")
case("augment-names-string", lambda: stn.augment(images(), sample("bright"), names="bright"), TypeError, "names",
     "mapping", "{'brightness': 'bright'}", "str")
case("augment-names-key", lambda: stn.augment(images(), sample("bright"), names={"bright": "bright"}), ValueError,
     "names", "keys among", "['bright']")
case("augment-images-not-batched", lambda: stn.augment(images()[0], sample("bright")), ValueError, "images",
     "[B, C, H, W]", "(3, 6, 6)")
case("augment-images-list", lambda: stn_kernels.augment_images([images()], brightness=0.2), TypeError, "images",
     "torch.Tensor", "list")
case("augment-images-int64", lambda: stn_kernels.augment_images(images().long(), brightness=0.2), TypeError,
     "images", "uint8", "torch.int64")
case("augment-brightness-negative", lambda: stn_kernels.augment_images(images(), brightness=-0.1), ValueError,
     "brightness", "[0.0, inf]", "-0.1")
case("augment-brightness-rows", lambda: stn_kernels.augment_images(images(), brightness=torch.rand(B + 1)),
     ValueError, "brightness", f"[{B}]", f"({B + 1},)")
case("augment-brightness-bool", lambda: stn_kernels.augment_images(images(), brightness=torch.ones(B, dtype=bool)),
     TypeError, "brightness", "real tensor", "torch.bool")
case("augment-seed-negative", lambda: stn_kernels.augment_images(images(), brightness=0.2, seed=-1), ValueError,
     "seed", "[0, 2**63 - 1]", "-1")
case("augment-seed-float-tensor", lambda: stn_kernels.augment_images(images(), brightness=0.2,
                                                                     seed=torch.tensor(1.0)),
     TypeError, "seed", "int64", "torch.float32")
case("augment-seed-and-generator", lambda: stn_kernels.augment_images(images(), brightness=0.2, seed=1,
                                                                      generator=torch.Generator()),
     ValueError, "generator", "None when seed is given", "Generator")
case("augment-offset-negative", lambda: stn_kernels.augment_images(images(), brightness=0.2, offset=-1), ValueError,
     "offset", "int >= 0", "-1")
case("augment-random-order", lambda: stn_kernels.augment_images(images(), brightness=0.2, random_order="no"),
     TypeError, "random_order", "bool", "str")
case("color-jitter-hue", lambda: stn_kernels.color_jitter(images(), hue=0.7), ValueError, "hue", "[0.0, 0.5]",
     "0.7")
case("color-jitter-one-channel", lambda: stn_kernels.color_jitter(images(c=1), saturation=0.3), ValueError, "images",
     "3 channels", "(2, 1, 6, 6)")
case("color-jitter-string", lambda: stn_kernels.color_jitter(images(), brightness="0.2"), TypeError, "brightness",
     "number", "str")
case("cutout-length-negative", lambda: stn_kernels.cutout(images(), 1, -2), ValueError, "length", "[0.0, inf]",
     "-2")
case("cutout-holes-over-max", lambda: stn_kernels.cutout(images(), torch.full((B,), 3.0), 2, max_holes=1),
     ValueError, "holes", "max_holes = 1", "3")
case("cutout-max-holes", lambda: stn_kernels.cutout(images(), 1, 2, max_holes=100), ValueError, "max_holes",
     "int in [0,", "100")
case("input-scale-negative", lambda: stn_kernels.input_scale(images(), -0.5), ValueError, "strength", "[0.0, inf]",
     "-0.5")
case("input-scale-rows", lambda: stn_kernels.input_scale(images(), torch.rand(B + 1)), ValueError, "strength",
     f"[{B}]", f"({B + 1},)")
case("affine-rotation", lambda: stn_kernels.affine(images(), rotation=200.0), ValueError, "rotation", "[0.0, 180.0]",
     "200.0")
case("affine-scale", lambda: stn_kernels.affine(images(), scale=1.0), ValueError, "scale", "[0.0, 0.99]", "1.0")
case("affine-interpolation", lambda: stn_kernels.affine(images(), rotation=10.0, interpolation="bicubic"),
     ValueError, "interpolation", "'nearest'", "'bicubic'")
case("dropout-rate-one", lambda: stn_kernels.per_example_dropout(torch.randn(B, K), 1.0), ValueError, "rates",
     "[0, 1)", "1.0")
case("dropout-rates-rows", lambda: stn_kernels.per_example_dropout(torch.randn(B, K), torch.rand(B + 1)), ValueError,
     "rates", f"[{B}]", f"({B + 1},)")
case("dropout-rates-list", lambda: stn_kernels.per_example_dropout(torch.randn(B, K), [0.1, 0.2]), TypeError, "rates",
     "torch.Tensor", "list")
case("dropout-rates-nan", lambda: stn_kernels.per_example_dropout(torch.randn(B, K), torch.tensor([0.1, float("nan")])),
     ValueError, "rates", "[0, 1)", "nan")
case("dropout-x-int", lambda: stn_kernels.per_example_dropout(torch.ones(B, K, dtype=torch.long), 0.1), TypeError, "x",
     "floating-point", "torch.int64")
case("dropout-arguments-swapped", lambda: stn.per_example_dropout(torch.rand(B), torch.randn(B, K)), ValueError,
     "rates", f"[{B}]", f"({B}, {K})")
case("channel-dropout-1d", lambda: stn_kernels.per_example_channel_dropout(torch.randn(B), 0.1), ValueError, "x",
     "[B, C, ...]", f"({B},)")
case("tuned-dropout-no-hparam", lambda: stn_kernels.TunedDropout(0.1), TypeError, "hparam", "missing",
     "TunedDropout(0.1, hparam=")
case("tuned-dropout-name-as-p", lambda: stn_kernels.TunedDropout("dropout"), TypeError, "p", "probability",
     "'dropout'", "hparam='dropout'")
case("tuned-dropout-name-as-inplace", lambda: stn_kernels.TunedDropout(0.1, "dropout"), TypeError, "inplace", "bool",
     "'dropout'", "hparam='dropout'")
case("tuned-dropout-p", lambda: stn_kernels.TunedDropout(1.5, hparam="dropout"), ValueError, "p", "[0, 1]", "1.5")
case("tuned-dropout-hparam-empty", lambda: stn_kernels.TunedDropout(0.1, hparam=""), TypeError, "hparam",
     "non-empty str", "''")
case("tuned-dropout-rate-rows", lambda: run_in_block(stn_kernels.TunedDropout(0.1, hparam="d"), torch.randn(B, K),
                                                     lam(H), rates={"d": torch.rand(B + 1)}),
     ValueError, "rates['d']", f"expected {B} rows", f"({B + 1},)")
case("tuned-dropout2d-3d-input", lambda: run_in_block(stn_kernels.TunedDropout2d(0.1, hparam="d"),
                                                      torch.randn(B, 3, 4), lam(B, H), rates={"d": torch.rand(B)}),
     ValueError, "input", "4 dims", f"({B}, 3, 4)")
case("tuned-dropout-int-input", lambda: run_in_block(stn_kernels.TunedDropout(0.1, hparam="d"),
                                                     torch.ones(B, K, dtype=torch.long), lam(B, H),
                                                     rates={"d": torch.rand(B)}),
     TypeError, "input", "floating-point", "torch.int64")


# ----------------------------------------------------------------------------- HyperMultiheadAttention

def attention(**kwargs):
    torch.manual_seed(0)
    return HyperMultiheadAttention(4, 2, num_hparams=H, **kwargs)


def attend(module, q, k=None, v=None, **kwargs):
    k = q if k is None else k
    return module(q, k, q if v is None else v, **kwargs)


case("attention-nn-habit-no-H", lambda: HyperMultiheadAttention(4, 2), TypeError, "num_hparams", "missing",
     "num_hparams=H")
case("attention-heads", lambda: HyperMultiheadAttention(6, 4, num_hparams=H), ValueError, "num_heads",
     "divisor of embed_dim=6", "4")
case("attention-dropout", lambda: HyperMultiheadAttention(4, 2, 1.5, num_hparams=H), ValueError, "dropout", "[0, 1]",
     "1.5")
case("attention-published-H-as-dropout", lambda: HyperMultiheadAttention(4, 2, 0.0, H), TypeError, "bias", "bool",
     "int 3", "num_hparams=3")
case("attention-kdim", lambda: HyperMultiheadAttention(4, 2, kdim=0, num_hparams=H), ValueError, "kdim", "int >= 1",
     "0")
case("attention-hparams-width", lambda: attend(attention(), torch.randn(T, B, 4), hparams=lam(B, H + 1)), ValueError,
     "hparams", f"[N, {H}]", f"({B}, {H + 1})")
case("attention-hparams-time-major-rows", lambda: attend(attention(), torch.randn(T, B, 4), hparams=lam(T, H)),
     ValueError, "hparams", f"expected {B} rows", "batch_first=False", f"({T}, {H})")
case("attention-hparams-dtype", lambda: attend(attention(), torch.randn(T, B, 4),
                                               hparams=lam(B, H, dtype=torch.float64)),
     TypeError, "hparams", "torch.float32", "torch.float64")
case("attention-query-4d", lambda: attend(attention(), torch.randn(1, T, B, 4)), ValueError, "query", "[L, N, E]",
     f"(1, {T}, {B}, 4)")
case("attention-key-features", lambda: attend(attention(), torch.randn(T, B, 4), torch.randn(T, B, 3)), ValueError,
     "key", "4 features", f"({T}, {B}, 3)")
case("attention-key-batch", lambda: attend(attention(batch_first=True), torch.randn(B, T, 4), torch.randn(B + 1, T, 4)),
     ValueError, "key, value", f"batch size of query ({B}", f"({B + 1}, {T}, 4)")
case("attention-query-dtype", lambda: attend(attention(), torch.randn(T, B, 4, dtype=torch.float64)), TypeError,
     "query", "torch.float32", "torch.float64")
case("attention-padding-mask-shape", lambda: attend(attention(), torch.randn(T, B, 4),
                                                    key_padding_mask=torch.zeros(T, B, dtype=torch.bool)),
     ValueError, "key_padding_mask", f"({B}, {T})", f"({T}, {B})")
case("attention-mask-int", lambda: attend(attention(), torch.randn(T, B, 4), attn_mask=torch.zeros(T, T,
                                                                                                     dtype=torch.long)),
     TypeError, "attn_mask", "bool or floating-point", "torch.int64")
case("attention-causal-without-mask", lambda: attend(attention(), torch.randn(T, B, 4), is_causal=True), ValueError,
     "is_causal", "attn_mask", "None")


# ----------------------------------------------------------------------------- layer constructors (nn-style misuse)

case("linear-float-features", lambda: HyperLinear(8.0, 5, num_hparams=H), TypeError, "in_features", "int >= 1",
     "float 8.0")
case("linear-bias-string", lambda: HyperLinear(8, 5, "no", num_hparams=H), TypeError, "bias", "bool", "str 'no'")
case("conv-kernel-zero", lambda: HyperConv2d(3, 6, 0, num_hparams=H), ValueError, "kernel_size", "int >= 1", "0")
case("conv-groups", lambda: HyperConv2d(3, 6, 3, groups=2, num_hparams=H), ValueError, "groups",
     "in_channels=3", "2")
case("embedding-H-zero", lambda: HyperEmbedding(10, 4, num_hparams=0), ValueError, "num_hparams", "int >= 1", "0")
case("lstm-layers-zero", lambda: HyperLSTM(4, 3, 0, num_hparams=H), ValueError, "num_layers", "int >= 1", "0")
case("lstm-dropconnect", lambda: HyperLSTM(4, 3, 2, dropconnect=1.5, num_hparams=H), ValueError, "dropconnect",
     "[0, 1)", "1.5")


# ----------------------------------------------------------------------------- the checks

@pytest.mark.parametrize("key", list(CASES))
def test_bad_input_names_the_argument(key):
    bad = CASES[key]
    with pytest.raises(bad.exc) as excinfo:
        bad.call()
    error = excinfo.value
    message = str(error.args[0]) if isinstance(error, KeyError) else str(error)
    assert re.match(rf"{re.escape(bad.name)}( \([^)]*\))?: ", message), \
        f"expected the message to name {bad.name!r} first, got: {message}"
    assert not INTERNAL.search(message), f"internal name in: {message}"
    for fragment in bad.fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_at_least_100_cases_across_the_areas():
    per_area = Counter(key.split("/")[0] for key in CASES)
    assert len(CASES) >= 100 and set(per_area) == set(AREAS.values()), per_area
    assert min(per_area.values()) >= 5, per_area


# ----------------------------------------------------------------------------- the benchmark's command line

@pytest.mark.parametrize("argv, option, fragment", [
    (["--threads", "-3"], "--threads", "'-3'"),
    (["--threads", "0"], "--threads", "'0'"),
    (["--threads", "two"], "--threads", "'two'"),
    (["--layer", "gru"], "--layer", "'gru'"),
])
def test_bench_command_line_names_the_option(argv, option, fragment, capsys):
    from stn_kernels.bench.cli import parse_args

    with pytest.raises(SystemExit) as excinfo:
        parse_args(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and fragment in err and "Traceback" not in err, err


def test_a_model_output_that_is_not_a_tensor_steps():
    """Not a bad input: a model_fn returning ``(output, hidden)`` (an RNN's habit) with a criterion that reads
    ``out[0]`` steps, and each StepResult holds the pair detached (said ``'tuple' object has no attribute
    'detach'``); its repr shows shapes, not tensors."""
    def model_fn(x, sample):
        return _fn(x, sample), {"hidden": x}

    t = trainer(model_fn=model_fn, criterion=lambda out, y: F.mse_loss(out[0], y), train_steps=1)
    results = t.step(_batch, _batch)
    assert [r.kind for r in results] == ["train", "valid"]
    for result in results:
        output, extra = result.output
        assert not output.requires_grad and output.shape == (B, 1) and extra["hidden"].shape == (B, K)
        assert repr(result).endswith(f"output=(Tensor(shape=({B}, 1), dtype=torch.float32), "
                                     f"{{'hidden': Tensor(shape=({B}, {K}), dtype=torch.float32)}}))")
