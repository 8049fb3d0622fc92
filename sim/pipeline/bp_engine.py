"""The BP pipeline engine, the fair distributed BP baseline: an end-to-end (BP-SSL) encoder split over K processes and
trained with back-propagation through all of them, driven by `torch.distributed.pipelining`
(GPipe or 1F1B over m micro-batches).

Each rank owns a contiguous group of blocks and wraps them in one `PipelineStage`; the last rank
also computes the top block's loss. A step takes a batch of B images (2B views) in m micro-batches
of b = B / m images. Micro-batch i holds both views of images i*b .. (i+1)*b - 1 (`microbatches`),
so each micro-batch's InfoNCE (or hinge) loss contrasts its b images with each other: this is the
micro-batched loss, the usual objective of pipelined SSL, not the loss over all B images. The
schedules run with `scale_grads=True`: the gradients of the m micro-batch losses are summed and
divided by m, so each step follows the gradient of the *mean* micro-batch loss. After each step
every block takes a step of its own AdamW.

What each rank measures:
- `busy_seconds`: compute on this rank. The pipelining schedules do not report their waits, so the
  compute regions are timed instead: each micro-batch's forward (`forward_one_chunk`) and backward
  (`backward_one_chunk`), the loss (last rank), the optimiser steps and, on rank 0, building the
  views. On CPU a region's wall time (compute is synchronous); on a GPU the time between CUDA
  events recorded around it on the compute stream. `wait_seconds` = wall time - busy time: waiting
  for activations and gradients, pipeline fill and drain, and the schedule's own Python overhead.
- `bytes_sent`: the bytes of every activation and gradient the stage hands to the transport,
  counted from the send operations' tensors. It equals, per step, with 4-byte floats,
  4 * 2B * (C_out * S_out^2 [not the last rank] + C_in * S_in^2 [not the first rank]), where
  (C_out, S_out) is the channel count and map side of this rank's last block (activations sent up,
  m micro-batches of 2b rows) and (C_in, S_in) those of the block below its first one (the
  gradient of its input, sent down). The schedules' one-off warm-up messages are not counted.
"""
from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from layers.block import Block
from layers.learning_rate import LearningRate
from layers.seeding import STREAM_NEGATIVES, keyed_generator
from sim.data.feed import ViewFeed
from sim.pipeline.schedule import PIPELINE_SCHEDULES, PipelineSettings
from sim.pipeline.stage import check_finite
from sim.record.peak_memory import PeakMemory
from sim.record.progress import WindowClock, progress_bar
from sim.record.summary import LOSS_WINDOW, RankResult

SCHEDULE_CLASSES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}  # torch's, by PIPELINE_SCHEDULES name
assert tuple(SCHEDULE_CLASSES) == PIPELINE_SCHEDULES


