"""Batches of two augmented views, addressable by step: the batch of step t is the same whether a
run goes straight through or resumes at t, and whichever process asks for it."""
from __future__ import annotations

import torch

from layers.seeding import STREAM_ORDER, STREAM_VIEWS, keyed_generator
from sim.data.datasets import ImageSet
from sim.data.views import SimCLRViews
from sim.errors import ConfigError


class ViewFeed:
    """Epoch-shuffled batches of `batch_size` images from `images`, the last partial batch of
    each epoch dropped; each step's views drawn from a generator keyed by (seed, step).

    With `replicas` R > 1, a step's batch is R x `batch_size` images and this feed gives replica
    `replica`'s share, rows replica*b .. (replica+1)*b - 1, its views keyed by (seed, step) and, after
    the first replica, the replica (as the negatives are, sim.pipeline.stage)."""

    def __init__(self, images: ImageSet, views: SimCLRViews, batch_size: int, seed: int, replica: int = 0,
                 replicas: int = 1):
        total = batch_size * replicas
        if len(images) < total:
            if replicas == 1:
                raise ConfigError(f"train.batch_size = {batch_size} is larger than the {len(images)} training "
                                  f"images; use a batch of at most {len(images)}")
            raise ConfigError(f"train.batch_size x sim.replicas = {batch_size} x {replicas} = {total} images a step, "
                              f"more than the {len(images)} training images; use train.batch_size <= "
                              f"{len(images) // replicas}")
        self.images, self.views, self.batch_size, self.seed = images, views, batch_size, seed
        self.replica, self.replicas = replica, replicas
        self.steps_per_epoch = len(images) // total
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) cache

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = keyed_generator(self.seed, STREAM_ORDER, epoch)
            self._order = (epoch, torch.randperm(len(self.images), generator=generator))
        return self._order[1]

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        start = (position * self.replicas + self.replica) * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size]

    def views_at(self, step: int) -> torch.Tensor:
        """(2B, C, S, S): rows 0..B-1 the first view of each image, rows B..2B-1 the second."""
        images, _ = self.images.batch(self.indices(step))
        replica = [self.replica] if self.replica else []
        return self.views(images, keyed_generator(self.seed, STREAM_VIEWS, step, *replica))

