"""Full-width speed: this checkout against a baseline commit, side by side, and against the floor.

    python -m launch.bench.speed [--baseline 8c06083] [--steps N] [--parallel-steps N] [--width W] [--out DIR]

At the paper's width (1.0), 32 px, batch 32 (64 views), on the CPU:
1. One process, 1 thread: seconds per training step of clapp_pp, clapp_pp_dfb, bp_infonce and clapp
   in the baseline commit (exported into a temporary folder with `git archive`) and in this
   checkout, alternating, each in its own process (launch/bench/step_timer.py: synthetic views,
   the median of --steps timed steps after three untimed ones).
2. Two cores: clapp_pp in one process with 2 threads, baseline and now; this checkout's
   layer-parallel runs under torchrun (K = 2, 1 thread each, `launch.train` on synthetic data):
   clapp_pp pipelined and clapp_pp_dfb with delayed feedback; images/s and pipeline efficiency.
3. Beside every run: its FLOPs per step (Plan.step_work), the floor (those FLOPs at this machine's
   best measured FLOP/s plus AdamW's traffic at its measured bandwidth, divided by the threads
   used in all), the fraction of the floor achieved, and the cost model's prediction from per-block
   times measured here (sim.cost.model).
Writes speed.json and speed.md into DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from launch.bench.predictions import plan_block_times, plan_data_seconds
from launch.machine import code_version, describe_machine, write_figures
from launch.program import ProgramErrors, run_program
from launch.runner import bench_run, positive
from sim.cost.measure import measure_link, measure_peak_rates
from sim.cost.model import local_pipelined
from sim.run.config import load_config
from sim.run.plan import make_plan

CHECKOUT = Path(__file__).resolve().parents[2]
TIMER = Path(__file__).with_name("step_timer.py")
METHODS = ("clapp_pp", "clapp_pp_dfb", "bp_infonce", "clapp")
BATCH = 32  # images per step, the paper's
SETTINGS = ["data.name=synthetic", f"train.batch_size={BATCH}"]  # and model.width: --width, the paper's by default
PARALLEL_RUNS = {"clapp_pp_k2_pipelined": ["method=clapp_pp", "sim.schedule=pipelined"],
                 "clapp_pp_dfb_k2_delayed": ["method=clapp_pp_dfb", "sim.feedback=delayed"]}


def export_commit(commit: str, folder: Path) -> Path:
    """The tree of `commit` of this repository, unpacked into `folder`."""
    archive = subprocess.run(["git", "-C", str(CHECKOUT), "archive", "--format=tar", commit], capture_output=True)
    if archive.returncode != 0:
        raise ValueError(f"--baseline {commit}: git cannot export it ({archive.stderr.decode().strip()}); give a "
                         "commit of this repository's history (a shallow clone may lack it: git fetch --unshallow)")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run_step_timer(options: list[str], what: str, threads: int = 1, timeout_s: float = 7200) -> dict:
    """launch/bench/step_timer.py with `options`, in a process of its own: its JSON line. `what` names the
    measurement in the error if it fails; `timeout_s`: a step takes seconds to minutes, so more means a hang."""
    done = subprocess.run([sys.executable, str(TIMER), "--threads", str(threads), *options], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=timeout_s)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_steps(method: str, threads: int, tree: Path, baseline: bool, steps: int, width: float) -> dict:
    """launch/bench/step_timer.py's measurement of `method` in `tree`, in a process of its own."""
    result = run_step_timer(["--method", method, "--tree", str(tree), "--steps", str(steps), "--width", str(width),
                             *(["--baseline"] if baseline else [])], f"timing {method} in {tree}", threads, 3600)
    result["seconds_per_step"] = statistics.median(result["step_seconds"])
    return result


def single_process_runs(baseline_tree: Path, steps: int, width: float) -> dict:
    runs: dict[str, dict] = {}
    layouts = [(method, 1) for method in METHODS] + [("clapp_pp", 2)]
    for method, threads in layouts:
        for version, tree in (("baseline", baseline_tree), ("now", CHECKOUT)):  # side by side
            name = f"{method}_{threads}t_{version}"
            runs[name] = time_steps(method, threads, tree, version == "baseline", steps, width)
            runs[name].update(version=version, processes=1)
            print(f"{name}: {runs[name]['seconds_per_step']:.2f} s/step", flush=True)
    return runs


def parallel_runs(steps: int, width: float, out: Path) -> dict:
    runs = {}
    config = CHECKOUT / "launch" / "configs" / "tiny.toml"
    for name, overrides in PARALLEL_RUNS.items():
        settings = [*SETTINGS, f"model.width={width}", f"train.steps={steps}", *overrides]
        summary = bench_run(2, 1, config, settings, out / name)
        runs[name] = {"version": "now", "method": summary.method, "processes": 2, "threads": 1,
                      "seconds_per_step": summary.config["train"]["batch_size"] / summary.throughput,
                      "pipeline_efficiency": summary.pipeline_efficiency(), "placement": summary.placement,
                      "peak_memory_bytes": max(summary.peak_memory_bytes), "speedups": summary.speedups,
                      "ranks": summary.ranks}
        print(f"{name}: {summary.throughput:.2f} images/s, efficiency {summary.pipeline_efficiency():.2f}", flush=True)
    return runs


