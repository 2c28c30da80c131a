"""Data-parallel STN (stn/distributed.py and STNTrainer under torch.distributed), on the CPU with gloo.

Two ranks are started once (tests/_stn_distributed_worker.py, one process each, one thread each) and run
every scenario in one process group; the tests compare what the ranks wrote. Each rank trains on its own
data and every rank is seeded alike, as a user's script would be: so identical λ and σ on both ranks come
from the synchronisation, and different ε from the per-rank streams.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from stn_kernels import stn

from _stn_distributed_worker import (
    equivalence_batches,
    equivalence_run,
    hparams_block_data,
    hparams_block_run,
    make_hparams,
    make_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_stn_distributed_worker.py")
WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stn_distributed")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    # A file store in a fresh folder: parallel runs of this test cannot meet on a port.
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(WORLD), str(tmp / "store"), str(tmp)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0])   # only guards against a hang
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    results = []
    for r, (p, out) in enumerate(zip(procs, outputs)):
        saved = tmp / f"rank{r}.pt"
        assert saved.exists(), f"rank {r} exited {p.returncode} without results:\n{out[-4000:]}"
        assert p.returncode == 0, out[-4000:]
        results.append(torch.load(saved, weights_only=False))
    return results


def _scenario(ranks, name):
    """What rank 0 and rank 1 saw in one scenario."""
    for r, result in enumerate(ranks):
        assert "error" not in result[name], f"rank {r}, scenario {name}:\n{result[name]['error']}"
    return ranks[0][name], ranks[1][name]


def _same(a, b):
    """Bitwise equality of snapshots (dicts of tensors and floats)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _moved(start, end):
    """Every weight tensor and λ changed (the loop really trained: a frozen run would also be 'identical')."""
    return all(not torch.equal(start["weights"][k], end["weights"][k]) for k in start["weights"]) and \
        bool((start["lam"] != end["lam"]).all())


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2", "delta_ddp", "delta_ddp_linearized", "delta_fsdp2",
                                      "delta_ddp_find_unused", "ddp_static_graph"])
def test_weights_lambda_and_sigma_are_identical_on_every_rank(ranks, scenario):
    first, second = _scenario(ranks, scenario)
    assert _same(first["start"], second["start"])
    assert _moved(first["start"], first["end"])
    assert _same(first["end"], second["end"])                  # weights, λ, ρ, values(), scales(): bit for bit
    if not scenario.startswith("delta"):
        assert not torch.equal(first["end"]["rho"], first["start"]["rho"])   # σ was tuned too


@pytest.mark.parametrize("scenario", ["ddp_frozen", "delta_ddp_frozen"])
def test_frozen_parameters_stay_and_the_rest_trains_identically_on_every_rank(ranks, scenario):
    first, second = _scenario(ranks, scenario)
    assert _same(first["end"], second["end"])
    for name, value in first["start"]["weights"].items():
        assert torch.equal(value, first["end"]["weights"][name]) == name.startswith("fc1."), name
    assert bool((first["start"]["lam"] != first["end"]["lam"]).all())


def test_a_converted_model_given_as_the_model_trains_identically_on_every_rank(ranks):
    """DDP(converted plain model): the trainer looks through DDP's forward(*inputs) to the model's forward(x) and
    calls it inside the hparams block."""
    first, second = _scenario(ranks, "ddp_module_path")
    assert first["takes_sample"] is False
    assert _moved(first["start"], first["end"]) and _same(first["end"], second["end"])


def test_each_rank_draws_its_own_perturbations_and_dropout_masks(ranks):
    first, second = _scenario(ranks, "ddp")
    # Same λ on both ranks at the first training step, so a difference is ε's.
    assert not torch.equal(first["perturbed"], second["perturbed"])
    assert not torch.equal(first["probe"], second["probe"])    # the same rate: a difference is the seed's
    # The comparison can see equality: with one user generator seeded alike on both ranks, ε coincide.
    same_generator = _scenario(ranks, "user_generator")
    assert torch.equal(same_generator[0]["perturbed"], same_generator[1]["perturbed"])


def test_opting_out_leaves_the_hyperparameters_unsynchronised(ranks):
    first, second = _scenario(ranks, "opt_out")
    assert _same(first["end"]["weights"], second["end"]["weights"])   # DDP still averages the weights
    assert not torch.equal(first["end"]["lam"], second["end"]["lam"])


