"""Checkpoints of a whole STN run: ``save_checkpoint(path, trainer, model, extra)`` and
``load_checkpoint(path, trainer, model) -> extra``. docs/checkpoints.md says what is saved.

One process or DDP: one file (``stn/checkpoint_format.py``: written atomically, checksummed, read with
``torch.load(weights_only=True)``); under DDP rank 0 writes it, with every rank's own random streams and
``extra`` gathered, and every rank reads it. FSDP2 (the model's parameters are DTensors): a directory, the
model's and the weight optimisers' shards written by every rank through ``torch.distributed.checkpoint``
(``stn/checkpoint_sharded.py``).

A load reads and checks everything first (the file's length and checksum, the world size, the model's tensor
names, shapes and dtypes, the hyperparameters, every optimiser's class and parameter shapes, the trainer's
settings and generators) and changes nothing unless all of it fits; under torch.distributed every rank
raises if any rank's check fails.
"""

from __future__ import annotations

import os

from torch import nn

from . import checkpoint_sharded, distributed, model_call
from .checkpoint_format import (
                                SHARED_OPTIMIZERS,
                                CheckpointError,
                                agree,
                                apply_entry,
                                check_payload,
                                encode,
                                new_payload,
                                own_entry,
                                read_verified,
                                tensor_layout,
                                together,
                                write_atomically,
)
from .training import STNTrainer

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]


def _check_arguments(path, trainer, model) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    if trainer is not None and not isinstance(trainer, STNTrainer):
        raise TypeError(f"trainer: expected an STNTrainer or None, got {type(trainer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected the nn.Module being trained, got {type(model).__name__}")
    return os.fspath(path)


def _group(trainer):
    return None if trainer is None else trainer.process_group


def save_checkpoint(path, trainer, model: nn.Module, extra=None) -> None:
    """Saves the whole run to ``path``: the model's state (``model.state_dict()`` of the module under DDP or
    ``torch.compile``), the trainer's :meth:`~stn_kernels.stn.STNTrainer.state_dict` (counters, optimisers, λ, ρ,
    generators, settings) and ``extra`` (yours: the data position, e.g. ``cycle_batches(...).state_dict()``, a
    learning-rate scheduler's state; tensors, numbers, strings, None and containers of them).

    Atomic: a kill at any instant leaves the previous checkpoint or the new one. ``trainer=None`` saves the
    model, torch's generators and ``extra`` of a loop without an STNTrainer.

    Under torch.distributed every rank calls it. DDP: rank 0 writes one file with every rank's random streams
    and ``extra``; FSDP2 (``fully_shard``): ``path`` is a directory and every rank writes its shard through
    ``torch.distributed.checkpoint``. Returns once the checkpoint is complete on disk, on every rank.
    """
    path = _check_arguments(path, trainer, model)
    group = _group(trainer)
    rank, world = distributed.distributed_rank(group)
    module = model_call.unwrapped(model)
    if checkpoint_sharded.is_sharded(module):
        checkpoint_sharded.save(path, trainer, module, extra, group)
        return
    entries = distributed.gather_objects(own_entry(trainer, extra, group), process_group=group)

    def write():   # rank 0
        state = module.state_dict()
        shared = {name: None if getattr(trainer, name, None) is None else getattr(trainer, name).state_dict()
                  for name in SHARED_OPTIMIZERS}
        write_atomically(path, encode(new_payload("file", world, tensor_layout(state), entries, model=state,
                                                  shared=shared)))

    together("save_checkpoint", group, write if rank == 0 else lambda: None)


def load_checkpoint(path, trainer, model: nn.Module):
    """Restores what :func:`save_checkpoint` saved into ``trainer`` and ``model`` (built as for the saved run)
    and returns ``extra``, this rank's.

    Everything is read and checked before anything changes: a file that is missing (FileNotFoundError),
    truncated or corrupted (length, SHA-256), or of another run (world size, the model's tensor names, shapes
    and dtypes, the hyperparameters' names, number, ranges and dtype, an optimiser's class or parameter
    shapes, the trainer's settings or generators) raises a :class:`CheckpointError` (a ValueError) naming
    every difference, and leaves model and trainer untouched. Under torch.distributed every rank calls it, each
    restores its own random streams, and all raise if any rank's check fails.
    """
    path = _check_arguments(path, trainer, model)
    group = _group(trainer)
    rank, world = distributed.distributed_rank(group)
    module = model_call.unwrapped(model)
    if checkpoint_sharded.is_sharded(module):
        return checkpoint_sharded.load(path, trainer, module, group)
    payload, missing, unreadable, problems = None, None, None, []
    try:
        if os.path.isdir(path):
            raise CheckpointError(checkpoint_sharded.directory_mismatch(path, world))
        payload = read_verified(path)
        problems = check_payload(payload, "file", world, rank, trainer, tensor_layout(module.state_dict()))
    except FileNotFoundError as error:
        missing = str(error)
    except CheckpointError as error:
        unreadable = str(error)
    except Exception as error:  # noqa: BLE001  (told to every rank: none goes on alone)
        unreadable = f"load_checkpoint: {path}: {type(error).__name__}: {error}"
    agree(missing, unreadable, problems, path, group)
    module.load_state_dict(payload["model"])
    return apply_entry(payload["ranks"][rank], trainer)
