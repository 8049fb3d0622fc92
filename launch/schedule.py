"""Print a run's schedule as a rank x tick grid, without running anything.

    python -m launch.schedule CONFIG --world-size K [--steps N] [--set key=value ...]

Each column is one unit of work: `F3` is the forward pass (and local learning) of batch 3, `U3`
the update of batch 3 once its top-down feedback has arrived, `.` a rank waiting.
"""
from __future__ import annotations

import argparse
import sys

from launch.config import ConfigError, load_config
from launch.plan import make_plan
from sim.placement import PlacementError
from sim.schedule import render_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.schedule", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--world-size", type=int, required=True, help="number of processes K")
    parser.add_argument("--steps", type=int, default=6, help="batches to show")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        plan = make_plan(load_config(args.config, args.overrides), args.world_size)
    except (ConfigError, PlacementError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    feedback = f", {plan.schedule.feedback} feedback" if plan.method.uses_top_context else ""
    print(f"{plan.method.name}: {plan.schedule.name} schedule{feedback} on {args.world_size} process(es), "
          f"blocks per rank {plan.placement}")
    print(render_grid(plan.schedule, args.steps, plan.placement.groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
