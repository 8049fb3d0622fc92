"""Train one method and probe it, in one process or one process per block group.

    python -m launch.train CONFIG [--set key=value ...] [--out DIR] [--resume RUN_DIR]
    torchrun --nproc-per-node K $LOCAL -m launch.train CONFIG [--set ...] --out DIR   # $LOCAL: README

Writes into the run folder: config.toml (resolved), checkpoints/, log.zarr, final.pt and summary.json
(sim.run.job says what each holds).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from launch.program import ProgramErrors, add_config_arguments, run_program
from sim.errors import ConfigError
from sim.pipeline.world import World
from sim.run.config import Config, load_config
from sim.run.job import run_job
from sim.run.plan import make_plan


def default_out_dir(config: Config) -> Path:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")  # the same in every process and every restart
    suffix = run_id[:12] if run_id and run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.method}_{config.data.name}_{suffix}"


def train(args: argparse.Namespace, world: World) -> None:
    if args.resume:
        if args.config or args.overrides or args.out:
            raise ConfigError("--resume RUN_DIR takes the run's own config.toml: give no CONFIG, --set or --out")
        if not (args.resume / "config.toml").is_file():
            raise ConfigError(f"--resume {args.resume}: no run there (no config.toml); give the --out folder of "
                              "the run to continue")
        config, out_dir = load_config(args.resume / "config.toml"), args.resume
    elif args.config:
        config = load_config(args.config, args.overrides)
        out_dir = args.out or default_out_dir(config)
    else:
        raise ConfigError("give a CONFIG (e.g. launch/configs/tiny.toml) or --resume RUN_DIR")
    plan = make_plan(config, world.size)  # a placement that does not fit the world size fails here
    summary = run_job(plan, out_dir, world=world, resume=bool(args.resume), progress=not args.no_progress)
    if summary is not None:
        print(summary.text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--out", type=Path, help="run folder (default runs/METHOD_DATASET_TIME)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a stopped run from its last complete checkpoint, with its config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="keep tracebacks (also LAMINAR_DEBUG=1)")
    args = parser.parse_args(argv)
    world = World.from_env()
    with ProgramErrors(world.rank, args.debug) as errors:
        train(args, world)
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
