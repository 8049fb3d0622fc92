"""BP-SSL pipeline-parallel over K processes: the fair distributed backprop baseline.

    torchrun --standalone --nproc-per-node K -m launch.bp_pipeline CONFIG --schedule gpipe|1f1b \\
        --microbatches M [--steps N] [--set key=value ...] --out DIR

The encoder's six blocks are split over the K processes as in `launch.train` (sim.placement) and
trained end to end with back-propagation between them (`sim.bp_pipeline`: GPipe or 1F1B over M
micro-batches, each micro-batch's loss over its own B / M images). The method is bp_infonce,
whatever CONFIG says, unless `--set method=bp_clapp_pp`. One process without torchrun also works.
Rank 0 writes DIR/summary.json, DIR/final.pt ({block: state_dict}) and DIR/config.toml.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from launch.config import Config, ConfigError, load_config, to_dict
from launch.plan import Plan, make_plan
from layers.methods import METHODS, get_method
from sim.bp_pipeline import (
    SCHEDULES,
    PipelineResult,
    PipelineTrainer,
    gather_results,
    gather_weights,
    join_alone,
    pipeline_group,
)
from sim.datasets import DatasetMissing, load_split
from sim.feed import ViewFeed
from sim.memory import PeakMemory
from sim.placement import PlacementError
from sim.stage import NonFiniteLoss
from sim.transport import PeerFailure, broadcast_from_first, first_failure, record_failure, setup_barrier
from sim.views import SimCLRViews
from sim.world import World, connect, disconnect

SETUP_TIMEOUT_S = 900.0  # rank 0 may load a large dataset before the others hear from it
DEFAULT_METHOD = "bp_infonce"
END_TO_END = tuple(name for name, method in METHODS.items() if method.end_to_end)


def load_request(config_path: str, overrides: list[str], steps: int | None) -> Config:
    """CONFIG with the method set to bp_infonce first, so that the shipped configs (which name a
    local method) serve as they are and `--set method=...` can still pick another BP method."""
    extra = [f"train.steps={steps}"] if steps is not None else []
    return load_config(config_path, [f"method={DEFAULT_METHOD}", *overrides, *extra])


def check_request(config: Config, schedule: str, count: int, world_size: int) -> None:
    """Everything about the request that can be wrong, before any process group exists."""
    method = get_method(config.method)
    if not method.end_to_end:
        raise ConfigError(f"method = {config.method!r} learns locally: the BP pipeline trains end-to-end methods "
                          f"({', '.join(END_TO_END)}); run local methods with launch.train")
    if schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    batch = config.train.batch_size
    if count < 1 or batch % count:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ConfigError(f"train.batch_size = {batch} is not divisible by --microbatches {count}: "
                          f"use one of {divisors}, or another batch size")
    if batch // count < 2:
        raise ConfigError(f"--microbatches {count} leaves {batch // count} image per micro-batch; each needs at "
                          f"least 2 (negatives come from other images): use at most {batch // 2}")
    if schedule == "1f1b" and count < world_size:
        raise ConfigError(f"1F1B needs at least as many micro-batches as processes: --microbatches {count} "
                          f"with {world_size} processes; use --microbatches {world_size} or more, or gpipe")
    if config.train.steps == 0 and config.train.epochs == 0:
        raise ConfigError("train.steps and train.epochs are both 0: nothing to train; give --steps N")


def microbatch_shapes(plan: Plan, rank: int, count: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input, output) shape of one micro-batch on `rank`: rows first, 2B / count of them."""
    rows, shapes = 2 * plan.config.train.batch_size // count, plan.shapes
    side = plan.info.image_size
    given = (plan.info.channels, side, side) if rank == 0 else shapes.activations[rank - 1][1:]
    made = shapes.feedback[1:] if rank == plan.placement.world_size - 1 else shapes.activations[rank][1:]
    return (rows, *given), (rows, *made)


def run(config: Config, schedule: str, count: int, out_dir: Path, world: World = World(),
        progress: bool = True) -> dict | None:
    """Train on this rank's blocks; returns the summary on rank 0, None elsewhere."""
    if (out_dir / "summary.json").exists():
        raise ConfigError(f"{out_dir} already holds a finished run; choose another --out or remove it")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = world.device(config.train.device)
    memory = PeakMemory(device)  # what the work holds: from here (imports done) to the end of training
    memory.start()
    plan = make_plan(config, world.size, pipeline_backprop=True)  # a placement that does not fit fails here
    store = connect(world, device, SETUP_TIMEOUT_S) if world.distributed else None
    if store is None:
        join_alone(device)
    try:
        summary = _run_rank(plan, schedule, count, out_dir, world, device, progress, memory)
    except Exception as error:
        if store is None:
            disconnect()
            raise
        reason = first_failure(store)  # a rank that failed first has left its reason there
        if reason is not None:
            raise PeerFailure(f"rank {world.rank} stops because {reason}") from error
        record_failure(store, f"rank {world.rank} failed: {type(error).__name__}: {error}")
        raise  # without tearing the process group down: that could wait on a broken peer
    disconnect()
    return summary