def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks):
    torch.set_num_threads(1)
    reference = equivalence_run([equivalence_batches(r) for r in range(WORLD)])
    start = make_model(regularize=False).state_dict()
    for result in _scenario(ranks, "equivalence"):
        for name, value in reference["weights"].items():
            assert not torch.equal(value, start[name])
            # float32: the mean over 16 examples in another order, then one SGD step: a few ulps
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(reference["lam"], make_hparams().unconstrained.detach())
        torch.testing.assert_close(result["lam"], reference["lam"], rtol=1e-5, atol=1e-6)


def test_hparams_block_under_ddp_equals_one_process_on_the_concatenated_batch(ranks):
    """A plain-torch LM converted, under DDP, λ from ``with stn_kernels.hparams(lam):``."""
    torch.set_num_threads(1)
    reference = hparams_block_run([hparams_block_data(r) for r in range(WORLD)])
    for rank, result in enumerate(_scenario(ranks, "hparams_block_ddp")):
        assert result["weights"].keys() == reference["weights"].keys()
        for name, grad in reference["weights"].items():
            assert grad.abs().max() > 0, name
            # float32: the same sums in another order (DDP averages the two ranks' means): a few ulps
            torch.testing.assert_close(result["weights"][name], grad, rtol=1e-5, atol=1e-7)
        # λ is per example and no parameter: each rank has the gradient of its own mean loss, over half the batch.
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(result["lam"], WORLD * reference["lam"][rows], rtol=1e-5, atol=1e-7)


def test_public_helpers(ranks):
    first, second = _scenario(ranks, "helpers")
    for helpers in (first, second):
        assert helpers["synced"] == first["synced"]
        assert helpers["synced"]["rate"] == pytest.approx(0.1, rel=1e-6)     # rank 0's value
        assert torch.equal(helpers["lam_grad"], torch.full((2,), 1.5))      # (1 + 2) / 2
        assert torch.equal(helpers["rho_grad"], torch.zeros(2))
        assert torch.equal(helpers["stream"], helpers["stream_again"])      # reproducible ...
        assert torch.equal(helpers["seeded"][0], helpers["seeded"][1])
    assert not torch.equal(first["stream"], second["stream"])            # ... and per rank
    assert not torch.equal(first["seeded"][0], second["seeded"][0])


# --------------------------------------------------------------------------- one process, no group


def test_helpers_do_nothing_in_one_process():
    hp = make_hparams()
    hp.set_values(rate=0.5)
    stn.sync_hyperparameters(hp)
    hp.unconstrained.grad = torch.ones(2)
    stn.average_hyperparameter_grads(hp)
    assert hp.values()["rate"] == pytest.approx(0.5) and torch.equal(hp.unconstrained.grad, torch.ones(2))
    assert hp.raw_scale.grad is None
    assert stn.distributed_rank() == (0, 1)


def test_seed_is_torch_manual_seed_in_one_process():
    assert stn.rank_seed(123, 0) == 123 and stn.rank_seed(123, 1) != stn.rank_seed(123, 2) != 123
    model, hp = make_model(), make_hparams()
    trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.SGD(model.parameters(), lr=0.1), seed=5)
    assert trainer.seed == 5
    drawn = torch.randn(3)
    torch.manual_seed(5)
    assert torch.equal(drawn, torch.randn(3))


def test_bad_arguments_name_themselves():
    model, hp = make_model(), make_hparams()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="sync_hyperparameters: expected a bool, got str"):
        stn.STNTrainer(model, F.cross_entropy, hp, sgd, sync_hyperparameters="no")
    with pytest.raises(ValueError, match="seed: expected an int in"):
        stn.STNTrainer(model, F.cross_entropy, hp, sgd, seed=-1)
    with pytest.raises(ValueError, match="process_group: given, but torch.distributed is not initialised"):
        stn.STNTrainer(model, F.cross_entropy, hp, sgd, process_group=object())
    with pytest.raises(TypeError, match="hparams: expected a HyperparameterSet, got Parameter"):
        stn.sync_hyperparameters(hp.unconstrained)
    with pytest.raises(TypeError, match="params: expected an iterable of tensors, got a single Tensor"):
        stn.average_gradients(hp.unconstrained)
    with pytest.raises(ValueError, match=r"src: expected a rank in \[0, 1\), got 1"):
        stn.sync_hyperparameters(hp, src=1)
    with pytest.raises(ValueError, match="rank: expected an int >= 0"):
        stn.rank_seed(1, -1)
