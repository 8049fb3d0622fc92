"""Placement: which contiguous group of blocks each rank owns.

Explicit (`[[0, 1, 2], [3, 4, 5]]`) or `auto`, which splits the blocks into as many contiguous
groups as there are processes so that the most expensive group is as cheap as possible, using each
block's estimated cost per step (`sim.cost.model.estimated_block_costs`). A placement that does not
fit the world size fails before any work, naming both numbers.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from layers.encoder import NUM_BLOCKS


class PlacementError(ValueError):
    """A placement that cannot run: says what is wrong and what to launch instead."""


@dataclass(frozen=True)
class Placement:
    groups: tuple[tuple[int, ...], ...]  # groups[r] = the blocks rank r owns, in order

    @property
    def world_size(self) -> int:
        return len(self.groups)

    def rank_of(self, block: int) -> int:
        return next(r for r, group in enumerate(self.groups) if block in group)

    def __str__(self) -> str:
        return " | ".join("-".join(map(str, g)) for g in self.groups)


def check_groups(groups: Sequence[Sequence[int]], world_size: int) -> Placement:
    """`groups` as a Placement, or a PlacementError naming what is wrong."""
    placement = Placement(tuple(tuple(g) for g in groups))
    flat = [b for g in placement.groups for b in g]
    if any(not g for g in placement.groups) or flat != list(range(NUM_BLOCKS)):
        raise PlacementError(
            f"sim.placement = {[list(g) for g in placement.groups]} must split blocks 0..{NUM_BLOCKS - 1} into "
            "non-empty contiguous groups in order, e.g. [[0, 1, 2], [3, 4, 5]]"
        )
    if placement.world_size != world_size:
        raise PlacementError(
            f"sim.placement has {placement.world_size} groups but the world size is {world_size}: launch "
            f"{placement.world_size} processes (torchrun --nproc-per-node {placement.world_size}), or give "
            f"{world_size} groups, or use sim.placement = \"auto\""
        )
    return placement


def balanced_placement(costs: Sequence[float], world_size: int) -> Placement:
    """Contiguous groups minimising the largest group cost (ties: the earliest split)."""
    if not 1 <= world_size <= len(costs):
        raise PlacementError(
            f"world size {world_size} does not fit {len(costs)} blocks: run 1 to {len(costs)} processes "
            "(one block per process at most)"
        )
    best: tuple[float, tuple[int, ...]] | None = None
    for cuts in itertools.combinations(range(1, len(costs)), world_size - 1):
        bounds = (0, *cuts, len(costs))
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        if best is None or worst < best[0] - 1e-9:
            best = (worst, bounds)
    bounds = best[1]
    return Placement(tuple(tuple(range(a, b)) for a, b in zip(bounds, bounds[1:])))


@dataclass(frozen=True)
class Mesh:
    replicas: int  # R
    stages: int  # K: processes of one replica's pipeline

    def position(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of global rank `rank`."""
        return divmod(rank, self.stages)

    def rank(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def __str__(self) -> str:
        return f"{self.replicas} replica(s) x {self.stages} stage(s)"


def stages_of(world_size: int, replicas: int) -> int:
    """K, the processes of one replica, or a PlacementError with the numbers that would fit."""
    if world_size % replicas == 0 and world_size // replicas <= NUM_BLOCKS:
        return world_size // replicas
    fitting = [r for r in range(1, world_size + 1) if world_size % r == 0 and world_size // r <= NUM_BLOCKS]
    stages = world_size // fitting[0] if fitting else 0
    instead = (f"set sim.replicas = {fitting[0]} ({world_size} = {fitting[0]} replicas x {stages} "
               f"stage{'s' if stages > 1 else ''})" if fitting else f"no sim.replicas fits {world_size} processes")
    if world_size % replicas:
        problem = f"sim.replicas = {replicas} does not divide the world size {world_size}"
    else:
        problem = (f"{world_size} processes with sim.replicas = {replicas} make {world_size // replicas} stages per "
                   f"replica, more than the {NUM_BLOCKS} blocks (one block per process at most)")
    sizes = ", ".join(str(replicas * k) for k in range(1, NUM_BLOCKS + 1))
    raise PlacementError(f"{problem}: launch R x K processes, with sim.replicas = {replicas} one of {sizes}; or "
                         f"{instead}")
