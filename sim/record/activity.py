"""How sparse what each block receives is: the fraction of zeros in its input, counted on every batch
without waiting for the device (the counts stay tensors until read). Event-driven hardware spends
work only on non-zero inputs: a block's synaptic operations are its dense multiply-accumulates times
the fraction of its input that is not zero (sim.cost.model.block_operations)."""
from __future__ import annotations

import torch


class ZeroCounter:
    """Zeros and values of each block's input, over a run and at its latest batch."""

    def __init__(self) -> None:
        self.zeros: dict[int, torch.Tensor] = {}
        self.values: dict[int, int] = {}
        self.latest: dict[int, torch.Tensor] = {}

    def observe(self, block: int, x: torch.Tensor) -> None:
        zeros = (x == 0).sum()
        self.latest[block] = zeros / x.numel()
        self.zeros[block] = self.zeros[block] + zeros if block in self.zeros else zeros
        self.values[block] = self.values.get(block, 0) + x.numel()

    def fractions(self) -> dict[int, float]:
        """Per block: the fraction of its inputs that were zero, over every batch it saw."""
        return {b: self.zeros[b].item() / self.values[b] for b in self.zeros}

    def latest_fraction(self, block: int) -> float | None:
        return self.latest[block].item() if block in self.latest else None
