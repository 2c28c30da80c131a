"""The published training procedures (stand-ins in ``_published``, written from reading the official STN scripts
and Delta-STN's step optimiser) on a published model and on ``stn_kernels.convert`` of a copy of it, in lockstep
from the same RNG state, float64: after every step each parameter and hyperparameter agrees to 1e-10 relative and
the RNG state is the same (every random draw the same, in the same order). The optimisers of the converted copy
are built before ``convert``, as the published scripts build theirs, and keep training it."""

from types import SimpleNamespace

import torch
from torch import nn

import stn_kernels
from stn_kernels import HyperConv2d, HyperLinear, HyperLSTMCell
from stn_kernels.convert import TimeMajorHyperEmbedding

from _naive import assert_close_rel, no_warnings
from _published import (
    DeltaStnDropoutCnn,
    Hparam,
    OfficialHyperLstmLm,
    OfficialSmallCnn,
    delta_stn_step,
    official_cnn_optimization_step,
    official_lstm_hyper_step,
    official_lstm_train_step,
)

F64 = torch.float64
STEPS = 12


def _unconstrained(rates):
    return nn.Parameter(torch.logit(torch.tensor(rates, dtype=F64)))


def _lockstep(original, converted, step_fn, tracked):
    """STEPS steps of ``step_fn(state, step)`` on both from the same RNG state; ``tracked(state)``: the tensors
    that must agree after each (the parameters in the optimisers' order, then the hyperparameters)."""
    initial = [t.detach().clone() for t in tracked(original)]
    for step in range(STEPS):
        rng = torch.get_rng_state()
        step_fn(original, step)
        want_rng = torch.get_rng_state()
        torch.set_rng_state(rng)
        step_fn(converted, step)
        assert torch.equal(torch.get_rng_state(), want_rng), f"step {step}: the RNG state differs"
        for i, (got, want) in enumerate(zip(tracked(converted), tracked(original), strict=True)):
            assert_close_rel(got, want, F64, f"step {step}: tracked tensor {i}")
    moved = [not torch.equal(t, t0) for t, t0 in zip(tracked(original), initial)]
    assert all(moved), f"every tracked tensor must have trained (else the comparison proves little): {moved}"


def _twice(make):
    """Two identical states (the original and the one to convert): ``make()`` under the same seed."""
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        states.append(make())
    return states


def _optimised(optimizers):
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


def test_official_cnn_training_with_elem_scalar_follows_the_published_trajectory_after_convert():
    """hypertrain.py's cycle (two training steps: SGD with momentum over every parameter, elem_scalar included;
    one hyper step: Adam on λ and its perturbation scale), per-layer and input dropout tuned."""
    hdict = {"dropout0": Hparam(0), "dropout1": Hparam(1), "indropout": Hparam(2)}
    original, converted = _twice(lambda: SimpleNamespace(
        cnn=OfficialSmallCnn([3, 4, 5, 6], 3, len(hdict), 8), htensor=_unconstrained([0.2, 0.3, 0.1]),
        hscale=nn.Parameter(torch.full((3,), -1.0, dtype=F64))))
    for state in (original, converted):  # as the published script: optimisers first (convert comes after)
        state.optimizers = (torch.optim.SGD(state.cnn.parameters(), lr=0.05, momentum=0.9),
                            torch.optim.Adam([state.htensor], lr=0.05), torch.optim.Adam([state.hscale], lr=0.05))
    scalars = [conv.elem_scalar for conv in converted.cnn.convs]
    with no_warnings():
        stn_kernels.convert(converted.cnn)  # the published model's plain fc stays, as published
    assert all(type(conv) is HyperConv2d and conv.elem_scalar is a for conv, a in zip(converted.cnn.convs, scalars))
    assert {id(p) for p in converted.cnn.parameters()} == {id(p) for p in _optimised(converted.optimizers[:1])}
    batches = [(torch.randn(4, 3, 8, 8, dtype=F64), torch.randint(0, 3, (4,))) for _ in range(STEPS)]

    def step(state, i):
        official_cnn_optimization_step(state.cnn, state.htensor, state.hscale, hdict, state.optimizers,
                                       *batches[i], hyper=i % 3 == 2)

    _lockstep(original, converted, step, lambda s: _optimised(s.optimizers))


