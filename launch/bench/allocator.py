"""Keeping freed memory, three ways, side by side: speed and peak memory of a training step.

    python -m launch.bench.allocator [--sizes 32,96] [--steps 3] [--width 1.0] [--out DIR]

For each input size and process, one process with one thread trains on synthetic views
(launch/bench/step_timer.py: --steps timed steps after two untimed ones) with `train.keep_freed_memory`
true (kept always: the default before issue 27), "auto" (kept where the process's weights and optimiser
state outweigh its activity four times: the default) and false (glibc's own allocator), one after the
other for each process, so that a noisy minute hits all three alike. At 32 px: all six blocks of
clapp_pp, clapp_pp_dfb, clapp and bp_infonce; at 96 px: all six blocks of clapp_pp and bp_infonce, and
block 1 alone (the largest process of clapp_pp with K = 6). Reports seconds per step and peak resident
memory (imports excluded), "auto" against true in speed and against false in memory. Writes allocator.json
and allocator.md into DIR.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from launch.bench.speed import run_step_timer
from launch.machine import code_version, describe_machine, write_figures
from launch.program import ProgramErrors, run_program
from launch.runner import positive

POLICIES = ("true", "auto", "false")
PROCESSES = {  # size -> name -> (method, blocks)
    32: {"clapp_pp": ("clapp_pp", "0,1,2,3,4,5"), "clapp_pp_dfb": ("clapp_pp_dfb", "0,1,2,3,4,5"),
         "clapp": ("clapp", "0,1,2,3,4,5"), "bp_infonce": ("bp_infonce", "0,1,2,3,4,5")},
    96: {"clapp_pp": ("clapp_pp", "0,1,2,3,4,5"), "bp_infonce": ("bp_infonce", "0,1,2,3,4,5"),
         "clapp_pp block 1 (K = 6)": ("clapp_pp", "1")},
}
DATA = {32: "synthetic", 96: "synthetic_96"}


def measure(method: str, blocks: str, size: int, policy: str, width: float, steps: int) -> dict:
    result = run_step_timer(["--method", method, "--width", str(width), "--blocks", blocks, "--warmup", "2",
                             "--steps", str(steps), "--set", f"data.name={DATA[size]}",
                             "--set", f"train.keep_freed_memory={policy}"],
                            f"{method} blocks {blocks} at {size} px, keep_freed_memory={policy}")
    return {"seconds_per_step": statistics.median(result["step_seconds"]), "peak_bytes": result["peak_memory_bytes"],
            "kept": result["speedups"]["freed_memory_kept"]}


def markdown(result: dict) -> str:
    lines = [f"Width {result['width']}, batch 32, one thread, {result['steps']} timed steps after two; "
             f"{result['machine']['cpu']}, {result['date']}. s/step and peak MiB per train.keep_freed_memory; "
             "auto against true (speed) and against false (memory).", "",
             "| input | process | true | auto (kept?) | false | auto speed / true | auto peak / false |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, runs in result["runs"].items():
        size, name = key.split(" px ", 1)
        cells = [f"{runs[p]['seconds_per_step']:.2f} s, {runs[p]['peak_bytes'] / 2**20:,.0f}" for p in POLICIES]
        cells[1] += " (yes)" if runs["auto"]["kept"] else " (no)"
        speed = runs["true"]["seconds_per_step"] / runs["auto"]["seconds_per_step"]
        memory = runs["auto"]["peak_bytes"] / runs["false"]["peak_bytes"]
        lines.append(f"| {size} px | {name} | " + " | ".join(cells) + f" | {speed:.3f} | {memory:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.allocator", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,96", help="input sizes in px, from 32 and 96")
    parser.add_argument("--steps", type=positive, default=3)
    parser.add_argument("--width", type=float, default=1.0, help="model.width (default 1.0, the paper's)")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"allocator_{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    with ProgramErrors(0) as errors:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        if not sizes or any(s not in PROCESSES for s in sizes):
            raise ValueError(f"--sizes {args.sizes}: choose from {', '.join(map(str, PROCESSES))}")
        result = {"machine": describe_machine(), "date": time.strftime("%Y-%m-%d"), "code_version": code_version(),
                  "width": args.width, "steps": args.steps, "runs": {}}
        for size in sizes:
            for name, (method, blocks) in PROCESSES[size].items():
                runs = {p: measure(method, blocks, size, p, args.width, args.steps) for p in POLICIES}
                result["runs"][f"{size} px {name}"] = runs
                print(f"{size} px {name}: " + ", ".join(f"{p} {r['seconds_per_step']:.2f} s "
                                                        f"{r['peak_bytes'] / 2**20:,.0f} MiB" for p, r in runs.items()),
                      flush=True)
        write_figures(args.out, "allocator", result, markdown(result))
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
