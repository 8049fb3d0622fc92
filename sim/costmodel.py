"""laminar's one cost model: what a block costs and how fast a schedule runs on K devices.

Two levels, one module. `estimated_block_costs` is an analytic estimate that needs no
measurement: "auto" placement balances it (sim.plan), so every rank computes the same placement.
`measure_block_times` times each block on this hardware, `measure_link` the link between two
processes, and the formulas below turn those into images/s, for the placement the run would use.

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
- R data-parallel replicas (sim.replicas) of any of these: R times the images of one replica, each
  rank's step longer by the ring all-reduce of its blocks' gradients, 2 (R - 1) messages of 1/R of
  them, counted without overlap (the runtime overlaps it with the stage's next blocks: a bound).
"""
from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from layers.block import Block
from layers.encoder import MAXPOOL, NUM_BLOCKS, describe_encoder
from sim.datasets import load_split
from sim.feed import ViewFeed
from sim.stage import LocalStage
from sim.views import SimCLRViews

if TYPE_CHECKING:  # sim.plan uses the estimate below: a plan is only ever passed in here
    from sim.plan import Plan

# A least-squares fit of measured local-step times per block on a 2-core x86 CPU (1 thread,
# batch 32, widths 1/16 to 1/2): element-wise work is memory-bound and weighs hundreds of MACs per
# element there; within about 30 % per block. On GPUs the balance differs: give an explicit
# sim.placement when the estimate splits badly (launch.show_schedule prints the placement).
ELEMENTWISE_WEIGHT = 400.0
HEAD_WEIGHT = 1.7


def estimated_block_costs(
    width: float, in_channels: int, input_size: int, feature_dims: Sequence[int], context_dims: Sequence[Sequence[int]]
) -> list[float]:
    """Relative cost of one training step of each block, in multiply-accumulate equivalents per view.

    Convolution forward and weight gradient (2x the forward MACs), the prediction heads (forward,
    gradient of B and of z: 3x, at HEAD_WEIGHT) and the element-wise work on the activity (ReLU,
    max-pool, pooling: ELEMENTWISE_WEIGHT per element of the pre-pool map).
    """
    costs = []
    for report, dim, contexts in zip(describe_encoder(width, in_channels, input_size), feature_dims, context_dims):
        c, h, _ = report.output_shape
        side = h * (2 if MAXPOOL[report.index] else 1)  # the conv runs before the max-pool
        heads = sum(3 * dim * context for context in contexts)
        costs.append(2 * report.macs_per_image + HEAD_WEIGHT * heads + ELEMENTWISE_WEIGHT * c * side * side)
    return costs


@dataclass(frozen=True)
class StepWork:
    """The arithmetic and memory traffic of one training step of a method, its floor's ingredients."""
    conv_flops: float  # convolutions: forward, weight gradient and, end to end, input gradient
    head_flops: float  # B matrices or projections: forward and weight gradient (contexts are detached)
    optimizer_bytes: float  # AdamW: reads weight, gradient and two moments, writes three (float32)

    @property
    def flops(self) -> float:
        return self.conv_flops + self.head_flops

    def floor_seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        """The step's time if every FLOP ran at `flops_per_s` and the optimiser at `bytes_per_s`."""
        return self.flops / flops_per_s + self.optimizer_bytes / bytes_per_s


def step_work(width: float, in_channels: int, input_size: int, rows: int, feature_dims: Sequence[int],
              head_dims: Sequence[Sequence[int]], end_to_end: bool, head_passes: int) -> StepWork:
    """FLOPs of one step on `rows` views (2B); the element-wise work (ReLU, pooling, the loss) is
    left out: it is memory traffic, small beside these at full width. `head_dims`: per block, the
    other side of each head (Plan.head_dims); `head_passes`: 2 for B (forward and weight gradient:
    the context is detached), 3 for a projection (its input takes a gradient too)."""
    reports = describe_encoder(width, in_channels, input_size)
    conv = 0.0
    for report in reports:  # forward and weight gradient; the input gradient only end to end, not into the image
        passes = 3 if end_to_end and report.index > 0 else 2
        conv += passes * 2 * report.macs_per_image * rows
    pairs = [(dim, other) for dim, others in zip(feature_dims, head_dims) for other in others]
    heads = sum(head_passes * 2 * rows * dim * other for dim, other in pairs)
    params = sum(r.conv_params for r in reports) + sum(dim * other for dim, other in pairs)
    return StepWork(conv, heads, 7 * 4 * params)


