"""Run one rank's part of a schedule: the same loop serves one process or many.

With one process there is no link: the stage holds all blocks and feedback is immediate. With K
processes each rank executes its own action list (`sim.schedule`), receiving activations from the
rank below and feedback from the top rank through its `Link`. When a log is kept, logged steps
also carry the held-out images up, and alignment steps a diagnostic gradient down (`sim.diagnostics`).
"""
from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from sim.diagnostics import AlignmentPass, HeldoutPass
from sim.feed import ViewFeed
from sim.logbook import RankLog
from sim.memory import PeakMemory
from sim.schedule import Schedule
from sim.stage import EndToEndStage, LocalStage
from sim.transport import Link

LOSS_WINDOW = 50  # reported losses are means over each block's last LOSS_WINDOW updates
TIMING_WINDOW = 20  # forward actions per timed window of the steady-state throughput


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
    window_seconds: list[float] = field(default_factory=list)  # duration of each TIMING_WINDOW forward actions

    def steady_steps_per_s(self) -> float | None:
        """Median rate over timed windows, the first (warm-up) left out; None for short runs."""
        windows = sorted(self.window_seconds[1:])
        return TIMING_WINDOW / windows[len(windows) // 2] if windows else None


@dataclass
class Observers:
    """What a rank records for the log; all None when no log is kept."""
    log: RankLog | None = None
    heldout: HeldoutPass | None = None
    alignment: AlignmentPass | None = None  # None also for end-to-end methods

    def wants(self, step: int) -> tuple[bool, bool]:
        """At `step`: measure each update's norm? keep each block's local gradient?"""
        if self.log is None:
            return False, False
        return self.log.settings.logs(step), self.alignment is not None and self.log.settings.aligns(step)


class RankRuntime:
    def __init__(self, rank: int, schedule: Schedule, stage: LocalStage | EndToEndStage, device: torch.device,
                 shapes: MessageShapes | None = None, feed: ViewFeed | None = None, link: Link | None = None,
                 observers: Observers = Observers()):
        self.rank, self.schedule, self.stage, self.device = rank, schedule, stage, device
        self.shapes, self.feed, self.link, self.observers = shapes, feed, link, observers
        self.top = schedule.world_size - 1
        self.recent: dict[int, deque] = {b.index: deque(maxlen=LOSS_WINDOW) for b in stage.blocks}

    def run(self, start: int, stop: int, checkpoint: Callable[[int], None], progress: bool = True,
            memory: PeakMemory | None = None) -> RankResult:
        """Execute this rank's actions for batches start..stop-1. `memory`, started when the process
        began its work (before loading data and building blocks), measures the peak; by default
        it starts here."""
        if memory is None:
            memory = PeakMemory(self.device)
            memory.start()
        bar = tqdm(total=stop, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (progress and self.rank == 0), mininterval=0.5 if sys.stderr.isatty() else 30)
        began = window_began = time.perf_counter()
        windows, forwards = [], 0
        for action in self.schedule.actions(self.rank, start, stop):
            if action.kind == "F":
                self._forward(action.step)
                bar.update()
                forwards += 1
                if forwards % TIMING_WINDOW == 0:
                    now = time.perf_counter()
                    windows.append(now - window_began)
                    window_began = now
                if action.step % 10 == 0:
                    bar.set_postfix_str(self._losses_text(), refresh=False)
            elif action.kind == "U":
                feedback = self.link.recv(self.shapes.feedback, self.top)
                self.stage.apply_feedback(action.step, feedback)
            elif action.kind == "G":
                self._record_pairs(action.step, self.observers.alignment.backward(action.step))
                self.observers.alignment.deliver()
            elif action.kind == "W":
                self.link.recv((1,), self.top)
            elif action.kind == "C":
                if self.link is not None:
                    self.link.flush()
                if self.observers.log is not None:
                    self.observers.log.flush()  # the log holds every step before a checkpoint
                checkpoint(action.step)
            self._record_learned()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - began
        bar.close()
        return RankResult(
            rank=self.rank, blocks=[b.index for b in self.stage.blocks], steps=stop - start, seconds=seconds,
            wait_seconds=self.link.wait_seconds if self.link else 0.0,
            bytes_sent=self.link.bytes_sent if self.link else 0, peak_memory_bytes=memory.peak_bytes(),
            loss_per_block={b: sum(r) / len(r) for b, r in self.recent.items() if r},
            feedback_delay=self.schedule.delay(self.rank), window_seconds=windows,
        )

    def _forward(self, step: int) -> None:
        log = self.observers.log
        logged = log is not None and log.settings.logs(step)
        began, sent = time.perf_counter(), self.link.bytes_sent if self.link else 0
        if logged:  # activity of the held-out images with the weights from before this batch
            for block, features in self.observers.heldout.run().items():
                log.blocks[block].record(step, activations=features)
        if self.rank == 0:
            x = self.feed.views_at(step).to(self.device, non_blocking=True)  # (2B, C, S, S)
        else:
            x = self.link.recv(self.shapes.activations[self.rank - 1], self.rank - 1)
        if self.observers.alignment is not None and log.settings.aligns(step):
            self._record_pairs(step, self.observers.alignment.forward(x, step))
        out = self.stage.forward(x, step)
        if self.rank < self.top:
            self.link.send(out, self.rank + 1)
        else:
            for rank, waits in enumerate(self.schedule.waits_for_feedback):
                if waits:
                    self.link.send(self.stage.top_context, rank)
            if self.schedule.sends_token():
                self.link.send(torch.ones(1, device=self.device), 0)
            if self.observers.alignment is not None:
                self.observers.alignment.deliver()
        if logged:
            seconds, sent = time.perf_counter() - began, (self.link.bytes_sent if self.link else 0) - sent
            for writer in log.blocks.values():
                writer.record(step, "forward", step_seconds=seconds, bytes_sent=sent)

    def _record_pairs(self, step: int, bp_gradients: dict | None) -> None:
        for block, gradient in (bp_gradients or {}).items():
            self.observers.log.blocks[block].record_pair(step, bp_gradient=gradient)

    def _record_learned(self) -> None:
        log = self.observers.log
        for learned in self.stage.learned:
            if learned.stats is not None:
                self.recent[learned.block].append(learned.stats.loss.item())
            if learned.gradient is not None:  # an alignment step
                log.blocks[learned.block].record_pair(learned.step, local_gradient=learned.gradient.cpu().numpy())
            if log is None or not log.settings.logs(learned.step):
                continue
            fields = {"update_norm": learned.update_norm, "feedback_norm": learned.feedback_norm}
            if learned.stats is not None:
                stats = learned.stats
                fields.update(loss=stats.loss.item(), score_pos=stats.score_pos.item(), score_neg=stats.score_neg.item())
            log.blocks[learned.block].record(learned.step, "update", **{k: v for k, v in fields.items() if v is not None})
        self.stage.learned.clear()

    def _losses_text(self) -> str:
        return " ".join(f"{i}:{sum(r) / len(r):.3f}" for i, r in self.recent.items() if r)
