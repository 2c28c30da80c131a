"""The STN training toolkit: hyperparameters, per-example regularisers and the steps of Algorithm 1.

A self-tuning loop in a few lines (see ``examples/stn_digits.py`` for a complete one)::

    from stn_kernels import stn

    hp = stn.HyperparameterSet([stn.Hyperparameter("dropout", init=0.1, low=0.0, high=0.9)])

    def model_fn(x, sample):                      # sample: a HyperparameterSample
        h = torch.relu(fc1(x, sample.layer_input))
        h = stn.per_example_dropout(h, sample["dropout"], training=sample.regularize)
        return fc2(h, sample.layer_input)

    trainer = stn.STNTrainer(model_fn, F.cross_entropy, hp, torch.optim.Adam(weights, 1e-3))
    for _ in range(cycles):
        trainer.step(next_train_batch, next_valid_batch)   # T_train weight steps, T_valid λ/σ steps

A model :func:`stn_kernels.convert` made from a plain torch.nn one is given as it is:
``stn.STNTrainer(model, ...)`` calls ``model(inputs)`` inside ``with sample.hparams():`` (λ for its converted
layers) and switches it between train and eval mode around every step (docs/trainer.md).

Data parallel (DDP, FSDP2): the trainer keeps λ and σ identical on every rank and gives each rank its
own random streams; ``sync_hyperparameters``, ``average_hyperparameter_grads`` and ``seed_rank_streams``
do the same in a loop of your own (``stn/distributed.py``).

Resuming a run: ``stn.save_checkpoint(path, trainer, model, extra)`` / ``stn.load_checkpoint(path, trainer,
model)`` (docs/checkpoints.md).

Data augmentation by the tuned hyperparameters: ``stn.augment(images, sample)`` (``stn/augmentation.py``);
the paper's hyperparameter sets: ``stn.presets.alexnet_cifar10()``.

This package holds the toolkit's public API only: the per-example dropout op lives with the other
ops (``stn_kernels.ops``, public function :func:`stn_kernels.functional.per_example_dropout`).
"""

from ..functional import per_example_channel_dropout, per_example_dropout
from . import presets
from .augmentation import AFFINE_NAMES, AUGMENT_NAMES, affine_arguments, augment, augment_arguments
from .batches import BatchCycle, cycle_batches
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .distributed import (
                          average_gradients,
                          average_hyperparameter_grads,
                          distributed_rank,
                          rank_seed,
                          seed_rank_streams,
                          sync_hyperparameters,
)
from .hyperparameters import (
                              Hyperparameter,
                              HyperparameterSample,
                              HyperparameterSet,
                              inverse_softplus,
                              stretched_logit,
                              stretched_sigmoid,
)
from .training import StepResult, STNTrainer, linearized_output, split_stn_parameters

__all__ = [
    "AFFINE_NAMES", "AUGMENT_NAMES", "BatchCycle", "CheckpointError", "Hyperparameter", "HyperparameterSample",
    "HyperparameterSet", "STNTrainer", "StepResult", "affine_arguments", "augment", "augment_arguments",
    "average_gradients", "average_hyperparameter_grads", "cycle_batches", "distributed_rank", "inverse_softplus",
    "linearized_output", "load_checkpoint", "per_example_channel_dropout", "per_example_dropout", "presets",
    "rank_seed", "save_checkpoint", "seed_rank_streams", "split_stn_parameters", "stretched_logit",
    "stretched_sigmoid", "sync_hyperparameters",
]
