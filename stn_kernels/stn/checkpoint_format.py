"""The checkpoint file: written atomically, verified before it is read, and what both layouts (one file; a
directory of DCP shards) share: the per-rank entries, the checks of a checkpoint against the run that loads it.

A file is ``MAGIC``, a JSON header line (format version, payload length), the SHA-256 of header line and
payload, then the payload: ``torch.save`` of a dict of tensors and plain values, read back with
``torch.load(weights_only=True)``. Written to a temporary file in the same directory, flushed and fsynced,
renamed over the target (``os.replace``, atomic), then the directory fsynced: a kill at any instant leaves the
previous file or the new one, never a torn one; a torn or altered file fails its length or checksum check.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import secrets
from collections import Counter, OrderedDict
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import distributed, trainer_state

FORMAT_VERSION = 1
MAGIC = b"STN_KERNELS_CHECKPOINT\n"
_CHUNK = 1 << 26  # bytes per os.write


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run: unreadable (truncated, corrupted, not a checkpoint) or of
    another run (model, hyperparameters, optimisers, settings, world size); the message names what differs."""


# --------------------------------------------------------------------------- writing and reading files


def fsync_directory(directory: str) -> None:
    """Makes a rename or a new file in ``directory`` durable (POSIX; Windows has no directory handles)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_temporaries(path: str) -> None:
    """Temporary files a killed writer of ``path`` left behind."""
    directory, name = os.path.split(path)
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp-*")):
        try:
            os.unlink(stale)
        except OSError:
            pass


def write_atomically(path: str, parts: Sequence[bytes]) -> None:
    """``parts`` one after another at ``path``: temporary file, write, fsync, ``os.replace``, fsync of the
    directory."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = _temporary_name(path)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    written = os.write(fd, view[:_CHUNK])
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsync_directory(directory)


def encode(payload: dict) -> List[bytes]:
    """The file's bytes for ``payload``, in parts (not joined: a copy less of a large payload): magic, header,
    checksum, ``torch.save`` of the payload."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()   # a view: the serialised payload is not copied again
    header = json.dumps({"format_version": FORMAT_VERSION, "payload_bytes": len(body)}).encode() + b"\n"
    digest = hashlib.sha256(header)
    digest.update(body)
    return [MAGIC, header, digest.hexdigest().encode() + b"\n", body]


def decode(path: str, data: bytes) -> dict:
    """The payload of a file's bytes, after checking them: magic, length, checksum, version; loaded with
    ``torch.load(weights_only=True)`` onto the CPU."""
    if not data.startswith(MAGIC):
        raise CheckpointError(f"path: {path} is not an stn_kernels checkpoint (it starts with {data[:24]!r}, "
                              f"expected {MAGIC!r})")
    rest = memoryview(data)[len(MAGIC):]   # slices of it copy nothing
    header_end = data.find(b"\n", len(MAGIC)) - len(MAGIC)
    digest_end = data.find(b"\n", len(MAGIC) + header_end + 1) - len(MAGIC)
    if header_end < 0 or digest_end < 0:
        raise CheckpointError(f"path: {path} is truncated: {len(data)} bytes, not even a whole header")
    header_line, digest, body = rest[:header_end + 1], rest[header_end + 1:digest_end], rest[digest_end + 1:]
    try:
        header = json.loads(bytes(header_line))
        expected = int(header["payload_bytes"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"path: {path} is corrupted: its header {bytes(header_line[:80])!r} does not "
                              f"parse") from None
    if len(body) < expected:
        raise CheckpointError(f"path: {path} is truncated: {len(body)} of its {expected} payload bytes are there")
    check = hashlib.sha256(header_line)
    check.update(body)
    if len(body) != expected or check.hexdigest().encode() != bytes(digest):
        raise CheckpointError(f"path: {path} is corrupted: its SHA-256 checksum does not match its contents")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"path: {path} has format version {header.get('format_version')!r}, this stn_kernels "
                              f"reads version {FORMAT_VERSION}")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (checksum right, yet unreadable: written by something else)
        raise CheckpointError(f"path: {path}: torch.load(weights_only=True) refuses its payload: {error}") from None


def read_verified(path: str) -> dict:
    """The payload of the checkpoint file at ``path`` (FileNotFoundError where there is none)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"path: {path} is a directory, not a checkpoint file")
    with open(path, "rb") as f:
        data = f.read()
    return decode(path, data)


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- what goes in


