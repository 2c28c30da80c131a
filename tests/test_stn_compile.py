"""STNTrainer(compile=...): each step's forward half is one graph (no graph break) for the README's MLP, the CNN
and LSTM language model of docs/layers.md and a converted plain model given to the trainer itself, and compiled
training follows the eager trajectory."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from test_readme import ROOT, _block_after

import stn_kernels
from stn_kernels import stn
from stn_kernels.stn import Hyperparameter, HyperparameterSet

from _naive import assert_close_rel

B = 6


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _readme_models():
    """The README's toolkit MLP (``Net``, ``hp``) and the CNN and language model of docs/layers.md, as defined there."""
    scope = {}
    toolkit = _block_after("## Training with STN: the toolkit")
    exec(toolkit[:toolkit.index("net = Net()")], scope)  # up to the user's data loaders
    exec(_block_after("## An STN CNN and an STN LSTM", ROOT / "docs" / "layers.md"), scope)
    return scope


def _problems():
    """(name, trainer factory, train batch, valid batch) for the three README models, tiny."""
    scope = _readme_models()
    torch.manual_seed(0)
    mlp_data = (torch.randn(B, 64), torch.randint(0, 10, (B,)))

    def mlp(**kwargs):
        torch.manual_seed(1)
        hp = copy.deepcopy(scope["hp"])
        net = scope["Net"]()
        return stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.Adam(net.parameters(), 1e-3), **kwargs)

    cnn_data = (torch.randn(B, 3, 32, 32), torch.randint(0, 10, (B,)))

    def cnn(**kwargs):
        torch.manual_seed(2)
        hp = HyperparameterSet([Hyperparameter("dropout", 0.2, 0.0, 0.9), Hyperparameter("other", 0.5, 0.0)])
        net = scope["HyperAlexNetHead"](len(hp))

        def model_fn(x, sample):
            return net(x, sample.layer_input, sample["dropout"] if sample.regularize else None)

        return stn.STNTrainer(model_fn, F.cross_entropy, hp, torch.optim.Adam(net.parameters(), 1e-3), module=net,
                              **kwargs)

    vocab, steps = 30, 5
    lm_data = (torch.randint(0, vocab, (steps, B)), torch.randint(0, vocab, (B, steps)))

    def lm(**kwargs):
        torch.manual_seed(3)
        hp = HyperparameterSet([Hyperparameter("dropouth", 0.25, 0.0, 0.9)])
        model = scope["HyperLanguageModel"](vocab, 8, 10, len(hp))

        def model_fn(tokens, sample):   # targets are batch-first [B, T]: logits to [B, vocab, T]
            logits, _ = model(tokens, None, sample.layer_input, sample["dropouth"] if sample.regularize else None)
            return logits.permute(1, 2, 0)

        return stn.STNTrainer(model_fn, F.cross_entropy, hp, torch.optim.Adam(model.parameters(), 1e-3),
                              constrained_layer_input=True, module=model, **kwargs)

    converted_data = (torch.randn(B, 64), torch.randint(0, 10, (B,)))

    def converted(**kwargs):
        torch.manual_seed(4)
        hp = copy.deepcopy(scope["hp"])
        net = _converted_plain_model(len(hp))
        return stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.Adam(net.parameters(), 1e-3), **kwargs)

    return [("mlp", mlp, mlp_data), ("cnn", cnn, cnn_data), ("lm", lm, lm_data),
            ("converted", converted, converted_data)]


def _converted_plain_model(num_hparams):
    """A plain torch.nn MLP with dropout and batch norm, converted: the trainer calls it as model(inputs) inside
    stn_kernels.hparams and switches its train/eval mode."""
    plain = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Dropout(0.2), torch.nn.Linear(32, 10))
    net = stn_kernels.convert(plain, num_hparams=num_hparams)
    with torch.no_grad():   # a visible hyper path (convert starts it at zero), so that λ moves
        for m in net.modules():
            if getattr(m, "context_hparams", False):
                m.hparam_weight.normal_(0.0, 0.5)
    return net


PROBLEMS = {name: (factory, data) for name, factory, data in _problems()}


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_readme_models_train_and_valid_steps_are_one_graph(name):
    factory, (inputs, targets) = PROBLEMS[name]
    trainer = factory(compile=True)
    noise = trainer._noise(targets.shape[0])
    # The function compile=True hands to torch.compile, with the arguments of a training and a validation step.
    for training, args in ((True, (noise, True, False, False)), (False, (noise, False, True, True))):
        with trainer._mode(training):
            explained = torch._dynamo.explain(trainer._loss)(inputs, targets, *args)
        reasons = [str(r.reason) for r in explained.break_reasons]
        assert explained.graph_break_count == 0 and explained.graph_count == 1, (name, training, reasons)


def _run(trainer, data, cycles):
    """``cycles`` cycles on fixed batches, dropout seeds from one torch seed: the same draws eager and compiled
    (the compiled graph draws them with torch's generator under fallback_random)."""
    torch.manual_seed(7)
    results = []
    for _ in range(cycles):
        results += trainer.step(lambda: data, lambda: data)
    return results


