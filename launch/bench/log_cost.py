"""What the training log costs: images/s with and without RUN_DIR/log.zarr, side by side.

    python -m launch.bench.log_cost [CONFIG] [--steps N] [--repeats R] [--set key=value ...] [--out DIR]

Alternates runs of one process without a log (log.every = 0) and with the configured log (the
defaults unless --set changes them), and reports the median images/s of each and the overhead.
Writes bench_log.json and bench_log.md.
"""
from __future__ import annotations

import statistics
import sys
import time

from launch.machine import describe_machine, write_figures
from launch.program import run_program
from launch.runner import bench_run, benchmark_parser, positive
from sim.run.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser("launch.bench.log_cost", __doc__, "bench_log")
    parser.add_argument("--steps", type=positive, default=1000)
    parser.add_argument("--repeats", type=positive, default=3)
    parser.add_argument("--threads", type=positive, default=1)
    args = parser.parse_args(argv)
    overrides = [f"train.steps={args.steps}", *args.overrides]
    log = load_config(args.config, overrides).log
    speeds: dict[str, list[float]] = {"without log": [], "with log": []}
    for repeat in range(args.repeats):  # alternate, so that a noisy minute hits both alike
        for name, extra in (("without log", ["log.every=0"]), ("with log", [f"log.every={log.every}"])):
            out = args.out / f"{name.replace(' ', '_')}_{repeat}"
            summary = bench_run(1, args.threads, args.config, overrides + extra, out)
            speeds[name].append(summary.images_per_s)
            print(f"{name} #{repeat}: {summary.images_per_s:.1f} images/s", flush=True)
    median = {name: statistics.median(values) for name, values in speeds.items()}
    result = {
        "machine": describe_machine(), "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python -m launch.bench.log_cost", *(argv if argv is not None else sys.argv[1:])]),
        "steps": args.steps, "threads": args.threads,
        "log": {"every": log.every, "align_every": log.align_every, "heldout": log.heldout, "dtype": log.dtype},
        "images_per_s": speeds, "median_images_per_s": median,
        "overhead": 1 - median["with log"] / median["without log"],
    }
    table = (f"log every {log.every} steps, alignment pairs every {log.align_every}, {log.heldout} held-out images "
             f"({log.dtype}); {args.steps} steps, {args.threads} thread(s), {result['machine']['cpu']}\n\n"
             "| run | images/s (median) |\n|---|---:|\n"
             + "".join(f"| {name} | {value:.1f} |\n" for name, value in median.items())
             + f"\noverhead of the log: {100 * result['overhead']:.1f} %")
    write_figures(args.out, "bench_log", result, table)
    return 0


if __name__ == "__main__":
    run_program(main)
