"""Data-parallel replicas of the layer pipeline: R replicas x K stages on one process mesh.

Global rank g is (replica, stage) = divmod(g, K): each replica's pipeline sits on K consecutive
ranks (on one machine when K fits there), and the R ranks of one stage, one per replica, form that
stage's replica group. Within a replica the pipeline runs as with one replica; across replicas,
each block's gradients are averaged over its replica group before its optimiser step, so that
every replica holds the same weights at every step.

A step with R replicas and `train.batch_size` b is the authors' `nn.DataParallel` step with R GPUs
and batch R x b: replica r takes rows r*b .. (r+1)*b - 1 of the step's R x b images, computes its
losses (positives, negatives, means) on its own rows only, and the gradients are averaged.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from layers.block import Block
from sim.placement import PlacementError
from sim.transport import Link


@dataclass(frozen=True)
class Mesh:
    replicas: int  # R
    stages: int  # K: processes of one replica's pipeline

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages

    def position(self, rank: int) -> tuple[int, int]:
        """(replica, stage) of global rank `rank`."""
        return divmod(rank, self.stages)

    def rank(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def __str__(self) -> str:
        return f"{self.replicas} replica(s) x {self.stages} stage(s)"


def stages_of(world_size: int, replicas: int) -> int:
    """K, the processes of one replica, or a PlacementError naming both numbers."""
    if replicas < 1:
        raise PlacementError(f"sim.replicas = {replicas}: give 1 or more")
    if world_size % replicas:
        fits = [n for n in range(replicas, 6 * replicas + 1, replicas)]
        raise PlacementError(f"sim.replicas = {replicas} does not divide the world size {world_size}: launch R x K "
                             f"processes, one of {fits} (K = 1 to 6 stages per replica), or set sim.replicas to a "
                             f"divisor of {world_size}")
    return world_size // replicas


def replica_group(mesh: Mesh, stage: int, timeout_s: float) -> dist.ProcessGroup:
    """This stage's replica group. Every rank builds every stage's group, in the same order (new_group
    is collective over the whole world), and keeps its own."""
    timeout = datetime.timedelta(seconds=timeout_s)
    groups = [dist.new_group([mesh.rank(r, s) for r in range(mesh.replicas)], timeout=timeout)
              for s in range(mesh.stages)]
    return groups[stage]


class GradientAverager:
    """Averages a block's gradients over the replicas: all of the block's gradients in one bucket,
    reduced asynchronously from `start` (right after its backward pass) to `finish` (right before its
    optimiser step), so that the stage's other blocks compute meanwhile. Every replica starts and
    finishes its blocks in the same order, which pairs the collectives."""

    def __init__(self, group: dist.ProcessGroup, replicas: int, link: Link):
        self.group, self.replicas, self.link = group, replicas, link
        self.in_flight: dict[int, tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = {}

    def start(self, block: Block) -> None:
        gradients = [p.grad for p in block.parameters() if p.grad is not None]
        bucket = torch.cat([g.reshape(-1) for g in gradients])  # (total parameters,)
        work = self.link.collective("averaging gradients", dist.all_reduce, bucket, dist.ReduceOp.SUM, self.group,
                                    True)
        self.in_flight[block.index] = (work, bucket, gradients)

    def finish(self, block: Block) -> None:
        work, bucket, gradients = self.in_flight.pop(block.index)
        self.link.wait(work, None, "averaging gradients with")
        bucket.div_(self.replicas)  # gloo has no average: the sum, then one division (exact when R is a power of two)
        for gradient, part in zip(gradients, bucket.split([g.numel() for g in gradients])):
            gradient.copy_(part.view_as(gradient))
