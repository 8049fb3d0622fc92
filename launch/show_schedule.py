"""Print a run's schedule as a rank x tick grid, without running anything.

    python -m launch.show_schedule CONFIG --world-size K [--steps N] [--set key=value ...]
    python -m launch.show_schedule CONFIG --world-size 8 --set sim.replicas=4   # 4 replicas x 2 stages

Each column is one unit of work: `F3` is the forward pass (and local learning) of batch 3, `U3`
the update of batch 3 once its top-down feedback has arrived, `G3` the diagnostic gradient of
batch 3 at the log's alignment steps, `.` a rank waiting. Below the grid, the messages each kind of
action sends and receives, in order: the list every rank's messages are checked against. With
sim.replicas = R, the world is R replicas of the grid's K ranks (global rank = replica x K + rank),
and every update also averages the block's gradients over the replicas.

With sim.schedule = "async" (one process, --world-size 1) it prints the simulated timeline instead:
which block group learns from which batch when on the virtual clock, and each update's ages.
"""
from __future__ import annotations

import argparse

import torch

from launch.program import ProgramErrors, add_config_arguments, run_program
from launch.runner import positive
from sim.pipeline.free_running import render_timeline
from sim.pipeline.schedule import render_grid, render_messages
from sim.run.config import load_config
from sim.run.plan import Plan, make_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.show_schedule", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=positive, required=True,
                        help="number of processes: K, or R x K with sim.replicas = R")
    parser.add_argument("--steps", type=positive, default=6, help="batches to show")
    args = parser.parse_args(argv)
    with ProgramErrors(rank=0) as errors:
        plan = make_plan(load_config(args.config, args.overrides), args.world_size)
        show(plan, args.steps)
    return errors.exit_code


def show(plan: Plan, steps: int) -> None:
    if plan.free_running is not None:
        print(plan.describe(steps, torch.device("cpu"), 0).split("\n", 1)[1])
        print(render_timeline(plan.free_running, steps))
        return
    feedback = f", {plan.feedback_text()}" if plan.rule.needs_feedback else ""
    print(f"{plan.rule.name}: {plan.schedule.name} schedule{feedback} on {plan.stages} process(es), "
          f"blocks per rank {plan.placement}")
    if plan.replicas > 1:
        batch = plan.config.train.batch_size
        print(f"{plan.mesh}: {plan.world_size} processes; each replica runs this grid on its {batch} of the step's "
              f"{plan.replicas * batch} images, each update averaging the block's gradients over the "
              f"{plan.replicas} replicas (global rank = replica x {plan.stages} + rank)")
    print(render_grid(plan.schedule, steps, plan.placement.groups))
    print(render_messages(plan.schedule, steps))


if __name__ == "__main__":
    run_program(main)
