"""The single-process training loop: one batch at a time through every block (the reference
semantics that layer-parallel schedules must reproduce)."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from layers.encoder import NUM_BLOCKS
from sim.feed import ViewFeed
from sim.memory import PeakMemory
from sim.stage import EndToEndStage, LocalStage

LOSS_WINDOW = 50  # summary losses are means over the last LOSS_WINDOW steps


@dataclass
class TrainResult:
    steps: int  # steps done in this call
    seconds: float
    images_per_s: float  # images (each seen as two views) per second of training
    loss_per_block: list[float | None]  # None for blocks without a loss of their own
    peak_memory_bytes: int


def train(
    stage: LocalStage | EndToEndStage,
    feed: ViewFeed,
    total_steps: int,
    device: torch.device,
    start_step: int = 0,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train from `start_step` to `total_steps`; `checkpoint(step)` is called every
    `checkpoint_every` steps and at the end."""
    recent: list[deque] = [deque(maxlen=LOSS_WINDOW) for _ in range(NUM_BLOCKS)]
    memory = PeakMemory(device)
    memory.start()
    bar = tqdm(range(start_step, total_steps), desc="train", unit="step", disable=not progress,
               initial=start_step, total=total_steps, dynamic_ncols=True)
    began = time.perf_counter()
    for step in bar:
        stage.forward(feed.views_at(step).to(device, non_blocking=True), step)
        for index, stats in stage.stats.items():
            recent[index].append(stats.loss.item())
        if progress and step % 10 == 0:
            bar.set_postfix_str(" ".join(f"{i}:{sum(r) / len(r):.3f}" for i, r in enumerate(recent) if r))
        done = step + 1
        if checkpoint is not None and (done == total_steps or (checkpoint_every and done % checkpoint_every == 0)):
            checkpoint(done)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - began
    bar.close()
    steps = total_steps - start_step
    return TrainResult(
        steps=steps,
        seconds=seconds,
        images_per_s=steps * feed.batch_size / seconds if steps else 0.0,
        loss_per_block=[sum(r) / len(r) if r else None for r in recent],
        peak_memory_bytes=memory.peak_bytes(),
    )
