"""Train one method and probe it, in one process or one process per block group.

    python -m launch.train CONFIG [--set key=value ...] [--out DIR] [--resume RUN_DIR]
    torchrun --standalone --nproc-per-node K -m launch.train CONFIG [--set ...] --out DIR

Writes into the run folder: config.toml (resolved), checkpoints/, final.pt and summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from launch.config import Config, ConfigError, load_config
from launch.observe import rank_observers, start_log
from launch.plan import Plan, make_plan
from launch.report import encoder_table, format_summary, summary_dict
from layers.block import Block
from layers.encoder import NUM_BLOCKS
from sim.checkpoint import completed_steps, discard_after, has_checkpoints, load_checkpoint, save_checkpoint, save_final
from sim.datasets import DatasetMissing, ImageSet, load_split
from sim.feed import ViewFeed
from sim.memory import PeakMemory
from sim.placement import PlacementError
from sim.probing import linear_probe, sample_images
from sim.runtime import RankResult, RankRuntime
from sim.stage import NonFiniteLoss, make_stage
from sim.transport import (
    Link,
    PeerFailure,
    broadcast_from_first,
    gather_to_first,
    receive_weights,
    record_failure,
    send_weights,
    setup_barrier,
)
from sim.views import SimCLRViews
from sim.world import World, connect, disconnect

SETUP_TIMEOUT_S = 900.0  # loading a large dataset on rank 0 may take minutes before the first message


def default_out_dir(config: Config) -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")  # the same in every process and every restart
    suffix = run_id[:12] if run_id and run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.method}_{config.data.name}_{suffix}"


def run(config: Config, out_dir: Path, progress: bool = True, world: World = World(), resume: bool = False) -> dict | None:
    """Train `config` on this process's share of the blocks; rank 0 then gathers the weights,
    probes the encoder and writes the run folder. Returns the summary on rank 0, None elsewhere.

    `resume` continues from the last complete checkpoint in `out_dir`; so does a job that torchrun
    restarted (world.attempt > 0)."""
    if (out_dir / "summary.json").exists():
        raise ConfigError(f"{out_dir} already holds a finished run; choose another --out or remove it")
    if not resume and not world.attempt and has_checkpoints(out_dir):
        raise ConfigError(f"{out_dir} holds checkpoints of an unfinished run: continue it with "
                          f"--resume {out_dir}, or choose another --out")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = world.device(config.train.device)
    memory = PeakMemory(device)  # what the work holds: from here (imports done) to the end of training
    memory.start()
    plan = make_plan(config, world.size)  # a placement that does not fit the world size fails here
    store = link = None
    if world.distributed:
        store = connect(world, device, SETUP_TIMEOUT_S)
        link = Link(world.rank, device, store, config.sim.timeout_s)
    try:
        summary = _run_rank(plan, out_dir, progress, world, device, link, resume, memory)
    except PeerFailure:
        raise
    except BaseException as error:
        if store is not None:  # say why, so the other ranks can name this rank when they stop
            record_failure(store, f"rank {world.rank} failed: {type(error).__name__}: {error}")
        raise  # without tearing the process group down: that could wait on a broken peer
    if store is not None:
        disconnect()
    return summary


def starting_step(out_dir: Path, resume: bool, restarted: bool) -> int:
    """Rank 0: the step to start from, removing checkpoints that will be written again."""
    complete = completed_steps(out_dir)
    if (resume or restarted) and complete:
        discard_after(out_dir, complete[-1])
        print(f"resuming {out_dir} from its checkpoint after step {complete[-1]}")
        return complete[-1]
    if resume:
        raise ConfigError(f"{out_dir} holds no complete checkpoint to resume from; start a new run")
    if restarted:
        print(f"restarted, but {out_dir} holds no complete checkpoint: training again from step 0", flush=True)
    discard_after(out_dir, -1)
    return 0


def _run_rank(plan: Plan, out_dir: Path, progress: bool, world: World, device: torch.device, link: Link | None,
              resume: bool, memory: PeakMemory) -> dict | None:
    config, info, root = plan.config, plan.info, plan.config.data.root or None
    feed = probe_sets = heldout = None
    start = stop = heldout_count = 0
    logging = config.log.every > 0
    if world.rank == 0:  # only the first rank reads images; it also checks the probe's data early
        ssl_set = load_split(info.name, root, "ssl", config.data.download)
        feed = ViewFeed(ssl_set, SimCLRViews(info, device), config.train.batch_size, config.train.seed)
        test_set = load_split(info.name, root, "test", config.data.download) if config.probe.epochs or logging else None
        if config.probe.epochs:
            probe_sets = [sample_images(load_split(info.name, root, "train", config.data.download),
                                        config.probe.train_limit, config.train.seed),
                          sample_images(test_set, config.probe.test_limit, config.train.seed)]
        stop = plan.total_steps(feed.steps_per_epoch)
        print(plan.describe(stop, device, len(ssl_set)))
        start = starting_step(out_dir, resume, world.attempt > 0)
        print(encoder_table(plan))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(plan.config_toml)
        if logging:
            heldout = start_log(plan, out_dir, test_set, start, world.size)
            heldout_count = len(heldout)
    if link is not None:  # only rank 0 read the data and the checkpoints: share what it found
        link.collective("the setup barrier", setup_barrier, SETUP_TIMEOUT_S)
        start, stop, heldout_count = link.collective("broadcast", broadcast_from_first, [start, stop, heldout_count],
                                                     device)
    own = plan.placement.groups[world.rank]
    blocks = plan.build_blocks(own, device)
    if start:
        load_checkpoint(out_dir, start, blocks)
    observers = rank_observers(plan, out_dir, world.rank, blocks, start, link, heldout, heldout_count, device)
    stage = make_stage(blocks, config.train.seed, config.sim.feedback == "delayed", observers.wants)
    runtime = RankRuntime(world.rank, plan.schedule, stage, device, plan.shapes, feed, link, observers)
    result = runtime.run(start, stop, lambda step: save_checkpoint(out_dir, step, blocks), progress, memory)

    if link is None:
        return _finish(plan, out_dir, blocks, [result], probe_sets, device, progress, stop)
    with link.patience(SETUP_TIMEOUT_S):  # gathering full-width weights may take minutes between machines
        results = link.collective("gathering results", gather_to_first, result)
        if world.rank > 0:
            send_weights(link, blocks, 0)
            return None
        rest = plan.build_blocks([i for i in range(NUM_BLOCKS) if i not in own], device)
        for rank in range(1, world.size):
            receive_weights(link, [b for b in rest if b.index in plan.placement.groups[rank]], rank)
    return _finish(plan, out_dir, blocks + rest, results, probe_sets, device, progress, stop)


def _finish(plan: Plan, out_dir: Path, blocks: list[Block], results: list[RankResult],
            probe_sets: list[ImageSet] | None, device: torch.device, progress: bool, stop: int) -> dict:
    """Rank 0, with every block's final weights: final.pt, the probe, summary.json."""
    config = plan.config
    save_final(out_dir / "final.pt", blocks)
    probe = None
    if probe_sets is not None:
        probe = linear_probe(blocks, plan.info, *probe_sets, config.probe.epochs, config.probe.batch_size,
                             config.probe.lr, config.probe.augment, config.probe.standardize,
                             config.train.seed, device, progress)
    summary = summary_dict(config, plan, results, probe, stop, device)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="TOML config, e.g. launch/configs/tiny.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value read as TOML (repeatable)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/METHOD_DATASET_TIME)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a stopped run from its last complete checkpoint, with its config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    world = World.from_env()
    try:
        if args.resume:
            if args.config or args.overrides or args.out:
                raise ConfigError("--resume RUN_DIR takes the run's own config.toml: give no CONFIG, --set or --out")
            config, out_dir, resume = load_config(args.resume / "config.toml"), args.resume, True
        elif args.config:
            config = load_config(args.config, args.overrides)
            out_dir = args.out or default_out_dir(config)
            resume = False
        else:
            raise ConfigError("give a CONFIG (e.g. launch/configs/tiny.toml) or --resume RUN_DIR")
        summary = run(config, out_dir, progress=not args.no_progress, world=world, resume=resume)
    except (ConfigError, PlacementError, DatasetMissing, NonFiniteLoss, PeerFailure) as error:
        print(f"error (rank {world.rank}): {error}", file=sys.stderr)
        return 2 if isinstance(error, (ConfigError, PlacementError, DatasetMissing)) else 1
    if summary is not None:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
