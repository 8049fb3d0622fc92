"""The local engine: one rank's part of a schedule of local learning. The same loop serves one
process or many.

Each rank executes its own action list (`sim.pipeline.schedule`), receiving activations from the
rank below and feedback from the top rank through its `Transport`; with one process the stage holds
all blocks, feedback is immediate and the schedule lists no message. When a log is kept, logged
steps also carry the held-out images up, and alignment steps a diagnostic gradient down
(`sim.pipeline.recording`).
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from sim.data.feed import ViewFeed
from sim.pipeline.codec import MessageCodecs
from sim.pipeline.recording import Recording
from sim.pipeline.schedule import MessageShapes, Schedule
from sim.pipeline.stage import EndToEndStage, LocalStage
from sim.pipeline.transport import InProcess, Transport
from sim.record.peak_memory import PeakMemory
from sim.record.progress import PhaseClock, WindowClock, progress_bar
from sim.record.summary import LOSS_WINDOW, RankResult


def no_checkpoint(step: int) -> None:
    """Checkpoints off: the engine still settles every update at a `C` action."""


class LocalEngine:
    """Rank `rank`'s actions of `schedule` on `stage`; `feed` (the first rank of each replica) builds
    each batch's views; `checkpoint(step)` saves at each `C` action. Without a `transport`, the
    rank is alone (InProcess)."""

    def __init__(self, rank: int, schedule: Schedule, stage: LocalStage | EndToEndStage, device: torch.device, *,
                 shapes: MessageShapes | None = None, feed: ViewFeed | None = None,
                 transport: Transport | None = None, recording: Recording | None = None,
                 checkpoint: Callable[[int], None] = no_checkpoint):
        self.rank, self.schedule, self.stage, self.device = rank, schedule, stage, device
        self.shapes, self.feed, self.checkpoint = shapes, feed, checkpoint
        self.transport = transport or InProcess(device)
        self.recording = recording or Recording()
        self.top = schedule.world_size - 1
        self.codecs = stage.codecs if isinstance(stage, LocalStage) else MessageCodecs()
        self.recent: dict[int, deque] = {b.index: deque(maxlen=LOSS_WINDOW) for b in stage.blocks}
        self.clock = PhaseClock(lambda: self.transport.wait_seconds)

    def run(self, start: int, stop: int, *, progress: bool = True, memory: PeakMemory | None = None) -> RankResult:
        """Execute this rank's actions for batches start..stop-1. `memory`, started when the process
        began its work (before loading data and building blocks), measures the peak; by default
        it starts here."""
        if memory is None:
            memory = PeakMemory(self.device)
            memory.start()
        bar = progress_bar(stop, start, progress and self.rank == 0)
        began, clock = time.perf_counter(), WindowClock()
        self.clock.seconds.clear()  # this call's phases only
        phase = self.clock.phase
        for action in self.schedule.actions(self.rank, start, stop):
            with phase("messages"):  # waits for this rank's oldest unreceived sends
                self.transport.begin(self.schedule.messages(self.rank, action))
            if action.kind == "F":
                self._forward(action.step)
                bar.update()
                clock.tick()
                if action.step % 10 == 0:
                    bar.set_postfix_str(self._losses_text(), refresh=False)
            elif action.kind == "U":
                with phase("messages"):
                    feedback = self.transport.recv_packed(self.codecs.feedback, self.shapes.feedback, self.top,
                                                          "feedback")
                with phase("compute"):
                    self.stage.apply_feedback(action.step, feedback)
            elif action.kind == "G":
                with phase("record"):
                    self._record_pairs(action.step, self.recording.alignment.backward(action.step))
                    self.recording.alignment.deliver()
            elif action.kind == "W":
                with phase("messages"):
                    self.transport.recv((1,), self.top, "token")
            elif action.kind == "C":
                with phase("compute"):
                    self.stage.apply_pending()  # every update of the batches before the checkpoint applied
                with phase("record"):
                    self._record_updates()
                    self.transport.flush()
                    if self.recording.log is not None:
                        self.recording.log.flush()  # the log holds every step before a checkpoint
                    self.checkpoint(action.step)
            self.transport.end(action)
            with phase("record"):
                self._record_updates()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - began
        bar.close()
        wait = self.transport.wait_seconds
        return RankResult(
            rank=self.rank, blocks=[b.index for b in self.stage.blocks], steps=stop - start, seconds=seconds,
            busy_seconds=seconds - wait, wait_seconds=wait,
            bytes_sent=self.transport.bytes_sent, peak_memory_bytes=memory.peak_bytes(),
            loss_per_block={b: sum(r) / len(r) for b, r in self.recent.items() if r},
            feedback_delays=self._feedback_delays(), window_seconds=clock.windows,
            input_zero_fraction=self.stage.zeros.fractions(), bytes_by_kind=self.transport.bytes_by_kind,
            phase_seconds={**self.clock.seconds, "other": seconds - sum(self.clock.seconds.values())},
        )

    def _feedback_delays(self) -> dict[int, int]:
        """Steps from each waiting block's forward pass of a batch to its update: the stage's delay
        line where the top block is here, else the schedule's."""
        blocks = [b for b in self.stage.blocks if b.needs_top_context]
        here = self.top == self.rank
        return {b.index: self.stage.feedback_delay if here else self.schedule.delay(self.rank) for b in blocks}

    def _forward(self, step: int) -> None:
        log, phase = self.recording.log, self.clock.phase
        logged = self.schedule.logs(step)
        began, sent = time.perf_counter(), self.transport.bytes_sent
        with phase("record"):
            if logged or self.schedule.aligns(step):  # these passes see the weights from before this batch
                self.stage.settle()
            if logged:  # activity of the held-out images with the weights from before this batch
                for block, features in self.recording.heldout.run().items():
                    log.blocks[block].record(step, activations=features)
        if self.rank == 0:
            with phase("views"):
                x = self.feed.views_at(step).to(self.device, non_blocking=True)  # (2B, C, S, S)
        else:
            with phase("messages"):
                x = self.transport.recv_packed(self.codecs.activations, self.shapes.activations[self.rank - 1],
                                               self.rank - 1, "activations")
        if self.recording.alignment is not None and self.schedule.aligns(step):
            with phase("record"):
                self._record_pairs(step, self.recording.alignment.forward(x, step))
        with phase("compute"):
            self.stage.forward(x, step)  # its output travels as the codec packed it
        with phase("messages"):
            if self.rank < self.top:
                self.transport.send_packed(self.stage.packed_output, self.rank + 1, "activations")
            else:
                for rank, waits in enumerate(self.schedule.waits_for_feedback):
                    if waits:
                        self.transport.send_packed(self.stage.packed_context, rank, "feedback")
                if self.schedule.sends_token():
                    self.transport.send(torch.ones(1, device=self.device), 0, "token")
        if self.recording.alignment is not None and self.rank == self.top:
            with phase("record"):
                self.recording.alignment.deliver()
        if logged:
            seconds, sent = time.perf_counter() - began, self.transport.bytes_sent - sent
            for block, writer in log.blocks.items():
                zeros = self.stage.zeros.latest_fraction(block)
                writer.record(step, "forward", step_seconds=seconds, bytes_sent=sent,
                              **({} if zeros is None else {"input_zero_fraction": zeros}))

    def _record_pairs(self, step: int, bp_gradients: dict | None) -> None:
        for block, gradient in (bp_gradients or {}).items():
            self.recording.log.blocks[block].record_pair(step, bp_gradient=gradient)

    def _record_updates(self) -> None:
        log = self.recording.log
        for update in self.stage.updates:
            if update.stats is not None:
                self.recent[update.block].append(update.stats.loss.item())
            if update.gradient is not None:  # an alignment step
                log.blocks[update.block].record_pair(update.step, local_gradient=update.gradient.cpu().numpy())
            if not self.schedule.logs(update.step):
                continue
            fields = {"update_norm": update.update_norm, "feedback_norm": update.feedback_norm}
            if update.stats is not None:
                stats = update.stats
                fields.update(loss=stats.loss.item(), score_pos=stats.score_pos.item(),
                              score_neg=stats.score_neg.item())
            log.blocks[update.block].record(update.step, "update", **{k: v for k, v in fields.items() if v is not None})
        self.stage.updates.clear()

    def _losses_text(self) -> str:
        return " ".join(f"{i}:{sum(r) / len(r):.3f}" for i, r in self.recent.items() if r)
