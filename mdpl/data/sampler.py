"""The training data order of every run: a permutation drawn from (seed, epoch), sharded over DDP ranks.

One mechanism for every run (plain, resumed, with or without mid-epoch checkpoints, 1 or N processes,
any ``num_workers``), so that none of these choices changes the result:

* the permutation of epoch ``e`` is ``randperm(n, generator=seed_of(seed, e))``: it draws nothing from the
  global RNG that dropout uses, and it does not depend on how many loader workers read the data;
* under DDP the permutation is padded to a multiple of the world size (by repeating its head, as
  :class:`torch.utils.data.DistributedSampler` does) and rank ``r`` reads positions ``r, r + W, ...``.
  The class subclasses ``DistributedSampler`` so that Lightning uses it as is instead of wrapping it;
* ``skip(k)`` drops the first ``k`` items of this rank's next iteration only: a run resumed from a
  mid-epoch checkpoint continues with exactly the batches the interrupted run had not trained on.
"""
from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

_EPOCH_STRIDE = 1_000_003   # seed and epoch -> one generator seed (distinct for every epoch of a seed)


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised process group, or (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class SeededTrainSampler(DistributedSampler):
    """Shuffled, rank-sharded training order that is a function of (seed, epoch) only (module docstring)."""

    def __init__(self, dataset: Sized, seed: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        size, own_rank = world()
        num_replicas = size if num_replicas is None else num_replicas
        rank = own_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self._skip = 0

    def epoch_order(self) -> list[int]:
        """All indices this rank reads in the current epoch, before any skip."""
        n = len(self.dataset)
        generator = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        padding = self.total_size - n
        order += (order * (padding // max(1, n) + 1))[:padding]
        return order[self.rank:self.total_size:self.num_replicas]

    def skip(self, items: int) -> None:
        """Leave out the first ``items`` indices of the next iteration (a mid-epoch resume)."""
        if not 0 <= items <= self.num_samples:
            raise ValueError(f"cannot skip {items} of the {self.num_samples} items of an epoch")
        self._skip = int(items)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.epoch_order()[skip:])

    def __len__(self) -> int:
        """The full epoch, skip or not: Lightning counts a resumed epoch's batches from the restored progress."""
        return self.num_samples