def _run_rank(plan: Plan, schedule: str, count: int, out_dir: Path, world: World, device: torch.device,
              progress: bool, memory: PeakMemory) -> dict | None:
    config, info = plan.config, plan.info
    group = pipeline_group(config.sim.timeout_s) if world.distributed else None  # every rank, same point
    feed, steps = None, config.train.steps
    if world.rank == 0:  # only the first rank reads images
        images = load_split(info.name, config.data.root or None, "ssl", config.data.download)
        feed = ViewFeed(images, SimCLRViews(info, device), config.train.batch_size, config.train.seed)
        steps = plan.total_steps(feed.steps_per_epoch)
        print(f"{plan.method.name} on {info.name} ({len(images):,} images), width {config.model.width}, batch "
              f"{config.train.batch_size} in {count} micro-batches, {steps:,} steps, {schedule}, {world.size} "
              f"processes (blocks per rank {plan.placement}), device {device}, {torch.get_num_threads()} threads",
              flush=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(plan.config_toml)
    own = plan.placement.groups[world.rank]
    blocks = plan.build_blocks(own, device)
    trainer = PipelineTrainer(blocks, world.rank, world.size, schedule, count, *microbatch_shapes(plan, world.rank, count),
                              device, group, config.train.seed)
    if world.distributed:  # all ranks built: start the clocks together
        setup_barrier(SETUP_TIMEOUT_S)
        (steps,) = broadcast_from_first([steps], device)
    result = trainer.train(steps, feed, progress, memory)
    results, weights = gather_results(result), gather_weights(blocks)
    if world.rank > 0:
        return None
    torch.save(weights, out_dir / "final.pt")
    summary = summary_dict(plan, schedule, count, steps, results, device)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_dict(plan: Plan, schedule: str, count: int, steps: int, results: list[PipelineResult],
                 device: torch.device) -> dict:
    config = plan.config
    seconds = max(r.seconds for r in results)  # the run lasts as long as its slowest rank
    return {
        "method": plan.method.name,
        "dataset": plan.info.name,
        "world_size": len(results),
        "steps": steps,
        "schedule": schedule,
        "microbatches": count,
        "images_per_s": steps * config.train.batch_size / seconds if steps else 0.0,
        "step_end_seconds": results[-1].step_end_seconds,  # the last rank's: a step ends with its backward there
        "loss": results[-1].loss,
        "peak_memory_bytes": [r.peak_memory_bytes for r in results],
        "placement": [list(g) for g in plan.placement.groups],
        "ranks": [{"rank": r.rank, "blocks": r.blocks, "seconds": r.seconds, "busy_seconds": r.busy_seconds,
                   "wait_seconds": r.wait_seconds, "bytes_sent": r.bytes_sent} for r in results],
        "train_seconds": seconds,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "config": to_dict(config),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bp_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="TOML config, e.g. launch/configs/fashion_mnist.toml")
    parser.add_argument("--schedule", required=True, choices=list(SCHEDULES))
    parser.add_argument("--microbatches", type=int, required=True, metavar="M", help="micro-batches per step")
    parser.add_argument("--steps", type=int, help="training steps (sets train.steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value read as TOML (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    world = World.from_env()
    try:
        config = load_request(args.config, args.overrides, args.steps)
        check_request(config, args.schedule, args.microbatches, world.size)
        summary = run(config, args.schedule, args.microbatches, args.out, world, progress=not args.no_progress)
    except (ConfigError, PlacementError, DatasetMissing, NonFiniteLoss, PeerFailure) as error:
        print(f"error (rank {world.rank}): {error}", file=sys.stderr)
        return 2 if isinstance(error, (ConfigError, PlacementError, DatasetMissing)) else 1
    if summary is not None:
        memory = ", ".join(f"{b / 2**20:.0f}" for b in summary["peak_memory_bytes"])
        print(f"{summary['images_per_s']:.1f} images/s, loss {summary['loss']:.4f}, "
              f"peak memory per rank {memory} MiB; wrote {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
