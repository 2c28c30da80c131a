"""One rank of the distributed runs of tests/test_stn_checkpoint.py (gloo, a file store; the model, data and
wrappers of tests/_stn_distributed_worker.py):

    python _stn_checkpoint_distributed_worker.py RANK WORLD STORE train SCENARIO CHECKPOINT KILL_CYCLE KILL_CALL
        trains from scratch under SCENARIO ("ddp" or "fsdp2"), saving a checkpoint every EVERY cycles, and
        SIGKILLs itself at the KILL_CALL-th model call of cycle KILL_CYCLE (every rank at the same point)
    python _stn_checkpoint_distributed_worker.py RANK WORLD STORE resume OUT DDP_CHECKPOINT FSDP2_CHECKPOINT ONE
        for each scenario: resumes from its checkpoint to the end, then runs the same seeds uninterrupted; loads
        ONE (a one-process checkpoint of the same model) and another hyperparameter set's checkpoint, which must
        fail on every rank and change nothing; then Delta-STN under FSDP2 (its weight and response optimisers both
        through DCP), stopped and resumed; an extra only one rank cannot save; writes what it saw to
        OUT/rank<RANK>.pt
"""

import copy
import os
import signal
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stn_kernels import stn  # noqa: E402

from _stn_distributed_worker import ddp, fsdp2, make_hparams, make_model  # noqa: E402

CYCLES = 12          # 2 training steps and 1 validation step each: 36 steps
EVERY = 2


def local(value):
    """A state with every DTensor replaced by this rank's shard, tensors cloned."""
    if hasattr(value, "to_local"):
        return value.to_local().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local(v) for v in value)
    return copy.deepcopy(value)


def build(scenario, rank, hparams=make_hparams, world=2):
    """(model, trainer, next_train, next_valid): this rank's, as a torchrun script builds them; scenario "one": in
    one process."""
    model = make_model()             # seeded: the same initial weights on every rank
    net = {"ddp": ddp, "fsdp2": fsdp2, "delta_fsdp2": fsdp2, "one": lambda m: m}[scenario](model)
    hp = hparams()
    options = dict(hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.05),
                   scale_optimizer=torch.optim.Adam([hp.raw_scale], 0.05), train_steps=2, valid_steps=1,
                   warmup_steps=2, seed=5, generator=torch.Generator().manual_seed(stn.rank_seed(9, rank)))
    if scenario.startswith("delta"):   # two optimisers of sharded parameters: both through DCP
        general, response = stn.split_stn_parameters(net)
        trainer = stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.Adam(general, 1e-2), delta_stn=True,
                                 response_optimizer=torch.optim.Adam(response, 1e-2), **options)
    else:
        trainer = stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.Adam(net.parameters(), 1e-2), **options)
    data = torch.Generator().manual_seed(3)
    train = torch.utils.data.TensorDataset(torch.randn(24, 6, generator=data),
                                           torch.randint(0, 3, (24,), generator=data))
    valid = torch.utils.data.TensorDataset(torch.randn(16, 6, generator=data),
                                           torch.randint(0, 3, (16,), generator=data))
    # Each rank its shard, in a new order every epoch (cycle_batches calls set_epoch).
    loader = lambda part: torch.utils.data.DataLoader(  # noqa: E731
        part, batch_size=4,
        sampler=torch.utils.data.DistributedSampler(part, num_replicas=world, rank=rank, shuffle=True, seed=4))
    return net, trainer, stn.cycle_batches(loader(train)), stn.cycle_batches(loader(valid))


def build_one_process():
    """The same run in one process (no process group)."""
    return build("one", 0, world=1)


def snapshot(run):
    net, trainer, next_train, next_valid = run
    return local({
        "weights": net.state_dict(), "lam": trainer.hparams.unconstrained, "rho": trainer.hparams.raw_scale,
        "optimizers": {name: None if getattr(trainer, name) is None else getattr(trainer, name).state_dict()
                       for name in ("weight_optimizer", "hparam_optimizer", "scale_optimizer", "response_optimizer")},
        "torch_rng": torch.get_rng_state(), "generator": trainer.generator.get_state(),
        "counters": (trainer.train_steps_done, trainer.valid_steps_done),
        "data": (next_train.state_dict(), next_valid.state_dict())})


