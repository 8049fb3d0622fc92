"""Data-parallel replicas of the layer pipeline: R replicas x K stages on one process mesh.

Global rank g is (replica, stage) = divmod(g, K) (`sim.pipeline.placement.Mesh`): each replica's
pipeline sits on K consecutive ranks (on one machine when K fits there), and the R ranks of one
stage, one per replica, form that stage's replica group. Within a replica the pipeline runs as
with one replica; across replicas, each block's gradients are averaged over its replica group
before its optimiser step, so that every replica holds the same weights at every step.

A step with R replicas and `train.batch_size` b is the authors' `nn.DataParallel` step with R GPUs
and batch R x b: replica r takes rows r*b .. (r+1)*b - 1 of the step's R x b images, computes its
losses (positives, negatives, means) on its own rows only, and the gradients are averaged.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from layers.block import Block
from sim.pipeline.placement import Mesh
from sim.pipeline.transport import Distributed

LONGEST_WAIT_S = 3600.0  # the replica groups' own bound: a checkpoint of a large model on a slow disk


def replica_group(mesh: Mesh, stage: int) -> dist.ProcessGroup:
    """This stage's replica group. Every rank builds every stage's group, in the same order (new_group
    is collective over the whole world), and keeps its own. Its own timeout is long: waits on it are
    bounded by the transport's timeout, or by a longer patience across a checkpoint."""
    groups = [dist.new_group([mesh.rank(r, s) for r in range(mesh.replicas)],
                             timeout=datetime.timedelta(seconds=LONGEST_WAIT_S)) for s in range(mesh.stages)]
    return groups[stage]


class GradientAverager:
    """Averages a block's gradients over the replicas: all of the block's gradients in one bucket,
    reduced asynchronously from `start` (right after its backward pass) to `finish` (before its
    optimiser step: the stage's other blocks, and its messages, go on meanwhile). Every replica
    starts its blocks in the same order, which pairs the collectives."""

    def __init__(self, group: dist.ProcessGroup, mesh: Mesh, replica: int, stage: int, transport: Distributed):
        self.group, self.replicas, self.transport = group, mesh.replicas, transport
        others = [mesh.rank(r, stage) for r in range(mesh.replicas) if r != replica]
        self.peers = f"rank {others[0]}" if len(others) == 1 else f"one of ranks {', '.join(map(str, others))}"
        self.in_flight: dict[int, tuple[dist.Work, torch.Tensor, list[torch.Tensor]]] = {}

    def start(self, block: Block) -> None:
        if block.index in self.in_flight:
            raise RuntimeError(f"block {block.index} learned twice before its gradients were averaged: a bug in "
                               "laminar")
        gradients = [p.grad for p in block.parameters() if p.grad is not None]
        bucket = torch.cat([g.reshape(-1) for g in gradients])  # (total parameters,)
        work = self.transport.collective("averaging gradients", dist.all_reduce, bucket, dist.ReduceOp.SUM, self.group,
                                    True)
        self.in_flight[block.index] = (work, bucket, gradients)
        # a ring all-reduce sends 2 (R - 1) / R of the bucket from each rank
        self.transport.bytes_sent += 2 * (self.replicas - 1) * bucket.numel() * bucket.element_size() // self.replicas

    def finish(self, block: Block) -> None:
        work, bucket, gradients = self.in_flight.pop(block.index)
        self.transport.wait(work, None, "averaging gradients with", who=self.peers)
        bucket.div_(self.replicas)  # gloo has no average: the sum, then one division (exact when R is a power of two)
        for gradient, part in zip(gradients, bucket.split([g.numel() for g in gradients])):
            gradient.copy_(part.view_as(gradient))

    def barrier(self, timeout_s: float) -> None:
        """Wait, up to `timeout_s`, until every replica of this stage is here (after replica 0 wrote a
        checkpoint, which the others do not write)."""
        with self.transport.patience(timeout_s):
            work = self.transport.collective("a checkpoint", dist.barrier, self.group, True)
            self.transport.wait(work, None, "waiting at a checkpoint for", who=self.peers)
