"""Free-running blocks for real: one block group per process over torch.distributed, the semantics of
sim.pipeline.free_running without its virtual clock. Each rank, as fast as it can: takes the next
input (rank 0: the views of its next batch; the others: from the mailbox of the link below, which
receives in the background), applies the top-down updates whose context has arrived, forwards and
learns, and sends its output up (the top rank: its context down to every waiting rank). No step
barrier; ranks stop after the run's last batch, waiting ranks once every batch they forwarded has
been updated or forgotten, and every message sent has been received. A checkpoint is such an end too
(sim.pipeline.free_running.segments): a consistent cut, from which a resumed run goes on.

`sim.block_speed` below 1 is emulated: after each forward, a rank sleeps until the forward has lasted
its group's slowdown (sim.pipeline.free_running.FreeRunning.duration over the speed-1 time) times its
compute; with `sim.pace_s`, until it has lasted pace_s times its duration on the virtual clock.

Each rank records what the simulation records: input ages (newer messages that had come when it took
one), context ages (its forwards between a batch's forward and its update), the batches it learned
from and forgot, and its own seconds per batch (waits for input left out), which the run's summary
feeds to the simulation to predict the same ages. With a log (log.every), each rank writes its blocks'
row of batch b when it reaches b (takes a batch at or after it): the held-out activity with its
weights of that moment, from the activity the rank below sent when it reached the same row.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

import torch

from sim.data.feed import ViewFeed
from sim.pipeline.free_running import FreeRunning, segments
from sim.pipeline.local_engine import no_checkpoint
from sim.pipeline.mailbox import Inbox, Outbox, receive
from sim.pipeline.recording import Recording
from sim.pipeline.schedule import MessageShapes
from sim.pipeline.stage import LocalStage
from sim.pipeline.transport import Distributed, ProtocolError
from sim.record.peak_memory import PeakMemory
from sim.record.progress import WindowClock, progress_bar
from sim.record.summary import LOSS_WINDOW, RankResult


class AsyncRank:
    """Rank `rank`'s group of `setup` on `stage`; `feed` on rank 0."""

    def __init__(self, rank: int, setup: FreeRunning, stage: LocalStage, device: torch.device, *,
                 transport: Distributed, shapes: MessageShapes, feed: ViewFeed | None, pace_s: float = 0.0,
                 checkpoint_every: int = 0, checkpoint: Callable[[int], None] = no_checkpoint,
                 recording: Recording = Recording(), log_every: int = 0):
        self.rank, self.setup, self.stage, self.device, self.pace_s = rank, setup, stage, device, pace_s
        self.recording, self.log_every = recording, log_every
        self.checkpoint_every, self.checkpoint = checkpoint_every, checkpoint
        self.most_in_mailbox = 0
        self.transport, self.shapes, self.feed = transport, shapes, feed
        self.top = len(setup.groups) - 1
        self.waits = setup.waits_for_feedback[rank]
        self.recent = {b.index: deque(maxlen=LOSS_WINDOW) for b in stage.blocks}
        self.forwards = 0
        self.pending: dict[int, int] = {}  # batch -> forwards before it, awaiting its context
        self.input_ages: Counter = Counter()
        self.context_ages: Counter = Counter()
        self.since_row = {"input_age": [], "context_age": [], "forwards": 0, "bytes_sent": 0}
        self.forgotten = 0
        self.busy = 0.0  # seconds of forward passes, emulated slowness included
        self.own_seconds = 0.0  # of the loop over batches, waits for input and credits left out
        self.log_seconds = 0.0  # of writing the log's rows, their waits left out

    def run(self, start: int, stop: int, *, progress: bool = True, memory: PeakMemory | None = None) -> RankResult:
        if memory is None:
            memory = PeakMemory(self.device)
            memory.start()
        bar = progress_bar(stop, start, progress and self.rank == 0)
        began, clock = time.perf_counter(), WindowClock()
        for first, end in segments(start, stop, self.checkpoint_every):
            self._stretch(first, end, bar, clock)
            self.checkpoint(end)  # a consistent cut: mailboxes empty, every update settled, on every rank
        seconds = time.perf_counter() - began
        bar.close()
        return RankResult(
            rank=self.rank, blocks=[b.index for b in self.stage.blocks], steps=stop - start, seconds=seconds,
            busy_seconds=self.busy, wait_seconds=self.transport.wait_seconds, bytes_sent=self.transport.bytes_sent,
            peak_memory_bytes=memory.peak_bytes(), window_seconds=clock.windows,
            loss_per_block={b: sum(r) / len(r) for b, r in self.recent.items() if r},
            free_running=self._record(), input_zero_fraction=self.stage.zeros.fractions(),
            bytes_by_kind=self.transport.bytes_by_kind)

    def _stretch(self, first: int, end: int, bar, clock: WindowClock) -> None:
        """Batches first..end-1, free-running, then every message received and every update settled."""
        last, policy = end - 1, self.setup.policy
        codecs = self.stage.codecs
        inbox = (Inbox(self.transport, self.rank - 1, "activations", self.shapes.activations[self.rank - 1], last,
                       depth=self.setup.depth, newest=policy == "newest", credits=policy == "fifo",
                       codec=codecs.activations)
                 if self.rank > 0 else None)
        feedback = (Inbox(self.transport, self.top, "feedback", self.shapes.feedback, last, codec=codecs.feedback)
                    if self.waits else None)
        if self.rank < self.top:
            outboxes = [Outbox(self.transport, self.rank + 1, "activations",
                               self.setup.depth if policy == "fifo" else None)]
        else:
            outboxes = [Outbox(self.transport, r, "feedback") for r, w in enumerate(self.setup.waits_for_feedback) if w]
        rows = deque(b for b in range(first, end) if self.log_every and b % self.log_every == 0)
        heldout = Outbox(self.transport, self.rank + 1, "heldout") if rows and self.rank < self.top else None
        began, waited, logged, batch = time.perf_counter(), self.transport.wait_seconds, self.log_seconds, first - 1
        while batch < last:
            if inbox is None:
                batch, age, x = batch + 1, 0, self.feed.views_at(batch + 1).to(self.device, non_blocking=True)
            else:
                batch, age, x = inbox.take()
            if feedback is not None:
                self._settle(feedback.arrived())
            while rows and rows[0] <= batch:  # rows this rank reached (a skipping rank logs several at once)
                self._log(rows.popleft(), heldout)
            self._forward(batch, age, x, outboxes)
            bar.update()
            clock.tick()
        # its own time: the loop's, but for the waits for input and credits and the log (views and sends included)
        self.own_seconds += (time.perf_counter() - began - (self.transport.wait_seconds - waited)
                             - (self.log_seconds - logged))
        while self.pending:  # forwarded everything: the contexts still to come
            feedback.wait()
            self._settle(feedback.arrived())
        for box in [inbox, feedback, heldout, *outboxes]:
            if box is not None:
                box.close()
        self.most_in_mailbox = max(self.most_in_mailbox, inbox.most if inbox is not None else 0)
        self.stage.settle()
        if self.recording.log is not None:
            self.recording.log.flush()  # the log holds every batch before a checkpoint

    def _forward(self, batch: int, age: int, x: torch.Tensor, outboxes: list[Outbox]) -> None:
        began = time.perf_counter()
        self.stage.forward(x, batch)  # its output travels as the codec packed it
        self._read_updates()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute = time.perf_counter() - began
        if self.pace_s:  # hardware of a chosen speed
            target = self.pace_s * self.setup.duration(self.rank, batch)
        else:  # this machine, with the slow blocks slowed
            target = compute * self.setup.duration(self.rank, batch) / self._speed_one_time()
        if target > compute:
            time.sleep(target - compute)
        self.busy += time.perf_counter() - began
        self.input_ages[age] += 1
        self.since_row["input_age"].append(age)
        if self.waits:
            self.pending[batch] = self.forwards
        self.forwards += 1
        packed = self.stage.packed_output if self.rank < self.top else self.stage.packed_context
        for box in outboxes:
            box.send(batch, self.forwards - 1, packed)

    def _log(self, row: int, heldout: Outbox | None) -> None:
        """Log row `row`, when this rank reached it (took a batch at or after it): the held-out images'
        activity with its weights of that moment, on the activity the rank below sent for the same row;
        each block's latest loss, and the rank's mean ages, bytes sent per batch, since the last row."""
        log, held = self.recording.log, self.recording.heldout
        began, waited = time.perf_counter(), self.transport.wait_seconds
        self.stage.settle()
        x = held.images
        if self.rank > 0:
            batch, _, x = receive(self.transport, self.rank - 1, "heldout", held.input_shape)
            if batch != row:
                raise ProtocolError(f"rank {self.rank} logs row {row} but received the held-out activity of {batch}")
        features, out = held.through(x)
        if heldout is not None:
            heldout.send(row, self.forwards, [out])
        since = self.since_row  # the batches' own traffic: the held-out activity left out
        sent = sum(n for kind, n in self.transport.bytes_by_kind["sent"].items() if kind != "heldout")
        ages = {name: sum(since[name]) / len(since[name]) for name in ("input_age", "context_age") if since[name]}
        per_batch = (sent - since["bytes_sent"]) // max(self.forwards - since["forwards"], 1)
        for block in self.stage.blocks:
            writer, losses = log.blocks[block.index], self.recent[block.index]
            zeros = self.stage.zeros.latest_fraction(block.index)
            writer.record(row, activations=features[block.index])
            writer.record(row, "forward", bytes_sent=per_batch,
                          **({} if zeros is None else {"input_zero_fraction": zeros}))
            writer.record(row, "update", **ages, **({"loss": losses[-1]} if losses else {}))
        self.since_row = {"input_age": [], "context_age": [], "forwards": self.forwards, "bytes_sent": sent}
        self.log_seconds += time.perf_counter() - began - (self.transport.wait_seconds - waited)

    def _speed_one_time(self) -> float:
        return sum(self.setup.block_seconds[b] for b in self.setup.groups[self.rank])

    def _settle(self, contexts: list[tuple[int, torch.Tensor]]) -> None:
        """Apply the updates whose context came; forget the batches older than it that never will."""
        for batch, context in contexts:
            for lost in sorted(b for b in self.pending if b < batch):
                del self.pending[lost]
                self.stage.forget(lost)
                self.forgotten += 1
            before = self.pending.pop(batch)
            self.context_ages[self.forwards - before - 1] += 1
            self.since_row["context_age"].append(self.forwards - before - 1)
            self.stage.apply_feedback(batch, context)
            self._read_updates()

    def _read_updates(self) -> None:
        for update in self.stage.updates:
            if update.stats is not None:
                self.recent[update.block].append(update.stats.loss.item())
        self.stage.updates.clear()

    def _record(self) -> dict:
        """This rank's part of summary.json's free_running (sim.pipeline.free_running.dynamics' per block)."""
        per_block = {str(b.index): {
            "group": self.rank, "batches": self.forwards,
            "updates_with_feedback": sum(self.context_ages.values()) if self.waits else None,
            "forgotten": self.forgotten,
            "input_age": {str(a): n for a, n in sorted(self.input_ages.items())},
            "context_age": {str(a): n for a, n in sorted(self.context_ages.items())}} for b in self.stage.blocks}
        return {"blocks": per_block, "seconds_per_batch": self.own_seconds / max(self.forwards, 1),
                "most_in_mailbox": self.most_in_mailbox if self.rank > 0 else None}