def held_memory(width: float, in_channels: int, input_size: int, rows: int, blocks: Sequence[int],
                head_params: Sequence[int], all_at_once: bool) -> dict[str, int]:
    """Bytes that `blocks` hold during a step on `rows` views: `optimizer_state`, their weights,
    gradients and AdamW's two moments (16 bytes per parameter), and `activity`, what a block keeps
    for its backward pass: its input (for the weight gradient), its ReLU output (computed in place
    of the convolution's) and, after a max-pool, the pooled map and its indices (float32, int64).
    `all_at_once`: every block's activity is kept together (backprop; blocks that wait for top-down
    feedback); else a block frees its own after its update, and the largest counts. Temporaries of
    the backward pass (gradients of those maps, patches) come on top."""
    reports = describe_encoder(width, in_channels, input_size)
    params, kept = 0, []
    for index in blocks:
        report = reports[index]
        c, side, _ = report.output_shape
        c_in, side_in = (in_channels, input_size) if index == 0 else reports[index - 1].output_shape[:2]
        before_pool = side * 2 if MAXPOOL[index] else side
        params += report.conv_params + head_params[index]
        activity = rows * (c_in * side_in**2 + c * before_pool**2) * 4
        if MAXPOOL[index]:
            activity += rows * c * side**2 * (4 + 8)
        kept.append(activity)
    return {"optimizer_state": 16 * params, "activity": sum(kept) if all_at_once else max(kept)}


@dataclass
class BlockTimes:
    local: list[float]  # seconds per batch: forward + local update, per block
    forward: list[float]  # end-to-end backprop: forward, per block
    backward: list[float]  # end-to-end backprop: backward with input gradients, per block
    data: float  # building one batch's views
    activation_bytes: list[int]  # one batch's output of each block
    feedback_bytes: int  # the top block's pooled activity for one batch
    gradient_bytes: list[int]  # each block's parameters: what replicas average


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
            stage.updates.clear()

        times.append(_median_seconds(step, repeats))
        with torch.no_grad():
            x = block(x)
    return times


def time_backprop_blocks(blocks: Sequence[Block], views: torch.Tensor,
                         repeats: int = 5) -> tuple[list[float], list[float]]:
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
    return [_median_after_warmup(f) for f in forward], [_median_after_warmup(b) for b in backward]