_PLAIN = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device)


def check_extra(value, where: str = "extra") -> None:
    """Raises a TypeError naming the first part of ``extra`` that ``torch.load(weights_only=True)`` would refuse
    (so that no checkpoint is written that cannot be read back)."""
    if isinstance(value, _PLAIN) or type(value) in (Tensor, torch.nn.Parameter):
        return
    if type(value) in (dict, OrderedDict, Counter):
        for key, item in value.items():
            check_extra(key, f"{where} key {key!r}")
            check_extra(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple, set, torch.Size):
        for i, item in enumerate(value):
            check_extra(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: expected tensors, numbers, strings, None and dicts, lists, tuples or sets of them "
                    f"(what torch.load(weights_only=True) reads back), got {type(value).__module__}."
                    f"{type(value).__qualname__}")


def to_cpu(value):
    """``value`` with every tensor on the CPU (for gathering over ranks and for the file)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return type(value)((k, to_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to_cpu(v) for v in value)
    return value


def rank_entry(trainer, extra, shared: tuple) -> dict:
    """What every rank saves of its own: the trainer's state without the optimisers in ``shared`` (saved once
    for all ranks) and without its random streams, the random streams, ``extra``."""
    if trainer is None:
        return to_cpu({"trainer": None, "random": trainer_state.random_state(None), "extra": extra})
    state = trainer_state.trainer_state(trainer)
    random = state.pop("random")
    for name in shared:
        state["optimizers"][name] = None
    return to_cpu({"trainer": state, "random": random, "extra": extra})


def own_entry(trainer, extra, process_group) -> dict:
    """This rank's entry (``extra`` checked first), or an error on every rank if any rank's failed."""
    def build():
        check_extra(extra)
        return rank_entry(trainer, extra, SHARED_OPTIMIZERS)

    return together("save_checkpoint", process_group, build)


def tensor_layout(state: dict) -> dict:
    """{name: [shape, dtype]} of a state dict's tensors."""
    return {name: [list(t.shape), str(t.dtype)] for name, t in state.items() if isinstance(t, Tensor)}


def check_layout(saved: dict, current: dict) -> List[str]:
    """How the saved model's names, shapes and dtypes differ from the model given."""
    if not isinstance(saved, dict):
        return ["model: the checkpoint's parameter names and shapes are missing"]
    problems = []
    missing = [name for name in current if name not in saved]
    unexpected = [name for name in saved if name not in current]
    if missing:
        problems.append(f"model: {len(missing)} of its tensors are not in the checkpoint: {missing[:8]}")
    if unexpected:
        problems.append(f"model: the checkpoint has {len(unexpected)} tensors this model lacks: {unexpected[:8]}")
    for name, (shape, dtype) in current.items():
        if name in saved and saved[name] != [shape, dtype]:
            problems.append(f"model: {name} is {tuple(saved[name][0])} {saved[name][1]} in the checkpoint, "
                            f"{tuple(shape)} {dtype} here")
    return problems


# The optimisers of the model's weights: saved once for all ranks (file layout: rank 0's, which DDP keeps equal on
# every rank; sharded layout: by DCP, each rank its shard). λ's and ρ's optimisers go with each rank's entry.
SHARED_OPTIMIZERS = ("weight_optimizer", "response_optimizer")


