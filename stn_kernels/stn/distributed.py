"""Data-parallel STN: the same λ and σ on every rank, and each rank's own random draws.

The model's weights are the business of ``DistributedDataParallel`` or FSDP2's ``fully_shard``; λ
(``hparams.unconstrained``) and ρ (``hparams.raw_scale``) live outside the model, so nothing averages
their gradients unless this module does. :class:`~stn_kernels.stn.STNTrainer` calls these helpers
itself when ``torch.distributed`` is initialised with more than one rank; they are public for loops
written by hand.

Random streams: the perturbations ε (``HyperparameterSet.perturb`` without a generator), the seeds of
``per_example_dropout`` and any ``torch.randn_like`` in the model all draw from torch's default
generator. Seeding it once per rank with :func:`seed_rank_streams` gives every rank its own stream,
reproducibly, while the sampling code keeps the ``generator=None`` path (the one ``torch.compile``
traces without a graph break).

Nothing here touches ``torch.distributed`` at import: every function asks for the process group
when called, and with one process (or none initialised) does nothing.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .hyperparameters import HyperparameterSet

_MAX_SEED = 2**63 - 1


def distributed_rank(process_group=None) -> Tuple[int, int]:
    """(rank, world size) of this process in ``process_group`` (default: the default group); (0, 1) when
    ``torch.distributed`` is unavailable or not initialised."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        if process_group is not None:
            raise ValueError("process_group: given, but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        return 0, 1
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup or None, "
                        f"got {type(process_group).__name__}")
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise ValueError("process_group: this process is not a member of the given group")
    return rank, dist.get_world_size(process_group)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of ``rank``'s stream in a run seeded ``seed``: ``seed`` itself on rank 0 (so a one-process
    run seeded s draws what ``torch.manual_seed(s)`` draws), a 63-bit hash of (seed, rank) elsewhere."""
    _check_seed(seed, "seed")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank: expected an int >= 0, got {rank!r}")
    if rank == 0:
        return seed
    digest = hashlib.blake2b(f"stn_kernels/{seed}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MAX_SEED


def seed_rank_streams(seed: Optional[int] = None, *, process_group=None) -> int:
    """Seeds torch's default generator (CPU and every CUDA device) with this rank's stream of ``seed``
    and returns the seed used on this rank.

    ``seed=None`` draws the run's seed from torch's default generator first: ranks seeded alike (the
    usual ``torch.manual_seed(s)`` on every rank) then still get different, reproducible streams.
    Call it after the model is built (FSDP2 does not broadcast the initial weights) and before the
    first random draw of training.
    """
    rank, _ = distributed_rank(process_group)
    if seed is None:
        seed = int(torch.randint(_MAX_SEED, (1,)).item())
    own = rank_seed(seed, rank)
    torch.manual_seed(own)
    return own


def sync_hyperparameters(hparams: HyperparameterSet, *, src: int = 0, process_group=None) -> None:
    """Broadcasts λ (``hparams.unconstrained``) and ρ (``hparams.raw_scale``) from rank ``src`` (a rank of
    ``process_group``) to every rank, e.g. once before training. Does nothing in a single process."""
    _check_hparams(hparams)
    _, world = distributed_rank(process_group)
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < world:
        raise ValueError(f"src: expected a rank in [0, {world}), got {src!r}")
    if world == 1:
        return
    dist = torch.distributed
    global_src = dist.get_global_rank(process_group, src) if process_group is not None else src
    with torch.no_grad():
        for p in (hparams.unconstrained, hparams.raw_scale):
            dist.broadcast(p.data, global_src, group=process_group)


def average_gradients(params: Iterable[Tensor], *, process_group=None) -> None:
    """Replaces each parameter's ``.grad`` by its mean over the ranks of ``process_group`` (a missing
    gradient counts as zeros, so every rank joins the same collectives). One ``all_reduce`` per dtype
    and device. Does nothing in a single process."""
    params = _check_params(params)
    _, world = distributed_rank(process_group)
    if world == 1 or not params:
        return
    buckets = {}
    for p in params:
        buckets.setdefault((p.dtype, p.device), []).append(p)
    for group in buckets.values():
        with torch.no_grad():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            # SUM then divide: gloo has no AVG. The reduced sum is the same bits on every rank.
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=process_group)
            flat.div_(world)
        offset = 0
        for p in group:
            p.grad = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()


def average_hyperparameter_grads(hparams: HyperparameterSet, *, process_group=None) -> None:
    """:func:`average_gradients` of λ and ρ: call it after the hypergradient's backward and before the
    hyperparameter and scale optimisers step. Does nothing in a single process."""
    _check_hparams(hparams)
    average_gradients([hparams.unconstrained, hparams.raw_scale], process_group=process_group)


# --------------------------------------------------------------------------- objects over the ranks (checkpoints)


def _first_rank(process_group) -> int:
    """The global rank of rank 0 of ``process_group``."""
    return torch.distributed.get_global_rank(process_group, 0) if process_group is not None else 0


def gather_objects(obj, *, process_group=None) -> Optional[list]:
    """Every rank's ``obj`` (picklable) on rank 0 of ``process_group``, in rank order; None on the other ranks;
    ``[obj]`` in a single process."""
    rank, world = distributed_rank(process_group)
    if world == 1:
        return [obj]
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, gathered, dst=_first_rank(process_group), group=process_group)
    return gathered


def all_gather_objects(obj, *, process_group=None) -> list:
    """Every rank's ``obj`` on every rank, in rank order (``[obj]`` in a single process)."""
    _, world = distributed_rank(process_group)
    if world == 1:
        return [obj]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, obj, group=process_group)
    return gathered


def broadcast_object(obj, *, process_group=None):
    """Rank 0's ``obj`` on every rank of ``process_group`` (``obj`` itself in a single process)."""
    _, world = distributed_rank(process_group)
    if world == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=_first_rank(process_group), group=process_group)
    return holder[0]


def _check_hparams(hparams) -> None:
    if not isinstance(hparams, HyperparameterSet):
        raise TypeError(f"hparams: expected a HyperparameterSet, got {type(hparams).__name__}")


def _check_params(params) -> List[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError("params: expected an iterable of tensors, got a single Tensor (wrap it in a list)")
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}]: expected a Tensor, got {type(p).__name__}")
    return params


def _check_seed(seed, name: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise ValueError(f"{name}: expected an int in [0, 2**63 - 1], got {seed!r}")