def microbatches(views: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Split a batch of views into `count` micro-batches that keep both views of an image together.

    `views` is (2B, C, S, S): rows 0..B-1 the first view of each image, rows B..2B-1 the second.
    Micro-batch i is (2b, C, S, S) with b = B / count: the first view of images i*b..(i+1)*b - 1,
    then their second view, the layout every loss expects of a batch."""
    rows = len(views)
    if rows % (2 * count):
        raise ValueError(f"{rows // 2} images do not split into {count} micro-batches of equal size")
    grouped = views.view(2, count, rows // (2 * count), *views.shape[1:])  # (view, micro-batch, b, C, S, S)
    return list(grouped.transpose(0, 1).reshape(rows, *views.shape[1:]).chunk(count))


class BlockChain(nn.Module):
    """One rank's blocks in sequence; the rank holding the top block returns its pooled features."""

    def __init__(self, blocks: Sequence[Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)  # (2b, C, H, W), not detached: the gradient crosses blocks and ranks
        top = self.blocks[-1]
        return top.features(x) if top.is_top else x  # (2b, D) on the last rank


class ComputeClock:
    """Seconds spent in timed regions; on a GPU from CUDA events, read by `settle` once a step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        if not self.cuda:
            began = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - began
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))

    def settle(self) -> None:
        """Add the regions recorded on the GPU; call after the device is synchronised."""
        self.seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        self._events.clear()


class MeasuredStage(PipelineStage):
    """A `PipelineStage` that times its forward and backward compute and counts the bytes it sends.
    The schedules call these four methods once per micro-batch."""

    def __init__(self, *args, clock: ComputeClock, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = clock
        self.bytes_sent = 0
        self.bytes_by_kind: dict[str, int] = {}  # activations up, gradients down

    def forward_one_chunk(self, *args, **kwargs):
        with self.clock.timed():
            return super().forward_one_chunk(*args, **kwargs)

    def backward_one_chunk(self, *args, **kwargs):
        with self.clock.timed():
            return super().backward_one_chunk(*args, **kwargs)

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self._counted(super().get_fwd_send_ops(fwd_chunk_id), "activations")

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self._counted(super().get_bwd_send_ops(bwd_chunk_id), "gradient")

    def _counted(self, ops: list[dist.P2POp], kind: str) -> list[dist.P2POp]:
        size = sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
        self.bytes_sent += size
        self.bytes_by_kind[kind] = self.bytes_by_kind.get(kind, 0) + size
        return ops


class BPPipelineEngine:
    """This rank's stage and schedule of a BP pipeline over `stages` ranks. The stage is told the
    shapes of one micro-batch up front (`Plan.microbatch_shapes`): what it receives (or, on rank 0,
    builds) and what it sends up (on the last rank, the top block's pooled features). Rank 0 takes
    each step's views from `feed`."""

    def __init__(self, blocks: Sequence[Block], *, rank: int, stages: int, device: torch.device,
                 group: dist.ProcessGroup | None, settings: PipelineSettings, seed: int,
                 shapes: tuple[tuple[int, ...], tuple[int, ...]], learning_rate: LearningRate,
                 feed: ViewFeed | None = None):
        if rank == 0 and feed is None:
            raise ValueError("rank 0 builds the views: it needs a ViewFeed")
        count, (input_shape, output_shape) = settings.microbatches, shapes
        self.blocks, self.rank, self.count, self.device, self.seed = list(blocks), rank, count, device, seed
        self.first, self.last = rank == 0, rank == stages - 1
        self.feed, self.learning_rate = feed, learning_rate
        self.clock = ComputeClock(device)
        # Shapes given up front (meta tensors): the stage skips its shape-inference pass at the first step.
        # requires_grad matters: the stage allocates a gradient buffer only for tensors that require
        # grad, and without one a stage silently back-propagates nothing (the images need none).
        given = torch.empty(input_shape, device="meta", requires_grad=not self.first)
        made = torch.empty(output_shape, device="meta", requires_grad=True)
        self.stage = MeasuredStage(BlockChain(self.blocks), rank, stages, device, input_args=given,
                                   output_args=made, group=group, clock=self.clock)
        self.schedule = SCHEDULE_CLASSES[settings.schedule](self.stage, n_microbatches=count, loss_fn=self._loss,
                                                            scale_grads=True)
        self.step_index = 0

    def _loss(self, features: torch.Tensor, microbatch: int) -> torch.Tensor:
        """The top block's loss on one micro-batch; the schedule passes the micro-batch's index as
        its target, which keys the random negatives (if any) by (seed, block, step, micro-batch)."""
        with self.clock.timed():
            top = self.blocks[-1]
            generator = (keyed_generator(self.seed, STREAM_NEGATIVES, top.index, self.step_index, microbatch)
                         if top.settings.negatives == "random" else None)
            loss, _ = top.loss(features, None, generator)
            return loss

    def run(self, start: int, stop: int, *, progress: bool = True, memory: PeakMemory | None = None) -> RankResult:
        """Train steps start..stop-1 (rank 0 shows a progress bar); the BP pipeline keeps no
        checkpoints, so it always starts at 0. `memory` measures the peak from when the process
        began its work (default: from here)."""
        if start != 0:
            raise ValueError(f"the BP pipeline keeps no checkpoints: it starts at step 0, not {start}")
        steps = stop
        if memory is None:
            memory = PeakMemory(self.device)
            memory.start()
        step_losses, learning_rate = [], self.learning_rate
        began, windows = time.perf_counter(), WindowClock()
        bar = progress_bar(steps, 0, progress and self.first)
        for step in range(steps):
            self.step_index = step
            inputs: dict = {}
            if self.first:
                with self.clock.timed():
                    inputs["arg_mbs"] = [(x,) for x in microbatches(self.feed.views_at(step), self.count)]
            losses: list[torch.Tensor] = []
            if self.last:
                inputs.update(target_mbs=list(range(self.count)), losses=losses)
            self.schedule.step(return_outputs=False, **inputs)
            if self.last:
                step_losses.append(torch.stack(losses).detach().mean())
                check_finite(step_losses[-1], self.blocks[-1].index, step)
            with self.clock.timed():
                for block in self.blocks:
                    learning_rate.apply(block.optimizer, step)
                    block.optimizer.step()
                    block.optimizer.zero_grad(set_to_none=True)
            if self.clock.cuda:
                torch.cuda.synchronize(self.device)  # the step's end is when its work is done
                self.clock.settle()
            windows.tick()
            bar.update()
        bar.close()
        seconds = time.perf_counter() - began
        window = [float(v) for v in step_losses[-LOSS_WINDOW:]]
        losses = {self.blocks[-1].index: sum(window) / len(window)} if window else {}
        return RankResult(
            rank=self.rank, blocks=[b.index for b in self.blocks], steps=steps, seconds=seconds,
            busy_seconds=self.clock.seconds, wait_seconds=max(0.0, seconds - self.clock.seconds),
            bytes_sent=self.stage.bytes_sent, peak_memory_bytes=memory.peak_bytes(), loss_per_block=losses,
            window_seconds=windows.windows, bytes_by_kind={"sent": self.stage.bytes_by_kind})


def pipeline_group(timeout_s: float) -> dist.ProcessGroup:
    """A process group for the pipeline's messages whose waits end after `timeout_s` (the
    schedules wait without a timeout of their own, so the group's is the only bound)."""
    return dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))
