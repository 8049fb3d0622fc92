"""Feed the cost model (sim/costmodel.py) with times measured on this machine, predict the
benchmark's runs, and predict K = 2, 3, 6 at full width."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch

from launch.config import Config
from launch.plan import make_plan
from sim.costmodel import (
    BlockTimes,
    Link,
    backprop_pipelined,
    local_exact_feedback,
    local_pipelined,
    measure_link,
    time_backprop_blocks,
    time_local_blocks,
)
from sim.datasets import load_split
from sim.feed import ViewFeed
from sim.placement import balanced_placement
from sim.views import SimCLRViews

METHODS = ("clapp_pp", "clapp_pp_dfb", "bp_infonce")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def block_times(config: Config, method: str, threads: int, data_seconds: float, repeats: int,
                microbatches: int = 1) -> BlockTimes:
    """Per-block times of `method` at the config's width, with `threads` threads, on one batch or
    on one of its `microbatches` micro-batches."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = make_plan(dataclasses.replace(config, method=method), 1)
        device = _device()
        blocks = plan.build_blocks(range(6), device)
        rows, info = 2 * config.train.batch_size // microbatches, plan.info
        views = torch.randn(rows, info.channels, info.image_size, info.image_size, device=device)
        zeros = [0.0] * len(blocks)
        local = time_local_blocks(blocks, views, repeats) if not plan.method.end_to_end else zeros
        forward, backward = time_backprop_blocks(blocks, views, repeats) if plan.method.end_to_end else (zeros, zeros)
        feedback = rows * plan.shapes.feedback[1] * 4
        return BlockTimes(local, forward, backward, data_seconds, output_bytes(blocks, views), feedback)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def output_bytes(blocks, views: torch.Tensor) -> list[int]:
    """Bytes of each block's output for one batch: the messages between ranks."""
    sizes, x = [], views
    for block in blocks:
        x = block(x)
        sizes.append(x.numel() * x.element_size())
    return sizes


def data_seconds(config: Config, repeats: int = 5) -> float:
    """Seconds to build one batch's two views on this machine (rank 0's extra work)."""
    plan = make_plan(config, 1)
    feed = ViewFeed(load_split(plan.info.name, config.data.root or None, "ssl"), SimCLRViews(plan.info, _device()),
                    config.train.batch_size, config.train.seed)
    feed.views_at(0)
    began = time.perf_counter()
    for step in range(1, repeats + 1):
        feed.views_at(step)
    return (time.perf_counter() - began) / repeats


def measure_times(config: Config, k: int, quick: bool, microbatches: int) -> tuple[dict, Link]:
    """{(method, threads): BlockTimes} for 1 and k threads (and ("bp_infonce", "micro") on one
    micro-batch, 1 thread), and the link between two processes."""
    repeats = 2 if quick else 5
    data = data_seconds(config)
    times = {(m, t): block_times(config, m, t, data, repeats) for m in METHODS for t in sorted({1, k})}
    times["bp_infonce", "micro"] = block_times(config, "bp_infonce", 1, data, repeats, microbatches)
    latency, bandwidth = measure_link()
    return times, Link(latency, bandwidth)


def predict(config: Config, runs: Sequence[dict], times: dict, link: Link, k: int, m: int) -> dict:
    """The model's images/s for each measured run, and its relative error."""
    batch, everything = config.train.batch_size, [list(range(6))]
    predictions = {}
    for run in runs:
        groups = run.get("placement") or everything
        threads = run["threads_per_process"]
        name = run["name"]
        if name == "bp_single":
            value = backprop_pipelined(times["bp_infonce", threads], everything, link, batch)
        elif name.startswith("bp_pipeline"):
            value = backprop_pipelined(times["bp_infonce", "micro"], groups, link, batch, m)
        elif name in ("local_single", "local_parallel"):
            value = local_pipelined(times["clapp_pp", threads], groups, link, batch)
        elif name == "local_dfb_single":
            value = local_pipelined(times["clapp_pp_dfb", threads], everything, link, batch)
        elif name == "local_dfb_exact_parallel":
            value = local_exact_feedback(times["clapp_pp_dfb", threads], groups, link, batch)
        else:  # local_dfb_delayed_parallel
            value = local_pipelined(times["clapp_pp_dfb", threads], groups, link, batch, feedback=True)
        predictions[name] = {"predicted": value, "measured": run["images_per_s"],
                             "error": value / run["images_per_s"] - 1}
    return {"link": {"latency_s": link.latency, "bandwidth_bytes_per_s": link.bandwidth},
            "block_seconds": {f"{method}@{threads}": dataclasses.asdict(t) for (method, threads), t in times.items()},
            "note": "bp_pipeline_* predictions use per-block times measured on one micro-batch",
            "runs": predictions,
            "max_abs_error": max(abs(p["error"]) for p in predictions.values())}


def full_width_predictions(config: Config, link: Link, m: int, world_sizes: Sequence[int] = (1, 2, 3, 6)) -> dict:
    """Predicted images/s at width 1.0 for each schedule and K, from per-block times measured here
    (1 thread per process on CPU, or this GPU), each K with its balanced placement."""
    full = dataclasses.replace(config, model=dataclasses.replace(config.model, width=1.0))
    data = data_seconds(full)
    local = block_times(full, "clapp_pp", 1, data, 2)
    dfb = block_times(full, "clapp_pp_dfb", 1, data, 2)
    bp = block_times(full, "bp_infonce", 1, data, 2)
    bp_micro = block_times(full, "bp_infonce", 1, data, 2, m)
    batch, table = full.train.batch_size, {}
    for k in world_sizes:
        local_groups = balanced_placement(local.local, k).groups
        bp_groups = balanced_placement([f + b for f, b in zip(bp_micro.forward, bp_micro.backward)], k).groups
        table[str(k)] = {
            "local_pipelined": local_pipelined(local, local_groups, link, batch),
            "dfb_exact": local_exact_feedback(dfb, local_groups, link, batch),
            "dfb_delayed": local_pipelined(dfb, local_groups, link, batch, feedback=True),
            "bp_1f1b" if k > 1 else "bp_single": (backprop_pipelined(bp_micro, bp_groups, link, batch, m) if k > 1
                                                  else backprop_pipelined(bp, bp_groups, link, batch)),
            "placement_local": [list(g) for g in local_groups],
        }
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU, 1 thread per process"
    return {"device": device, "batch_size": batch, "microbatches": m, "images_per_s": table,
            "block_seconds": {"clapp_pp": local.local, "clapp_pp_dfb": dfb.local, "bp_forward": bp.forward,
                              "bp_backward": bp.backward, "data": data}}