def test_official_lstm_language_model_training_follows_the_published_trajectory_after_convert():
    """train.py's parameter steps (training mode: every dropout and DropConnect rate tuned, per-example or shared,
    embedding dropout, gradient clipping, SGD) and hyperparameter steps (eval mode, Adam on λ), two to one, over
    consecutive BPTT chunks with the hidden state carried; token V−1 (padding_idx=-1: no gradient) occurs; the
    tied-weights configuration with emsize ≠ nhid (the last layer has emsize units)."""
    V, T, B = 11, 4, 3
    hdict = {"dropouto": Hparam(0), "dropouti": Hparam(1), "dropouth": Hparam(2),
             "dropoute": Hparam(3, minibatch=False), "wdrop": Hparam(4, minibatch=False)}
    original, converted = _twice(lambda: SimpleNamespace(
        model=OfficialHyperLstmLm(V, 4, 5, 2, len(hdict)), htensor=_unconstrained([0.3, 0.2, 0.25, 0.1, 0.4]),
        hscale=nn.Parameter(torch.full((5,), -1.0, dtype=F64))))
    for state in (original, converted):
        state.optimizers = (torch.optim.SGD(state.model.parameters(), lr=1.0),
                            torch.optim.Adam([state.htensor], lr=0.05))
        state.train_hidden, state.val_hidden = state.model.init_hidden(B), state.model.init_hidden(B)
    with no_warnings():
        stn_kernels.convert(converted.model)  # the published model's plain decoder stays, as published
    assert type(converted.model.encoder) is TimeMajorHyperEmbedding
    assert all(type(rnn) is HyperLSTMCell for rnn in converted.model.rnns)
    assert converted.model.decoder.weight is converted.model.encoder.weight
    assert {id(p) for p in converted.model.parameters()} == {id(p) for p in _optimised(converted.optimizers[:1])}
    stream = torch.randint(0, V, (STEPS * T + 1, B))
    stream[::3, 1] = V - 1

    def step(state, i):
        data, targets = stream[i * T:(i + 1) * T], stream[i * T + 1:(i + 1) * T + 1]
        if i % 3 == 2:
            state.val_hidden = official_lstm_hyper_step(state.model, state.htensor, hdict, state.optimizers[1],
                                                        data, targets, state.val_hidden)
        else:
            state.train_hidden = official_lstm_train_step(state.model, state.htensor, state.hscale, hdict,
                                                          state.optimizers[0], data, targets, state.train_hidden)

    _lockstep(original, converted, step, lambda s: _optimised(s.optimizers))


def test_delta_stn_training_follows_the_published_trajectory_after_convert():
    """DeltaStnStepOptimizer.step with tune_scales and the linearised response: per training step a general SGD
    step and a response SGD step (the optimisers over StnModel's isinstance-based lists: the response one built
    before convert, the general one after), per hyper step RMSprop on λ and its scale; input and per-layer
    dropout tuned."""
    original, converted = _twice(lambda: SimpleNamespace(
        model=DeltaStnDropoutCnn(3), h_tensor=_unconstrained([0.2, 0.3, 0.1]),
        h_scale=nn.Parameter(torch.full((3,), -1.0, dtype=F64))))
    response_before = torch.optim.SGD(converted.model.get_response_parameters(), lr=0.1, momentum=0.9)
    stn_kernels.convert(converted.model)
    assert all(isinstance(layer, (HyperLinear, HyperConv2d)) for layer in converted.model.get_layers())
    for state in (original, converted):
        response = (torch.optim.SGD(state.model.get_response_parameters(), lr=0.1, momentum=0.9)
                    if state is original else response_before)
        general = torch.optim.SGD(state.model.get_general_parameters(), lr=0.05, momentum=0.9)
        state.optimizers = (general, response, torch.optim.RMSprop([state.h_tensor], lr=0.01),
                            torch.optim.RMSprop([state.h_scale], lr=0.01))
    assert [len(opt.param_groups[0]["params"]) for opt in converted.optimizers[:2]] == [8, 12]
    batches = [(torch.randn(4, 1, 8, 8, dtype=F64), torch.randint(0, 3, (4,))) for _ in range(STEPS)]

    def step(state, i):
        delta_stn_step(state.model, state.h_tensor, state.h_scale, state.optimizers, *batches[i],
                       tune_hyper=i % 3 == 2)

    _lockstep(original, converted, step, lambda s: _optimised(s.optimizers))
