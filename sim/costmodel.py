"""A cost model of laminar's schedules: predict images/s for K devices from measured per-block
times and the measured bandwidth of the link between processes.

Per batch of B images (2B views): `local[l]` is block l's forward pass plus its local update,
`forward[l]` and `backward[l]` its share of an end-to-end backprop step, `data` the views on
rank 0, `activation_bytes[l]` the size of block l's output. A rank's step time is the sum over its
blocks (plus the data on rank 0, plus sending its output); then:

- local SSL, pipelined over K ranks: no rank waits for another's backward, so the pipeline runs
  at the pace of its slowest rank: B / max_r(step_r);
- local SSL with exact top-down feedback: each batch climbs to the top and its feedback comes
  back before the next: B / (sum of all steps + the messages on the way up and down);
- BP-SSL pipelined with m micro-batches (GPipe and 1F1B alike, flushed every batch): with the
  forward and backward times of one micro-batch (measured at that size: small micro-batches use
  the hardware less well than 1/m of a batch would), the pipeline fills and drains:
  B / ((m + K - 1) * max_r(forward_r + backward_r + messages_r)).
"""
from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from layers.block import Block
from sim.stage import LocalStage


@dataclass
class BlockTimes:
    local: list[float]  # seconds per batch: forward + local update, per block
    forward: list[float]  # end-to-end backprop: forward, per block
    backward: list[float]  # end-to-end backprop: backward with input gradients, per block
    data: float  # building one batch's views
    activation_bytes: list[int]  # one batch's output of each block
    feedback_bytes: int  # the top block's pooled activity for one batch


def _median_seconds(run, repeats: int) -> float:
    run()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def time_local_blocks(blocks: Sequence[Block], views: torch.Tensor, repeats: int = 5) -> list[float]:
    """Seconds of each block's forward + local update on `views`."""
    times, x = [], views
    for block in blocks:
        stage = LocalStage([block], seed=0)
        top_context = None
        if block.needs_top_context:  # stand in for the feedback message: the block's own shape suffices
            top_context = torch.zeros(len(x), block.heads["top"].in_features, device=x.device)

        def step(x=x, stage=stage, top_context=top_context) -> None:
            stage.forward(x, 0)
            if top_context is not None:
                stage.apply_feedback(0, top_context)
            stage.learned.clear()

        times.append(_median_seconds(step, repeats))
        with torch.no_grad():
            x = block(x)
    return times


def time_backprop_blocks(blocks: Sequence[Block], views: torch.Tensor, repeats: int = 5) -> tuple[list[float], list[float]]:
    """Forward and backward seconds of each block inside one end-to-end backprop step."""
    forward, backward = [[] for _ in blocks], [[] for _ in blocks]
    for repeat in range(repeats + 1):
        outputs, x = [], views
        for index, block in enumerate(blocks):
            x = x.detach().requires_grad_(index > 0)
            began = time.perf_counter()
            out = block(x)
            if block.is_top:
                out = block.loss(block.features(out))[0]
            forward[index].append(time.perf_counter() - began)
            outputs.append((x, out))
            x = out
        grad = None
        for index in reversed(range(len(blocks))):
            x, out = outputs[index]
            began = time.perf_counter()
            out.backward(grad)
            backward[index].append(time.perf_counter() - began)
            grad = x.grad
        for block in blocks:
            block.zero_grad(set_to_none=True)
    median = lambda values: sorted(values[1:])[len(values[1:]) // 2]  # noqa: E731 - the first is warm-up
    return [median(f) for f in forward], [median(b) for b in backward]


def _ping_pong(rank: int, path: str, sizes: Sequence[int], repeats: int, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for size in sizes:
            tensor = torch.zeros(size // 4)
            times = []
            for _ in range(repeats + 1):
                began = time.perf_counter()
                if rank == 0:
                    dist.send(tensor, 1)
                    dist.recv(tensor, 1)
                else:
                    dist.recv(tensor, 0)
                    dist.send(tensor, 0)
                times.append((time.perf_counter() - began) / 2)
            if rank == 0:
                results.append((size, sorted(times[1:])[len(times) // 2]))
    finally:
        dist.destroy_process_group()


def measure_link(sizes: Sequence[int] = (1 << 16, 1 << 22), repeats: int = 10) -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of a gloo link between two local processes, from the
    one-way time of two message sizes."""
    with tempfile.TemporaryDirectory() as folder:
        results = mp.get_context("spawn").Manager().list()
        mp.start_processes(_ping_pong, args=(f"{folder}/rendezvous", list(sizes), repeats, results), nprocs=2,
                           start_method="spawn")
        (small, t_small), (large, t_large) = sorted(results)
    bandwidth = (large - small) / max(t_large - t_small, 1e-9)
    return max(t_small - small / bandwidth, 0.0), bandwidth


@dataclass(frozen=True)
class Link:
    latency: float
    bandwidth: float

    def seconds(self, size: int) -> float:
        return self.latency + size / self.bandwidth


def _rank_sums(values: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    return [sum(values[b] for b in group) for group in groups]


def local_pipelined(times: BlockTimes, groups: Sequence[Sequence[int]], link: Link, batch: int,
                    feedback: bool = False) -> float:
    """Images/s of local SSL pipelined over len(groups) ranks (delayed feedback: `feedback`)."""
    steps = _rank_sums(times.local, groups)
    steps[0] += times.data
    for rank, group in enumerate(groups[:-1]):
        steps[rank] += link.seconds(times.activation_bytes[group[-1]])
    if feedback and len(groups) > 1:
        steps[-1] += (len(groups) - 1) * link.seconds(times.feedback_bytes)
    return batch / max(steps)


def local_exact_feedback(times: BlockTimes, groups: Sequence[Sequence[int]], link: Link, batch: int) -> float:
    """Images/s of local SSL with exact top-down feedback: no overlap between ranks."""
    total = times.data + sum(times.local)
    total += sum(link.seconds(times.activation_bytes[g[-1]]) for g in groups[:-1])
    total += link.seconds(times.feedback_bytes) if len(groups) > 1 else 0.0
    return batch / total


def backprop_pipelined(times: BlockTimes, groups: Sequence[Sequence[int]], link: Link, batch: int,
                       microbatches: int = 1) -> float:
    """Images/s of BP-SSL over len(groups) ranks with `microbatches` micro-batches per batch, from
    `times` measured on one micro-batch (K = 1, m = 1: plain single-process backprop)."""
    work = [f + b for f, b in zip(_rank_sums(times.forward, groups), _rank_sums(times.backward, groups))]
    for rank, group in enumerate(groups[:-1]):  # an activation up and a gradient down per micro-batch
        work[rank] += 2 * link.seconds(times.activation_bytes[group[-1]])
    return batch / ((microbatches + len(groups) - 1) * max(work) + times.data)
