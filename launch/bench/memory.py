"""Peak memory of local SSL against BP-SSL where the paper measured it: 96 px, full width.

    python -m launch.bench.memory [--width W] [--steps N] [--sizes 96,32] [--system-allocator] [--out DIR]

For each input size (96 px: synthetic images of STL-10's shapes with the paper's 96 px pooling
12-12-12-6-6-3; 32 px: the CIFAR-10 shapes), batch 32, a few steps each (the peak comes with the
first updates), `launch.train` runs with probe and log off:
- bp_infonce in one process (2 threads): the BP-SSL baseline;
- clapp_pp in one process (K = 1, 2 threads) and one block per process (K = 6, 1 thread each).
Memory is each process's peak resident memory minus its resident memory after imports (sim.record.peak_memory).
Beside it, what the process's blocks must hold (Plan.held_memory): weights, gradients and AdamW's
two moments (16 bytes per parameter: the B matrices dominate at full width), and the activity one
step keeps for its backward pass; the rest is the backward pass's temporaries, rank 0's dataset
and views, and the allocator's slack. Writes memory.json and memory.md into DIR.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from launch.machine import describe_machine, write_figures
from launch.program import ProgramErrors, run_program
from launch.runner import bench_run, positive
from sim.run.config import load_config
from sim.run.plan import make_plan

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
DATASET = {96: "synthetic_96", 32: "synthetic"}
RUNS = {"bp_infonce_k1": ("bp_infonce", 1, 2), "clapp_pp_k1": ("clapp_pp", 1, 2), "clapp_pp_k6": ("clapp_pp", 6, 1)}


def measure(size: int, width: float, steps: int, out: Path, keep_freed_memory: bool) -> dict:
    runs = {}
    for name, (method, processes, threads) in RUNS.items():
        overrides = [f"data.name={DATASET[size]}", f"model.width={width}", "train.batch_size=32",
                     f"train.steps={steps}", f"method={method}", "sim.placement=auto",
                     "sim.timeout_s=900",  # six ranks of 96 px steps share 2 cores: a rank may wait minutes
                     f"train.keep_freed_memory={str(keep_freed_memory).lower()}"]
        plan = make_plan(load_config(CONFIG, overrides), processes)
        summary = bench_run(processes, threads, CONFIG, overrides, out / f"{name}_{size}px")
        held = [plan.held_memory(group) for group in plan.placement.groups]
        runs[name] = {"method": method, "processes": processes, "threads": threads,
                      "placement": [list(g) for g in plan.placement.groups],
                      "peak_memory_bytes": summary.peak_memory_bytes, "held_bytes": held,
                      "speedups": summary.speedups}
        print(f"{size} px {name}: peak MiB per process {[b // 2**20 for b in summary.peak_memory_bytes]}", flush=True)
    bp = max(runs["bp_infonce_k1"]["peak_memory_bytes"])
    ratios = {name: max(run["peak_memory_bytes"]) / bp for name, run in runs.items() if name != "bp_infonce_k1"}
    return {"input_px": size, "runs": runs, "largest_process_vs_bp": ratios}


def markdown(result: dict) -> str:
    allocator = "freed memory kept" if result["keep_freed_memory"] else "glibc's default allocator"
    lines = [f"Width {result['width']}, batch 32, {result['steps']} steps, CPU ({result['machine']['cpu']}), "
             f"{allocator}; "
             "MiB per process: measured peak (imports excluded) | AdamW state + weights | activity kept", "",
             "| input | run | processes x threads | per process: peak, state, activity (MiB) | "
             "largest / BP |", "|---|---|---|---|---:|"]
    mib = 2**20
    for sized in result["sizes"]:
        for name, run in sized["runs"].items():
            cells = "; ".join(f"{p / mib:.0f}, {h['optimizer_state'] / mib:.0f}, {h['activity'] / mib:.0f}"
                              for p, h in zip(run["peak_memory_bytes"], run["held_bytes"]))
            ratio = sized["largest_process_vs_bp"].get(name)
            lines.append(f"| {sized['input_px']} px | {name} | {run['processes']} x {run['threads']} | {cells} | "
                         f"{'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0, help="model.width (default 1.0, the paper's)")
    parser.add_argument("--steps", type=positive, default=3)
    parser.add_argument("--sizes", default="96,32", help="input sizes in px, from 96 and 32 (default: both)")
    parser.add_argument("--system-allocator", action="store_true",
                        help="glibc's default allocator (train.keep_freed_memory = false), to see what keeping costs")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"memory_{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    with ProgramErrors(0) as errors:
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
        unknown = [s for s in sizes if not s.isdigit() or int(s) not in DATASET]
        if unknown:
            raise ValueError(f"--sizes {args.sizes}: {', '.join(unknown)} not among {sorted(DATASET)} (px)")
        sizes = [int(s) for s in sizes]
        result = {"machine": describe_machine(), "date": time.strftime("%Y-%m-%d"), "width": args.width,
                  "steps": args.steps, "command": " ".join(["python -m launch.bench.memory",
                                                            *(argv if argv is not None else sys.argv[1:])]),
                  "keep_freed_memory": not args.system_allocator, "sizes": []}
        for size in sizes:
            result["sizes"].append(measure(size, args.width, args.steps, args.out, not args.system_allocator))
        write_figures(args.out, "memory", result, markdown(result))
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
