"""Run one rank's part of a schedule: the same loop serves one process or many.

With one process there is no link: the stage holds all blocks and feedback is immediate. With K
processes each rank executes its own action list (`sim.schedule`), receiving activations from the
rank below and feedback from the top rank through its `Link`.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from sim.feed import ViewFeed
from sim.memory import PeakMemory
from sim.schedule import Schedule
from sim.stage import EndToEndStage, LocalStage
from sim.transport import Link

LOSS_WINDOW = 50  # reported losses are means over each block's last LOSS_WINDOW updates


@dataclass(frozen=True)
class MessageShapes:
    activations: tuple[tuple[int, ...], ...]  # [r] = shape of what rank r sends up to rank r + 1
    feedback: tuple[int, ...]  # the top block's pooled activity, (2B, D_top)


@dataclass
class RankResult:
    rank: int
    blocks: list[int]
    steps: int  # batches this rank forwarded in this call
    seconds: float  # wall time of the loop, pipeline fill and drain included
    wait_seconds: float  # time blocked on receives and on sends not yet taken
    bytes_sent: int
    peak_memory_bytes: int
    loss_per_block: dict[int, float] = field(default_factory=dict)
    feedback_delay: int = 0  # steps between a batch's forward and its update on this rank


class RankRuntime:
    def __init__(self, rank: int, schedule: Schedule, stage: LocalStage | EndToEndStage, device: torch.device,
                 shapes: MessageShapes | None = None, feed: ViewFeed | None = None, link: Link | None = None):
        self.rank, self.schedule, self.stage, self.device = rank, schedule, stage, device
        self.shapes, self.feed, self.link = shapes, feed, link
        self.top = schedule.world_size - 1
        self.recent: dict[int, deque] = {b.index: deque(maxlen=LOSS_WINDOW) for b in stage.blocks}

    def run(self, start: int, stop: int, checkpoint: Callable[[int], None], progress: bool = True) -> RankResult:
        memory = PeakMemory(self.device)
        memory.start()
        bar = tqdm(total=stop, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (progress and self.rank == 0), mininterval=0.5 if sys.stderr.isatty() else 30)
        began = time.perf_counter()
        for action in self.schedule.actions(self.rank, start, stop):
            if action.kind == "F":
                self._forward(action.step)
                bar.update()
                if action.step % 10 == 0:
                    bar.set_postfix_str(self._losses_text(), refresh=False)
            elif action.kind == "U":
                feedback = self.link.recv(self.shapes.feedback, self.top)
                self.stage.apply_feedback(action.step, feedback)
            elif action.kind == "W":
                self.link.recv((1,), self.top)
            elif action.kind == "C":
                if self.link is not None:
                    self.link.flush()
                checkpoint(action.step)
            self._record_losses()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - began
        bar.close()
        return RankResult(
            rank=self.rank, blocks=[b.index for b in self.stage.blocks], steps=stop - start, seconds=seconds,
            wait_seconds=self.link.wait_seconds if self.link else 0.0,
            bytes_sent=self.link.bytes_sent if self.link else 0, peak_memory_bytes=memory.peak_bytes(),
            loss_per_block={b: sum(r) / len(r) for b, r in self.recent.items() if r},
            feedback_delay=self.schedule.delay(self.rank),
        )

    def _forward(self, step: int) -> None:
        if self.rank == 0:
            x = self.feed.views_at(step).to(self.device, non_blocking=True)  # (2B, C, S, S)
        else:
            x = self.link.recv(self.shapes.activations[self.rank - 1], self.rank - 1)
        out = self.stage.forward(x, step)
        if self.rank < self.top:
            self.link.send(out, self.rank + 1)
            return
        for rank, waits in enumerate(self.schedule.waits_for_feedback):
            if waits:
                self.link.send(self.stage.top_context, rank)
        if self.schedule.sends_token():
            self.link.send(torch.ones(1, device=self.device), 0)

    def _record_losses(self) -> None:
        for index, stats in self.stage.learned:
            self.recent[index].append(stats.loss.item())
        self.stage.learned.clear()

    def _losses_text(self) -> str:
        return " ".join(f"{i}:{sum(r) / len(r):.3f}" for i, r in self.recent.items() if r)
