"""BP-SSL pipeline-parallel over K processes: the fair distributed backprop baseline.

    torchrun --nproc-per-node K $LOCAL -m launch.bp_pipeline CONFIG --schedule gpipe|1f1b \\
        --microbatches M [--steps N] [--set key=value ...] --out DIR

The encoder's six blocks are split over the K processes as in `launch.train` (sim.placement) and
trained end to end with back-propagation between them (`sim.pipeline.bp_engine`: GPipe or 1F1B over M
micro-batches, each micro-batch's loss over its own B / M images). The method is bp_infonce,
whatever CONFIG says, unless `--set method=bp_clapp_pp`. One process without torchrun also works.
Rank 0 writes DIR/config.toml, DIR/final.pt, DIR/summary.json (and probes the encoder, as
launch.train does, unless probe.epochs = 0).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from launch.program import ProgramErrors, add_config_arguments, run_program
from sim.pipeline.schedule import PIPELINE_SCHEDULES, PipelineSettings
from sim.pipeline.world import World
from sim.run.config import Config, load_config
from sim.run.job import run_job
from sim.run.plan import make_plan

DEFAULT_METHOD = "bp_infonce"


def load_request(config_path: str, overrides: list[str], steps: int | None) -> Config:
    """CONFIG with the method set to bp_infonce first, so that the shipped configs (which name a
    local method) serve as they are and `--set method=...` can still pick another BP method."""
    extra = [f"train.steps={steps}"] if steps is not None else []
    return load_config(config_path, [f"method={DEFAULT_METHOD}", *overrides, *extra])


def train(args: argparse.Namespace, world: World) -> None:
    config = load_request(args.config, args.overrides, args.steps)
    plan = make_plan(config, world.size, pipeline=PipelineSettings(args.schedule, args.microbatches))
    summary = run_job(plan, args.out, world=world, progress=not args.no_progress)
    if summary is not None:
        print(summary.text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bp_pipeline", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--schedule", required=True, choices=list(PIPELINE_SCHEDULES))
    parser.add_argument("--microbatches", type=int, required=True, metavar="M", help="micro-batches per step")
    parser.add_argument("--steps", type=int, help="training steps (sets train.steps)")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="keep tracebacks (also LAMINAR_DEBUG=1)")
    args = parser.parse_args(argv)
    world = World.from_env()
    with ProgramErrors(world.rank, args.debug) as errors:
        train(args, world)
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
