"""The hyperparameter container (transforms, perturbation, entropy) and the STN / Delta-STN steps."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F

import stn_kernels
from stn_kernels import stn
from stn_kernels.stn import Hyperparameter, HyperparameterSet

F64 = torch.float64


def naive_sigmoid(u):
    return 1.0 / (1.0 + math.exp(-u))


def naive_softplus(u):
    return math.log1p(math.exp(u))


# --------------------------------------------------------------------------- transforms


def test_transforms_match_naive_formulas():
    hp = HyperparameterSet([
        Hyperparameter("rate", 0.3, 0.0, 0.95),
        Hyperparameter("shift", 2.0, 1.0, 5.0),
        Hyperparameter("std", 0.5, 0.0),                 # (0, ∞): softplus
        Hyperparameter("ceiling", -1.0, high=0.0),       # (−∞, 0): 0 − softplus
        Hyperparameter("free", 3.0),                     # identity
    ], dtype=F64)
    assert [s.kind for s in hp.specs] == ["sigmoid", "sigmoid", "softplus", "softplus", "identity"]
    us = [-6.0, -1.3, 0.0, 0.7, 4.2]
    u = torch.tensor([[v] * 5 for v in us], dtype=F64)
    c = hp.constrain(u)
    for row, v in enumerate(us):
        expected = [0.95 * naive_sigmoid(v), 1.0 + 4.0 * naive_sigmoid(v), naive_softplus(v), -naive_softplus(v), v]
        torch.testing.assert_close(c[row], torch.tensor(expected, dtype=F64), rtol=1e-14, atol=1e-15)


def test_transforms_round_trip():
    hp = HyperparameterSet([Hyperparameter("rate", 0.3, 0.0, 0.95), Hyperparameter("std", 0.5, 0.0),
                            Hyperparameter("ceiling", -1.0, high=0.0), Hyperparameter("free", 3.0)], dtype=F64)
    u = torch.linspace(-8, 8, 161, dtype=F64).unsqueeze(1).expand(-1, 4)
    # Recovering u from c loses |dc/du|⁻¹·eps relative: at |u| = 8 the sigmoid slope is 3e-4, so ~4e-13.
    torch.testing.assert_close(hp.unconstrain(hp.constrain(u)), u, rtol=0, atol=1e-11)
    c = torch.tensor([[0.01, 1e-3, -50.0, -7.5], [0.5, 3.0, -1e-3, 0.0], [0.94, 60.0, -2.0, 12.0]], dtype=F64)
    torch.testing.assert_close(hp.constrain(hp.unconstrain(c)), c, rtol=1e-12, atol=0)


def test_initial_values_are_in_constrained_units():
    specs = [Hyperparameter("rate", 0.05, 0.0, 0.9), Hyperparameter("std", 0.2, 0.0),
             Hyperparameter("holes", 3, 0, 4, discrete=True)]
    for dtype, rtol in ((F64, 1e-13), (torch.float32, 4 * 2**-23 * 10)):  # float32: eps·|u|·|dlog c/du| ≲ 10·eps
        values = HyperparameterSet(specs, dtype=dtype).values()
        assert values["holes"] == 3.0
        assert math.isclose(values["rate"], 0.05, rel_tol=rtol)
        assert math.isclose(values["std"], 0.2, rel_tol=rtol)


def test_discrete_hyperparameters_are_floored_into_their_integer_range():
    hp = HyperparameterSet([Hyperparameter("holes", 1, 0, 4, discrete=True)], dtype=F64)
    # continuous value on (0, 5); flooring gives 0..4 and every integer gets a cell of width 1
    u = torch.linspace(-40, 40, 2001, dtype=F64).unsqueeze(1)
    c = hp.constrain(u)
    assert set(c.flatten().tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}
    continuous = hp.constrain(u, floor_discrete=False).flatten()
    torch.testing.assert_close(c.flatten(), torch.floor(continuous).clamp(max=4.0))
    assert hp.unconstrained.item() == pytest.approx(math.log(1.5 / 3.5))  # init 1 → middle of its cell, 1.5 of 5
    hp.set_values(holes=4)
    assert hp.values()["holes"] == 4.0


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(name="p", init=0.95, low=0.0, high=0.95), ValueError, ["init", "'p'", "(0.0, 0.95)", "0.95"]),
    (dict(name="p", init=-0.1, low=0.0), ValueError, ["init", "-0.1"]),
    (dict(name="p", init=0.5, low=0.0, transform="sigmoid"), ValueError, ["transform", "'softplus'", "'sigmoid'"]),
    (dict(name="p", init=0.5, transform="logit"), ValueError, ["transform", "'logit'"]),
    (dict(name="p", init=0.5, low=1.0, high=0.0), ValueError, ["low < high", "low=1.0", "high=0.0"]),
    (dict(name="p", init=0.5, low=0.0, high=1.0, scale=0.0), ValueError, ["scale", "> 0", "0.0"]),
    (dict(name="k", init=1.5, low=0, high=4, discrete=True), ValueError, ["init", "integer", "1.5"]),
    (dict(name="k", init=5, low=0, high=4, discrete=True), ValueError, ["init", "[0, 4]", "5"]),
    (dict(name="", init=0.5), TypeError, ["name", "non-empty"]),
    (dict(name="p", init="0.5"), TypeError, ["init", "float", "str"]),
])
def test_bad_hyperparameter_specifications_are_rejected(kwargs, error, words):
    with pytest.raises(error) as info:
        Hyperparameter(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_container_input_is_rejected():
    with pytest.raises(ValueError, match=r"duplicates \['a'\]"):
        HyperparameterSet([Hyperparameter("a", 0.5, 0, 1), Hyperparameter("a", 0.5, 0, 1)])
    with pytest.raises(ValueError, match="at least one"):
        HyperparameterSet([])
    hp = HyperparameterSet([Hyperparameter("a", 0.5, 0, 1), Hyperparameter("b", 1.0, 0.0)])
    with pytest.raises(ValueError, match=r"unconstrained: expected shape \[\.\.\., 2\].*\(4, 3\)"):
        hp.constrain(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"batch_size: expected an int >= 1, got 0"):
        hp.perturb(0)
    with pytest.raises(KeyError, match=r"expected one of \('a', 'b'\), got 'c'"):
        hp.index("c")
    with pytest.raises(ValueError, match=r"a: expected a value strictly inside \(0, 1\), got 1.0"):
        hp.set_values(a=1.0)


# --------------------------------------------------------------------------- perturbation and entropy


def test_perturbation_statistics():
    hp = HyperparameterSet([Hyperparameter("a", 0.3, 0.0, 0.9, scale=0.5), Hyperparameter("b", 2.0, 0.0, scale=1.5),
                            Hyperparameter("shared", 0.1, 0.0, 1.0, per_example=False, scale=0.8)], dtype=F64)
    n = 50000
    batch = hp.perturb(n, generator=torch.Generator().manual_seed(0)).detach()
    lam, sigma = hp.unconstrained.detach(), hp.scale.detach()
    for h in range(2):
        column = batch[:, h]
        assert abs(column.mean().item() - lam[h].item()) < 5 * sigma[h].item() / math.sqrt(n)
        assert abs(column.std().item() - sigma[h].item()) < 5 * sigma[h].item() / math.sqrt(2 * n)
    corr = torch.corrcoef(batch[:, :2].T)[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)
    assert torch.equal(batch[:, 2], batch[:1, 2].expand(n))   # one draw shared by the batch
    draws = torch.stack([hp.perturb(2)[0, 2].detach() for _ in range(200)])
    assert abs(draws.std().item() - sigma[2].item()) < 0.25 * sigma[2].item()  # but a new draw per batch


def test_perturbation_gradients():
    hp = HyperparameterSet([Hyperparameter("a", 0.3, 0.0, 0.9), Hyperparameter("b", 2.0, 0.0, scale=1.5)], dtype=F64)
    batch = hp.perturb(7, generator=torch.Generator().manual_seed(1))
    epsilon = ((batch - hp.unconstrained) / hp.scale).detach()
    batch.sum().backward()
    torch.testing.assert_close(hp.unconstrained.grad, torch.full((2,), 7.0, dtype=F64))
    # d(λ + softplus(ρ)·ε)/dρ = sigmoid(ρ)·ε
    rho = hp.raw_scale.detach()
    torch.testing.assert_close(hp.raw_scale.grad, torch.sigmoid(rho) * epsilon.sum(0))


def test_entropy_value_and_gradient():
    hp = HyperparameterSet([Hyperparameter("a", 0.3, 0.0, 0.9, scale=0.2), Hyperparameter("b", 2.0, 0.0, scale=3.0)],
                           dtype=F64)
    entropy = hp.entropy()
    # The differential entropy of N(0, σ²) is ½·log(2πeσ²).
    expected = sum(0.5 * math.log(2 * math.pi * math.e * s * s) for s in (0.2, 3.0))
    assert entropy.item() == pytest.approx(expected, rel=1e-13)
    entropy.backward()
    rho = hp.raw_scale.detach()
    # d/dρ log softplus(ρ) = sigmoid(ρ) / softplus(ρ)
    expected_grad = [naive_sigmoid(r) / naive_softplus(r) for r in rho.tolist()]
    torch.testing.assert_close(hp.raw_scale.grad, torch.tensor(expected_grad, dtype=F64), rtol=1e-12, atol=0)


def test_layer_input_variants():
    hp = HyperparameterSet([Hyperparameter("a", 0.3, 0.0, 0.9), Hyperparameter("k", 2, 0, 4, discrete=True)],
                           dtype=F64)
    batch = hp.perturb(5)
    assert hp.layer_input(batch) is batch                                   # unconstrained, as the CNN code
    torch.testing.assert_close(hp.layer_input(batch, constrained=True), hp.constrain(batch, floor_discrete=False))
    centred = hp.layer_input(hp.repeat(5), centre=True)                     # Delta-STN: λ − λ₀
    assert torch.equal(centred, torch.zeros(5, 2, dtype=F64))
    centred.sum().backward()                                                # ... with the gradient still flowing
    torch.testing.assert_close(hp.unconstrained.grad, torch.full((2,), 5.0, dtype=F64))
    sample = hp.make_sample(batch, regularize=True)
    assert not sample.values.requires_grad and sample["k"].tolist() == hp.constrain(batch.detach())[:, 1].tolist()
    assert set(sample["k"].tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


# --------------------------------------------------------------------------- the training steps


class TinyHyperMLP(torch.nn.Module):
    """6 → 8 → 3 with per-example dropout driven by hyperparameter "rate" and input noise by "noise"."""

    def __init__(self, num_hparams, dtype=torch.float32, dropout=True):
        super().__init__()
        self.fc1 = stn_kernels.HyperLinear(6, 8, num_hparams=num_hparams, dtype=dtype)
        self.fc2 = stn_kernels.HyperLinear(8, 3, num_hparams=num_hparams, dtype=dtype)
        self.dropout = dropout
        self.seen = []   # (sample.regularize, self.training) of every call

    def forward(self, x, sample):
        self.seen.append((sample.regularize, self.training))
        h = torch.relu(self.fc1(x, sample.layer_input))
        if self.dropout:
            h = stn.per_example_dropout(h, sample["rate"], training=sample.regularize)
        return self.fc2(h, sample.layer_input)


def make_problem(dtype=torch.float32, seed=0, dropout=True):
    torch.manual_seed(seed)
    hp = HyperparameterSet([Hyperparameter("rate", 0.3, 0.0, 0.9, scale=0.4), Hyperparameter("noise", 0.2, 0.0)],
                           dtype=dtype)
    model = TinyHyperMLP(2, dtype, dropout)
    with torch.no_grad():  # a visible hyper path, so that the hypergradient is not tiny
        for layer in (model.fc1, model.fc2):
            layer.hparam_weight.normal_(0.0, 0.5)
    x = torch.randn(10, 6, dtype=dtype)
    y = torch.randint(0, 3, (10,))
    return hp, model, x, y


def naive_model(model, x, lam):
    """The tiny MLP (without dropout) written out from the STN layer formula."""
    def layer(m, inp):
        n = m.weight.shape[0]
        v, c = m.hparam_weight[:n], m.hparam_weight[n:]
        return inp @ m.weight.T + m.bias + (lam @ v.T) * (inp @ m.hyper_weight.T) + (lam @ c.T) * m.hyper_bias
    return layer(model.fc2, torch.relu(layer(model.fc1, x)))


def test_train_step_updates_weights_only():
    hp, model, x, y = make_problem()
    lam, rho = hp.unconstrained.detach().clone(), hp.raw_scale.detach().clone()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train_step(x, y)
    assert torch.equal(hp.unconstrained, lam) and torch.equal(hp.raw_scale, rho)
    assert hp.unconstrained.grad is None and hp.raw_scale.grad is None
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert model.seen == [(True, True)]


def test_valid_step_equals_hand_computed_update():
    hp, model, x, y = make_problem(F64, dropout=False)
    lr, tau = 0.5, 0.01
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.SGD(model.parameters(), lr=0.1),
                             hparam_optimizer=torch.optim.SGD([hp.unconstrained], lr=lr),
                             scale_optimizer=torch.optim.SGD([hp.raw_scale], lr=lr), entropy_weight=tau,
                             generator=torch.Generator().manual_seed(5))
    # The same objective, by hand: λ_b = λ + softplus(ρ)·ε with ε from the same generator.
    lam = hp.unconstrained.detach().clone().requires_grad_()
    rho = hp.raw_scale.detach().clone().requires_grad_()
    epsilon = torch.randn(10, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    sigma = torch.log1p(torch.exp(rho))
    objective = F.cross_entropy(naive_model(model, x, lam + sigma * epsilon), y) \
        - tau * torch.sum(torch.log(sigma) + 0.5 * math.log(2 * math.pi * math.e))
    grad_lam, grad_rho = torch.autograd.grad(objective, (lam, rho))
    weights = [p.detach().clone() for p in model.parameters()]

    trainer.valid_step(x, y)
    torch.testing.assert_close(hp.unconstrained.detach(), lam.detach() - lr * grad_lam, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(hp.raw_scale.detach(), rho.detach() - lr * grad_rho, rtol=1e-12, atol=1e-14)
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert all(p.grad is None for p in model.parameters())   # no weight gradient is even formed
    assert model.seen == [(False, False)]                    # regularisers off, eval mode


def test_cycle_with_warmup():
    hp, model, x, y = make_problem()
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.SGD(model.parameters(), lr=0.1),
                             train_steps=2, valid_steps=1, warmup_steps=3)
    lam = hp.unconstrained.detach().clone()
    kinds = [r.kind for r in trainer.step(lambda: (x, y), lambda: (x, y))]
    assert kinds == ["warmup", "warmup"] and torch.equal(hp.unconstrained, lam)
    kinds = [r.kind for r in trainer.step(lambda: (x, y), lambda: (x, y))]
    assert kinds == ["warmup", "train", "valid"] and not torch.equal(hp.unconstrained, lam)
    assert (trainer.train_steps_done, trainer.valid_steps_done) == (4, 1)


def test_no_scale_tuning_validates_at_unperturbed_lambda():
    hp, model, x, y = make_problem(F64, dropout=False)
    rho = hp.raw_scale.detach().clone()
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.SGD(model.parameters(), lr=0.1),
                             hparam_optimizer=torch.optim.SGD([hp.unconstrained], lr=1.0), tune_scales=False)
    lam = hp.unconstrained.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(naive_model(model, x, lam.expand(10, 2)), y), lam)
    trainer.valid_step(x, y)
    torch.testing.assert_close(hp.unconstrained.detach(), lam.detach() - grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(hp.raw_scale, rho)


def test_linearized_output_matches_finite_differences():
    hp, model, x, y = make_problem(F64, dropout=False)
    sample = hp.make_sample(hp.repeat(10).detach(), regularize=False, centre=True)
    direction = torch.randn(10, 2, dtype=F64)
    linear = stn.linearized_output(model, x, sample, direction)
    step = 1e-5

    def at(delta):
        return model(x, stn.HyperparameterSample(sample.unconstrained, delta, sample.values, False, sample.names))

    central = (at(step * direction) - at(-step * direction)) / (2 * step)
    # central differences: O(step²) truncation and ~eps/step rounding, both ≲ 1e-9 here
    torch.testing.assert_close(linear, at(torch.zeros(10, 2, dtype=F64)) + central, rtol=0, atol=1e-8)
    linear.sum().backward()  # differentiable w.r.t. the weights (needs the layers' double backward)
    assert model.fc1.hparam_weight.grad is not None and model.fc1.hparam_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("linearize", [False, True])
def test_delta_stn_train_step_updates_general_then_response_parameters(linearize):
    hp, model, x, y = make_problem()
    general, response = stn.split_stn_parameters(model)
    assert {id(p) for p in response} == {id(getattr(m, n)) for m in (model.fc1, model.fc2)
                                         for n in ("hyper_weight", "hyper_bias", "hparam_weight")}
    assert len(general) + len(response) == len(list(model.parameters()))
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.SGD(general, lr=0.1),
                             response_optimizer=torch.optim.SGD(response, lr=0.1), delta_stn=True,
                             linearize=linearize)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    results = trainer.train_step(x, y)
    assert [r.kind for r in results] == ["train", "response"]
    assert all(not torch.equal(before[id(p)], p) for p in model.parameters())
    lam = hp.unconstrained.detach().clone()
    trainer.valid_step(x, y)
    assert not torch.equal(hp.unconstrained, lam)


def test_trainer_rejects_inconsistent_configuration():
    hp, model, x, y = make_problem()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="response_optimizer: required with delta_stn=True"):
        stn.STNTrainer(model, F.cross_entropy, hp, sgd, delta_stn=True)
    with pytest.raises(ValueError, match="linearize.*delta_stn=True.*got delta_stn=False"):
        stn.STNTrainer(model, F.cross_entropy, hp, sgd, linearize=True)
    with pytest.raises(ValueError, match="train_steps: expected an int >= 1, got 0"):
        stn.STNTrainer(model, F.cross_entropy, hp, sgd, train_steps=0)
    with pytest.raises(TypeError, match="weight_optimizer: expected a torch.optim.Optimizer, got list"):
        stn.STNTrainer(model, F.cross_entropy, hp, [])
    with pytest.raises(ValueError, match="entropy_weight: expected a finite float >= 0, got -1"):
        stn.STNTrainer(model, F.cross_entropy, hp, sgd, entropy_weight=-1)


@pytest.mark.triton
def test_fused_backend_gives_the_same_hyperparameter_update_as_the_reference():
    """One training step (dropout on, through the fused dropout kernel) and one validation step, on the
    Triton backend (HyperLinear kernels and the dropout kernel; interpreted on a CPU) and on the
    reference backend, from the same state and seeds."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(backend):
        hp, model, x, y = make_problem(seed=3)
        hp, model, x, y = hp.to(device), model.to(device), x.to(device), y.to(device)
        start = (hp.unconstrained.detach().clone(), hp.raw_scale.detach().clone())
        trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.SGD(model.parameters(), lr=0.5),
                                 hparam_optimizer=torch.optim.SGD([hp.unconstrained], lr=1.0),
                                 scale_optimizer=torch.optim.SGD([hp.raw_scale], lr=1.0), train_steps=1,
                                 generator=torch.Generator(device).manual_seed(7))
        torch.manual_seed(11)  # dropout seeds
        with stn_kernels.use_backend(backend):
            results = trainer.step(lambda: (x, y), lambda: (x, y))
        updates = (hp.unconstrained.detach() - start[0], hp.raw_scale.detach() - start[1])
        return updates, [p.detach() for p in model.parameters()], results[0].output

    (ref_lam, ref_rho), ref_weights, ref_train_out = run("reference")
    (tri_lam, tri_rho), tri_weights, tri_train_out = run("triton")
    assert "stn_kernels.backends.triton.per_example_dropout" in sys.modules      # the fused kernels really ran
    assert "stn_kernels.backends.triton.hyper_linear" in sys.modules
    # Same dropout masks bit for bit (another mask would move these logits by O(1)); the GEMMs accumulate
    # in fp32 in another order (K ≤ 8 terms), so results agree to a few fp32 ulps, far below any real difference.
    torch.testing.assert_close(tri_train_out, ref_train_out, rtol=1e-5, atol=1e-6)
    for ref, tri in ((ref_lam, tri_lam), (ref_rho, tri_rho)):
        assert ref.abs().max() > 1e-4  # a real update
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    for ref, tri in zip(ref_weights, tri_weights):
        torch.testing.assert_close(tri, ref, rtol=1e-5, atol=1e-6)
