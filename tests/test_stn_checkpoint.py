"""Resumable STN runs: ``stn.save_checkpoint`` / ``stn.load_checkpoint``, ``STNTrainer.state_dict()`` and the
position of ``stn.cycle_batches``.

A run killed with SIGKILL at a random step, then resumed from its last checkpoint in a new process, ends bitwise
equal (weights, λ, σ, every optimiser state, the random streams, the data positions) to an uninterrupted run of
the same seed: in one process (an MLP with per-example dropout, augmentation and input noise; Delta-STN), and on
2 gloo ranks under DDP and FSDP2 (tests/_stn_checkpoint_worker.py, tests/_stn_checkpoint_distributed_worker.py).
A SIGKILL inside ``save_checkpoint`` leaves a checkpoint that loads and resumes identically. A truncated or
altered file, another model, hyperparameter set, optimiser, setting or world size raises, naming the problem,
and leaves model and trainer as they were.
"""

import copy
import os
import random
import signal
import subprocess
import sys
import time

import _stn_checkpoint_distributed_worker as distributed_worker
import _stn_checkpoint_worker as worker
import pytest
import torch
import torch.nn.functional as F

import stn_kernels
from stn_kernels import stn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_stn_checkpoint_worker.py")
DISTRIBUTED_WORKER = os.path.join(ROOT, "tests", "_stn_checkpoint_distributed_worker.py")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
SAVE_KILL_POINTS = ("write", "fsync", "replace", "replaced")
CHOOSE = random.Random()   # the kill points differ from run to run: every one must resume identically


@pytest.fixture(autouse=True)
def _own_random_state_and_threads():
    """The in-process runs seed torch's generator and use one thread: the other tests' state is left as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def _difference(a, b, where="") -> list:
    """Where two states differ, bit for bit (dicts, lists, tuples, tensors, plain values)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in _difference(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _difference(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _kill_point(first_cycle: int, last_cycle: int) -> tuple:
    """A random model call (1..3: the calls of one cycle after the warm-up) of a random cycle."""
    return CHOOSE.randint(first_cycle, last_cycle), CHOOSE.randint(1, 3)


def _communicate(procs, timeout=240) -> list:
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])   # only guards against a hang
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return outputs


# --------------------------------------------------------------------------- one process, killed


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stn_checkpoint")
    kills = {name: _kill_point(worker.EVERY + 1, worker.CYCLES) for name in ("mlp", "delta")}
    procs = {name: subprocess.Popen([sys.executable, WORKER, "train", name, str(tmp / f"{name}.pt"),
                                     *map(str, kills[name])], env=ENV, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for name in kills}
    outputs = dict(zip(procs, _communicate(list(procs.values()))))
    for name, p in procs.items():
        assert p.returncode == -signal.SIGKILL, f"{name} (kill at {kills[name]}) exited {p.returncode}:\n" \
                                                f"{outputs[name][-3000:]}"
    check = subprocess.run([sys.executable, WORKER, "check", str(tmp / "out.pt"), str(tmp / "mlp.pt"),
                            str(tmp / "delta.pt"), str(tmp / "kills"), *SAVE_KILL_POINTS], env=ENV,
                           capture_output=True, text=True, timeout=240)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-4000:]
    return kills, torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("scenario", ["mlp", "delta"])
def test_a_run_killed_at_a_random_step_resumes_bitwise_equal_to_an_uninterrupted_one(one_process, scenario):
    kills, results = one_process
    kill_cycle, kill_call = kills[scenario]
    result = results[scenario]
    # The last checkpoint before the kill: after the last multiple of EVERY before the killed cycle.
    assert result["start"] == (kill_cycle - 1) // worker.EVERY * worker.EVERY, kills[scenario]
    assert result["end"]["counters"] == result["reference"]["counters"] != (0, 0)
    assert _difference(result["end"], result["reference"]) == [], f"killed at cycle {kill_cycle}, call {kill_call}"
    # The run trained: the weights and λ moved (a frozen run would also be "identical"), and ε was drawn.
    start = worker.snapshot(worker.build(scenario))
    assert all(not torch.equal(start["weights"][k], v) for k, v in result["end"]["weights"].items())
    assert not torch.equal(start["lam"], result["end"]["lam"]) and not torch.equal(start["rho"], result["end"]["rho"])
    assert not torch.equal(start["generator"], result["end"]["generator"])


