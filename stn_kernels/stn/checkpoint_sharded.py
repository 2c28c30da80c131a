"""Checkpoints of an FSDP2 model (parameters sharded as DTensors) through ``torch.distributed.checkpoint``.

``path`` is a directory holding ``checkpoint-<n>/`` directories, the newest complete one being the checkpoint:
each holds DCP's files (the model's and the weight optimisers' shards, every rank writing its own) and
``stn_checkpoint.pt`` (one file in ``checkpoint_format``'s format: every rank's trainer state and random
streams, ``extra``, the model's tensor names and shapes, and the SHA-256 of each DCP file). A checkpoint is
written as ``.checkpoint-<n>.tmp-<token>/``, fsynced, and renamed to ``checkpoint-<n>`` (atomic) by rank 0
once every rank's shard is on disk; older ones are removed after. A kill at any instant leaves the previous
complete checkpoint or the new one; a directory on a shared filesystem that every rank sees, as DCP needs.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil

import torch
from torch import Tensor, nn

from . import distributed
from .checkpoint_format import (
                                SHARED_OPTIMIZERS,
                                CheckpointError,
                                agree,
                                apply_entry,
                                check_payload,
                                encode,
                                file_digest,
                                fsync_directory,
                                new_payload,
                                own_entry,
                                read_verified,
                                tensor_layout,
                                together,
                                write_atomically,
)

STATE_FILE = "stn_checkpoint.pt"
_COMPLETE = re.compile(r"checkpoint-(\d+)$")
_PARTIAL = re.compile(r"\.checkpoint-\d+\.tmp-[0-9a-f]+$")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds DTensor parameters (``fully_shard``)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def _complete(path: str) -> list:
    """The complete checkpoints in ``path``, oldest first: [(n, name)]."""
    found = [(int(m.group(1)), name) for name in os.listdir(path) if (m := _COMPLETE.match(name))
             and os.path.isdir(os.path.join(path, name))]
    return sorted(found)


def _state_dicts(trainer, module: nn.Module) -> tuple:
    """What DCP saves ({"model": ..., optimiser name: ...}) and the optimisers with no state yet, saved as their
    plain state_dict (DCP's helpers would first create a state for them, a step with lr 0 that counts)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    sharded, empty = {"model": get_model_state_dict(module)}, {}
    for name in SHARED_OPTIMIZERS:
        optimizer = getattr(trainer, name)
        if optimizer is None:
            continue
        if optimizer.state:
            sharded[name] = get_optimizer_state_dict(module, optimizer)
        else:
            empty[name] = optimizer.state_dict()
    return sharded, empty


def save(path: str, trainer, module: nn.Module, extra, group) -> None:
    import torch.distributed.checkpoint as dcp

    if trainer is None:
        raise ValueError("trainer: a sharded (FSDP2) model is saved with its STNTrainer (the weight optimiser's "
                         "shards are written with the model's), got None")
    rank, world = distributed.distributed_rank(group)

    def prepare():   # rank 0: where this checkpoint is written until it is complete
        os.makedirs(path, exist_ok=True)
        number = 1 + max((n for n, _ in _complete(path)), default=0)
        return os.path.join(path, f".checkpoint-{number:08d}.tmp-{secrets.token_hex(6)}")

    partial = distributed.broadcast_object(together("save_checkpoint", group, prepare if rank == 0 else lambda: None),
                                           process_group=group)
    entry = own_entry(trainer, extra, group)
    sharded, empty = _state_dicts(trainer, module)
    dcp.save(sharded, storage_writer=dcp.FileSystemWriter(partial, sync_files=True), process_group=group)
    entries = distributed.gather_objects(entry, process_group=group)
    # Every rank hashes its share of the files (all complete once dcp.save has returned), as rank 0 lists them.
    names = distributed.broadcast_object(
        together("save_checkpoint", group, (lambda: sorted(os.listdir(partial))) if rank == 0 else lambda: None),
        process_group=group)
    digests = distributed.gather_objects(together("save_checkpoint", group, lambda: {
        name: file_digest(os.path.join(partial, name)) for name in names[rank::world]}), process_group=group)

    def commit():    # rank 0: the small file, then the rename that makes the checkpoint complete
        files = {name: digest for part in digests for name, digest in part.items()}
        payload = new_payload("sharded", world, tensor_layout(sharded["model"]), entries, files=files,
                              dcp_keys=sorted(sharded), empty_optimizers=empty)
        write_atomically(os.path.join(partial, STATE_FILE), encode(payload))
        fsync_directory(partial)
        final = os.path.join(path, os.path.basename(partial).split(".tmp-")[0][1:])
        os.replace(partial, final)
        fsync_directory(path)
        for _, name in _complete(path):
            if name != os.path.basename(final):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        for name in os.listdir(path):
            if _PARTIAL.match(name):    # a killed writer's
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)

    together("save_checkpoint", group, commit if rank == 0 else lambda: None)


