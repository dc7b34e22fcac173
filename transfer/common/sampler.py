"""A shuffling sampler whose place in the epoch can be saved and restored, for exact resume."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["ResumableRandomSampler"]


class ResumableRandomSampler(Sampler[int]):
    """``RandomSampler``'s order, one permutation per epoch, restartable in the middle of an epoch.

    In one process each epoch's permutation seed is drawn from the global torch generator exactly as
    ``torch.utils.data.RandomSampler`` draws it, so a run gives the same batches as ``DataLoader(shuffle=True)``
    after the same ``torch.manual_seed``. With several processes every rank must see the same permutation
    whatever its own random draws, so the seed is a function of ``seed`` and the epoch, and each rank takes every
    ``world_size``-th index (the permutation padded by wrapping, as ``DistributedSampler`` does).

    Args:
        length: dataset size.
        seed: run seed (used with several processes).
        rank: this process's index.
        world_size: number of processes.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.length, self.seed, self.rank, self.world_size = length, seed, rank, world_size
        self.epoch = 0
        self.epoch_seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return math.ceil(self.length / self.world_size)

    def resume(self, epoch: int, epoch_seed: int, consumed: int) -> None:
        """Make the next ``__iter__`` continue epoch ``epoch`` (permutation ``epoch_seed``) after ``consumed``
        of this rank's indices."""
        self.epoch, self._resume = epoch, (epoch_seed, consumed)

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            seed, skip = self._resume
            self._resume = None
        else:
            skip = 0
            if self.world_size == 1:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's own draw
            else:
                seed = (self.seed * 1_000_003 + self.epoch * 7919) % (2**63)
        self.epoch_seed = seed
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(seed)).tolist()
        if self.world_size > 1:
            order = (order * self.world_size)[:len(self) * self.world_size][self.rank::self.world_size]
        yield from order[skip:]
