"""The runs of tests/test_stn_checkpoint.py, in a process of their own:

    python _stn_checkpoint_worker.py train SCENARIO CHECKPOINT KILL_CYCLE KILL_CALL
        trains from scratch, saving a checkpoint every EVERY cycles, and SIGKILLs itself at the KILL_CALL-th model
        call of cycle KILL_CYCLE (never returns normally)
    python _stn_checkpoint_worker.py check OUT MLP_CHECKPOINT DELTA_CHECKPOINT KILLS_DIR POINT...
        resumes each scenario from its checkpoint to the end and runs it with the same seed uninterrupted; then,
        for each POINT, a forked child is SIGKILLed inside save_checkpoint at that point of the write (over an
        older checkpoint of "mlp"), and each checkpoint left is loaded and resumed to the end; writes it all to OUT

SCENARIO "mlp": an MLP on 8×8 images with per-example dropout, augmentation (jitter, cutout) and input noise,
its data from shuffled DataLoaders through stn.cycle_batches; "delta": Delta-STN (linearised) on it.
"""

import copy
import os
import signal
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stn_kernels  # noqa: E402
from stn_kernels import stn  # noqa: E402
from stn_kernels.stn import checkpoint_format  # noqa: E402

CYCLES = 16          # 2 training steps and 1 validation step each: 48 steps
EVERY = 3            # a checkpoint every 3 cycles
HPARAMS = [stn.Hyperparameter("dropout", 0.2, 0.0, 0.9), stn.Hyperparameter("noise", 0.05, 0.0, 1.0),
           stn.Hyperparameter("bright", 0.1, 0.0, 1.0), stn.Hyperparameter("contrast", 0.1, 0.0, 1.0),
           stn.Hyperparameter("cutholes", 1, 0, 2, discrete=True), stn.Hyperparameter("cutlength", 2, 0, 4,
                                                                                       discrete=True)]


class ImageMLP(torch.nn.Module):
    """64 → 16 → 4 on 8×8 images: augmentation and noise on the input, per-example dropout on the hidden layer."""

    def __init__(self):
        super().__init__()
        self.fc1 = stn_kernels.HyperLinear(64, 16, num_hparams=len(HPARAMS))
        self.fc2 = stn_kernels.HyperLinear(16, 4, num_hparams=len(HPARAMS))

    def forward(self, x, sample):
        if sample.regularize:
            x = stn.augment(x.view(-1, 1, 8, 8), sample, max_holes=2).flatten(1)
            x = x + sample["noise"][:, None] * torch.randn_like(x)
        h = torch.relu(self.fc1(x, sample.layer_input))
        h = stn.per_example_dropout(h, sample["dropout"], training=sample.regularize)
        return self.fc2(h, sample.layer_input)


def build(scenario):
    """(model, trainer, next_train, next_valid) as a script builds them, before any step."""
    torch.manual_seed(0)
    model = ImageMLP()
    with torch.no_grad():
        for layer in (model.fc1, model.fc2):
            layer.hparam_weight.normal_(0.0, 0.5)
    hp = stn.HyperparameterSet(HPARAMS)
    data = torch.Generator().manual_seed(1)
    train = torch.utils.data.TensorDataset(torch.rand(44, 64, generator=data),
                                           torch.randint(0, 4, (44,), generator=data))
    valid = torch.utils.data.TensorDataset(torch.rand(20, 64, generator=data),
                                           torch.randint(0, 4, (20,), generator=data))
    # The training order from torch's default generator, the validation order from the loader's own.
    next_train = stn.cycle_batches(torch.utils.data.DataLoader(train, batch_size=8, shuffle=True))
    next_valid = stn.cycle_batches(torch.utils.data.DataLoader(valid, batch_size=6, shuffle=True,
                                                               generator=torch.Generator().manual_seed(2)))
    options = dict(hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.05),
                   scale_optimizer=torch.optim.Adam([hp.raw_scale], 0.05), train_steps=2, valid_steps=1,
                   warmup_steps=2, seed=7, generator=torch.Generator().manual_seed(9))
    if scenario == "delta":
        general, response = stn.split_stn_parameters(model)
        trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.Adam(general, 1e-2), delta_stn=True,
                                 linearize=True, response_optimizer=torch.optim.Adam(response, 1e-2), **options)
    else:
        trainer = stn.STNTrainer(model, F.cross_entropy, hp, torch.optim.Adam(model.parameters(), 1e-2), **options)
    return model, trainer, next_train, next_valid