@pytest.mark.parametrize("variant", ["stn", "delta_stn", "delta_stn_linearized"])
def test_compiled_trainer_follows_the_eager_trajectory(variant):
    scope = _readme_models()
    torch.manual_seed(0)
    data = (torch.randn(B, 64), torch.randint(0, 10, (B,)))
    states, losses = {}, {}
    for compiled in (False, True):
        torch.manual_seed(1)
        hp = copy.deepcopy(scope["hp"])
        net = scope["Net"]()
        kwargs = dict(warmup_steps=1, generator=torch.Generator().manual_seed(3),
                      compile={"fullgraph": True} if compiled else False)
        if variant == "stn":
            weights = torch.optim.Adam(net.parameters(), 1e-3)
        else:
            general, response = stn.split_stn_parameters(net)
            weights = torch.optim.Adam(general, 1e-3)
            kwargs.update(delta_stn=True, response_optimizer=torch.optim.Adam(response, 1e-3),
                          linearize=variant == "delta_stn_linearized")
        trainer = stn.STNTrainer(net, F.cross_entropy, hp, weights, **kwargs)
        with torch._inductor.config.patch(fallback_random=True):
            results = _run(trainer, data, cycles=3)
        states[compiled] = {**{n: p.detach().clone() for n, p in net.named_parameters()},
                            "lambda": hp.unconstrained.detach().clone(), "rho": hp.raw_scale.detach().clone()}
        losses[compiled] = torch.stack([r.loss_tensor for r in results])
        kinds = [r.kind for r in results]
        assert kinds[0] == "warmup" and "valid" in kinds and ("response" in kinds) == (variant != "stn")
    assert not torch.equal(states[True]["lambda"], scope["hp"].unconstrained), "λ did not move"
    assert_close_rel(losses[True], losses[False], torch.float32, "losses")
    for name, expected in states[False].items():
        assert_close_rel(states[True][name], expected, torch.float32, name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_module_path_follows_the_eager_trajectory(device):
    """A converted plain model given to the trainer itself: called as model(inputs) inside the hparams block (in
    the compiled graph), nn.Dropout and BatchNorm1d switched between train and eval mode around every step. On
    CUDA the compiled run uses CUDA graphs (the default mode)."""
    torch.manual_seed(0)
    data = (torch.randn(B, 64, device=device), torch.randint(0, 10, (B,), device=device))
    states, losses = {}, {}
    for compiled in (False, True):
        torch.manual_seed(1)
        hp = HyperparameterSet([Hyperparameter("dropout", 0.05, 0.0, 0.9), Hyperparameter("noise", 0.05, 0.0, 1.0)],
                               device=device)
        net = _converted_plain_model(len(hp)).to(device)
        # SGD, not Adam: the gradient of the bias before the batch norm is 0 in exact arithmetic, and Adam would
        # turn its rounding noise (another in each graph) into steps of ±lr.
        trainer = stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.SGD(net.parameters(), 1e-2), warmup_steps=1,
                                 generator=torch.Generator(device).manual_seed(3),
                                 compile={"fullgraph": True} if compiled else False)
        with torch._inductor.config.patch(fallback_random=True):
            results = _run(trainer, data, cycles=3)
        states[compiled] = {**{n: t.detach().clone() for n, t in net.state_dict().items()},
                            "lambda": hp.unconstrained.detach().clone(), "rho": hp.raw_scale.detach().clone()}
        losses[compiled] = torch.stack([r.loss_tensor for r in results])
        assert net[1].num_batches_tracked == 6   # 6 training steps updated the running statistics, 3 valid did not
    assert_close_rel(losses[True], losses[False], torch.float32, "losses")
    for name, expected in states[False].items():
        assert_close_rel(states[True][name], expected, torch.float32, name)
    assert not torch.equal(states[False]["lambda"].cpu(), HyperparameterSet(
        [Hyperparameter("dropout", 0.05, 0.0, 0.9), Hyperparameter("noise", 0.05, 0.0, 1.0)]).unconstrained)


def test_step_result_reads_the_loss_only_when_asked():
    factory, data = PROBLEMS["mlp"]
    trainer = factory()
    (result,) = trainer.train_step(*data)
    assert result.loss_tensor.dim() == 0 and not result.loss_tensor.requires_grad
    assert isinstance(result.loss, float)
    assert result.loss == pytest.approx(float(F.cross_entropy(result.output, data[1])), rel=1e-6)


@pytest.mark.parametrize("value, error, words", [
    ("yes", TypeError, "compile: expected False, True or a dict of torch.compile options, got str"),
    ({"mod": "reduce-overhead"}, ValueError, "compile: expected torch.compile options among"),
])
def test_bad_compile_argument_is_rejected(value, error, words):
    factory, _ = PROBLEMS["mlp"]
    with pytest.raises(error, match=re.escape(words)):
        factory(compile=value)


@pytest.mark.gpu
def test_cuda_defaults_to_cuda_graphs_and_matches_eager():
    scope = _readme_models()
    data = (torch.randn(B, 64, device="cuda"), torch.randint(0, 10, (B,), device="cuda"))
    states = {}
    for compiled in (False, True):
        torch.manual_seed(1)
        hp = copy.deepcopy(scope["hp"]).cuda()
        net = scope["Net"]().cuda()
        trainer = stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.Adam(net.parameters(), 1e-3),
                                 generator=torch.Generator("cuda").manual_seed(3), compile=compiled)
        with torch._inductor.config.patch(fallback_random=True):
            results = _run(trainer, data, cycles=3)
        if compiled:
            assert trainer._cuda_graphs
            # Outputs kept from an earlier step stay readable after later replays.
            assert torch.isfinite(results[0].output).all()
        states[compiled] = [hp.unconstrained.detach().clone()] + [p.detach().clone() for p in net.parameters()]
    for i, (got, expected) in enumerate(zip(states[True], states[False])):
        assert_close_rel(got, expected, torch.float32, f"tensor {i}")
