"""What a rank records for the log (`Recording`), and the passes that observe the network without
changing it.

`HeldoutPass`: the pooled activity of a fixed set of held-out images, forwarded rank by rank like
a batch. `AlignmentPass`: the gradient of the top block's loss back-propagated to every block, on
the same batch, negatives and weights as the local updates, across ranks: each rank sends the
gradient with respect to its input down to the rank below. Nothing learns from it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from layers.block import Block
from sim.pipeline.stage import negatives_generator
from sim.pipeline.transport import Transport
from sim.record.logbook import RankLog


class HeldoutPass:
    def __init__(self, blocks: Sequence[Block], kernels: Sequence[int], rank: int, top_rank: int,
                 transport: Transport, input_shape: tuple[int, ...] | None, images: torch.Tensor | None):
        self.blocks, self.kernels, self.rank, self.top_rank = list(blocks), list(kernels), rank, top_rank
        self.transport, self.input_shape, self.images = transport, input_shape, images  # images: rank 0 only

    @torch.no_grad()
    def run(self) -> dict[int, np.ndarray]:
        """{block: (images, features)} pooled to the probe's grid, with the weights of the moment."""
        x = self.images if self.rank == 0 else self.transport.recv(self.input_shape, self.rank - 1, "heldout")
        features, out = self.through(x)
        if self.rank < self.top_rank:
            self.transport.send(out, self.rank + 1, "heldout")
        return features

    @torch.no_grad()
    def through(self, x: torch.Tensor) -> tuple[dict[int, np.ndarray], torch.Tensor]:
        """This rank's blocks on the held-out activity `x` from below: their features, and the output."""
        features = {}
        for block, kernel in zip(self.blocks, self.kernels):
            x = block(x)  # (N, C, H, W)
            features[block.index] = F.avg_pool2d(x, kernel).flatten(1).cpu().numpy()
        return features, x


class AlignmentPass:
    def __init__(self, blocks: Sequence[Block], rank: int, top_rank: int, transport: Transport, seed: int):
        self.blocks, self.rank, self.top_rank, self.transport, self.seed = list(blocks), rank, top_rank, transport, seed
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # step -> (input, output), graph kept
        self.outgoing: torch.Tensor | None = None  # gradient for the rank below, sent by `deliver`

    def forward(self, x: torch.Tensor, step: int) -> dict[int, np.ndarray] | None:
        """A second forward pass of batch `step` with gradients across this rank's blocks, on a copy
        of the weights (later updates leave it intact). The top rank back-propagates its block's loss
        at once and returns the gradients; other ranks wait for `backward`."""
        x = x.detach().requires_grad_(self.rank > 0)
        out = x
        for block in self.blocks:
            out, features = block.forward_and_features(out, stash_weights=True)  # (2B, C, H, W), not detached
        if self.rank != self.top_rank:
            self.pending[step] = (x, out)
            return None
        top = self.blocks[-1]
        loss, _ = top.loss(features, None, negatives_generator(top, self.seed, step))
        return self._backpropagate(loss, None, x)

    def backward(self, step: int) -> dict[int, np.ndarray]:
        """Receive d(top loss)/d(output) of batch `step` from the rank above and back-propagate it."""
        x, out = self.pending.pop(step)
        return self._backpropagate(out, self.transport.recv(tuple(out.shape), self.rank + 1, "gradient"), x)

    def _backpropagate(self, output: torch.Tensor, grad_output: torch.Tensor | None,
                       x: torch.Tensor) -> dict[int, np.ndarray]:
        weights = [block.conv_weight for block in self.blocks]
        inputs = weights + ([x] if self.rank > 0 else [])
        gradients = torch.autograd.grad(output, inputs, grad_outputs=grad_output)
        if self.rank > 0:
            self.outgoing = gradients[-1]
        return {b.index: g.flatten().cpu().numpy() for b, g in zip(self.blocks, gradients)}

    def deliver(self) -> None:
        """Send the gradient with respect to this rank's input down. The top rank calls it after
        its feedback messages of the same step, the order in which the rank below expects them."""
        if self.outgoing is not None:
            self.transport.send(self.outgoing, self.rank - 1, "gradient")
            self.outgoing = None


@dataclass
class Recording:
    """What a rank records for the log; all None when no log is kept."""
    log: RankLog | None = None
    heldout: HeldoutPass | None = None
    alignment: AlignmentPass | None = None  # None also for end-to-end methods

    def wants(self, step: int) -> tuple[bool, bool]:
        """At `step`: measure each update's norm? keep each block's local gradient?"""
        if self.log is None:
            return False, False
        return self.log.settings.logs(step), self.alignment is not None and self.log.settings.aligns(step)