def add_floor_and_model(runs: dict, width: float) -> dict:
    """Each run's FLOPs, floor and the cost model's prediction; returns the machine's rates."""
    torch.set_num_threads(1)
    flops_per_s, bytes_per_s = measure_peak_rates()
    link = measure_link()
    plans = {m: make_plan(load_config(None, [*SETTINGS, f"model.width={width}", f"method={m}"]), 1) for m in METHODS}
    data = plan_data_seconds(plans["clapp_pp"])
    times = {}
    for method, plan in plans.items():
        times[method] = plan_block_times(plan, 1, data, repeats=3)
        print(f"cost model: {method} blocks measured", flush=True)
    for run in runs.values():
        method, processes = run["method"], run["processes"]
        work, times_1 = plans[method].step_work(), times[method]
        floor = work.floor_seconds(flops_per_s, bytes_per_s) / (processes * run["threads"])
        run.update(gflop_per_step=work.flops / 1e9, floor_seconds=floor, floor_fraction=floor / run["seconds_per_step"])
        if run["version"] == "baseline" or run["threads"] > 1:
            continue  # the model's block times are this checkout's, on one thread
        if plans[method].rule.end_to_end:
            predicted = sum(times_1.forward) + sum(times_1.backward)
        elif processes == 1:
            predicted = sum(times_1.local)
        else:
            batch = plans[method].config.train.batch_size
            delayed = plans[method].rule.needs_feedback
            predicted = batch / local_pipelined(times_1, run["placement"], link, batch, feedback=delayed)
        run["predicted_seconds_per_step"] = predicted
    return {"flop_per_s": flops_per_s, "bytes_per_s": bytes_per_s,
            "block_seconds": {m: (t.local if not plans[m].rule.end_to_end else [f + b for f, b in
                                                                                   zip(t.forward, t.backward)])
                              for m, t in times.items()}}


def markdown(result: dict) -> str:
    runs, rates = result["runs"], result["machine_rates"]
    machine = result["machine"]
    lines = [f"Width {result['width']}, 32 px, batch {BATCH} ({2 * BATCH} views), CPU: {machine['cpu']}, "
             f"torch {machine['torch']}; "
             f"this code {result.get('code_version', 'unrecorded')[:12]}, baseline {result['baseline']}. "
             f"Measured {rates['flop_per_s'] / 1e9:.1f} GFLOP/s (1 thread), "
             f"{rates['bytes_per_s'] / 1e9:.1f} GB/s.", "",
             "| run | code | processes x threads | s/step | images/s | speed-up | GFLOP/step | floor (s) | "
             "of floor | predicted s/step | peak memory (MiB) |", "|---|---|---|" + "---:|" * 8]
    for name, run in runs.items():
        base = runs.get(name.replace("_now", "_baseline"))
        speedup = f"{base['seconds_per_step'] / run['seconds_per_step']:.2f}x" if base and base is not run else ""
        predicted = run.get("predicted_seconds_per_step")
        lines.append(f"| {run['method']} | {run['version']} | {run['processes']} x {run['threads']} | "
                     f"{run['seconds_per_step']:.2f} | {BATCH / run['seconds_per_step']:.2f} | {speedup} | "
                     f"{run['gflop_per_step']:.0f} | {run['floor_seconds']:.2f} | {run['floor_fraction']:.2f} | "
                     f"{'' if predicted is None else f'{predicted:.2f}'} | {run['peak_memory_bytes'] / 2**20:.0f} |")
    lines += ["", "| ratio | measured |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in result["ratios"].items()]
    return "\n".join(lines)


def ratios(runs: dict) -> dict:
    two_threads = runs["clapp_pp_2t_baseline"]["seconds_per_step"]
    found = {f"{m} 1 thread, now / baseline": runs[f"{m}_1t_baseline"]["seconds_per_step"]
             / runs[f"{m}_1t_now"]["seconds_per_step"] for m in METHODS}
    for name in PARALLEL_RUNS:
        if name in runs:
            found[f"{name} / baseline clapp_pp 1 x 2 threads"] = two_threads / runs[name]["seconds_per_step"]
            found[f"{name} pipeline efficiency"] = runs[name]["pipeline_efficiency"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="8c06083", help="commit to compare with (default: 8c06083)")
    parser.add_argument("--steps", type=positive, default=5, help="timed steps per single-process run")
    parser.add_argument("--parallel-steps", type=positive, default=45,
                        help="steps of each layer-parallel run (41 or more: a steady window after warm-up)")
    parser.add_argument("--width", type=float, default=1.0, help="model.width (default 1.0, the paper's)")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"speed_{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    with ProgramErrors(0) as errors:
        with tempfile.TemporaryDirectory() as folder:
            runs = single_process_runs(export_commit(args.baseline, Path(folder)), args.steps, args.width)
        runs.update(parallel_runs(args.parallel_steps, args.width, args.out))
        rates = add_floor_and_model(runs, args.width)
        command = " ".join(["python -m launch.bench.speed", *(argv if argv is not None else sys.argv[1:])])
        result = {"machine": describe_machine(), "date": time.strftime("%Y-%m-%d"), "baseline": args.baseline,
                  "code_version": code_version(), "width": args.width, "command": command,
                  "machine_rates": rates, "runs": runs, "ratios": ratios(runs)}
        write_figures(args.out, "speed", result, markdown(result))
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
