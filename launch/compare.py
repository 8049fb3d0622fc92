"""laminar's main job: train methods side by side on one config and compare their linear probes.

    python -m launch.compare [CONFIG] [--runs random,clapp_pp,clapp_pp@2,bp_infonce] [--set key=value ...] [--out DIR]

A run is a method name; `METHOD@K` runs it layer-parallel on K processes (torchrun, one thread
each); `random` probes the untrained encoder. Each run is its own process (launch.runner),
so its peak memory is its own. A run whose folder already holds a summary.json is not trained
again: an interrupted comparison continues where it stopped. Writes compare.json, compare.md and
compare.png into DIR.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from launch.runner import DEFAULT_CONFIG, launch_run
from sim.config import ConfigError, add_config_arguments, load_config
from sim.job import ProgramErrors
from sim.placement import PlacementError
from sim.plan import make_plan
from sim.summary import RunSummary, finished

# A run name is a method name, or "random": the encoder as initialised, probed without training.
RUN_OVERRIDES = {"random": ["method=clapp_pp", "train.steps=0", "train.epochs=0"]}


def run_overrides(name: str) -> list[str]:
    method, _, processes = name.partition("@")
    parallel = ["train.threads=1"] if processes else []
    return RUN_OVERRIDES.get(method, [f"method={method}"]) + parallel


def train_run(name: str, config: Path, overrides: list[str], folder: Path) -> RunSummary:
    """Run `name` into `folder`, unless a finished run is there already."""
    if finished(folder):
        return RunSummary.read(folder)
    processes = int(name.partition("@")[2] or 1)
    return launch_run(config, [*overrides, *run_overrides(name)], folder, processes=processes)


def markdown_table(rows: list[tuple[str, RunSummary]]) -> str:
    lines = ["| run | method | processes | steps | images/s | peak memory per process (MiB) | probe: all blocks (%) "
             "| probe: last block (%) |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for name, s in rows:
        probe = s.probe or {}
        last = probe.get("per_block_test_acc", [None])[-1]
        speed = f"{s.images_per_s:.1f}" if s.steps else "-"
        memory = ", ".join(f"{b / 2**20:.0f}" for b in s.peak_memory_bytes) if s.steps else "-"
        lines.append(f"| {name} | {s.method} | {s.world_size} | {s.steps} | {speed} | {memory} | "
                     f"{_percent(probe.get('test_acc'))} | {_percent(last)} |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(rows: list[tuple[str, RunSummary]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, (label, pick) in enumerate([("all blocks", lambda p: p["test_acc"]),
                                            ("last block", lambda p: p["per_block_test_acc"][-1])]):
        values = [pick(s.probe) if s.probe else 0 for _, s in rows]
        bars = left.bar([i + 0.4 * offset for i in range(len(rows))], values, width=0.4, label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks([i + 0.2 for i in range(len(rows))], names)
    left.set_ylabel("linear probe test accuracy (%)")
    left.set_ylim(0, 112)
    left.legend(loc="upper right", ncol=2, fontsize=8)
    trained = [(name, s) for name, s in rows if s.steps]
    bars = right.bar([n for n, _ in trained], [s.images_per_s for _, s in trained], color="tab:gray")
    right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_ylabel("training throughput (images/s)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.compare", description=__doc__.splitlines()[0])
    add_config_arguments(parser, default=DEFAULT_CONFIG)
    parser.add_argument("--runs", default="random,clapp_pp,clapp_pp@2,bp_infonce",
                        help="comma-separated runs: METHOD, METHOD@K (K processes) or random (untrained)")
    parser.add_argument("--out", type=Path, help="folder of the comparison (default runs/compare_TIME)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not names:
        parser.error("--runs names no run; e.g. --runs random,clapp_pp,clapp_pp@2,bp_infonce")
    for name in names:
        processes = name.partition("@")[2]
        if processes and not (processes.isdigit() and int(processes) >= 1):
            parser.error(f"--runs: {name!r}: after @ comes the number of processes, e.g. clapp_pp@2")
    try:  # check every run's config and placement before training anything
        configs = {name: load_config(args.config, args.overrides + run_overrides(name)) for name in names}
        for name, config in configs.items():
            make_plan(config, int(name.partition("@")[2] or 1))
    except (ConfigError, PlacementError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"compare_{time.strftime('%Y%m%d-%H%M%S')}"
    rows = [(name, train_run(name, args.config, args.overrides, out / name.replace("@", "_x"))) for name in names]
    first = configs[names[0]]
    title = f"{first.data.name}, width {first.model.width}, batch {first.train.batch_size}"
    table = markdown_table(rows)
    (out / "compare.md").write_text(f"# {title}\n\n{table}\n")
    runs = {name: dataclasses.asdict(summary) for name, summary in rows}
    (out / "compare.json").write_text(json.dumps({"title": title, "runs": runs}, indent=2) + "\n")
    plot(rows, out / "compare.png", title)
    print(f"\n{title}\n{table}\n\nwritten: {out}/compare.md, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    with ProgramErrors(rank=0) as errors:  # one line, not a traceback, for what a user can get wrong
        code = main()
    sys.exit(errors.exit_code or code)
