"""The free-running engine in one process: every block group of `sim.schedule = "async"` as its own
stage, executed in the order of the virtual-clock simulation (sim.pipeline.free_running), so a run is
reproducible bit for bit and a slow block, a deep mailbox or jitter change what is learned exactly as
the simulation says. Each group only changes its own weights, so executing the events one at a time
in causal order gives what concurrent groups would compute.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from sim.data.feed import ViewFeed
from sim.pipeline.free_running import Event, FreeRunning, dynamics, segmented_timeline, segments
from sim.pipeline.local_engine import no_checkpoint
from sim.pipeline.recording import Recording
from sim.pipeline.stage import LocalStage
from sim.record.peak_memory import PeakMemory
from sim.record.progress import WindowClock, progress_bar
from sim.record.summary import LOSS_WINDOW, RankResult


class AsyncEngine:
    """`stages[g]` holds group g's blocks (the top one's stage learns from its own context at once;
    the others wait for `apply_feedback`); `feed` builds each batch's views."""

    def __init__(self, setup: FreeRunning, stages: list[LocalStage], feed: ViewFeed, device: torch.device,
                 batch_size: int, *, checkpoint_every: int = 0, checkpoint: Callable[[int], None] = no_checkpoint,
                 recording: Recording = Recording(), log_every: int = 0):
        self.setup, self.stages, self.feed, self.device, self.batch_size = setup, stages, feed, device, batch_size
        self.checkpoint_every, self.checkpoint = checkpoint_every, checkpoint
        self.recording, self.log_every = recording, log_every
        self.recent = {b.index: deque(maxlen=LOSS_WINDOW) for s in stages for b in s.blocks}
        self.ages = {g: {"F": [], "U": []} for g in range(len(stages))}  # since the last logged batch

    def run(self, start: int, stop: int, *, progress: bool = True, memory: PeakMemory | None = None) -> RankResult:
        if memory is None:
            memory = PeakMemory(self.device)
            memory.start()
        events = segmented_timeline(self.setup, start, stop, self.checkpoint_every)
        bar = progress_bar(stop, start, progress)
        began, clock = time.perf_counter(), WindowClock()
        for first, end in segments(start, stop, self.checkpoint_every):
            self._execute([e for e in events if first <= e.batch < end], bar, clock)
            for stage in self.stages:
                stage.settle()
            if self.recording.log is not None:
                self.recording.log.flush()  # the log holds every batch before a checkpoint
            self.checkpoint(end)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - began
        bar.close()
        return RankResult(
            rank=0, blocks=[b.index for s in self.stages for b in s.blocks], steps=stop - start, seconds=seconds,
            busy_seconds=seconds, wait_seconds=0.0, bytes_sent=0, peak_memory_bytes=memory.peak_bytes(),
            loss_per_block={b: sum(r) / len(r) for b, r in self.recent.items() if r}, window_seconds=clock.windows,
            free_running=dynamics(self.setup, events, start, stop, self.batch_size),
            input_zero_fraction={b: f for stage in self.stages for b, f in stage.zeros.fractions().items()})

    def _execute(self, events: list[Event], bar, clock: WindowClock) -> None:
        """One stretch's events, in order."""
        top = len(self.stages) - 1
        outputs: dict[tuple[int, int], torch.Tensor] = {}  # (group, batch) -> its output, in the mailbox above
        contexts: dict[int, torch.Tensor] = {}  # batch -> the top block's context, until every waiting group used it
        readers = sum(self.setup.waits_for_feedback)
        uses: dict[int, int] = {}
        for event in events:
            stage = self.stages[event.group]
            if event.kind == "F" and event.group == 0 and self.log_every and event.batch % self.log_every == 0:
                self._log(event.batch)  # before the batch, as lockstep logs do
            if event.kind in "FU":
                self.ages[event.group][event.kind].append(event.age)
            if event.kind == "F":
                self._forward(event, stage, outputs, contexts, top)
                if event.group == 0:
                    bar.update()
                    clock.tick()
            else:  # U or X: the waiting group settles a batch
                if event.kind == "X":
                    stage.forget(event.batch)
                else:
                    stage.apply_feedback(event.batch, contexts[event.batch])
                    uses[event.batch] = uses.get(event.batch, 0) + 1
                    if uses[event.batch] == readers:  # every waiting group forwarded what the top saw
                        del contexts[event.batch], uses[event.batch]
            self._record_updates(stage)

    def _forward(self, event: Event, stage: LocalStage, outputs: dict, contexts: dict, top: int) -> None:
        g, batch = event.group, event.batch
        if g == 0:
            x = self.feed.views_at(batch).to(self.device, non_blocking=True)  # (2B, C, S, S)
        else:
            x = outputs.pop((g - 1, batch))
            for dropped in [key for key in outputs if key[0] == g - 1 and key[1] < batch]:
                del outputs[dropped]  # batches the group below made that this one never takes
        out = stage.forward(x, batch)
        if g < top:
            outputs[g, batch] = out
        elif any(self.setup.waits_for_feedback):
            contexts[batch] = stage.top_context

    def _log(self, batch: int) -> None:
        """The log's row of `batch` for every block: the held-out images' activity with the weights of the
        moment, each block's latest loss and the mean ages of its group's updates since the last row."""
        log = self.recording.log
        for stage in self.stages:
            stage.settle()
        for block, features in self.recording.heldout.run().items():
            log.blocks[block].record(batch, activations=features)
        for group, stage in enumerate(self.stages):
            ages = {f"{name}_age": sum(values) / len(values) for name, values in
                    (("input", self.ages[group]["F"]), ("context", self.ages[group]["U"])) if values}
            for block in stage.blocks:
                losses = self.recent[block.index]
                zeros = stage.zeros.latest_fraction(block.index)  # of the group's latest batch
                log.blocks[block.index].record(batch, "forward", bytes_sent=0,
                                               **({} if zeros is None else {"input_zero_fraction": zeros}))
                log.blocks[block.index].record(batch, "update", **ages, **({"loss": losses[-1]} if losses else {}))
            self.ages[group] = {"F": [], "U": []}

    def _record_updates(self, stage: LocalStage) -> None:
        for update in stage.updates:
            if update.stats is not None:
                self.recent[update.block].append(update.stats.loss.item())
        stage.updates.clear()
