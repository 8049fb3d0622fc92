"""The learning rate of every block's AdamW at each step: constant (the paper's), or a linear
warm-up followed by a cosine decay to `lr_min` at the last step.

A function of the step alone: a block's update for batch t gets the same rate whichever process
applies it, whenever it is applied (delayed feedback applies it steps later), and after a resume.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LearningRate:
    lr: float  # the peak rate (after warm-up)
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0  # linear from lr / warmup_steps at step 0 to lr at step warmup_steps - 1
    total_steps: int = 0  # the run's length: where the cosine reaches lr_min
    lr_min: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule = {self.schedule!r} is not one of {', '.join(LR_SCHEDULES)}")

    def at(self, step: int) -> float:
        """The rate of the update of batch `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1 + math.cos(math.pi * progress))

    @property
    def varies(self) -> bool:
        return self.schedule != "constant" or self.warmup_steps > 0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set `optimizer`'s rate for the update of batch `step` (nothing to do when constant)."""
        if self.varies:
            for group in optimizer.param_groups:
                group["lr"] = self.at(step)