def train(run, start, checkpoint=None, kill=None, last=CYCLES):
    """Cycles ``start + 1 .. last``; a checkpoint after every EVERY-th; ``kill``: (cycle, call) to die at."""
    net, trainer, next_train, next_valid = run
    calls = {"left": None}

    def count(module, inputs):
        if calls["left"] is not None:
            calls["left"] -= 1
            if calls["left"] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    hook = net.register_forward_pre_hook(count)
    for cycle in range(start + 1, last + 1):
        if kill is not None and cycle == kill[0]:
            calls["left"] = kill[1]
        trainer.step(next_train, next_valid)
        if checkpoint is not None and cycle % EVERY == 0:
            stn.save_checkpoint(checkpoint, trainer, net, extra={"cycle": cycle, "train": next_train.state_dict(),
                                                                 "valid": next_valid.state_dict()})
    hook.remove()
    return snapshot(run)


def resume(checkpoint, run):
    net, trainer, next_train, next_valid = run
    extra = stn.load_checkpoint(checkpoint, trainer, net)
    next_train.load_state_dict(extra["train"])
    next_valid.load_state_dict(extra["valid"])
    return extra["cycle"]


def refused(path, run):
    """The error loading ``path`` into ``run`` raises, and whether the run is unchanged after it."""
    before = snapshot(run)
    try:
        resume(path, run)
    except Exception as error:  # noqa: BLE001  (what it is, the test checks)
        return {"type": type(error).__name__, "message": str(error),
                "unchanged": _equal(before, snapshot(run))}
    return {"type": None}


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def other_hparams():
    return stn.HyperparameterSet([stn.Hyperparameter("rate", 0.3, 0.0, 0.8, scale=0.4),
                                  stn.Hyperparameter("noise", 0.2, 0.0)])


def main_resume(rank, out, ddp_checkpoint, fsdp2_checkpoint, one_process):
    results = {}
    for scenario, checkpoint in (("ddp", ddp_checkpoint), ("fsdp2", fsdp2_checkpoint)):
        try:
            run = build(scenario, rank)
            start = resume(checkpoint, run)
            results[scenario] = {"start": start, "end": train(run, start, checkpoint),
                                 "reference": train(build(scenario, rank), 0),
                                 "one_process": refused(one_process, build(scenario, rank)),
                                 "other_hparams": refused(checkpoint, build(scenario, rank, other_hparams))}
        except Exception:  # noqa: BLE001  (a failing scenario fails its own test; the ranks stay in step)
            results[scenario] = {"error": traceback.format_exc()}
    try:   # Delta-STN under FSDP2, stopped after cycle 5 (not killed: the launch goes on) and resumed from cycle 4
        checkpoint = os.path.join(out, "delta_fsdp2")
        train(build("delta_fsdp2", rank), 0, checkpoint, last=5)
        run = build("delta_fsdp2", rank)
        start = resume(checkpoint, run)
        results["delta_fsdp2"] = {"start": start, "end": train(run, start, checkpoint),
                                  "reference": train(build("delta_fsdp2", rank), 0)}
    except Exception:  # noqa: BLE001
        results["delta_fsdp2"] = {"error": traceback.format_exc()}
    # An extra only rank 1 cannot save: every rank raises (none waits for the others in a collective), nothing written.
    run, bad = build("ddp", rank), os.path.join(out, "bad_extra.pt")
    try:
        stn.save_checkpoint(bad, run[1], run[0], extra={"x": object()} if rank == 1 else {})
        results["bad_extra"] = {"type": None}
    except Exception as error:  # noqa: BLE001
        results["bad_extra"] = {"type": type(error).__name__, "message": str(error), "written": os.path.exists(bad)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def main():
    rank, world, store, command, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    if command == "train":
        scenario, checkpoint, kill_cycle, kill_call = args
        train(build(scenario, rank), 0, checkpoint, kill=(int(kill_cycle), int(kill_call)))
        raise SystemExit("not killed")
    main_resume(rank, *args)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
