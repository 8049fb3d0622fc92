"""The benchmark's predictions: sim.cost.model fed with times measured on this machine, for each
measured run and for K = 1, 2, 3, 6 at full width, each with the placement its run uses."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from layers.encoder import NUM_BLOCKS
from sim.cost import measure
from sim.cost.measure import measure_link
from sim.cost.model import BlockTimes, LinkSpeed, backprop_pipelined, local_exact_feedback, local_pipelined
from sim.data.datasets import load_split
from sim.data.feed import ViewFeed
from sim.data.views import SimCLRViews
from sim.pipeline.placement import balanced_placement
from sim.pipeline.schedule import PipelineSettings
from sim.run.config import Config
from sim.run.freed_memory import give_back_freed_memory, keep_freed_memory, keeps, kept_setting
from sim.run.plan import Plan, make_plan

METHODS = ("clapp_pp", "clapp_pp_dfb", "bp_infonce")
EVERYTHING = [list(range(6))]


def _plan(config: Config, method: str, world_size: int = 1, microbatches: int | None = None) -> Plan:
    config = dataclasses.replace(config, method=method)
    # the placement is the same for either schedule; gpipe accepts any micro-batch count
    pipeline = PipelineSettings("gpipe", microbatches) if microbatches and world_size > 1 else None
    return make_plan(config, world_size, pipeline=pipeline)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_block_times(plan: Plan, threads: int, data_seconds: float, repeats: int, microbatches: int = 1) -> BlockTimes:
    """Per-block times of the plan's rule and width with `threads` threads, on one batch or on one of
    its `microbatches` micro-batches, on this process's device (sim.cost.measure.measure_block_times),
    with freed memory kept or not as a process holding all the plan's blocks keeps it in a run (at
    width 1/8 keeping it makes a step 15-25 % faster: times measured otherwise would not be the run's)."""
    device = _device()
    blocks = plan.build_blocks(range(NUM_BLOCKS), device)
    rows, info = 2 * plan.config.train.batch_size // microbatches, plan.info
    views = torch.randn(rows, info.channels, info.image_size, info.image_size, device=device)  # (2b, C, S, S)
    kept_before = kept_setting() is not None
    run_keeps = keeps(plan.config.train.keep_freed_memory, plan.held_memory(range(NUM_BLOCKS)))
    (keep_freed_memory if run_keeps else give_back_freed_memory)()
    try:
        return measure.measure_block_times(blocks, views, threads=threads, data_seconds=data_seconds,
                                           repeats=repeats, codecs=plan.codecs)
    finally:
        (keep_freed_memory if kept_before else give_back_freed_memory)()


def plan_data_seconds(plan: Plan, repeats: int = 5) -> float:
    """Seconds to build one batch's two views of the plan's dataset on this machine (rank 0's extra work)."""
    config, device = plan.config, _device()
    feed = ViewFeed(load_split(plan.info.name, config.data.root or None, "ssl"), SimCLRViews(plan.info, device),
                    config.train.batch_size, config.train.seed)
    return measure.measure_data_seconds(feed, repeats)


def measured_placement(config: Config, world_size: int, repeats: int = 3) -> list[list[int]]:
    """Contiguous groups of blocks balanced on block times measured here (one thread each), the views of
    each batch counted on the first group's process: what "auto" placement estimates without measuring."""
    plan = make_plan(config, 1)
    times = plan_block_times(plan, 1, plan_data_seconds(plan), repeats)
    costs = [seconds + (times.data if block == 0 else 0.0) for block, seconds in enumerate(times.local)]
    return [list(group) for group in balanced_placement(costs, world_size).groups]


def measure_times(config: Config, k: int, microbatches: int) -> tuple[dict, LinkSpeed]:
    """{(method, threads): BlockTimes} for 1 and k threads (and ("bp_infonce", "micro") on one
    micro-batch, 1 thread), and the link between two processes."""
    repeats = 5  # the median of five (of two it would be the slower one)
    data = plan_data_seconds(_plan(config, "clapp_pp"))
    times = {(m, t): plan_block_times(_plan(config, m), t, data, repeats) for m in METHODS for t in sorted({1, k})}
    times["bp_infonce", "micro"] = plan_block_times(_plan(config, "bp_infonce"), 1, data, repeats, microbatches)
    return times, measure_link()


def predict(config: Config, runs: Sequence[dict], times: dict, link: LinkSpeed, m: int) -> dict:
    """The model's images/s for each measured run (with the placement it ran with), and its error."""
    batch = config.train.batch_size
    predictions = {}
    for run in runs:
        groups = run.get("placement") or EVERYTHING
        threads, name = run["threads_per_process"], run["name"]
        if name == "bp_single":
            value = backprop_pipelined(times["bp_infonce", threads], EVERYTHING, link, batch)
        elif name.startswith("bp_pipeline"):
            value = backprop_pipelined(times["bp_infonce", "micro"], groups, link, batch, m)
        elif name in ("local_single", "local_parallel"):
            value = local_pipelined(times["clapp_pp", threads], groups, link, batch)
        elif name == "local_dfb_single":
            value = local_pipelined(times["clapp_pp_dfb", threads], EVERYTHING, link, batch)
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


def full_width_predictions(config: Config, link: LinkSpeed, m: int, world_sizes: Sequence[int] = (1, 2, 3, 6)) -> dict:
    """Predicted images/s at width 1.0 for each schedule and K, from per-block times measured here
    (1 thread per process on CPU, or this GPU), each K with the placement its run would use."""
    full = dataclasses.replace(config, model=dataclasses.replace(config.model, width=1.0))
    data = plan_data_seconds(_plan(full, "clapp_pp"))
    local = plan_block_times(_plan(full, "clapp_pp"), 1, data, 3)
    dfb = plan_block_times(_plan(full, "clapp_pp_dfb"), 1, data, 3)
    bp = plan_block_times(_plan(full, "bp_infonce"), 1, data, 3)
    bp_micro = plan_block_times(_plan(full, "bp_infonce"), 1, data, 3, m)
    batch, table = full.train.batch_size, {}
    for k in world_sizes:
        local_groups = _plan(full, "clapp_pp", k).placement.groups
        dfb_groups = _plan(full, "clapp_pp_dfb", k).placement.groups
        bp_groups = _plan(full, "bp_infonce", k, m).placement.groups
        table[str(k)] = {
            "local_pipelined": local_pipelined(local, local_groups, link, batch),
            "dfb_exact": local_exact_feedback(dfb, dfb_groups, link, batch),
            "dfb_delayed": local_pipelined(dfb, dfb_groups, link, batch, feedback=True),
            "bp_1f1b" if k > 1 else "bp_single": (backprop_pipelined(bp_micro, bp_groups, link, batch, m) if k > 1
                                                  else backprop_pipelined(bp, bp_groups, link, batch)),
            "placement_local": [list(g) for g in local_groups],
        }
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU, 1 thread per process"
    return {"device": device, "batch_size": batch, "microbatches": m, "images_per_s": table,
            "block_seconds": {"clapp_pp": local.local, "clapp_pp_dfb": dfb.local, "bp_forward": bp.forward,
                              "bp_backward": bp.backward, "data": data}}
