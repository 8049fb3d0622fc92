"""Data-parallel replicas against layer-parallel stages on the same processes, and the cost model's R x K.

    python -m launch.bench.replicas [--widths 0.125,1.0] [--steps 200,30] [--out launch/results/replicas]

For clapp_pp on synthetic 32 px images (3 channels, like CIFAR-10), batch 32 per replica, 1 thread per
process, for each width:
1. R = 1, K = 2: one pipeline over 2 processes (layer-parallel), 32 images a step;
2. R = 2, K = 1: two replicas of the whole network, 2 x 32 images a step, gradients averaged (gloo);
3. R = 1, K = 1 on one process, for scale.
Throughput is images/s over the whole loop (steady-state where the run has timed windows), each run in
its own processes (torchrun). Beside each run, the cost model's prediction (sim.cost.model, per-block
times and the link measured here); then its predictions for 8 processes as R x K (8 x 1, 4 x 2, 2 x 3,
2 x 4, 1 x 6), from the same per-block times: on GPUs, run this program there for the GPU's figures.
Writes replicas.json and replicas.md into OUT.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from launch.bench.predictions import plan_block_times, plan_data_seconds
from launch.machine import describe_machine, write_figures
from launch.program import run_program
from launch.runner import bench_run
from sim.cost.measure import measure_link
from sim.cost.model import local_pipelined
from sim.run.config import load_config
from sim.run.job import speedups
from sim.run.plan import make_plan

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.toml"
SETTINGS = ["method=clapp_pp", "data.name=synthetic", "train.batch_size=32", "sim.schedule=pipelined"]
RUNS = {"R=1 K=1": (1, 1), "R=1 K=2": (1, 2), "R=2 K=1": (2, 1)}  # name -> (replicas, stages)
EIGHT = [(8, 1), (4, 2), (2, 3), (2, 4), (1, 6)]  # R x K on 8 processes (2 x 3 leaves 2 idle)


def measure(width: float, steps: int, folders: Path) -> dict:
    overrides = [*SETTINGS, f"model.width={width}", f"train.steps={steps}"]
    config = load_config(CONFIG, overrides)
    one = make_plan(config, 1)
    speedups(config, one.held_memory(range(6)))  # the block timings below run as a one-process run does
    block_times = plan_block_times(one, 1, plan_data_seconds(one), 3)
    link = measure_link()
    runs = {}
    for name, (replicas, stages) in RUNS.items():
        processes = replicas * stages
        summary = bench_run(processes, 1, CONFIG, [*overrides, f"sim.replicas={replicas}"],
                            folders / f"w{width}_{name.replace(' ', '_').replace('=', '')}")
        groups = make_plan(load_config(CONFIG, [*overrides, f"sim.replicas={replicas}"]), processes).placement.groups
        predicted = local_pipelined(block_times, groups, link, config.train.batch_size, replicas=replicas)
        runs[name] = {"replicas": replicas, "stages": stages, "processes": processes,
                      "images_per_s": summary.throughput, "images_per_step": replicas * config.train.batch_size,
                      "placement": [list(g) for g in groups], "predicted_images_per_s": predicted,
                      "prediction_error": predicted / summary.throughput - 1}
    eight = {}
    for replicas, stages in EIGHT:
        groups = make_plan(load_config(CONFIG, [*overrides, f"sim.replicas={replicas}"]), replicas * stages
                           ).placement.groups
        eight[f"{replicas}x{stages}"] = {"processes": replicas * stages, "placement": [list(g) for g in groups],
                                         "predicted_images_per_s": local_pipelined(
                                             block_times, groups, link, config.train.batch_size, replicas=replicas)}
    return {"width": width, "steps": steps, "runs": runs, "eight_processes": eight,
            "link": {"latency_s": link.latency, "bandwidth_bytes_per_s": link.bandwidth},
            "block_seconds": block_times.local, "gradient_bytes": block_times.gradient_bytes}


def table(results: list[dict]) -> str:
    lines = ["| width | run | processes | images/step | images/s | cost model (images/s) | model error |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for result in results:
        for name, run in result["runs"].items():
            lines.append(f"| {result['width']} | {name} | {run['processes']} | {run['images_per_step']} | "
                         f"{run['images_per_s']:.1f} | {run['predicted_images_per_s']:.1f} | "
                         f"{run['prediction_error']:+.0%} |")
    lines += ["", "Cost model, 8 processes (2 x 3 uses 6 of them; per-block times and link measured on this machine, "
              "1 thread each):", "",
              "| width | R x K | placement | predicted images/s |", "|---:|---|---|---:|"]
    for result in results:
        for name, row in result["eight_processes"].items():
            placement = " | ".join("-".join(map(str, g)) for g in row["placement"])
            lines.append(f"| {result['width']} | {name} | {placement} | {row['predicted_images_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.replicas", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="0.125,1.0", help="comma-separated model widths")
    parser.add_argument("--steps", default="200,30", help="training steps of each run, one per width")
    parser.add_argument("--out", type=Path, default=Path("launch") / "results" / "replicas")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "bench_replicas", help="where run folders go")
    args = parser.parse_args(argv)
    try:
        widths = [float(w) for w in args.widths.split(",")]
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error("--widths and --steps take numbers separated by commas, e.g. --widths 0.125,1.0 --steps 200,12")
    if len(widths) != len(steps):
        parser.error(f"--widths has {len(widths)} values and --steps {len(steps)}: give one step count per width")
    results = [measure(width, count, args.runs) for width, count in zip(widths, steps)]
    write_figures(args.out, "replicas", {"machine": describe_machine(), "results": results}, table(results))
    return 0


if __name__ == "__main__":
    run_program(main)
