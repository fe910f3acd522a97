"""Which rank owns which routed expert under expert parallelism (no torch: ``esft-rs plan``
and the trainer share it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Placement:
    """The owner rank of every routed expert, per MoE layer."""

    world: int
    owners: dict[int, tuple[int, ...]]  # layer -> owner of expert 0, 1, ...

    def experts_of(self, layer: int, rank: int) -> list[int]:
        return [e for e, r in enumerate(self.owners[layer]) if r == rank]

    def describe(self, trained: Mapping[int, list[int]]) -> dict[str, Any]:
        """What each rank holds: experts and trained experts in all (for the run directory)."""
        ranks = range(self.world)
        return {
            "world": self.world,
            "experts_per_rank": [sum(len(self.experts_of(layer, r)) for layer in self.owners)
                                 for r in ranks],
            "trained_per_rank": [sum(1 for layer, ids in trained.items() for e in ids
                                     if self.owners[layer][e] == r) for r in ranks],
            "owners": {str(k): list(v) for k, v in self.owners.items()},
        }


def place_experts(layout: Mapping[int, int], trained: Mapping[int, list[int]],
                  world: int) -> Placement:
    """ESFT-aware placement: per layer, trained experts round-robin from where the previous
    layer's left off, then frozen experts into the ranks with room, in id order. Every
    rank ends with ``E // world`` or one more experts of each layer (none when a layer has
    fewer experts than ranks), and ``T // world`` or one more of its ``T`` trained ones."""
    owners: dict[int, tuple[int, ...]] = {}
    turn = 0
    for layer in sorted(layout):
        n = layout[layer]
        chosen = sorted(set(trained.get(layer, ())))
        # the ranks that get one expert more than E // world are the next E % world in turn
        room = [n // world + int((r - turn) % world < n % world) for r in range(world)]
        owner = [-1] * n
        for i, e in enumerate(chosen):
            r = (turn + i) % world
            owner[e] = r
            room[r] -= 1
        free = iter(r for r in range(world) for _ in range(room[r]))
        for e in range(n):
            if owner[e] < 0:
                owner[e] = next(free)
        owners[layer] = tuple(owner)
        turn = (turn + len(chosen)) % world
    return Placement(world, owners)