def test_a_kill_inside_save_checkpoint_leaves_a_checkpoint_that_resumes_identically(one_process):
    _, results = one_process
    kills = results["save_kills"]
    # Killed before the rename: the older checkpoint (after cycle EVERY) and the killed writer's temporary file;
    # killed after it: the new one (after cycle 2·EVERY). The next save removes the leftover.
    for point in SAVE_KILL_POINTS:
        result = kills["points"][point]
        assert result["signal"] == signal.SIGKILL, point
        renamed = point == "replaced"
        assert result["start"] == (2 if renamed else 1) * worker.EVERY, point
        assert len(result["files"]) == (1 if renamed else 2) and "run.pt" in result["files"], result["files"]
        assert result["files_after"] == ["run.pt"], point
        assert _difference(result["end"], kills["reference"]) == [], point


# --------------------------------------------------------------------------- bad checkpoints, in this process


def _run(scenario="mlp", cycles=3, **changes):
    """A built ``mlp`` run (or with ``changes`` to the model, hyperparameters or trainer) after ``cycles``."""
    run = worker.build(scenario)
    if changes:
        run = _rebuilt(run, **changes)
    for _ in range(cycles):
        run[1].step(run[2], run[3])
    return run


def _rebuilt(run, model=None, hparams=None, optimizer=None, **trainer_options):
    model_, trainer, next_train, next_valid = run
    model = model or model_
    hp = hparams or trainer.hparams
    options = dict(hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.05),
                   scale_optimizer=torch.optim.Adam([hp.raw_scale], 0.05), train_steps=2, valid_steps=1,
                   warmup_steps=2, seed=7, generator=torch.Generator().manual_seed(9))
    options.update(trainer_options)
    weights = optimizer(model.parameters()) if optimizer else torch.optim.Adam(model.parameters(), 1e-2)
    return model, stn.STNTrainer(model, F.cross_entropy, hp, weights, **options), next_train, next_valid


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint of the mlp run after 3 cycles (its optimisers hold state)."""
    path = tmp_path_factory.mktemp("saved") / "run.pt"
    with torch.random.fork_rng():
        worker.save(str(path), _run(), 3)
    return path


def _refused(path, run, match, error=stn.CheckpointError):
    """Loading ``path`` into ``run`` raises ``error`` matching ``match``, and changes nothing."""
    before = worker.snapshot(run)
    with pytest.raises(error, match=match):
        stn.load_checkpoint(path, run[1], run[0])
    assert _difference(worker.snapshot(run), before) == []


def test_the_checkpoint_loads_into_a_fresh_run_and_the_load_can_see_a_difference(saved):
    """The refusals below are of a checkpoint that loads; and the comparison of the unchanged run can fail."""
    run = worker.build("mlp")
    before = worker.snapshot(run)
    assert stn.load_checkpoint(saved, run[1], run[0])["cycle"] == 3
    assert _difference(worker.snapshot(run), before) != []
    assert run[1].train_steps_done == 6 and run[1].valid_steps_done == 3


@pytest.mark.parametrize("keep", [0, 10, 40, 200, -1])
def test_a_truncated_file_is_refused(saved, tmp_path, keep):
    data = saved.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    what = "is not an stn_kernels checkpoint" if 0 <= keep < len(stn.checkpoint_format.MAGIC) else "is truncated"
    _refused(cut, worker.build("mlp"), what)


@pytest.mark.parametrize("where", ["magic", "header", "checksum", "middle", "last"])
def test_a_flipped_byte_is_refused(saved, tmp_path, where):
    data = bytearray(saved.read_bytes())
    magic = len(stn.checkpoint_format.MAGIC)
    checksum = data.index(b"\n", magic) + 5
    index = {"magic": 3, "header": magic, "checksum": checksum, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[index] ^= 0x10
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    expected = {"magic": "is not an stn_kernels checkpoint", "header": "is corrupted: its header"}.get(
        where, "is corrupted: its SHA-256 checksum does not match its contents")
    _refused(flipped, worker.build("mlp"), expected)


class WiderMLP(worker.ImageMLP):
    def __init__(self):
        super().__init__()
        self.fc1 = stn_kernels.HyperLinear(64, 20, num_hparams=len(worker.HPARAMS))
        self.fc2 = stn_kernels.HyperLinear(20, 4, num_hparams=len(worker.HPARAMS))


class DeeperMLP(worker.ImageMLP):
    def __init__(self):
        super().__init__()
        self.fc3 = stn_kernels.HyperLinear(4, 4, num_hparams=len(worker.HPARAMS))


def _two_groups(params):
    params = list(params)
    return torch.optim.Adam([{"params": params[:2]}, {"params": params[2:]}], 0.1)


def _hparams(changed):
    specs = [stn.Hyperparameter(**{**spec.__dict__, **changed.get(spec.name, {})}) for spec in worker.HPARAMS]
    return stn.HyperparameterSet(specs)


# What the run is built with instead (a factory: built inside the test), and what the error says.
BAD = {
    "wider model": (lambda: dict(model=WiderMLP()),
                    r"model: fc1.weight is \(16, 64\) torch.float32 in the checkpoint, \(20, 64\) torch.float32 here"),
    "another layer": (lambda: dict(model=DeeperMLP()), r"model: 5 of its tensors are not in the checkpoint: \['fc3\."),
    "float64 model": (lambda: dict(model=worker.ImageMLP().double()),
                      r"model: fc1.weight is \(16, 64\) torch.float32 in the checkpoint, \(16, 64\) torch.float64 "
                      r"here"),
    "other range": (lambda: dict(hparams=_hparams({"dropout": {"high": 0.8}})),
                    r"hparams: high of 'dropout': 0.9 in the checkpoint, 0.8 here"),
    "other name": (lambda: dict(hparams=_hparams({"noise": {"name": "jitter"}})),
                   r"hparams: names \('dropout', 'noise', .*\) in the checkpoint, \('dropout', 'jitter', .*\) here"),
    "other count": (lambda: dict(hparams=stn.HyperparameterSet(worker.HPARAMS[:5])),
                    r"hparams: 6 hyperparameters .* in the checkpoint, 5 .* here"),
    "discrete": (lambda: dict(hparams=_hparams({"cutholes": {"discrete": False, "init": 1.5}})),
                 r"hparams: discrete of 'cutholes': True in the checkpoint, False here"),
    "float64 hyperparameters": (lambda: dict(hparams=stn.HyperparameterSet(worker.HPARAMS, dtype=torch.float64)),
                                r"hparams: dtype: 'torch.float32' in the checkpoint, 'torch.float64' here"),
    "other optimizer": (lambda: dict(optimizer=lambda p: torch.optim.SGD(p, 0.1)),
                        r"weight_optimizer: Adam in the checkpoint, SGD here"),
    "other groups": (lambda: dict(optimizer=_two_groups),
                     r"weight_optimizer: 1 parameter group\(s\) in the checkpoint, 2 here"),
    "other setting": (lambda: dict(train_steps=3), r"train_steps: 2 in the checkpoint, 3 here"),
    "no generator": (lambda: dict(generator=None),
                     r"generator: the checkpoint's trainer had a generator=, this one has none"),
    "compiled": (lambda: dict(compile=True), r"compile: None in the checkpoint, \{\} here"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(saved, case):
    changes, match = BAD[case]
    torch.manual_seed(0)
    _refused(saved, _rebuilt(worker.build("mlp"), **changes()), match)


def test_trainer_none_and_a_trainer_do_not_mix(saved, tmp_path):
    run = worker.build("mlp")
    before = worker.snapshot(run)
    with pytest.raises(stn.CheckpointError, match="trainer=None was given"):
        stn.load_checkpoint(saved, None, run[0])
    assert _difference(worker.snapshot(run), before) == []
    # A loop without a trainer: the model, torch's generators and extra.
    stn.save_checkpoint(tmp_path / "plain.pt", None, run[0], extra={"step": 5})
    drawn = torch.rand(3)
    _refused(tmp_path / "plain.pt", run, "the checkpoint holds no STNTrainer state, but a trainer was given")
    assert stn.load_checkpoint(tmp_path / "plain.pt", None, worker.ImageMLP()) == {"step": 5}
    assert torch.equal(torch.rand(3), drawn)      # the default generator as it was at the save


def test_a_missing_checkpoint_and_bad_arguments(tmp_path):
    run = worker.build("mlp")
    with pytest.raises(FileNotFoundError, match="path: no checkpoint at"):
        stn.load_checkpoint(tmp_path / "none.pt", run[1], run[0])
    with pytest.raises(TypeError, match=r"extra\['data'\]\[1\]: expected tensors, numbers, strings, .* got "
                                        r"builtins.object"):
        stn.save_checkpoint(tmp_path / "x.pt", run[1], run[0], extra={"data": [1, object()]})
    assert not os.listdir(tmp_path)                       # nothing written
    with pytest.raises(TypeError, match="trainer: expected an STNTrainer or None, got Adam"):
        stn.save_checkpoint(tmp_path / "x.pt", run[1].weight_optimizer, run[0])
    with pytest.raises(TypeError, match="model: expected the nn.Module being trained, got STNTrainer"):
        stn.save_checkpoint(tmp_path / "x.pt", run[1], run[1])
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int"):
        stn.load_checkpoint(3, run[1], run[0])


def test_trainer_state_dict_round_trip_and_refusal():
    """A fresh trainer given the state (and the model its weights, the data their positions) continues as the
    trainer the state came from."""
    run = _run()
    state = copy.deepcopy(run[1].state_dict())
    assert state["version"] == 1 and state["counters"] == {"train_steps_done": 6, "valid_steps_done": 3}
    assert state["optimizers"]["response_optimizer"] is None and state["random"]["seed"] == 7
    weights, positions = copy.deepcopy(run[0].state_dict()), [copy.deepcopy(n.state_dict()) for n in run[2:]]
    for _ in range(2):
        run[1].step(run[2], run[3])
    fresh = worker.build("mlp")
    fresh[0].load_state_dict(weights)
    fresh[1].load_state_dict(state)
    for next_batch, position in zip(fresh[2:], positions):
        next_batch.load_state_dict(position)
    for _ in range(2):
        fresh[1].step(fresh[2], fresh[3])
    assert _difference(worker.snapshot(fresh), worker.snapshot(run)) == []
    other = _rebuilt(worker.build("mlp"), warmup_steps=4)
    before = copy.deepcopy(other[1].state_dict())
    with pytest.raises(ValueError, match="state_dict: does not fit this trainer: warmup_steps: 2 in the "
                                         "checkpoint, 4 here"):
        other[1].load_state_dict(state)
    assert _difference(other[1].state_dict(), before) == []


# --------------------------------------------------------------------------- cycle_batches' position


def _loaders():
    """kind -> (a factory of the batches, batches per epoch)."""
    data = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
    return {
        "shuffled": (lambda: torch.utils.data.DataLoader(data, batch_size=3, shuffle=True), 4),
        "own generator": (lambda: torch.utils.data.DataLoader(data, batch_size=3, shuffle=True,
                                                              generator=torch.Generator().manual_seed(1)), 4),
        "distributed sampler": (lambda: torch.utils.data.DataLoader(
            data, batch_size=2, sampler=torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, seed=3)), 3),
        "list": (lambda: [(torch.tensor([float(i)]), torch.tensor([i])) for i in range(4)], 4),
    }


@pytest.mark.parametrize("kind", list(_loaders()))
@pytest.mark.parametrize("taken", [0, 2, 4, 9])
def test_cycle_batches_resumes_its_position(kind, taken):
    """The batches after a restored position are those of the uninterrupted sequence, across epochs, while torch's
    generator also serves the training in between (a draw after every batch)."""
    make, epoch = _loaders()[kind]
    torch.manual_seed(0)
    straight = stn.cycle_batches(make())
    sequence = []
    for _ in range(taken + 8):
        sequence.append(straight()[1].tolist())
        torch.rand(1)
    torch.manual_seed(0)
    first = stn.cycle_batches(make())
    for _ in range(taken):
        first()
        torch.rand(1)
    position, rng = copy.deepcopy(first.state_dict()), torch.get_rng_state()
    torch.manual_seed(123)                          # a new process: other draws first
    torch.rand(5)
    resumed = stn.cycle_batches(make())
    torch.set_rng_state(rng)                        # what load_checkpoint restores
    resumed.load_state_dict(position)
    assert torch.equal(torch.get_rng_state(), rng)  # the replay leaves torch's generator as it was
    rest = []
    for _ in range(8):
        rest.append(resumed()[1].tolist())
        torch.rand(1)
    assert rest == sequence[taken:]
    # Shuffled: every epoch in another order, so a position is more than a count modulo the epoch.
    assert (sequence[:epoch] == sequence[epoch:2 * epoch]) == (kind == "list")


def test_cycle_batches_sets_the_sampler_epoch_and_refuses_a_one_pass_iterator():
    data = torch.utils.data.TensorDataset(torch.arange(8.0), torch.arange(8))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0, seed=3)
    next_batch = stn.cycle_batches(torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler))
    first, second = next_batch()[1].tolist(), next_batch()[1].tolist()
    assert sampler.epoch == 1 and first != second     # set_epoch(1): a new order in the second epoch
    assert next_batch.state_dict()["epoch"] == 1 and next_batch.state_dict()["taken"] == 1
    once = stn.cycle_batches(iter([(torch.zeros(1), torch.zeros(1))]))
    once()
    with pytest.raises(TypeError, match="batches: a position can be restored only in something iterated afresh"):
        stn.cycle_batches(iter([])).load_state_dict(once.state_dict())
    with pytest.raises(TypeError, match="batches: expected an iterable of batches"):
        stn.cycle_batches(3)


# --------------------------------------------------------------------------- 2 ranks: DDP and FSDP2


def _killed_together(procs, grace=30.0, timeout=240.0) -> None:
    """Waits for the ranks of a killed run; once one has died, the others get ``grace`` seconds to die too, then are
    killed (a rank blocked in a collective with a dead peer would wait for gloo's timeout)."""
    deadline = time.monotonic() + timeout
    while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = min(deadline, time.monotonic() + grace)
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each scenario trained on 2 ranks and killed at a random step; then one launch resumes both, runs them
    uninterrupted and loads checkpoints that must be refused."""
    tmp = tmp_path_factory.mktemp("stn_checkpoint_distributed")
    kills = {name: _kill_point(distributed_worker.EVERY + 1, distributed_worker.CYCLES) for name in ("ddp", "fsdp2")}
    paths = {"ddp": tmp / "ddp.pt", "fsdp2": tmp / "fsdp2"}

    def launch(store, *args):
        """The 2 ranks, their output to files (a full pipe would stall a rank that nobody reads yet)."""
        procs = []
        for r in range(2):
            with open(tmp / f"{store}_{r}.log", "w") as log:   # the rank writes to its own copy of the file
                procs.append(subprocess.Popen([sys.executable, DISTRIBUTED_WORKER, str(r), "2", str(tmp / store),
                                               *map(str, args)], env=ENV, stdout=log, stderr=subprocess.STDOUT))
        return procs

    def output(store, r):
        return (tmp / f"{store}_{r}.log").read_text()

    killed = {name: launch(f"store_{name}", "train", name, paths[name], *kills[name]) for name in kills}
    for name, procs in killed.items():
        _killed_together(procs)
        for p, out in zip(procs, (output(f"store_{name}", r) for r in range(2))):
            # Each rank kills itself at the same call; one still in a collective with a dead peer may instead
            # stop on gloo's error, or be killed here.
            peer_died = p.returncode != 0 and "Connection" in out
            assert p.returncode == -signal.SIGKILL or peer_died, \
                f"{name} (kill at {kills[name]}) exited {p.returncode}:\n{out[-3000:]}"
    # A one-process checkpoint of the same model, hyperparameters and trainer settings.
    with torch.random.fork_rng():
        one = distributed_worker.build_one_process()
        stn.save_checkpoint(tmp / "one.pt", one[1], one[0], extra={"cycle": 0})
    procs = launch("store_resume", "resume", tmp, paths["ddp"], paths["fsdp2"], tmp / "one.pt")
    _communicate(procs)
    results = []
    for r, (p, out) in enumerate(zip(procs, (output("store_resume", r) for r in range(2)))):
        saved = tmp / f"rank{r}.pt"
        assert saved.exists() and p.returncode == 0, f"rank {r} exited {p.returncode}:\n{out[-4000:]}"
        results.append(torch.load(saved, weights_only=False))
    return kills, paths, results


def _scenario(two_ranks, name):
    kills, _, results = two_ranks
    for r, result in enumerate(results):
        assert "error" not in result[name], f"rank {r}, {name}:\n{result[name]['error']}"
    return kills[name], [result[name] for result in results]


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_two_ranks_killed_at_a_random_step_resume_bitwise_equal_to_an_uninterrupted_run(two_ranks, scenario):
    (kill_cycle, kill_call), ranks = _scenario(two_ranks, scenario)
    for rank, result in enumerate(ranks):
        assert result["start"] == (kill_cycle - 1) // distributed_worker.EVERY * distributed_worker.EVERY
        differences = _difference(result["end"], result["reference"])
        assert differences == [], f"rank {rank}, killed at cycle {kill_cycle}, call {kill_call}: {differences[:5]}"
    # Each rank restored its own streams: they differ between the ranks (and the data shards too).
    first, second = ranks[0]["end"], ranks[1]["end"]
    assert not torch.equal(first["torch_rng"], second["torch_rng"])
    assert not torch.equal(first["generator"], second["generator"])
    assert _difference(first["lam"], second["lam"]) == [] and _difference(first["rho"], second["rho"]) == []


def test_delta_stn_under_fsdp2_resumes_bitwise_equal(two_ranks):
    """Its two optimisers of sharded parameters (general weights, response) go through DCP side by side."""
    _, _, results = two_ranks
    for rank, result in enumerate(r["delta_fsdp2"] for r in results):
        assert "error" not in result, f"rank {rank}:\n{result['error']}"
        assert result["start"] == 4 and result["end"]["optimizers"]["response_optimizer"]["state"]
        assert _difference(result["end"], result["reference"]) == [], rank


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_two_ranks_refuse_another_world_size_and_another_hyperparameter_set_on_every_rank(two_ranks, scenario):
    _, ranks = _scenario(two_ranks, scenario)
    for rank, result in enumerate(ranks):
        one, other = result["one_process"], result["other_hparams"]
        assert one["type"] == other["type"] == "CheckpointError" and one["unchanged"] and other["unchanged"]
        expected = ("world size: the checkpoint was written by a run of 1 rank(s), this run has 2" if scenario == "ddp"
                    else "is a file (a one-process or DDP checkpoint?), but the model holds sharded")
        assert expected in one["message"], one["message"]
        assert "hparams: high of 'rate': 0.9 in the checkpoint, 0.8 here" in other["message"], other["message"]
        assert "(rank 0 of 2)" in other["message"]      # rank 1 names the rank that found it, as rank 0 does


def test_a_failure_on_one_rank_raises_on_every_rank(two_ranks):
    _, _, results = two_ranks
    first, second = (r["bad_extra"] for r in results)
    assert second["type"] == "TypeError" and second["message"].startswith("extra['x']: expected tensors"), second
    assert first["type"] == "RuntimeError" and "save_checkpoint: rank 1 failed: TypeError: extra['x']" in \
        first["message"], first
    assert not first["written"] and not second["written"]


def test_one_process_refuses_a_checkpoint_of_two_ranks_naming_the_world_size(two_ranks):
    _, paths, _ = two_ranks
    run = distributed_worker.build_one_process()
    before = distributed_worker.snapshot(run)
    with pytest.raises(stn.CheckpointError, match=r"world size: the checkpoint was written by a run of 2 "
                                                  r"rank\(s\), this run has 1"):
        stn.load_checkpoint(paths["ddp"], run[1], run[0])
    with pytest.raises(stn.CheckpointError, match=r"a sharded \(FSDP2\) checkpoint written by a run of 2 "
                                                  r"rank\(s\), but this run has 1 rank\(s\)"):
        stn.load_checkpoint(paths["fsdp2"], run[1], run[0])
    assert distributed_worker._equal(distributed_worker.snapshot(run), before)
