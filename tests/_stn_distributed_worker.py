"""One rank of tests/test_stn_distributed.py: ``python _stn_distributed_worker.py RANK WORLD INIT_FILE OUT_DIR``.

Joins a gloo group through a file store (no port to collide on), runs every scenario in turn in that
one group and writes what each rank saw to ``OUT_DIR/rank<RANK>.pt`` for the parent test to compare.
The model, data and the one-process reference (:func:`equivalence_run`) are importable by the parent.
"""

import gc
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stn_kernels  # noqa: E402
from stn_kernels import stn  # noqa: E402


class TinyNet(torch.nn.Module):
    """6 → 8 → 3; with ``regularize`` per-example dropout ("rate") and input noise ("noise")."""

    def __init__(self, regularize=True):
        super().__init__()
        self.fc1 = stn_kernels.HyperLinear(6, 8, num_hparams=2)
        self.fc2 = stn_kernels.HyperLinear(8, 3, num_hparams=2)
        self.regularize = regularize
        self.perturbed = []   # λ_b of every training step: ε made visible
        self.probes = []      # a mask at a fixed rate: shows the dropout seed stream alone

    def forward(self, x, sample):
        if sample.regularize:
            self.perturbed.append(sample.unconstrained.detach().clone())
        if self.regularize and sample.regularize:
            x = x + sample["noise"][:, None] * torch.randn_like(x)
        h = torch.relu(self.fc1(x, sample.layer_input))
        if self.regularize:
            if sample.regularize:
                self.probes.append(stn.per_example_dropout(torch.ones(4, 16), 0.5) == 0)
            h = stn.per_example_dropout(h, sample["rate"], training=sample.regularize)
        return self.fc2(h, sample.layer_input)


def make_model(regularize=True):
    torch.manual_seed(0)  # the same initial weights on every rank (FSDP2 does not broadcast them)
    model = TinyNet(regularize)
    with torch.no_grad():  # a visible hyper path, so that the hypergradient is not tiny
        for layer in (model.fc1, model.fc2):
            layer.hparam_weight.normal_(0.0, 0.5)
    return model


def make_hparams():
    return stn.HyperparameterSet([stn.Hyperparameter("rate", 0.3, 0.0, 0.9, scale=0.4),
                                  stn.Hyperparameter("noise", 0.2, 0.0)])


def rank_data(rank, n=8, salt=0):
    """This rank's own (inputs, targets): different on every rank."""
    g = torch.Generator().manual_seed(1000 * (salt + 1) + rank)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def batches(rank, salt):
    data = [rank_data(rank, salt=salt + k) for k in range(3)]
    state = {"i": 0}

    def next_batch():
        state["i"] += 1
        return data[state["i"] % len(data)]
    return next_batch


def snapshot(model, hp, full=lambda t: t):
    return {"weights": {k: full(v).detach().clone() for k, v in model.state_dict().items()},
            "lam": hp.unconstrained.detach().clone(), "rho": hp.raw_scale.detach().clone(),
            "values": dict(hp.values()), "scales": dict(hp.scales())}


def stn_loop(rank, wrap, *, delta=False, linearize=False, cycles=4, make=None, freeze=None, **trainer_kwargs):
    """The README loop: Adam on weights, λ and ρ; 2 training steps and 1 validation step per cycle. ``make``: another
    model; ``freeze(model)``: parameters to freeze before wrapping (the optimizer still holds them)."""
    torch.manual_seed(0)  # every rank seeded alike: the trainer must still give each its own draws
    model = (make or make_model)()
    if freeze is not None:
        freeze(model)
    net = wrap(model)
    hp = make_hparams()
    start = snapshot(model, hp, full=_full)
    if delta:
        general, response = stn.split_stn_parameters(net)
        extra = dict(response_optimizer=torch.optim.Adam(response, 1e-2), delta_stn=True, linearize=linearize)
    else:
        general, extra = list(net.parameters()), {}
    trainer = stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.Adam(general, 1e-2),
                             hparam_optimizer=torch.optim.Adam([hp.unconstrained], 0.05),
                             scale_optimizer=torch.optim.Adam([hp.raw_scale], 0.05),
                             train_steps=2, valid_steps=1, warmup_steps=2, **extra, **trainer_kwargs)
    next_train, next_valid = batches(rank, 0), batches(rank, 10)
    for _ in range(cycles):
        trainer.step(next_train, next_valid)
    return {"start": start, "end": snapshot(model, hp, full=_full), "takes_sample": trainer.takes_sample,
            "perturbed": model.perturbed[0] if hasattr(model, "perturbed") else None,
            "probe": model.probes[0] if getattr(model, "probes", None) else None}