def check_payload(payload, layout: str, world_size: int, rank: int, trainer, model_layout: dict) -> List[str]:
    """Every way a checkpoint's payload does not fit this run: its layout and version, the world size, the
    model's tensors, the trainer's state or its absence, this rank's random streams. On success this rank's
    entry holds the whole trainer state (``entry["trainer"]``), the weight optimisers' states included in the
    file layout (in the sharded one they come from DCP and only their layouts are checked here)."""
    if not isinstance(payload, dict) or payload.get("format") != "stn_kernels.stn checkpoint":
        return ["not an stn_kernels.stn checkpoint payload"]
    if payload.get("version") != FORMAT_VERSION:
        return [f"version: checkpoint version {payload.get('version')!r}, this stn_kernels reads {FORMAT_VERSION}"]
    if payload.get("layout") != layout:
        return [f"layout: a {payload.get('layout')!r} checkpoint, expected a {layout!r} one"]
    saved_world = payload.get("world_size")
    if saved_world != world_size:
        return [f"world size: the checkpoint was written by a run of {saved_world} rank(s), this run has "
                f"{world_size} (a run continues only on as many ranks: each has its own random streams and data)"]
    problems = check_layout(payload.get("model_layout"), model_layout)
    entries = payload.get("ranks")
    if not isinstance(entries, list) or len(entries) != world_size or not isinstance(entries[rank], dict):
        return problems + ["ranks: the per-rank states are missing or malformed"]
    entry = entries[rank]
    state = entry.get("trainer")
    if (state is None) != (trainer is None):
        return problems + ["trainer: " + ("the checkpoint holds no STNTrainer state, but a trainer was given"
                                          if state is None else "the checkpoint holds an STNTrainer state, but "
                                          "trainer=None was given")]
    if trainer is None:
        return problems + trainer_state.check_random_state(entry.get("random"), None)
    if not isinstance(state, dict) or not isinstance(state.get("optimizers"), dict):
        return problems + ["trainer: its state is malformed"]
    state = dict(state, random=entry.get("random"), optimizers=dict(state["optimizers"]))
    if layout == "file":
        shared = payload.get("shared") or {}
        state["optimizers"].update({name: shared.get(name) for name in SHARED_OPTIMIZERS})
    entry["trainer"] = state
    return problems + trainer_state.check_trainer_state(
        trainer, state, shared=SHARED_OPTIMIZERS if layout == "sharded" else ())


def apply_entry(entry: dict, trainer, shared: tuple = ()) -> object:
    """Sets the trainer (or, without one, torch's generators) from an entry :func:`check_payload` accepted;
    returns its ``extra``. ``shared``: optimisers already set (from DCP)."""
    if trainer is None:
        trainer_state.apply_random_state(entry["random"])
    else:
        trainer_state.apply_trainer_state(trainer, entry["trainer"], shared=shared)
    return entry.get("extra")


def new_payload(layout: str, world_size: int, model_layout: dict, entries: list, **parts) -> dict:
    from ..version import __version__

    return {"format": "stn_kernels.stn checkpoint", "version": FORMAT_VERSION, "layout": layout,
            "world_size": world_size, "model_layout": model_layout, "ranks": entries,
            "versions": {"torch": str(torch.__version__), "stn_kernels": str(__version__)}, **parts}


def problems_message(path: str, problems: List[str], rank: Optional[int] = None) -> str:
    where = f" (rank {rank})" if rank is not None else ""
    return f"load_checkpoint: {path} does not fit this run{where}: " + "; ".join(problems)


# --------------------------------------------------------------------------- every rank together


def together(what: str, process_group, fn, *args):
    """``fn(*args)`` on this rank; if it raised on any rank, raises on every rank (its own error where it had one,
    else one naming the rank that failed), so that no rank goes on, or waits in a collective, alone."""
    try:
        result, error = fn(*args), None
    except Exception as failure:  # noqa: BLE001  (re-raised below, and told to the other ranks)
        result, error = None, failure
    messages = distributed.all_gather_objects(None if error is None else f"{type(error).__name__}: {error}",
                                              process_group=process_group)
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise RuntimeError(f"{what}: rank {rank} failed: {message}")
    return result


def agree(missing: Optional[str], unreadable: Optional[str], problems, path: str, process_group) -> None:
    """Raises on every rank if any rank found no checkpoint (FileNotFoundError), could not read it or found that
    it does not fit (CheckpointError naming every difference, and the rank)."""
    _, world = distributed.distributed_rank(process_group)
    reports = distributed.all_gather_objects((missing, unreadable, problems), process_group=process_group)
    where = (lambda r: "") if world == 1 else (lambda r: f" (rank {r} of {world})")
    for r, (gone, _, _) in enumerate(reports):
        if gone is not None:
            raise FileNotFoundError(gone + where(r))
    for r, (_, bad, found) in enumerate(reports):
        if bad is not None or found:
            raise CheckpointError((bad or problems_message(path, found)) + where(r))
