"""laminar's main job: train methods side by side on one config and compare their linear probes.

    python -m launch.compare [CONFIG] [--runs random,clapp_pp,clapp_pp@2,bp_infonce] [--seeds 0] [--set key=value ...]
                             [--out DIR]

A run is a method name; `METHOD@K` runs it layer-parallel on K processes (torchrun, one thread
each); `random` probes the untrained encoder. Each run is its own process (launch.runner),
so its peak memory is its own. A run whose folder already holds a summary.json is not trained
again: an interrupted comparison continues where it stopped. With `random` among the runs, the
table says of each trained run whether it beats the untrained encoder by more than the seed spread
(with one seed, that the spread is unknown). Writes compare.json, compare.md and compare.png into DIR.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from launch.machine import mean_spread
from launch.program import add_config_arguments, run_program
from launch.runner import DEFAULT_CONFIG, launch_run
from sim.errors import ConfigError
from sim.pipeline.placement import PlacementError
from sim.record.summary import RunSummary, finished
from sim.run.config import load_config
from sim.run.plan import make_plan

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


def accuracies(summaries: list[RunSummary], last_block: bool = False) -> list[float]:
    """Each seed's probe accuracy (all blocks, or the last block's)."""
    return [s.probe["per_block_probe_accuracy"][-1] if last_block else s.probe["probe_accuracy"]
            for s in summaries if s.probe]


def verdict(trained: list[float], untrained: list[float]) -> str:
    """Whether `trained` beats `untrained` by more than the seed spread (the larger standard deviation)."""
    if not trained or not untrained:
        return "-"
    difference = statistics.mean(trained) - statistics.mean(untrained)
    if min(len(trained), len(untrained)) < 2:
        return f"{difference:+.2f} points; seed spread unknown (1 seed)"
    spread = max(statistics.stdev(trained), statistics.stdev(untrained))
    beats = "beats it" if difference > spread else "does not beat it"
    return f"{difference:+.2f} points: {beats} by more than the seed spread ({spread:.2f})"


def markdown_table(rows: list[tuple[str, list[RunSummary]]]) -> str:
    untrained = next((accuracies(found) for name, found in rows if name == "random"), [])
    lines = ["| run | method | processes | steps | seeds | images/s | peak memory per process (MiB) "
             "| probe: all blocks (%) | probe: last block (%) | against the untrained encoder |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for name, found in rows:
        s = found[0]
        speed = f"{statistics.mean(r.images_per_s for r in found):.1f}" if s.steps else "-"
        memory = ", ".join(f"{b / 2**20:.0f}" for b in s.peak_memory_bytes) if s.steps else "-"
        against = verdict(accuracies(found), untrained) if name != "random" else "-"
        lines.append(f"| {name} | {s.method} | {s.world_size} | {s.steps} | {len(found)} | {speed} | {memory} | "
                     f"{mean_spread(accuracies(found))} | {mean_spread(accuracies(found, last_block=True))} | "
                     f"{against} |")
    return "\n".join(lines)


def plot(rows: list[tuple[str, list[RunSummary]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, (label, last_block) in enumerate([("all blocks", False), ("last block", True)]):
        values = [statistics.mean(accuracies(found, last_block) or [0]) for _, found in rows]
        bars = left.bar([i + 0.4 * offset for i in range(len(rows))], values, width=0.4, label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks([i + 0.2 for i in range(len(rows))], names)
    left.set_ylabel("linear probe test accuracy (%)")
    left.set_ylim(0, 112)
    left.legend(loc="upper right", ncol=2, fontsize=8)
    trained = [(name, found) for name, found in rows if found[0].steps]
    bars = right.bar([n for n, _ in trained], [statistics.mean(s.images_per_s for s in found) for _, found in trained],
                     color="tab:gray")
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
    parser.add_argument("--seeds", help="comma-separated train.seed values, each run once per seed (default: the "
                        "config's train.seed, once)")
    parser.add_argument("--out", type=Path, help="folder of the comparison (default runs/compare_TIME)")
    args = parser.parse_args(argv)
    seeds: list[int | None] = [None]  # None: the config's own seed
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1")
        if not seeds:
            parser.error("--seeds names no seed; e.g. --seeds 0,1")
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
    rows = []
    for name in names:  # one seed: a folder per run; several: RUN_sSEED
        found = []
        for seed in seeds:
            folder = out / (name.replace("@", "_x") + (f"_s{seed}" if len(seeds) > 1 else ""))
            seeded = args.overrides + ([] if seed is None else [f"train.seed={seed}"])
            found.append(train_run(name, args.config, seeded, folder))
        rows.append((name, found))
    first = configs[names[0]]
    title = f"{first.data.name}, width {first.model.width}, batch {first.train.batch_size}"
    table = markdown_table(rows)
    (out / "compare.md").write_text(f"# {title}\n\n{table}\n")
    runs = {name: [dataclasses.asdict(s) for s in found] for name, found in rows}
    (out / "compare.json").write_text(json.dumps({"title": title, "runs": runs}, indent=2) + "\n")
    plot(rows, out / "compare.png", title)
    print(f"\n{title}\n{table}\n\nwritten: {out}/compare.md, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    run_program(main)
