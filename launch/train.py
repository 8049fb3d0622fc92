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
from launch.plan import Plan, make_plan
from launch.report import encoder_table, format_summary, summary_dict
from layers.encoder import NUM_BLOCKS
from layers.model import build_blocks
from sim.checkpoint import completed_steps, discard_after, load_checkpoint, save_checkpoint, save_final
from sim.datasets import DatasetMissing, load_split
from sim.feed import ViewFeed
from sim.placement import PlacementError
from sim.probing import first_images, linear_probe
from sim.runtime import RankRuntime
from sim.stage import NonFiniteLoss, make_stage
from sim.transport import (Link, PeerFailure, broadcast_from_first, gather_to_first, receive_weights,
                           record_failure, send_weights, setup_barrier)
from sim.views import SimCLRViews
from sim.world import World, connect, disconnect

SETUP_TIMEOUT_S = 900.0  # loading a large dataset on rank 0 may take minutes before the first message


def default_out_dir(config: Config) -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")  # the same in every process and every restart
    suffix = run_id[:12] if run_id and run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.method}_{config.data.name}_{suffix}"


def run(config: Config, out_dir: Path, progress: bool = True, world: World = World(), resume: bool = False) -> dict | None:
    """Train `config` on this process's share of the blocks; rank 0 then gathers the weights,
    probes the encoder and writes the run folder. Returns the summary on rank 0, None elsewhere."""
    if (out_dir / "summary.json").exists():
        raise ConfigError(f"{out_dir} already holds a finished run; choose another --out or remove it")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = world.device(config.train.device)
    plan = make_plan(config, world.size)  # a placement that does not fit the world size fails here
    start = 0
    if resume:
        steps = completed_steps(out_dir)
        if not steps:
            raise ConfigError(f"{out_dir} holds no complete checkpoint to resume from; start a new run")
        start = steps[-1]
    store = connect(world, device, SETUP_TIMEOUT_S) if world.distributed else None
    try:
        return _run_rank(config, plan, out_dir, progress, world, device, store, start)
    except (PeerFailure, KeyboardInterrupt):
        raise
    except BaseException as error:
        if store is not None:  # say why, so the other ranks can name this rank when they stop
            record_failure(store, f"rank {world.rank} failed: {type(error).__name__}: {error}")
        raise
    finally:
        if store is not None:
            disconnect()


def _run_rank(config: Config, plan: Plan, out_dir: Path, progress: bool, world: World, device: torch.device,
              store, start: int) -> dict | None:
    info, root = plan.info, config.data.root or None
    feed = probe_sets = None
    if world.rank == 0:  # only the first rank reads images; it also checks the probe's data early
        ssl_set = load_split(info.name, root, "ssl", config.data.download)
        feed = ViewFeed(ssl_set, SimCLRViews(info, device), config.train.batch_size, config.train.seed)
        if config.probe.epochs:
            probe_sets = [first_images(load_split(info.name, root, split, config.data.download), limit)
                          for split, limit in (("train", config.probe.train_limit), ("test", config.probe.test_limit))]
    own = plan.placement.groups[world.rank]
    blocks = build_blocks(plan.method, config.model.width, info.channels, info.image_size, plan.rule,
                          config.train.seed, config.optim.lr, config.optim.weight_decay, config.rule.pool or None,
                          indices=own, device=device)
    if start:
        load_checkpoint(out_dir, start, blocks)
    stop = plan.total_steps(feed.steps_per_epoch if feed else 0)
    if world.rank == 0:
        print(plan.describe(stop, device, len(feed.images)))
        if start:
            discard_after(out_dir, start)
            print(f"resuming {out_dir} from its checkpoint after step {start}")
        print(encoder_table(config, plan.method, plan.kernels))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(plan.config_toml)
    link = None
    if world.distributed:
        link = Link(world.rank, device, store, config.sim.timeout_s)
        setup_barrier(SETUP_TIMEOUT_S)
        stop = broadcast_from_first(stop, device)  # only rank 0 read the data, so only it knows the epoch size
    stage = make_stage(blocks, config.train.seed, stash_weights=config.sim.feedback == "delayed")
    runtime = RankRuntime(world.rank, plan.schedule, stage, device, plan.shapes, feed, link)
    result = runtime.run(start, stop, lambda step: save_checkpoint(out_dir, step, blocks), progress)

    if not world.distributed:
        return _finish(config, plan, out_dir, blocks, [result], probe_sets, device, progress, stop)
    results = gather_to_first(result)
    if world.rank > 0:
        send_weights(link, blocks, 0)
        return None
    others = [i for i in range(NUM_BLOCKS) if i not in own]
    rest = build_blocks(plan.method, config.model.width, info.channels, info.image_size, plan.rule,
                        config.train.seed, pool=config.rule.pool or None, indices=others, device=device)
    for rank in range(1, world.size):
        receive_weights(link, [b for b in rest if b.index in plan.placement.groups[rank]], rank)
    return _finish(config, plan, out_dir, blocks + rest, results, probe_sets, device, progress, stop)


def _finish(config, plan, out_dir, blocks, results, probe_sets, device, progress, stop) -> dict:
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
            resume = world.attempt > 0 and bool(completed_steps(out_dir))  # torchrun restarted the job
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
