"""STNTrainer owning the model (issue 19): the call conventions and their errors, train/eval mode around every
step (validation steps leave batch-norm statistics alone and run without dropout), the warning for a function
that hides its module, batch_dim for time-major inputs, frozen parameters (lockstep against a plain
``loss.backward(); opt.step()`` loop), tuned_layer_input, StepResult's repr and the batch errors."""

import copy
import functools
import math
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_kernels
from stn_kernels import stn
from stn_kernels.hparams_context import current_batch_dim, current_hparams, current_rate, hparams_rows
from stn_kernels.stn import Hyperparameter, HyperparameterSet

from _naive import assert_close_rel, naive_hyper_embedding, naive_hyper_linear, no_warnings
from _published import OfficialHyperLinear

F64 = torch.float64
H = 2
B = 6


def _hparams():
    return HyperparameterSet([Hyperparameter("dropout", 0.3, 0.0, 0.9, scale=0.4),
                              Hyperparameter("noise", 0.2, 0.0, scale=0.6)], dtype=F64)


def _visible(model):
    """A hyper path that changes the output (convert starts V and C at zero)."""
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "context_hparams", False):
                m.hparam_weight.normal_(0.0, 0.5)
    return model


def _converted(*layers):
    with no_warnings():
        return _visible(stn_kernels.convert(nn.Sequential(*layers).double(), num_hparams=H))


def _mlp_bn():
    return _converted(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Dropout(0.5), nn.Linear(7, 3))


def _cnn_bn():
    return _converted(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                      nn.Linear(4 * 5 * 5, 3))


def _sgd(params, lr=0.1):
    return torch.optim.SGD(params, lr=lr)


def _trainer(model_fn, hp, params, **kwargs):
    return stn.STNTrainer(model_fn, F.cross_entropy, hp, _sgd(params), hparam_optimizer=_sgd([hp.unconstrained]),
                          scale_optimizer=_sgd([hp.raw_scale]), generator=torch.Generator().manual_seed(5), **kwargs)


def _run_in_block(model):
    def model_fn(x, sample):
        with sample.hparams():
            return model(x)
    return model_fn


# --------------------------------------------------------------------------- train/eval around every step


def _modes_seen(model):
    """(training flag of every dropout and batch norm) at each of their calls."""
    seen = []
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)):
            m.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    return seen


@pytest.mark.parametrize("make, shape", [(_mlp_bn, (B, 5)), (_cnn_bn, (B, 2, 5, 5))], ids=["bn1d", "bn2d"])
@pytest.mark.parametrize("given", ["module", "function_and_module"])
def test_validation_steps_run_in_eval_mode_and_training_steps_in_train_mode(make, shape, given):
    torch.manual_seed(0)
    model, hp = make(), _hparams()
    x, y = torch.randn(shape, dtype=F64), torch.randint(0, 3, (B,))
    model_fn, extra = (model, {}) if given == "module" else (_run_in_block(model), {"module": model})
    trainer = _trainer(model_fn, hp, model.parameters(), tune_scales=False, **extra)
    reference = copy.deepcopy(model)   # the same model called by hand (copied before the hooks below)
    seen = _modes_seen(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    assert buffers["1.num_batches_tracked"] == 0

    # Validation at λ itself (tune_scales=False): the output is the eval-mode model's, and no buffer moves.
    with torch.no_grad(), stn_kernels.hparams(hp.unconstrained.detach().expand(B, H)):
        expected = copy.deepcopy(reference).eval()(x)
        # train mode would show (dropout, batch statistics)
        assert not torch.allclose(copy.deepcopy(reference).train()(x), expected)
    model.train()
    model[1].eval()   # a batch norm the user keeps in eval mode: back in eval mode after every step
    result = trainer.valid_step(x, y)
    assert_close_rel(result.output, expected, F64, "validation output")
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name                     # running_mean, running_var, num_batches_tracked
    assert seen == [False, False]
    assert model.training and not model[1].training and model[3].training

    # Training step: train mode (dropout on, batch statistics, running statistics updated), as the same model
    # called by hand in train mode from the same random state.
    reference.train()
    epsilon = torch.randn(B, H, dtype=F64, generator=torch.Generator().manual_seed(5))
    rng = torch.get_rng_state()
    (result,) = trainer.train_step(x, y)
    torch.set_rng_state(rng)
    lam = (hp.unconstrained + hp.scale * epsilon).detach()   # λ did not move in a training step
    with torch.no_grad(), stn_kernels.hparams(lam):
        expected = reference(x)
    assert_close_rel(result.output, expected, F64, "training output")
    assert seen[2:] == [True, True]
    assert model[1].num_batches_tracked == 1 and not torch.equal(model[1].running_mean, buffers["1.running_mean"])
    assert_close_rel(model[1].running_mean, reference[1].running_mean, F64, "running_mean")
    assert model.training and not model[1].training and model[3].training


def test_the_trainer_leaves_an_eval_mode_model_in_eval_mode():
    model, hp = _mlp_bn(), _hparams()
    x, y = torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,))
    trainer = _trainer(model, hp, model.parameters())
    model.eval()
    seen = _modes_seen(model)
    trainer.step(lambda: (x, y), lambda: (x, y))
    assert seen == [True, True, True, True, False, False]   # 2 training steps, 1 validation step
    assert not any(m.training for m in model.modules())


