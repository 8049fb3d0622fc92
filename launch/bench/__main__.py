"""Layer-parallel local SSL against global BP-SSL on the same hardware, side by side.

    python -m launch.bench [CONFIG] [--world-size K] [--microbatches M] [--steps N] [--repeats R] [--quick] [--out DIR]

Runs, with the same encoder, width, batch, input size and data (probe and log off):
1. BP-SSL (bp_infonce) in one process with K threads (or the one GPU): what a user would pick instead;
2. BP-SSL pipeline-parallel over K processes (torch.distributed.pipelining, GPipe and 1F1B, M micro-batches);
3. local SSL (clapp_pp; clapp_pp_dfb) in one process with K threads;
4. local SSL layer-parallel over K processes with 1 thread each (clapp_pp pipelined; clapp_pp_dfb with
   exact and with delayed feedback).
Single-process runs get as many threads as the parallel runs use in total. Throughput is the median
images/s over timed windows after warm-up (the whole-run mean for runs too short to have windows); with
--repeats R (--quick: 3), every run is made R times, alternating, and its median run counts.
The cost model (sim/cost/model.py), fed with per-block times measured here, predicts every run with
the placement it ran with; its errors are reported, and its predictions for K = 2, 3, 6 at full
width (per-block times measured on this hardware, each K with the placement its run would use).
Writes bench.json, bench.md and bench.png into DIR.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

from launch.bench.predictions import full_width_predictions, measure_times, predict
from launch.bench.render import chart, markdown
from launch.machine import describe_machine, write_figures
from launch.program import run_program
from launch.runner import bench_run, benchmark_parser, positive
from sim.record.summary import RunSummary
from sim.run.config import load_config
from sim.run.job import speedups
from sim.run.plan import make_plan

# --quick: enough steps for four timed windows after the warm-up one (sim.record.summary.TIMING_WINDOW), so
# that its rates are steady medians, not whole-run means with start-up in them (24 steps varied 20 % run to run)
QUICK_STEPS = 100
# and each run three times, alternating, the median kept: two quick benchmarks in a row varied 5-10 % with one
QUICK_REPEATS = 3


@dataclass(frozen=True)
class RunSpec:
    name: str
    method: str
    processes: int
    threads: int
    module: str = "launch.train"
    overrides: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


def run_specs(k: int, microbatches: int, quick: bool) -> list[RunSpec]:
    pipeline = "launch.bp_pipeline"
    specs = [
        RunSpec("bp_single", "bp_infonce", 1, k),
        RunSpec("bp_pipeline_1f1b", "bp_infonce", k, 1, pipeline,
                options=("--schedule", "1f1b", "--microbatches", str(microbatches))),
        RunSpec("local_single", "clapp_pp", 1, k),
        RunSpec("local_parallel", "clapp_pp", k, 1, overrides=("sim.schedule=pipelined",)),
    ]
    if not quick:
        specs[2:2] = [RunSpec("bp_pipeline_gpipe", "bp_infonce", k, 1, pipeline,
                              options=("--schedule", "gpipe", "--microbatches", str(microbatches)))]
        specs += [RunSpec("local_dfb_single", "clapp_pp_dfb", 1, k),
                  RunSpec("local_dfb_exact_parallel", "clapp_pp_dfb", k, 1, overrides=("sim.feedback=exact",)),
                  RunSpec("local_dfb_delayed_parallel", "clapp_pp_dfb", k, 1, overrides=("sim.feedback=delayed",))]
    return specs


def busy_and_idle(summary: RunSummary) -> list[dict]:
    return [{"rank": r["rank"], "blocks": r["blocks"], "busy_s": r["busy_seconds"],
             "idle_s": r["seconds"] - r["busy_seconds"], "wait_s": r["wait_seconds"], "bytes_sent": r["bytes_sent"]}
            for r in summary.ranks]


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("launch.bench", __doc__, "bench")
    parser.add_argument("--world-size", type=positive, default=2)
    parser.add_argument("--microbatches", type=positive, default=4)
    parser.add_argument("--steps", type=positive, default=200)
    parser.add_argument("--quick", action="store_true",
                        help=f"4 runs of {QUICK_STEPS} steps, {QUICK_REPEATS} times each, no full-width predictions")
    parser.add_argument("--repeats", type=positive, default=0,
                        help=f"times each run is made, alternating; its median counts (default 1; --quick: "
                             f"{QUICK_REPEATS})")
    args = parser.parse_args(argv)
    k, m = args.world_size, args.microbatches
    steps = QUICK_STEPS if args.quick else args.steps
    config = load_config(args.config, [f"train.steps={steps}", *args.overrides])
    # as a one-process run has them: the cost model's block times are measured in this process
    speedups(config, make_plan(config, 1).held_memory(range(6)))
    make_plan(dataclasses.replace(config, method="clapp_pp"), k)  # a K that cannot run fails here, not in a run
    specs = run_specs(k, m, args.quick)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else 1)
    measured: dict[str, list[RunSummary]] = {spec.name: [] for spec in specs}
    for repeat in range(repeats):  # every run once, then again: a noisy minute hits each alike
        for spec in specs:
            overrides = [f"train.steps={steps}", f"method={spec.method}", *args.overrides, *spec.overrides]
            summary = bench_run(spec.processes, spec.threads, args.config, overrides,
                                args.out / f"{spec.name}_{repeat}", spec.module, spec.options)
            measured[spec.name].append(summary)
            print(f"{spec.name} #{repeat}: {summary.throughput:.1f} images/s", flush=True)
    runs = []
    for spec in specs:
        ordered = sorted(measured[spec.name], key=lambda s: s.throughput)
        summary = ordered[len(ordered) // 2]  # the median run (the upper one of two)
        runs.append({"name": spec.name, "method": spec.method, "world_size": spec.processes,
                     "threads_per_process": spec.threads, "images_per_s": summary.throughput,
                     "images_per_s_each_repeat": [s.throughput for s in measured[spec.name]],
                     "images_per_s_whole_run": summary.images_per_s,
                     "peak_memory_bytes": summary.peak_memory_bytes, "ranks": busy_and_idle(summary),
                     "placement": summary.placement, "efficiency": summary.pipeline_efficiency()})
    by_name = {r["name"]: r for r in runs}
    parallel = by_name["local_parallel"]
    bp_pipeline = max((r for r in runs if r["name"].startswith("bp_pipeline")), key=lambda r: r["images_per_s"])
    bound = (m + k - 1) / m
    ratios = {
        "local_parallel_vs_bp_pipeline": parallel["images_per_s"] / bp_pipeline["images_per_s"],
        "local_parallel_vs_bp_single": parallel["images_per_s"] / by_name["bp_single"]["images_per_s"],
        "local_parallel_vs_local_sequential": parallel["images_per_s"] / by_name["local_single"]["images_per_s"],
        "pipeline_efficiency": parallel["efficiency"],
    }
    bounds = {"local_parallel_vs_bp_pipeline": bound, "pipeline_efficiency": 1.0,
              "local_parallel_vs_local_sequential": float(k)}
    times, link = measure_times(config, k, m)
    model = predict(config, runs, times, link, m)
    result = {
        "machine": describe_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m launch.bench", *(argv if argv is not None else sys.argv[1:])]),
        "dataset": config.data.name, "width": config.model.width, "batch_size": config.train.batch_size,
        "steps": steps, "world_size": k, "microbatches": m, "runs": runs, "ratios": ratios,
        "analytic_bounds": bounds, "best_bp_pipeline": bp_pipeline["name"],
        "memory_local_parallel_vs_bp_single": (max(parallel["peak_memory_bytes"])
                                               / max(by_name["bp_single"]["peak_memory_bytes"])),
        "cost_model": model,
    }
    if not args.quick:
        result["cost_model"]["full_width_predictions"] = full_width_predictions(config, link, m)
    table = markdown(result)
    write_figures(args.out, "bench", result, table)
    chart(result, args.out / "bench.png")
    return 0


if __name__ == "__main__":
    run_program(main)