def _median_after_warmup(values: Sequence[float]) -> float:
    """The median of `values` without the first, a warm-up."""
    return sorted(values[1:])[len(values[1:]) // 2]


def measure_peak_rates(repeats: int = 3) -> tuple[float, float]:
    """This machine's best float32 FLOP/s, with the threads torch has: the faster of a large matmul
    and a full-width convolution's forward pass (block 3 at 32 px, 64 views); and its memory
    bandwidth in bytes/s (an in-place multiply-add over 256 MiB)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = 2 * 2048**3 / min(_timed(lambda: a @ b) for _ in range(repeats))
    x, w = torch.randn(64, 256, 16, 16), torch.randn(512, 256, 3, 3)
    conv = 2 * 64 * 512 * 256 * 9 * 16 * 16 / min(_timed(lambda: F.conv2d(x, w, padding=1)) for _ in range(repeats))
    big, other = torch.ones(2**26), torch.ones(2**26)  # 256 MiB each
    bandwidth = 3 * big.nbytes / min(_timed(lambda: big.add_(other, alpha=0.5)) for _ in range(repeats))
    return max(matmul, conv), bandwidth


def _timed(run) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


@dataclass(frozen=True)
class LinkSpeed:
    """A link between two processes, as measured by `measure_link`."""
    latency: float
    bandwidth: float

    def seconds(self, size: int) -> float:
        return self.latency + size / self.bandwidth


def measure_block_times(plan: Plan, threads: int, data_seconds: float, repeats: int,
                        microbatches: int = 1) -> BlockTimes:
    """Per-block times of the plan's method and width with `threads` threads, on one batch or on
    one of its `microbatches` micro-batches, on this process's device."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        blocks = plan.build_blocks(range(NUM_BLOCKS), device)
        rows, info = 2 * plan.config.train.batch_size // microbatches, plan.info
        views = torch.randn(rows, info.channels, info.image_size, info.image_size, device=device)
        zeros = [0.0] * len(blocks)
        end_to_end = plan.method.end_to_end
        local = zeros if end_to_end else time_local_blocks(blocks, views, repeats)
        forward, backward = time_backprop_blocks(blocks, views, repeats) if end_to_end else (zeros, zeros)
        feedback = rows * plan.shapes.feedback[1] * 4
        gradients = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
        return BlockTimes(local, forward, backward, data_seconds, _output_bytes(blocks, views), feedback, gradients)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _output_bytes(blocks: Sequence[Block], views: torch.Tensor) -> list[int]:
    """Bytes of each block's output for one batch: the messages between ranks."""
    sizes, x = [], views
    for block in blocks:
        x = block(x)
        sizes.append(x.numel() * x.element_size())
    return sizes


def measure_data_seconds(plan: Plan, repeats: int = 5) -> float:
    """Seconds to build one batch's two views on this machine (rank 0's extra work)."""
    config = plan.config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    feed = ViewFeed(load_split(plan.info.name, config.data.root or None, "ssl"), SimCLRViews(plan.info, device),
                    config.train.batch_size, config.train.seed)
    feed.views_at(0)
    began = time.perf_counter()
    for step in range(1, repeats + 1):
        feed.views_at(step)
    return (time.perf_counter() - began) / repeats


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


def measure_link(sizes: Sequence[int] = (1 << 16, 1 << 22), repeats: int = 10) -> LinkSpeed:
    """Latency (s) and bandwidth (bytes/s) of a gloo link between two local processes, from the
    one-way time of two message sizes."""
    with tempfile.TemporaryDirectory() as folder:
        results = mp.get_context("spawn").Manager().list()
        mp.start_processes(_ping_pong, args=(f"{folder}/rendezvous", list(sizes), repeats, results), nprocs=2,
                           start_method="spawn")
        (small, t_small), (large, t_large) = sorted(results)
    bandwidth = (large - small) / max(t_large - t_small, 1e-9)
    return LinkSpeed(max(t_small - small / bandwidth, 0.0), bandwidth)


def _rank_sums(values: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    return [sum(values[b] for b in group) for group in groups]


def all_reduce_seconds(link: LinkSpeed, size: int, replicas: int) -> float:
    """A ring all-reduce of `size` bytes over `replicas` ranks: 2 (R - 1) messages of size / R."""
    return 2 * (replicas - 1) * link.seconds(size // replicas) if replicas > 1 else 0.0


def _averaging(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, replicas: int) -> list[float]:
    """Per rank, the all-reduce of its blocks' gradients (one bucket per block), counted as if it did
    not overlap the rank's compute: an upper bound."""
    return [sum(all_reduce_seconds(link, times.gradient_bytes[b], replicas) for b in group) for group in groups]


def local_pipelined(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, batch: int,
                    feedback: bool = False, replicas: int = 1) -> float:
    """Images/s of local SSL pipelined over len(groups) ranks (delayed feedback: `feedback`), in each
    of `replicas` data-parallel replicas, each of them on `batch` images a step."""
    steps = [s + a for s, a in zip(_rank_sums(times.local, groups), _averaging(times, groups, link, replicas))]
    steps[0] += times.data
    for rank, group in enumerate(groups[:-1]):
        steps[rank] += link.seconds(times.activation_bytes[group[-1]])
    if feedback and len(groups) > 1:
        steps[-1] += (len(groups) - 1) * link.seconds(times.feedback_bytes)
    return replicas * batch / max(steps)


def local_exact_feedback(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, batch: int,
                         replicas: int = 1) -> float:
    """Images/s of local SSL with exact top-down feedback: no overlap between ranks."""
    total = times.data + sum(times.local) + sum(_averaging(times, groups, link, replicas))
    total += sum(link.seconds(times.activation_bytes[g[-1]]) for g in groups[:-1])
    total += link.seconds(times.feedback_bytes) if len(groups) > 1 else 0.0
    return replicas * batch / total


def backprop_pipelined(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, batch: int,
                       microbatches: int = 1, replicas: int = 1) -> float:
    """Images/s of BP-SSL over len(groups) ranks with `microbatches` micro-batches per batch, from
    `times` measured on one micro-batch (K = 1, m = 1: plain single-process backprop); with
    `replicas` (K = 1 only), each replica on `batch` images a step."""
    work = [f + b for f, b in zip(_rank_sums(times.forward, groups), _rank_sums(times.backward, groups))]
    for rank, group in enumerate(groups[:-1]):  # an activation up and a gradient down per micro-batch
        work[rank] += 2 * link.seconds(times.activation_bytes[group[-1]])
    averaging = max(_averaging(times, groups, link, replicas))
    return replicas * batch / ((microbatches + len(groups) - 1) * max(work) + times.data + averaging)