class _RateProbe(nn.Module):
    """Records the λ, batch dimension and rates of the hparams block it runs in (what a tuned dropout reads)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        rates = {name: current_rate(name) for name in ("dropout", "noise", "other")}
        self.seen.append((current_hparams().detach().clone(), current_batch_dim(-1), rates))
        return x


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta_stn"])
def test_the_block_carries_lambda_and_the_per_example_rates_in_training_steps_only(delta):
    torch.manual_seed(0)
    hp = _hparams()
    probe = _RateProbe()
    model = nn.Sequential(_converted(nn.Linear(5, 3)), probe)
    general, response = stn.split_stn_parameters(model)
    extra = dict(delta_stn=True, response_optimizer=_sgd(response)) if delta else {}
    trainer = _trainer(model, hp, general if delta else model.parameters(), **extra)
    x, y = torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,))
    epsilon = torch.randn(B, H, dtype=F64, generator=torch.Generator().manual_seed(5))
    lam = (hp.unconstrained + hp.scale * epsilon).detach()
    trainer.train_step(x, y)
    # The constrained values of λ_b by name: 0.9·sigmoid(u) for the dropout, softplus(u) for the noise.
    expected = {"dropout": 0.9 / (1 + torch.exp(-lam[:, 0])), "noise": torch.log1p(torch.exp(lam[:, 1]))}
    steps = probe.seen
    if delta:   # the general step at λ itself (centred input 0, rates at λ), then the response step at λ_b
        (lam_in, dim, rates), steps = steps[0], steps[1:]
        assert torch.equal(lam_in, torch.zeros(B, H, dtype=F64)) and dim == 0
        at_lambda = hp.constrain(hp.unconstrained.detach().expand(B, H))
        torch.testing.assert_close(rates["dropout"], at_lambda[:, 0], rtol=1e-13, atol=0)
    ((lam_in, dim, rates),) = steps
    torch.testing.assert_close(lam_in, lam - hp.unconstrained.detach() if delta else lam, rtol=1e-13, atol=1e-15)
    assert dim == 0 and rates["other"] is None
    for name, want in expected.items():
        torch.testing.assert_close(rates[name], want, rtol=1e-13, atol=0)
    probe.seen.clear()
    trainer.valid_step(x, y)
    ((_, _, rates),) = probe.seen
    assert rates == {"dropout": None, "noise": None, "other": None}   # regularisers off: no rates


# --------------------------------------------------------------------------- a function that hides its module


class _Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def run(self, x, sample):
        with sample.hparams():
            return self.model(x)


def _call_in_block(model, x, sample):
    with sample.hparams():
        return model(x)


_GLOBAL_MODEL = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))


def _uses_global_model(x, sample):
    return _GLOBAL_MODEL(x)


def _hiding(model):
    """model_fn that use a module the trainer is not given, each a different way to hide it."""
    return {
        "lambda": lambda x, sample: _call_in_block(model, x, sample),
        "closure": _run_in_block(model),
        "partial": functools.partial(_call_in_block, model),
        "bound_method": _Wrapper(model).run,
        "global": _uses_global_model,
        "helper_through_global_function": lambda x, sample: _uses_global_model(x, sample),
    }


@pytest.mark.parametrize("how", sorted(_hiding(None)))
def test_a_function_hiding_its_module_gets_one_warning_that_names_the_fix(how):
    model, hp = _mlp_bn(), _hparams()
    model_fn = _hiding(model)[how]
    x, y = torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(model_fn, hp, model.parameters())
        if how not in ("global", "helper_through_global_function"):
            trainer.step(lambda: (x, y), lambda: (x, y))
            trainer.step(lambda: (x, y), lambda: (x, y))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert caught[0].filename == __file__   # it points at the user's STNTrainer(...) line
    assert "module=" in messages[0] and "Pass the module itself" in messages[0]
    assert ("Sequential" if how != "bound_method" else "_Wrapper") in messages[0]
    # Named, the same function gets no warning, and the trainer switches the module's mode.
    with no_warnings():
        named = _trainer(model_fn, hp, model.parameters(), module=model if how != "global" else _GLOBAL_MODEL)
    assert named.module is not None


def test_no_warning_for_a_module_or_a_function_without_one():
    model, hp = _mlp_bn(), _hparams()
    weight = torch.randn(5, 3, dtype=F64, requires_grad=True)
    mix = torch.randn(H, 3, dtype=F64, requires_grad=True)
    loss = nn.CrossEntropyLoss()
    with no_warnings():
        _trainer(model, hp, model.parameters())
        _trainer(_run_in_block(model), hp, model.parameters(), module=model)
        trainer = _trainer(lambda x, sample: loss(x @ weight + sample.layer_input @ mix, x.argmax(1)), hp, [weight])
    assert trainer.module is None


# --------------------------------------------------------------------------- the call conventions


class _InputsOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = stn_kernels.convert(nn.Linear(5, 3).double(), num_hparams=H)
        self.calls = []

    def forward(self, x):
        self.calls.append((current_hparams() is not None,))
        return self.fc(x)


class _WithSample(_InputsOnly):
    def forward(self, x, sample):
        self.calls.append((current_hparams() is not None, isinstance(sample, stn.HyperparameterSample)))
        return self.fc(x, sample.layer_input)


class _OptionalSample(_WithSample):
    def forward(self, x, sample=None):
        return super().forward(x, sample)


class _AnnotatedSample(_WithSample):
    def forward(self, x, hp: "stn.HyperparameterSample" = None):
        return super().forward(x, hp)


class _OptionalHidden(_InputsOnly):
    def forward(self, x, hidden=None):
        return super().forward(x)


class _AnyArguments(_InputsOnly):
    def forward(self, *args):
        if len(args) == 2:
            return _WithSample.forward(self, *args)
        return _InputsOnly.forward(self, *args)


class _ExtraArguments(_InputsOnly):
    def forward(self, x, *rest):
        return _AnyArguments.forward(self, x, *rest)


@pytest.mark.parametrize("make, takes_sample", [
    (_InputsOnly, False), (_WithSample, True), (_OptionalSample, True), (_AnnotatedSample, True),
    (_OptionalHidden, False), (_AnyArguments, True), (_ExtraArguments, True),
    (lambda: torch.compile(_InputsOnly()), False), (lambda: torch.compile(_WithSample()), True),
])
def test_the_call_convention_is_read_from_the_signature(make, takes_sample):
    model, hp = make(), _hparams()
    inner = getattr(model, "_orig_mod", model)
    trainer = _trainer(model, hp, model.parameters())
    assert trainer.takes_sample is takes_sample
    if not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):   # no compilation here
        trainer.train_step(torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,)))
        # model(inputs) runs inside the hparams block; model_fn(inputs, sample) gets the sample and no block
        assert inner.calls == ([(False, True)] if takes_sample else [(True,)])


def test_functions_follow_the_same_rules_and_takes_sample_overrides():
    hp = _hparams()
    model = _InputsOnly()
    assert _trainer(lambda x: model(x), hp, model.parameters(), module=model).takes_sample is False
    assert _trainer(lambda x, sample: model(x), hp, model.parameters(), module=model).takes_sample is True
    # *args keeps the (inputs, sample) call the trainer always made; takes_sample=False states model(inputs).
    model = _ExtraArguments()
    trainer = _trainer(model, hp, model.parameters(), takes_sample=False)
    trainer.train_step(torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,)))
    assert trainer.takes_sample is False and model.calls == [(True,)]


class _ThreeInputs(nn.Module):
    def forward(self, x, mask, sample):
        return x


class _KeywordOnly(nn.Module):
    def forward(self, x, *, sample):
        return x


@pytest.mark.parametrize("model_fn, kwargs, error, words", [
    (_WithSample(), {"takes_sample": False}, ValueError,
     "takes_sample: False calls model_fn(inputs) inside stn_kernels.hparams(...), but _WithSample.forward(x, sample) "
     "requires 2 positional arguments"),
    (_InputsOnly(), {"takes_sample": True}, ValueError,
     "takes_sample: True calls model_fn(inputs, sample), but _InputsOnly.forward(x) takes at most 1 positional"),
    (_InputsOnly(), {"takes_sample": "yes"}, TypeError, "takes_sample: expected None"),
    (_ThreeInputs(), {}, TypeError, "model_fn: expected a model taking (inputs) or (inputs, sample), got "
                                    "_ThreeInputs.forward(x, mask, sample)"),
    (_KeywordOnly(), {}, TypeError, "requires the keyword argument(s) ['sample']"),
    (_InputsOnly(), {"module": lambda x: x}, TypeError, "module: expected the nn.Module whose train/eval mode"),
    (_InputsOnly(), {"batch_dim": 2}, ValueError, "batch_dim: expected None, 0 or 1"),
    (_InputsOnly(), {"batch_dim": True}, ValueError, "batch_dim: expected None, 0 or 1"),
    (42, {}, TypeError, "model_fn: expected an nn.Module or a callable"),
])
def test_bad_call_arguments_name_themselves(model_fn, kwargs, error, words):
    hp = _hparams()
    with pytest.raises(error, match=re.escape(words)):
        stn.STNTrainer(model_fn, F.cross_entropy, hp, _sgd([hp.unconstrained]), **kwargs)


def test_a_model_called_with_the_inputs_that_no_layer_reads_lambda_from_gets_a_warning():
    model, hp = nn.Sequential(nn.Linear(5, 3)), _hparams()
    with pytest.warns(UserWarning, match=r"no layer of Sequential takes λ from that block"):
        _trainer(model, hp, model.parameters())


# --------------------------------------------------------------------------- batch_dim: time-major inputs

VOCAB, EMBED = 7, 4


class _TimeMajorLM(nn.Module):
    """tokens [T, B] → converted nn.Embedding [T, B, E] → converted nn.Linear decoder [T, B, V]. The layers get λ
    from the hparams block laid out along the block's batch dimension (what ``convert(..., batch_first=False)``
    makes its layers do), here by hand: the embedding's ``batch_dim``, the decoder's rows by ``hparams_rows``."""

    def __init__(self):
        super().__init__()
        with no_warnings():
            self.embed = _visible(stn_kernels.convert(nn.Embedding(VOCAB, EMBED).double(), num_hparams=H))
            self.decoder = _visible(stn_kernels.convert(nn.Linear(EMBED, VOCAB).double(), num_hparams=H))

    def forward(self, tokens):
        lam, dim = current_hparams(), current_batch_dim(0)
        h = self.embed(tokens, lam, batch_dim=dim)
        rows = hparams_rows(lam, h, dim, 3, "decoder")
        return self.decoder(h.flatten(0, 1), rows).view(*h.shape[:2], VOCAB)


def _naive_time_major(model, tokens, lam):
    """The same LM written out batch-major from the layer formulas, λ row b for the tokens of column b."""
    e, d = model.embed, model.decoder
    h = naive_hyper_embedding(tokens.T, lam, e.weight, e.hyper_weight, e.hparam_weight)
    n = d.weight.shape[0]
    out = naive_hyper_linear(h, lam, d.weight, d.hyper_weight, d.bias, d.hyper_bias, d.hparam_weight[:n],
                             d.hparam_weight[n:])
    return out.transpose(0, 1)


def _lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


@pytest.mark.parametrize("steps, batch", [(4, 3), (3, 3)], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("stated", ["trainer", "layers"])
def test_time_major_inputs_with_batch_dim(steps, batch, stated):
    torch.manual_seed(0)
    model, hp = _TimeMajorLM(), _hparams()
    tokens = torch.randint(0, VOCAB, (steps + 1, batch))
    inputs, targets = tokens[:-1], tokens[1:].reshape(-1)          # targets flattened [T·B]: not the batch size
    if stated == "layers":   # as convert(..., batch_first=False) states it on the layers it makes
        model.embed.hparams_batch_dim = model.decoder.hparams_batch_dim = 1
        extra = {}
    else:
        extra = {"batch_dim": 1}
    trainer = stn.STNTrainer(model, _lm_loss, hp, _sgd(model.parameters()), generator=torch.Generator().manual_seed(5),
                             tune_scales=False, **extra)
    assert trainer.batch_dim == 1
    epsilon = torch.randn(batch, H, dtype=F64, generator=torch.Generator().manual_seed(5))
    lam = (hp.unconstrained + hp.scale * epsilon).detach()
    expected = _naive_time_major(model, inputs, lam).detach()
    (result,) = trainer.train_step(inputs, targets)
    assert_close_rel(result.output, expected, F64, "training output")
    # The validation step at λ itself, one row per example along dim 1.
    expected = _naive_time_major(model, inputs, hp.unconstrained.detach().expand(batch, H)).detach()
    assert_close_rel(trainer.valid_step(inputs, targets).output, expected, F64, "validation output")


def test_batch_dim_errors_name_the_argument():
    model, hp = _TimeMajorLM(), _hparams()
    model.embed.hparams_batch_dim = 1
    with pytest.raises(ValueError, match=r"batch_dim: the converted layers of the model state different batch dims "
                                         r"\(0: decoder; 1: embed\); pass batch_dim=0 or 1"):
        stn.STNTrainer(model, _lm_loss, hp, _sgd(model.parameters()))
    trainer = stn.STNTrainer(model, _lm_loss, hp, _sgd(model.parameters()), batch_dim=1)
    with pytest.raises(ValueError, match=re.escape("inputs: expected a tensor with the examples along dim 1 "
                                                   "(batch_dim=1), got Tensor of shape (5,)")):
        trainer.train_step(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))


# --------------------------------------------------------------------------- frozen parameters


def _lockstep_mlp():
    return _converted(nn.Linear(5, 7), nn.ReLU(), nn.Dropout(0.3), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))


class _PublishedNet(nn.Module):
    """Two official CNN-code linear layers (``elem_scalar`` a: out = a·(W x + b) + ...), converted; called with
    the sample."""

    def __init__(self):
        super().__init__()
        self.fc1 = OfficialHyperLinear(5, 7, H, elem_scalar=1.3)
        self.fc2 = OfficialHyperLinear(7, 3, H, elem_scalar=0.8)

    def forward(self, x, sample):
        return self.fc2(torch.relu(self.fc1(x, sample.layer_input)), sample.layer_input)


def _published_net():
    with no_warnings():
        net = stn_kernels.convert(_PublishedNet())
    assert isinstance(net.fc1, stn_kernels.HyperLinear) and net.fc1.elem_scalar is not None
    return net


def _freeze_layer(model):
    model[0].requires_grad_(False)


def _freeze_parts(model):
    for p in (model[0].hparam_weight, model[3].bias, model[5].hyper_weight, model[5].weight):
        p.requires_grad_(False)


def _freeze_elem_scalars(model):
    model.fc1.elem_scalar.requires_grad_(False)
    model.fc2.elem_scalar.requires_grad_(False)


FROZEN = {"frozen_layer": (_lockstep_mlp, _freeze_layer), "part_of_a_converted_model": (_lockstep_mlp, _freeze_parts),
          "frozen_elem_scalar": (_published_net, _freeze_elem_scalars)}


def _forward(model, x, layer_input):
    """The model at ``layer_input``, written by hand: inside the hparams block, or given λ through the sample."""
    if isinstance(model, _PublishedNet):
        return model(x, SimpleNamespace(layer_input=layer_input))
    with stn_kernels.hparams(layer_input):
        return model(x)


def _optimizers(model, hp, delta):
    def sgd(params):
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)  # a zero gradient would move
    weights = list(stn.split_stn_parameters(model)) if delta else [list(model.parameters())]
    return [sgd(p) for p in weights], _sgd([hp.unconstrained], 0.05), _sgd([hp.raw_scale], 0.05)


def _hand_cycle(model, hp, optimizers, batches, delta, generator, tau):
    """Two training steps and one validation step as a plain loop: ``loss.backward(); opt.step()``."""
    weights, hparam_opt, scale_opt = optimizers
    for x, y in batches[:2]:
        model.train()
        lam = (hp.unconstrained + hp.scale * torch.randn(B, H, dtype=F64, generator=generator)).detach()
        if delta:
            general, response = weights
            general.zero_grad()
            F.cross_entropy(_forward(model, x, torch.zeros_like(lam)), y).backward()
            general.step()
            response.zero_grad()
            F.cross_entropy(_forward(model, x, lam - hp.unconstrained.detach()), y).backward()
            response.step()
        else:
            weights[0].zero_grad()
            F.cross_entropy(_forward(model, x, lam), y).backward()
            weights[0].step()
    model.eval()
    x, y = batches[2]
    lam = hp.unconstrained + hp.scale * torch.randn(B, H, dtype=F64, generator=generator)
    entropy = torch.log(hp.scale).sum() + H * 0.5 * math.log(2 * math.pi * math.e)
    layer_input = lam - hp.unconstrained.detach() if delta else lam
    objective = F.cross_entropy(_forward(model, x, layer_input), y) - tau * entropy
    hparam_opt.zero_grad()
    scale_opt.zero_grad()
    objective.backward()
    hparam_opt.step()
    scale_opt.step()


def _state(model, hp):
    return [p.detach().clone() for p in model.parameters()] + [hp.unconstrained.detach().clone(),
                                                                 hp.raw_scale.detach().clone()]


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta_stn"])
@pytest.mark.parametrize("scenario", sorted(FROZEN))
def test_frozen_parameters_train_as_a_plain_loop_does(scenario, delta):
    # In one process the trainer differentiates the optimizer's parameters only; under torch.distributed it
    # differentiates every parameter (DDP's hooks): both paths, here in one process.
    for restrict in (True, False):
        _frozen_lockstep(scenario, delta, restrict)


def _frozen_lockstep(scenario, delta, restrict):
    make, freeze = FROZEN[scenario]
    torch.manual_seed(0)
    model, hp = make(), _hparams()
    freeze(model)
    hand_model, hand_hp = copy.deepcopy(model), copy.deepcopy(hp)
    frozen = [not p.requires_grad for p in model.parameters()]
    assert any(frozen) and not all(frozen)
    weights, hparam_opt, scale_opt = _optimizers(model, hp, delta)
    hand_optimizers = _optimizers(hand_model, hand_hp, delta)
    tau = 1e-2
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, weights[0], response_optimizer=weights[1] if delta else None,
                             hparam_optimizer=hparam_opt, scale_optimizer=scale_opt, delta_stn=delta,
                             entropy_weight=tau, generator=torch.Generator().manual_seed(5))
    trainer._restrict_backward = restrict
    hand_generator = torch.Generator().manual_seed(5)
    initial = _state(model, hp)
    for cycle in range(3):
        batches = [(torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,))) for _ in range(3)]
        rng = torch.get_rng_state()
        trainer.step(functools.partial(next, iter(batches[:2])), lambda: batches[2])
        after = torch.get_rng_state()
        torch.set_rng_state(rng)
        _hand_cycle(hand_model, hand_hp, hand_optimizers, batches, delta, hand_generator, tau)
        assert torch.equal(torch.get_rng_state(), after), f"cycle {cycle}: another number of random draws"
        for i, (got, want) in enumerate(zip(_state(model, hp), _state(hand_model, hand_hp), strict=True)):
            assert_close_rel(got, want, F64, f"restrict={restrict}, cycle {cycle}, tensor {i}")
    for i, (now, then) in enumerate(zip(_state(model, hp), initial)):
        is_frozen = i < len(frozen) and frozen[i]
        assert torch.equal(now, then) == is_frozen, f"restrict={restrict}, tensor {i}: frozen {is_frozen}"


@pytest.mark.parametrize("restrict", [True, False], ids=["one_process", "distributed_backward"])
@pytest.mark.parametrize("variant", ["stn", "delta_stn", "delta_stn_linearized"])
def test_an_optimizer_whose_parameters_are_all_frozen_does_not_crash(variant, restrict):
    model, hp = _lockstep_mlp(), _hparams()
    general, response = stn.split_stn_parameters(model)
    for p in general:
        p.requires_grad_(False)
    if variant == "stn":
        model.requires_grad_(False)
    weights, _, _ = _optimizers(model, hp, variant != "stn")
    extra = {} if variant == "stn" else dict(delta_stn=True, response_optimizer=weights[1],
                                             linearize=variant == "delta_stn_linearized")
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, weights[0], **extra)
    trainer._restrict_backward = restrict
    before = _state(model, hp)
    x, y = torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,))
    for _ in range(2):
        trainer.step(lambda: (x, y), lambda: (x, y))
    after = _state(model, hp)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(after[i], before[i]) != p.requires_grad, i   # only the trainable response moved
    assert not torch.equal(after[-2], before[-2])                     # λ: the hypergradient through frozen weights


# --------------------------------------------------------------------------- tuned_layer_input, repr, batch errors


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("delta", [False, True])
def test_tuned_layer_input_is_what_the_layers_see_at_the_current_lambda(constrained, delta):
    model, hp = _mlp_bn(), _hparams()
    hp.set_values(dropout=0.42, noise=0.7)
    extra = dict(delta_stn=True, response_optimizer=_sgd(stn.split_stn_parameters(model)[1])) if delta else {}
    trainer = _trainer(model, hp, stn.split_stn_parameters(model)[0], constrained_layer_input=constrained, **extra)
    u = hp.unconstrained.detach()
    if delta:
        expected = torch.zeros(H, dtype=F64)
    elif constrained:   # the continuous constrained values: 0.9·sigmoid(u₀), softplus(u₁)
        expected = torch.stack([0.9 / (1 + torch.exp(-u[0])), torch.log1p(torch.exp(u[1]))])
        torch.testing.assert_close(expected, torch.tensor([0.42, 0.7], dtype=F64), rtol=1e-12, atol=0)
    else:
        expected = u
    got = trainer.tuned_layer_input()
    assert got.shape == (H,) and not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-15)
    # Shared λ [H] is the evaluation sample's λ for every example: the same outputs.
    x = torch.randn(B, 5, dtype=F64)
    model.eval()
    with torch.no_grad():
        with stn_kernels.hparams(got):
            shared = model(x)
        with stn_kernels.hparams(trainer.evaluation_sample(B).layer_input):
            per_example = model(x)
    assert_close_rel(shared, per_example, F64, "outputs at the tuned λ")


def test_step_result_repr_shows_numbers_not_tensors():
    result = stn.StepResult("valid", torch.tensor(1.25), torch.randn(64, 1000))
    assert repr(result) == "StepResult(kind='valid', loss=1.25, output=Tensor(shape=(64, 1000), dtype=torch.float32))"


@pytest.mark.parametrize("train, valid, words", [
    (lambda x, y: lambda: x, None, "next_train_batch: expected it to return an (inputs, targets) pair, got a Tensor "
                                   "of shape (6, 5)"),
    (None, lambda x, y: lambda: (x, y, None), "next_valid_batch: expected it to return an (inputs, targets) pair, "
                                              "got a tuple of 3 item(s)"),
    (None, lambda x, y: lambda: {"x": x}, "next_valid_batch: expected it to return an (inputs, targets) pair, "
                                          "got a dict"),
    (lambda x, y: [(x, y)], None, "next_train_batch: expected a callable returning (inputs, targets), e.g. "
                                  "stn.cycle_batches(loader), got list"),
])
def test_a_batch_that_is_not_a_pair_is_a_clear_type_error(train, valid, words):
    model, hp = _mlp_bn(), _hparams()
    x, y = torch.randn(B, 5, dtype=F64), torch.randint(0, 3, (B,))
    trainer = _trainer(model, hp, model.parameters())
    train = (train or (lambda x, y: lambda: (x, y)))(x, y)
    valid = (valid or (lambda x, y: lambda: (x, y)))(x, y)
    with pytest.raises(TypeError, match=re.escape(words)):
        trainer.step(train, valid)
