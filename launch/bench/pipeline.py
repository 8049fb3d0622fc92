"""Layer-parallel throughput against one process on the same cores.

    python -m launch.bench.pipeline [CONFIG] [--world-size K] [--steps N] [--repeats R] [--placement measured]
                                    [--set ...] [--out DIR]

Runs, alternating and `--repeats` times each: one process with 1 thread, one process with K
threads (the same cores as the parallel run), and K processes with 1 thread each under torchrun
(pipelined schedule). Reports the median steady images/s of each, the ratios, the ceiling (perfect
balance and no overhead: one 1-thread process's rate times K, over the K-thread process's rate), the
pipeline efficiency (the slowest rank's busy time over the run's wall time: 1.0 means the pipeline
runs as fast as its slowest rank can compute), where each rank's time goes (compute, views,
messages, waiting, record, other: RankResult.phase_seconds), the ranks' busy time summed against the
1-thread process's loop, and each rank's peak memory. Writes bench_pipeline.json and .md.
"""
from __future__ import annotations

import statistics
import sys
import time

from launch.bench.predictions import measured_placement
from launch.machine import describe_machine, write_figures
from launch.program import run_program
from launch.runner import bench_run, benchmark_parser, positive
from sim.run.config import load_config
from sim.run.plan import make_plan


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("launch.bench.pipeline", __doc__, "bench_pipeline")
    parser.add_argument("--world-size", type=positive, default=2)
    parser.add_argument("--steps", type=positive, default=300)
    parser.add_argument("--repeats", type=positive, default=3)
    parser.add_argument("--placement", choices=("auto", "measured"), default="auto",
                        help="the parallel run's blocks per process: the plan's estimate, or balanced on block "
                             "times measured here first (launch.bench.predictions.measured_placement)")
    args = parser.parse_args(argv)
    k = args.world_size
    overrides = [f"train.steps={args.steps}", "sim.schedule=pipelined", *args.overrides]
    config = load_config(args.config, overrides)
    make_plan(config, k)  # a K or a config that cannot run fails here, not in a run
    placed = [] if args.placement == "auto" else [f"sim.placement={measured_placement(config, k)}"]
    layouts = {"single_1_thread": (1, 1), f"single_{k}_threads": (1, k), "parallel": (k, 1)}  # processes, threads
    kinds = list(layouts)
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):  # alternate, so that a noisy minute hits every kind alike
        for kind, (processes, threads) in layouts.items():
            settings = overrides + (placed if kind == "parallel" else [])
            summary = bench_run(processes, threads, args.config, settings, args.out / f"{kind}_{repeat}")
            runs[kind].append(summary)
            print(f"{kind} #{repeat}: {summary.images_per_s:.1f} images/s", flush=True)
    speed = {kind: statistics.median(s.throughput for s in runs[kind]) for kind in kinds}
    parallel = runs["parallel"]
    ceiling = k * speed["single_1_thread"] / speed[f"single_{k}_threads"]
    achieved = speed["parallel"] / speed[f"single_{k}_threads"]
    result = {
        "machine": describe_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m launch.bench.pipeline", *(argv if argv is not None else sys.argv[1:])]),
        "method": parallel[0].method, "dataset": parallel[0].dataset,
        "width": parallel[0].config["model"]["width"], "batch_size": parallel[0].config["train"]["batch_size"],
        "steps": args.steps, "world_size": k, "placement": parallel[0].placement, "placement_from": args.placement,
        "images_per_s": speed,
        "ratios": {"parallel_vs_single_1_thread": speed["parallel"] / speed["single_1_thread"],
                   f"parallel_vs_single_{k}_threads": speed["parallel"] / speed[f"single_{k}_threads"]},
        "ceiling_vs_single_k_threads": ceiling, "share_of_ceiling": achieved / ceiling,
        "busy_sum_vs_single_1_thread": statistics.median(
            sum(r["busy_seconds"] for r in run.ranks) / one.train_seconds
            for run, one in zip(parallel, runs["single_1_thread"])),
        "pipeline_efficiency": statistics.median(s.pipeline_efficiency() for s in parallel),
        "peak_memory_bytes": {kind: [statistics.median(s.peak_memory_bytes[r] for s in runs[kind])
                                     for r in range(len(runs[kind][0].peak_memory_bytes))] for kind in kinds},
        "ranks": [{"rank": r["rank"], "blocks": r["blocks"], "busy_s": r["busy_seconds"],
                   "wait_s": r["wait_seconds"], "bytes_sent": r["bytes_sent"],
                   "phase_seconds": r.get("phase_seconds", {})} for r in parallel[-1].ranks],
    }
    table = markdown(result)
    write_figures(args.out, "bench_pipeline", result, table)
    return 0


def markdown(result: dict) -> str:
    k = result["world_size"]
    memory = result["peak_memory_bytes"]
    lines = [f"{result['method']} on {result['dataset']}, width {result['width']}, batch {result['batch_size']}, "
             f"{result['steps']} steps; {result['machine']['cpu']} ({result['machine']['cores']} cores), "
             f"torch {result['machine']['torch']}, {result['date']}",
             "", "| run | images/s | peak memory per process (MiB) |", "|---|---:|---|"]
    names = {"single_1_thread": "1 process, 1 thread", f"single_{k}_threads": f"1 process, {k} threads",
             "parallel": f"{k} processes x 1 thread, pipelined, blocks {result['placement']}"}
    for kind, name in names.items():
        lines.append(f"| {name} | {result['images_per_s'][kind]:.1f} | "
                     f"{', '.join(f'{b / 2**20:.0f}' for b in memory[kind])} |")
    ratios = result["ratios"]
    lines += ["", f"- parallel / 1 thread: {ratios['parallel_vs_single_1_thread']:.2f}x; parallel / {k} threads: "
              f"{ratios[f'parallel_vs_single_{k}_threads']:.2f}x",
              f"- ceiling (perfect balance, no overhead: {k} x the 1-thread rate / the {k}-thread rate): "
              f"{result['ceiling_vs_single_k_threads']:.2f}x; reached: {result['share_of_ceiling']:.2f} of it",
              "- the ranks' busy time summed / the 1-thread process's loop: "
              f"{result['busy_sum_vs_single_1_thread']:.2f}",
              f"- pipeline efficiency (slowest rank's busy time / wall time): {result['pipeline_efficiency']:.3f}",
              "- per rank (last repeat): " + "; ".join(
                  f"rank {r['rank']} blocks {r['blocks']} busy {r['busy_s']:.1f} s, waiting {r['wait_s']:.1f} s, "
                  f"sent {r['bytes_sent'] / 2**20:.0f} MiB" for r in result["ranks"])]
    phases = sorted({name for r in result["ranks"] for name in r["phase_seconds"]})
    if phases:
        lines += ["", "Where each rank's loop time went (s, last repeat):", "",
                  "| rank | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
        lines += [f"| {r['rank']} | " + " | ".join(f"{r['phase_seconds'].get(n, 0.0):.2f}" for n in phases) + " |"
                  for r in result["ranks"]]
    return "\n".join(lines)


if __name__ == "__main__":
    run_program(main)
