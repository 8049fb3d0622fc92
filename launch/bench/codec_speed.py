"""Message codecs against the cost model: images/s of 2 processes with each codec, measured and predicted.

    python -m launch.bench.codec_speed [CONFIG] [--steps N] [--out DIR]
    python -m launch.bench.codec_speed --dry-run [--out DIR]     # tiny and short: a test of the program

For each codec of the activations (fp32, fp16, int8, int4, spike), clapp_pp runs on 2 processes, one
thread each (probe and log off), and its images/s (median over timed windows after warm-up) is set
beside the cost model's prediction (sim.cost.model.local_pipelined, with per-block times, the data's
time and the link measured here, and the message bytes as the codec packs them: sim.cost.measure). The
model's error per codec is reported, and its prediction for slower links than this machine's loopback
(1 Gbit/s and 100 Mbit/s, same latency), where fewer bytes on the wire start to pay. Encoding and
decoding are part of each block's measured time only through the run: the model does not see them,
so a codec whose measured speed falls short of its prediction costs that much in arithmetic.
Writes codec_speed.json and codec_speed.md into DIR (default launch/results/codecs).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from launch.bench.predictions import plan_block_times, plan_data_seconds
from launch.machine import code_version, describe_machine, write_figures
from launch.program import ProgramErrors, add_config_arguments, run_program
from launch.runner import bench_run, positive
from sim.cost.measure import measure_link
from sim.cost.model import LinkSpeed, local_pipelined
from sim.run.config import load_config
from sim.run.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]  # launch/
CONFIG = ROOT / "configs" / "fashion_mnist.toml"
CODECS = ("fp32", "fp16", "int8", "int4", "spike")
SLOWER_LINKS = {"1 Gbit/s": 125e6, "100 Mbit/s": 12.5e6}  # bytes/s


def measure_codec(config_path: Path, overrides: list[str], codec: str, out: Path, link: LinkSpeed,
                  repeats: int) -> dict:
    """One codec: the 2-process run, and the model's prediction for it on this link and slower ones."""
    sets = [*overrides, "method=clapp_pp", f"sim.codec={codec}"]
    plan = make_plan(load_config(config_path, [*sets, "train.threads=1"]), 2)
    times = plan_block_times(plan, 1, plan_data_seconds(plan), repeats)
    batch = plan.config.train.batch_size
    summary = bench_run(2, 1, config_path, sets, out / codec)
    predicted = local_pipelined(times, plan.placement.groups, link, batch)
    slower = {name: local_pipelined(times, plan.placement.groups, dataclasses.replace(link, bandwidth=speed), batch)
              for name, speed in SLOWER_LINKS.items()}
    message = times.activation_bytes[plan.placement.groups[0][-1]]  # rank 0's output, as the codec packs it
    return {"codec": codec, "measured": summary.throughput, "predicted": predicted,
            "error": predicted / summary.throughput - 1, "message_bytes": message,
            "bytes_sent_rank0": summary.ranks[0]["bytes_sent"], "predicted_on_slower_links": slower}


def markdown(result: dict) -> str:
    machine, link = result["machine"], result["link"]
    lines = [f"{machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, code "
             f"{result['code_version'][:12]}; clapp_pp on 2 processes, 1 thread each, {result['steps']} steps; link "
             f"measured: {link['latency_s'] * 1e6:.0f} us + {link['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s"
             + (" (a dry run, not a measurement)" if result["dry_run"] else ""), "",
             "| codec | message (KiB) | measured images/s | predicted | error | predicted at "
             + " | predicted at ".join(SLOWER_LINKS) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(SLOWER_LINKS)]
    for r in result["runs"]:
        slower = " | ".join(f"{r['predicted_on_slower_links'][name]:.1f}" for name in SLOWER_LINKS)
        lines.append(f"| {r['codec']} | {r['message_bytes'] / 1024:,.1f} | {r['measured']:.1f} | "
                     f"{r['predicted']:.1f} | {r['error']:+.1%} | {slower} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.codec_speed", description=__doc__.splitlines()[0])
    add_config_arguments(parser, default=CONFIG)
    parser.add_argument("--steps", type=positive, default=200, help="steps of each run")
    parser.add_argument("--dry-run", action="store_true", help="tiny width, few steps: checks the program end to end")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "codecs")
    args = parser.parse_args(argv)
    with ProgramErrors(rank=0) as errors:
        steps = 45 if args.dry_run else args.steps
        overrides = [*args.overrides, f"train.steps={steps}", "train.checkpoint_every=0"]
        if args.dry_run:
            overrides += ["data.name=synthetic", "model.width=0.0625"]
        link = measure_link(repeats=3 if args.dry_run else 10)
        runs = [measure_codec(args.config, overrides, codec, args.out / "runs", link, 1 if args.dry_run else 3)
                for codec in CODECS]
        result = {"machine": describe_machine(), "code_version": code_version(), "dry_run": args.dry_run,
                  "steps": steps, "link": {"latency_s": link.latency, "bandwidth_bytes_per_s": link.bandwidth},
                  "runs": runs}
        write_figures(args.out, "codec_speed", result, markdown(result))
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
