"""What times this machine for the cost model (`sim.cost.model`): each block's local step and its
share of a backprop step, building a batch's views, the peak FLOP rate and memory bandwidth, and
a gloo link between two local processes. Everything here runs work; the model only does arithmetic.
"""
from __future__ import annotations

import datetime
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from layers.block import Block
from sim.cost.model import BlockTimes, LinkSpeed
from sim.data.feed import ViewFeed
from sim.pipeline.codec import MessageCodecs
from sim.pipeline.stage import LocalStage


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
            top_context = torch.zeros(len(x), block.top_context_dim, device=x.device)

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
            if block.is_top:
                out = block.loss(block.forward_and_features(x)[1])[0]
            else:
                out = block(x)
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


def measure_block_times(blocks: Sequence[Block], views: torch.Tensor, *, threads: int, data_seconds: float,
                        repeats: int, codecs: MessageCodecs = MessageCodecs()) -> BlockTimes:
    """Per-block times of all six `blocks` (as a run builds them) with `threads` threads, on `views`:
    one batch, or one micro-batch of the BP pipeline; `data_seconds` (`measure_data_seconds`) is
    rank 0's extra work per batch; messages as `codecs` pack them (sim.codec, sim.codec_feedback)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        zeros = [0.0] * len(blocks)
        end_to_end = blocks[0].rule.end_to_end
        local = zeros if end_to_end else time_local_blocks(blocks, views, repeats)
        forward, backward = time_backprop_blocks(blocks, views, repeats) if end_to_end else (zeros, zeros)
        outputs, feedback = _message_bytes(blocks, views, codecs)
        gradients = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
        return BlockTimes(local, forward, backward, data_seconds, outputs, feedback, gradients)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def _message_bytes(blocks: Sequence[Block], views: torch.Tensor, codecs: MessageCodecs) -> tuple[list[int], int]:
    """Bytes on the wire of each block's output for one batch (the messages up between ranks) and of
    the top block's pooled activity (the feedback message down), as the codecs pack them."""
    sizes, x = [], views
    for block in blocks:
        x, top = block.forward_and_features(x)  # the last one's features: the top block's, (2B, D_top)
        sizes.append(codecs.activations.message_bytes(tuple(x.shape)))
    return sizes, codecs.feedback.message_bytes(tuple(top.shape))


def measure_data_seconds(feed: ViewFeed, repeats: int = 5) -> float:
    """Seconds to build one batch's two views on this machine (rank 0's extra work)."""
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