def snapshot(run):
    """Everything that must be bitwise equal: weights, λ, ρ, every optimiser's state, the random streams, the
    counters and the data positions."""
    model, trainer, next_train, next_valid = run
    optimizers = {name: getattr(trainer, name) for name in ("weight_optimizer", "hparam_optimizer",
                                                             "scale_optimizer", "response_optimizer")}
    return copy.deepcopy({
        "weights": model.state_dict(), "lam": trainer.hparams.unconstrained.detach(),
        "rho": trainer.hparams.raw_scale.detach(),
        "optimizers": {k: None if v is None else v.state_dict() for k, v in optimizers.items()},
        "torch_rng": torch.get_rng_state(),
        "generator": None if trainer.generator is None else trainer.generator.get_state(),
        "counters": (trainer.train_steps_done, trainer.valid_steps_done),
        "data": (next_train.state_dict(), next_valid.state_dict())})


def save(path, run, cycle):
    model, trainer, next_train, next_valid = run
    stn.save_checkpoint(path, trainer, model, extra={"cycle": cycle, "train": next_train.state_dict(),
                                                     "valid": next_valid.state_dict()})


def resume(path, run) -> int:
    """The cycle the checkpoint at ``path`` was saved after (0: none there, start from scratch)."""
    model, trainer, next_train, next_valid = run
    try:
        extra = stn.load_checkpoint(path, trainer, model)
    except FileNotFoundError:
        return 0
    next_train.load_state_dict(extra["train"])
    next_valid.load_state_dict(extra["valid"])
    return extra["cycle"]


def train(run, start, checkpoint=None, kill=None):
    """Cycles ``start + 1 .. CYCLES``; a checkpoint after every EVERY-th; ``kill``: (cycle, call) to die at."""
    model, trainer, next_train, next_valid = run
    calls = {"left": None}

    def count(module, inputs):
        if calls["left"] is not None:
            calls["left"] -= 1
            if calls["left"] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    hook = model.register_forward_pre_hook(count)
    for cycle in range(start + 1, CYCLES + 1):
        if kill is not None and cycle == kill[0]:
            calls["left"] = kill[1]
        trainer.step(next_train, next_valid)
        if checkpoint is not None and cycle % EVERY == 0:
            save(checkpoint, run, cycle)
    hook.remove()
    return snapshot(run)


def uninterrupted(scenario):
    return train(build(scenario), 0)


def main_train(scenario, checkpoint, kill_cycle, kill_call):
    train(build(scenario), 0, checkpoint, kill=(int(kill_cycle), int(kill_call)))
    raise SystemExit("not killed")


def resumed(scenario, checkpoint):
    run = build(scenario)
    start = resume(checkpoint, run)
    return {"start": start, "end": train(run, start, checkpoint), "reference": uninterrupted(scenario)}


class KillingOs:
    """``os`` as checkpoint_format sees it, with a SIGKILL at one point of the write."""

    def __init__(self, point):
        self.point = point

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def write(self, fd, data):
        if self.point == "write" and len(data) > 1000:    # the header and half of the payload on disk
            os.write(fd, bytes(data[:len(data) // 2]))
            self.die()
        return os.write(fd, data)

    def fsync(self, fd):
        if self.point == "fsync":      # the temporary file written, not yet synced
            self.die()
        os.fsync(fd)

    def replace(self, source, target):
        if self.point == "replace":    # synced, not yet renamed
            self.die()
        os.replace(source, target)
        if self.point == "replaced":   # renamed, the directory not yet synced
            self.die()


def save_kills(scenario, directory, points):
    run = build(scenario)
    train_to = 2 * EVERY
    results = {}
    for cycle in range(1, train_to + 1):
        run[1].step(run[2], run[3])
        if cycle == EVERY:        # the older checkpoint, in every point's directory
            for point in points:
                save(os.path.join(directory, point, "run.pt"), run, cycle)
    for point in points:
        path = os.path.join(directory, point, "run.pt")
        pid = os.fork()
        if pid == 0:
            checkpoint_format.os = KillingOs(point)
            try:
                save(path, run, train_to)
            finally:
                os._exit(1)   # not killed: the parent sees exit status 1
        _, status = os.waitpid(pid, 0)
        killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        results[point] = {"signal": killed, "files": sorted(os.listdir(os.path.dirname(path)))}
    for point in points:
        resumed = build(scenario)
        path = os.path.join(directory, point, "run.pt")
        results[point]["start"] = resume(path, resumed)
        results[point]["end"] = train(resumed, results[point]["start"], path)
        results[point]["files_after"] = sorted(os.listdir(os.path.dirname(path)))
    return {"points": results, "reference": uninterrupted(scenario)}


def main_check(out, mlp_checkpoint, delta_checkpoint, kills_directory, *points):
    torch.save({"mlp": resumed("mlp", mlp_checkpoint), "delta": resumed("delta", delta_checkpoint),
                "save_kills": save_kills("mlp", kills_directory, points)}, out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, args = sys.argv[1], sys.argv[2:]
    {"train": main_train, "check": main_check}[command](*args)