def _latest(path: str) -> tuple:
    """(the newest complete checkpoint's directory, None, None), or (None, why there is none, why it cannot be
    read)."""
    if not os.path.exists(path):
        return None, f"path: no checkpoint at {path}", None
    if not os.path.isdir(path):
        return None, None, (f"path: {path} is a file (a one-process or DDP checkpoint?), but the model holds sharded "
                            f"(DTensor) parameters: load it into the model as it was saved")
    complete = _complete(path)
    if not complete:
        return None, f"path: no checkpoint at {path} (no complete checkpoint-<n> directory in it)", None
    return os.path.join(path, complete[-1][1]), None, None


def directory_mismatch(path: str, world_size: int) -> str:
    """Why the checkpoint directory ``path`` cannot be loaded into a model without sharded parameters."""
    directory, _, _ = _latest(path)
    written = ""
    if directory is not None:
        try:
            written = f" written by a run of {read_verified(os.path.join(directory, STATE_FILE))['world_size']} rank(s)"
        except (CheckpointError, FileNotFoundError, KeyError, TypeError):
            pass
    return (f"path: {path} is a directory, a sharded (FSDP2) checkpoint{written}, but this run has {world_size} "
            f"rank(s) and a model with no sharded (DTensor) parameters: load it into the model wrapped with "
            f"fully_shard as when it was saved, on as many ranks")


def _verify_files(directory: str, files, rank: int, world: int) -> list:
    """This rank's share of the DCP files against their recorded SHA-256."""
    if not isinstance(files, dict) or not files:
        return [f"path: {directory} is corrupted: the list of its files is missing"]
    problems = []
    for name in sorted(files)[rank::world]:
        file = os.path.join(directory, name)
        if not os.path.exists(file):
            problems.append(f"path: {directory} is incomplete: {name} is missing")
        elif file_digest(file) != files[name]:
            problems.append(f"path: {file} is corrupted: its SHA-256 checksum does not match its contents")
    return problems


def _clone(value):
    """A copy of a state dict to load into, tensors (DTensors too) cloned: the model and optimisers stay untouched
    until everything has loaded."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _clone(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def load(path: str, trainer, module: nn.Module, group):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict,
    )

    if trainer is None:
        raise ValueError("trainer: a sharded (FSDP2) model is loaded with its STNTrainer (the weight optimiser's "
                         "shards are read with the model's), got None")
    rank, world = distributed.distributed_rank(group)
    found = together("load_checkpoint", group, _latest if rank == 0 else lambda _: None, path)
    directory, missing, unreadable = distributed.broadcast_object(found, process_group=group)
    payload, problems = None, []
    if directory is not None:
        try:
            payload = read_verified(os.path.join(directory, STATE_FILE))
            problems = check_payload(payload, "sharded", world, rank, trainer,
                                     tensor_layout(get_model_state_dict(module)))
            problems = problems or _verify_files(directory, payload.get("files"), rank, world)
        except (CheckpointError, FileNotFoundError) as error:
            unreadable = str(error)
        except Exception as error:  # noqa: BLE001  (told to every rank: none goes on alone)
            unreadable = f"load_checkpoint: {path}: {type(error).__name__}: {error}"
    agree(missing, unreadable, problems, path, group)
    # Everything checked: read the shards into copies, then set model and optimisers from them.
    created = []
    templates = {"model": _clone(get_model_state_dict(module))}
    try:
        for name in payload["dcp_keys"]:
            if name != "model":
                optimizer = getattr(trainer, name)
                if not optimizer.state:
                    created.append(optimizer)   # DCP's helper gives it a state to load into; undone on failure
                templates[name] = _clone(get_optimizer_state_dict(module, optimizer))
        dcp.load(templates, storage_reader=dcp.FileSystemReader(directory), process_group=group)
    except Exception as error:  # noqa: BLE001
        for optimizer in created:
            optimizer.state.clear()
        raise CheckpointError(f"load_checkpoint: {directory}: torch.distributed.checkpoint could not read the "
                              f"shards: {error}") from error
    set_model_state_dict(module, templates["model"])
    for name in SHARED_OPTIMIZERS:
        optimizer = getattr(trainer, name)
        if name in templates:
            set_optimizer_state_dict(module, optimizer, templates[name])
        elif name in payload["empty_optimizers"]:
            optimizer.load_state_dict(payload["empty_optimizers"][name])
    return apply_entry(payload["ranks"][rank], trainer, shared=SHARED_OPTIMIZERS)
