"""laminar's main job: train methods side by side on one config and compare their linear probes.

    python -m launch.compare [CONFIG] [--runs random,clapp_pp,clapp_pp@2,bp_infonce] [--seeds 0] [--set key=value ...]
                             [--out DIR]

A run is a method name; `METHOD@K` runs it layer-parallel on K processes (torchrun, one thread
each); `random` probes the untrained encoder. Each run is its own process (launch.runner),
so its peak memory is its own. A run whose folder already holds a summary.json is not trained
again: an interrupted comparison continues where it stopped. With `random` among the runs, the
table says of each trained run whether it beats the untrained encoder by more than the seed spread
(with one seed, that the spread is unknown). A one-process run of a method that also runs as METHOD@K
is its reference: it runs with one thread, as each rank does (float sums depend on the thread count),
and the table says whether the two ended with the same weights, from their final.pt files. Writes
compare.json, compare.md and compare.png (each trained run's gain over the untrained encoder) into DIR.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from launch.machine import mean_spread
from launch.program import add_config_arguments, run_program
from launch.runner import DEFAULT_CONFIG, launch_run
from sim.errors import ConfigError
from sim.pipeline.placement import PlacementError
from sim.record.summary import RunSummary, finished
from sim.run.checkpoint import FINAL
from sim.run.config import load_config
from sim.run.plan import make_plan

# A run name is a method name, or "random": the encoder as initialised, probed without training.
RUN_OVERRIDES = {"random": ["method=clapp_pp", "train.steps=0", "train.epochs=0"]}


def run_overrides(name: str, names: Sequence[str] = ()) -> list[str]:
    """The settings of run `name`; one thread per process for METHOD@K and for the one-process run of a
    method that `names` also runs as METHOD@K (its reference: the same weights, bit for bit)."""
    method, _, processes = name.partition("@")
    reference = any(other.partition("@")[0] == method and other.partition("@")[2] for other in names)
    one_thread = ["train.threads=1"] if processes or reference else []
    return RUN_OVERRIDES.get(method, [f"method={method}"]) + one_thread


def run_folder(out: Path, name: str, seed: int | None, seeds: int) -> Path:
    """One seed: a folder per run; several: RUN_sSEED."""
    return out / (name.replace("@", "_x") + (f"_s{seed}" if seeds > 1 else ""))


def same_weights(parallel: Path, reference: Path) -> str:
    """Whether two runs ended with the same weights: 'yes', or 'no, max |dW| = ...'."""
    a, b = (torch.load(folder / FINAL, weights_only=True) for folder in (parallel, reference))
    largest = max((x - b[block][key]).abs().max().item() for block, state in a.items() for key, x in state.items())
    return "yes" if largest == 0 else f"no, max |dW| = {largest:.2g}"


def train_run(name: str, names: Sequence[str], config: Path, overrides: list[str], folder: Path) -> RunSummary:
    """Run `name` into `folder`, unless a finished run is there already."""
    if finished(folder):
        return RunSummary.read(folder)
    processes = int(name.partition("@")[2] or 1)
    return launch_run(config, [*overrides, *run_overrides(name, names)], folder, processes=processes)


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


def markdown_table(rows: list[tuple[str, list[RunSummary]]], weights: dict[str, str] | None = None) -> str:
    """The table; `weights`: per METHOD@K run, whether it ended with its one-process reference's weights."""
    untrained = next((accuracies(found) for name, found in rows if name == "random"), [])
    weights = weights or {}
    lines = ["| run | method | processes | threads | steps | seeds | images/s | peak memory per process (MiB) "
             "| probe: all blocks (%) | probe: last block (%) | against the untrained encoder |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for name, found in rows:
        s = found[0]
        speed = f"{statistics.mean(r.images_per_s for r in found):.1f}" if s.steps else "-"
        memory = ", ".join(f"{b / 2**20:.0f}" for b in s.peak_memory_bytes) if s.steps else "-"
        against = verdict(accuracies(found), untrained) if name != "random" else "-"
        lines.append(f"| {name} | {s.method} | {s.world_size} | {s.threads} | {s.steps} | {len(found)} | {speed} | "
                     f"{memory} | {mean_spread(accuracies(found))} | {mean_spread(accuracies(found, last_block=True))} "
                     f"| {against} |")
    lines += [f"\n{name} ends with the weights of {name.partition('@')[0]} in one process (one thread): {answer}"
              for name, answer in weights.items()]
    return "\n".join(lines)


def plot(rows: list[tuple[str, list[RunSummary]]], path: Path, title: str) -> None:
    """Left: what the table says, each trained run's probe accuracy minus the untrained encoder's (mean
    over seeds, the seed spread as an error bar), or the accuracy itself without a `random` run; right:
    throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    untrained = {last: accuracies(found, last) for name, found in rows if name == "random" for last in (False, True)}
    trained = [(name, found) for name, found in rows if found[0].steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for offset, (label, last_block) in enumerate([("all blocks", False), ("last block", True)]):
        values, errors = [], []
        for _, found in trained:
            found_values = accuracies(found, last_block) or [float("nan")]
            base = statistics.mean(untrained[last_block]) if untrained else 0.0
            values.append(statistics.mean(found_values) - base)
            errors.append(statistics.stdev(found_values) if len(found_values) > 1 else 0.0)
        bars = left.bar([i + 0.4 * offset for i in range(len(trained))], values, width=0.4, yerr=errors, capsize=3,
                        label=label)
        left.bar_label(bars, fmt="%+.2f" if untrained else "%.1f", fontsize=8)
    left.set_xticks([i + 0.2 for i in range(len(trained))], [name for name, _ in trained])
    if untrained:
        left.axhline(0, color="black", linewidth=0.8)
        left.set_ylabel("probe accuracy - untrained encoder's (points)")
    else:
        left.set_ylabel("linear probe test accuracy (%)")
    left.legend(fontsize=8)
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
        configs = {name: load_config(args.config, args.overrides + run_overrides(name, names)) for name in names}
        for name, config in configs.items():
            make_plan(config, int(name.partition("@")[2] or 1))
    except (ConfigError, PlacementError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"compare_{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    for name in names:
        found = []
        for seed in seeds:
            seeded = args.overrides + ([] if seed is None else [f"train.seed={seed}"])
            found.append(train_run(name, names, args.config, seeded, run_folder(out, name, seed, len(seeds))))
        rows.append((name, found))
    references = {name: name.partition("@")[0] for name in names if "@" in name and name.partition("@")[0] in names}
    weights = {name: ", ".join(same_weights(run_folder(out, name, seed, len(seeds)),
                                            run_folder(out, reference, seed, len(seeds))) for seed in seeds)
               for name, reference in references.items()}
    first = configs[names[0]]
    title = f"{first.data.name}, width {first.model.width}, batch {first.train.batch_size}"
    table = markdown_table(rows, weights)
    (out / "compare.md").write_text(f"# {title}\n\n{table}\n")
    runs = {name: [dataclasses.asdict(s) for s in found] for name, found in rows}
    (out / "compare.json").write_text(json.dumps({"title": title, "runs": runs}, indent=2) + "\n")
    plot(rows, out / "compare.png", title)
    print(f"\n{title}\n{table}\n\nwritten: {out}/compare.md, compare.json, compare.png")
    return 0


if __name__ == "__main__":
    run_program(main)
