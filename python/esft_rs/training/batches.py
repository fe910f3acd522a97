"""Validation split and the order of global batches: pure functions of the seed.

The batch of step ``s`` depends only on (seed, s), so a resumed run needs no
sampler state, and every process computes the same global batch and takes its
own disjoint part of it.
"""

from __future__ import annotations

import torch


def split(n: int, val_ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices: ``int(n * (1 - val_ratio))`` train, as the official code."""
    n_train = int(n * (1 - val_ratio))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_train], perm[n_train:]


class GlobalBatches:
    """Global batches of ``size`` train indices, reshuffled each epoch, the last partial dropped.

    Fewer indices than one batch: the epochs' shuffles follow one another and each batch
    takes the next ``size`` of them (a batch then cycles through the data, some rows twice)."""

    def __init__(self, train_idx: torch.Tensor, size: int, seed: int) -> None:
        self.train_idx = train_idx
        self.size = size
        self.seed = seed
        self.per_epoch = len(train_idx) // size  # 0: the data is smaller than one batch

    def _shuffle(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1 + epoch)
        return torch.randperm(len(self.train_idx), generator=g)

    def __call__(self, step: int) -> torch.Tensor:
        if self.per_epoch:
            epoch, k = divmod(step, self.per_epoch)
            return self.train_idx[self._shuffle(epoch)[k * self.size : (k + 1) * self.size]]
        n, parts = len(self.train_idx), []
        pos, end = step * self.size, (step + 1) * self.size
        while pos < end:
            epoch, k = divmod(pos, n)
            take = min(n - k, end - pos)
            parts.append(self.train_idx[self._shuffle(epoch)[k : k + take]])
            pos += take
        return torch.cat(parts)

    def epoch(self, step: int) -> float:
        """Epochs done after ``step`` steps."""
        if self.per_epoch:
            return step / self.per_epoch
        return step * self.size / len(self.train_idx)


def rank_part(
    batch: torch.Tensor, micro: int, rank: int, world: int, per_device: int
) -> torch.Tensor:
    """The sequences of ``batch`` that process ``rank`` runs in micro-step ``micro``."""
    start = (micro * world + rank) * per_device
    return batch[start : start + per_device]
