"""``cycle_batches``: endless batches from a DataLoader (or any re-iterable), with a position that can be saved
and resumed.

A resumed run must see the batches the interrupted one would have seen. The position is the epoch and the
number of batches taken from it; the order of the epoch is replayed from what decided it when the epoch
started: the sampler's epoch (``set_epoch``, as ``DistributedSampler`` takes it), torch's default CPU
generator (a ``DataLoader(shuffle=True)`` without ``generator=`` draws its order and base seed from it) and
the ``torch.Generator`` the loader or its sampler holds (``DataLoader(generator=...)``,
``RandomSampler(generator=...)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Iterable, List, Optional

import torch

_VERSION = 1


def _generators(batches) -> List[torch.Generator]:
    """The torch.Generators that decide the order of an epoch: the loader's and its samplers'."""
    found = []
    sampler = getattr(batches, "sampler", None)
    batch_sampler = getattr(batches, "batch_sampler", None)
    for owner in (batches, sampler, getattr(batch_sampler, "sampler", None)):
        generator = getattr(owner, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
            found.append(generator)
    return found


def _set_epoch(batches, epoch: int) -> None:
    for owner in (getattr(batches, "sampler", None), getattr(getattr(batches, "batch_sampler", None), "sampler",
                                                             None)):
        if callable(getattr(owner, "set_epoch", None)):
            owner.set_epoch(epoch)
            return


class BatchCycle:
    """A ``next_batch()`` callable that restarts ``batches`` (e.g. a DataLoader) when it runs out, and whose
    position :meth:`state_dict` saves and :meth:`load_state_dict` restores. What :func:`cycle_batches`
    returns.

    At the start of every epoch it calls ``set_epoch(epoch)`` on the loader's sampler when the sampler has it
    (``DistributedSampler``: a new order per epoch; epochs count from 0).
    """

    def __init__(self, batches: Iterable) -> None:
        if not hasattr(batches, "__iter__"):
            raise TypeError(f"batches: expected an iterable of batches (e.g. a DataLoader), got "
                            f"{type(batches).__name__}")
        self.batches = batches
        self.epoch = -1          # the epoch in progress (-1: none started)
        self.taken = 0           # batches taken from it
        self._iterator = None
        self._epoch_random: Optional[dict] = None

    def _start_epoch(self) -> None:
        self.epoch += 1
        self.taken = 0
        _set_epoch(self.batches, self.epoch)
        # What decides this epoch's order, as it is before the loader draws from it.
        self._epoch_random = {"cpu": torch.get_rng_state(),
                              "generators": [g.get_state() for g in _generators(self.batches)]}
        self._iterator = iter(self.batches)

    def __call__(self):
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"batches: expected at least one batch per epoch, got an empty "
                                 f"{type(self.batches).__name__}") from None
        self.taken += 1
        return batch

    def state_dict(self) -> dict:
        """The position: the epoch, the batches taken from it, and the random states its order came from."""
        return {"version": _VERSION, "epoch": self.epoch, "taken": self.taken, "epoch_random": self._epoch_random}

    def load_state_dict(self, state_dict: dict) -> None:
        """Moves to a saved position: the epoch's order is drawn again from the states it came from and the batches
        already taken are read and dropped (so a long epoch costs reading them once more); torch's default
        generator is left as it was before the call. Call it after the run's random state is restored (e.g. by
        :func:`~stn_kernels.stn.load_checkpoint`), before the first batch."""
        if not isinstance(state_dict, dict) or state_dict.get("version") != _VERSION:
            got = state_dict.get("version") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"state_dict: expected a cycle_batches state of version {_VERSION}, got {got!r}")
        epoch, taken, random = state_dict["epoch"], state_dict["taken"], state_dict["epoch_random"]
        if isinstance(self.batches, Iterator):
            raise TypeError(f"batches: a position can be restored only in something iterated afresh every epoch (a "
                            f"DataLoader, a list), got the one-pass iterator {type(self.batches).__name__}")
        generators = _generators(self.batches)
        if random is not None and len(random["generators"]) != len(generators):
            raise ValueError(f"state_dict: the saved position's loader had {len(random['generators'])} "
                             f"torch.Generator(s) deciding its order, this one has {len(generators)}")
        self._iterator, self.epoch, self.taken, self._epoch_random = None, epoch, 0, random
        if epoch < 0:
            return
        now = torch.get_rng_state()
        try:
            torch.set_rng_state(random["cpu"])
            for generator, state in zip(generators, random["generators"]):
                generator.set_state(state)
            _set_epoch(self.batches, epoch)
            self._iterator = iter(self.batches)
            for _ in range(taken):
                try:
                    next(self._iterator)
                except StopIteration:
                    raise ValueError(f"state_dict: the saved position is batch {taken} of epoch {epoch}, but this "
                                     f"epoch has only {self.taken} batch(es): other data?") from None
                self.taken += 1
        finally:
            torch.set_rng_state(now)


def cycle_batches(batches: Iterable) -> BatchCycle:
    """A ``next_batch()`` callable that restarts ``batches`` (e.g. a DataLoader) when it runs out; its
    ``state_dict()`` / ``load_state_dict()`` save and restore the position (:class:`BatchCycle`)."""
    return BatchCycle(batches)
