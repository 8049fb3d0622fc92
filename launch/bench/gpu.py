"""Every method at full width on one GPU: images/s and the memory the work holds, local against BP-SSL.

    python -m launch.bench.gpu [--steps N] [--methods a,b] [--out DIR]      # on a machine with a GPU
    python -m launch.bench.gpu --dry-run [--out DIR]                        # the same program on the CPU, tiny

Ready before a GPU is lent (issue 27): one invocation, well within 8 minutes on one H100, runs each method
in its own process (so that each one's `torch.cuda.max_memory_allocated` is its own) with the paper's
encoder (width 1.0), batch 32 of 32 px synthetic images (CIFAR-10's size: no dataset to copy), probe and
log off, and reads images/s (median over timed windows after warm-up) and peak memory from its
summary.json. Local rules run in one process here (K = 1); layer-parallel runs and the BP pipeline need
one GPU per stage (NCCL does not put two ranks on one device): the table says so rather than running them.
Writes gpu.json and gpu.md (with the card's name) into DIR. `--dry-run` runs on the CPU at width 1/16 for
a few steps: a test of the program, not a measurement.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from launch.machine import code_version, describe_machine, write_figures
from launch.program import ProgramErrors, run_program
from launch.runner import bench_run, positive
from layers.rules import RULES
from sim.errors import ConfigError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"  # every key it sets is overridden below
FULL = {"width": 1.0, "steps": 100}  # 100 steps: four timed windows of 20 after the first
DRY = {"width": 0.0625, "steps": 45}  # the fewest steps that still give a steady rate (two windows)
BASELINE = "bp_infonce"  # the end-to-end method each local rule is compared with


def run_method(method: str, width: float, steps: int, device: str, out: Path) -> dict:
    """One method alone in its own process; what its summary says."""
    overrides = [f"method={method}", "data.name=synthetic", f"model.width={width}", "train.batch_size=32",
                 f"train.steps={steps}", f"train.device={device}", "train.checkpoint_every=0"]
    began = time.monotonic()
    summary = bench_run(1, 0, CONFIG, overrides, out / method)
    return {"method": method, "images_per_s": summary.throughput, "steady": summary.images_per_s_steady is not None,
            "peak_memory_bytes": summary.peak_memory_bytes[0], "wall_s": round(time.monotonic() - began, 1)}


def markdown(result: dict) -> str:
    rows = {r["method"]: r for r in result["runs"]}
    base = rows.get(BASELINE)
    machine = result["machine"]
    card = machine["cuda"] or f"no GPU: {machine['cpu']} (a dry run, not a measurement)"
    lines = [f"{card}; torch {machine['torch']}; code {result['code_version'][:12]}; width {result['width']}, "
             f"batch 32, 32 px synthetic, {result['steps']} steps, one process per method", "",
             f"| method | images/s | peak memory (MiB) | images/s vs {BASELINE} | memory vs {BASELINE} |",
             "|---|---:|---:|---:|---:|"]
    for method, r in rows.items():
        speed = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        memory = f"{r['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x" if base else "-"
        lines.append(f"| {method} | {r['images_per_s']:.1f} | {r['peak_memory_bytes'] / 2**20:,.0f} | {speed} | "
                     f"{memory} |")
    lines += ["", "Not run: layer-parallel local rules (K > 1) and the BP pipeline need one GPU per stage."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive, help=f"steps per method (default {FULL['steps']})")
    parser.add_argument("--methods", default=",".join(RULES), help="comma-separated methods (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny: checks the program end to end")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"gpu_{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    with ProgramErrors(rank=0) as errors:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in RULES]
        if unknown or not methods:
            raise ConfigError(f"--methods {args.methods}: {', '.join(unknown) or 'none given'}; choose among "
                              f"{', '.join(RULES)}")
        if not args.dry_run and not torch.cuda.is_available():
            raise ConfigError("no CUDA device here: run it on a machine with a GPU, or with --dry-run on the CPU")
        scale = DRY if args.dry_run else FULL
        steps = args.steps or scale["steps"]
        device = "cpu" if args.dry_run else "cuda"
        runs = [run_method(m, scale["width"], steps, device, args.out / "runs") for m in methods]
        result = {"machine": describe_machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run,
                  "code_version": code_version(), "width": scale["width"], "steps": steps, "runs": runs}
        write_figures(args.out, "gpu", result, markdown(result))
    return errors.exit_code


if __name__ == "__main__":
    run_program(main)