def make_converted_model():
    """A plain torch.nn MLP with dropout, converted: given to the trainer (under DDP) as the model itself."""
    torch.manual_seed(0)
    model = stn_kernels.convert(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                                    torch.nn.Linear(8, 3)), num_hparams=2)
    with torch.no_grad():  # a visible hyper path (convert starts it at zero)
        for m in model.modules():
            if getattr(m, "context_hparams", False):
                m.hparam_weight.normal_(0.0, 0.5)
    return model


def freeze_first_layer(model):
    model.fc1.requires_grad_(False)


def _full(t):
    """A DTensor (FSDP2's sharded parameter) gathered whole; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def ddp(model, **options):
    return torch.nn.parallel.DistributedDataParallel(model, **options)


def fsdp2(model):
    from torch.distributed.fsdp import fully_shard

    for layer in (model.fc1, model.fc2):
        fully_shard(layer)
    fully_shard(model)
    return model


def equivalence_run(batches_of_ranks, wrap=lambda m: m):
    """One cycle (1 training step, 1 validation step, SGD) with the perturbations off: σ = softplus(−200)
    is exactly 0 in float32, so λ_b = λ bit for bit; no dropout, no noise; validation at λ itself.
    ``batches_of_ranks``: [(train, valid)] of this process (one entry) or of all ranks concatenated."""
    model = make_model(regularize=False)
    net = wrap(model)
    hp = make_hparams()
    with torch.no_grad():
        hp.raw_scale.fill_(-200.0)
    assert torch.equal(hp.scale, torch.zeros(2))
    trainer = stn.STNTrainer(net, F.cross_entropy, hp, torch.optim.SGD(net.parameters(), lr=0.5),
                             hparam_optimizer=torch.optim.SGD([hp.unconstrained], lr=2.0),
                             tune_scales=False, train_steps=1, valid_steps=1)
    train = tuple(torch.cat(parts) for parts in zip(*[b[0] for b in batches_of_ranks]))
    valid = tuple(torch.cat(parts) for parts in zip(*[b[1] for b in batches_of_ranks]))
    trainer.step(lambda: train, lambda: valid)
    return snapshot(model, hp)


def equivalence_batches(rank):
    return rank_data(rank, salt=20), rank_data(rank, salt=30)


VOCAB = 11


class PlainLM(torch.nn.Module):
    """Embedding → LSTM → Linear in plain torch.nn, to be converted and fed λ by ``stn_kernels.hparams``."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 5)
        self.lstm = torch.nn.LSTM(5, 6, batch_first=True)
        self.decoder = torch.nn.Linear(6, VOCAB)

    def forward(self, tokens):
        return self.decoder(self.lstm(self.embed(tokens))[0])


def hparams_block_data(rank):
    """This rank's (tokens [4, 6], λ [4, 2]): different on every rank."""
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randint(0, VOCAB, (4, 6), generator=g), torch.randn(4, 2, generator=g)


def hparams_block_run(data_of_ranks, wrap=lambda m: m):
    """The gradients (weights, λ) of the converted LM's next-token loss on the given ranks' data concatenated,
    λ fed by ``with stn_kernels.hparams(lam):`` around the (wrapped) model's call."""
    torch.manual_seed(0)
    model = stn_kernels.convert(PlainLM(), num_hparams=2)
    with torch.no_grad():  # a visible hyper path (convert starts it at zero)
        for name, p in model.named_parameters():
            if name.endswith("hparam_weight"):
                p.normal_(0.0, 0.5)
    net = wrap(model)
    tokens, lam = (torch.cat(parts) for parts in zip(*data_of_ranks))
    lam.requires_grad_()
    with stn_kernels.hparams(lam):
        logits = net(tokens[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
    return {"weights": {name: p.grad.clone() for name, p in model.named_parameters()}, "lam": lam.grad.clone()}


def helpers(rank, world):
    hp = make_hparams()
    hp.set_values(rate=0.1 + 0.2 * rank)             # rank-specific values ...
    stn.sync_hyperparameters(hp)                       # ... replaced by rank 0's
    synced = dict(hp.values())
    hp.unconstrained.grad = torch.full((2,), float(rank + 1))
    hp.raw_scale.grad = None                           # a missing gradient counts as zeros
    stn.average_hyperparameter_grads(hp)
    stn.seed_rank_streams(7)
    first = torch.randn(5)
    stn.seed_rank_streams(7)
    again = torch.randn(5)
    # Reproducible per-rank ε from the trainer's seed: two trainers seeded 11 draw the same on this rank.
    drawn = []
    for _ in range(2):
        model, hp2 = make_model(), make_hparams()
        trainer = stn.STNTrainer(model, F.cross_entropy, hp2, torch.optim.SGD(model.parameters(), lr=0.1), seed=11)
        trainer.train_step(*rank_data(rank))
        drawn.append(model.perturbed[0])
    return {"synced": synced, "lam_grad": hp.unconstrained.grad.clone(), "rho_grad": hp.raw_scale.grad.clone(),
            "stream": first, "stream_again": again, "seeded": drawn}


def main(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    scenarios = {
        "ddp": lambda: stn_loop(rank, ddp),
        "fsdp2": lambda: stn_loop(rank, fsdp2),
        "opt_out": lambda: stn_loop(rank, ddp, sync_hyperparameters=False),
        "user_generator": lambda: stn_loop(rank, ddp, cycles=1, generator=torch.Generator().manual_seed(3)),
        "delta_ddp": lambda: stn_loop(rank, ddp, delta=True),
        "delta_ddp_linearized": lambda: stn_loop(rank, ddp, delta=True, linearize=True),
        "delta_fsdp2": lambda: stn_loop(rank, fsdp2, delta=True),
        # The valid step's forward builds no weight gradient: DDP must not wait for one in these modes either.
        "delta_ddp_find_unused": lambda: stn_loop(rank, lambda m: ddp(m, find_unused_parameters=True), delta=True),
        "ddp_static_graph": lambda: stn_loop(rank, lambda m: ddp(m, static_graph=True)),
        # Frozen parameters held by the optimizers: the whole-model backward under DDP skips them.
        "ddp_frozen": lambda: stn_loop(rank, ddp, freeze=freeze_first_layer),
        "delta_ddp_frozen": lambda: stn_loop(rank, ddp, delta=True, freeze=freeze_first_layer),
        # A converted plain model, the trainer calling DDP(model)(inputs) inside the hparams block.
        "ddp_module_path": lambda: stn_loop(rank, ddp, make=make_converted_model),
        "equivalence": lambda: equivalence_run([equivalence_batches(rank)], wrap=ddp),
        "helpers": lambda: helpers(rank, world),
        "hparams_block_ddp": lambda: hparams_block_run([hparams_block_data(rank)], wrap=ddp),
    }
    results = {}
    for name, run in scenarios.items():
        try:   # a failing scenario fails its own tests only (its error goes to the parent)
            results[name] = run()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    gc.collect()  # free the DDP/FSDP wrappers first, then leave together (see examples/stn_digits.py)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    rank, world, init_file, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    sys.exit(main(rank, world, init_file, out_dir))
