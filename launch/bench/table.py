"""The reproduction table: every method trained and probed at CPU scale, over seeds, next to the paper.

    python -m launch.bench.table --data cifar10 --data-root ../shared/data/cifar10
    python -m launch.bench.table --scale protocol --data cifar10 --data-root ../shared/data/cifar10 --jobs 2
    python -m launch.bench.table --data fashion_mnist
    python -m launch.bench.table --render            # only rebuild BENCHMARKS.md's table and the chart

Two scales, each with its config, results file, chart and place in BENCHMARKS.md:
- short: launch/configs/table_cpu.toml (600 steps, constant lr 2e-4), launch/results/table.json;
- protocol: launch/configs/protocol_cpu.toml (9,000 steps, cosine from 1e-3: the protocol chosen on a
  validation split by launch.bench.protocol_search), launch/results/table_protocol.json. At this scale
  seed 0 of the figure's rows (FIGURE_ROWS) also logs held-out activity every LOG_EVERY steps,
  for the probe-over-training figure (`python -m analysis curves`).

Each cell (dataset, row, seed) is one run of `launch.train` (on 2 processes for the layer-parallel
row); its result is added to the results file as soon as it finishes, so a table can be completed over
several invocations and re-rendered without training. `--jobs 2` runs two one-process cells at once
(one thread each); a 2-process cell runs alone.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from threading import Lock

from launch.machine import available_cores, code_version, cpu_name, mean_spread, replace_between_markers
from launch.program import run_program
from launch.runner import launch_run, positive

ROOT = Path(__file__).parents[1]  # launch/
BENCHMARKS = ROOT.parent / "BENCHMARKS.md"


@dataclass(frozen=True)
class Scale:
    """One budget of the table: what it trains with, where its results go, and its markers in BENCHMARKS.md."""
    config: Path
    results: Path
    chart: Path
    marker: str
    logged_rows: tuple[str, ...] = ()  # rows whose seed 0 also logs held-out activity

    @property
    def start(self) -> str:
        return f"<!-- {self.marker}:start -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.marker}:end -->"


FIGURE_ROWS = ("clapp_pp", "clapp_pp_dfb@2 delayed", "bp_infonce")
LOG_EVERY, LOG_HELDOUT = 500, 2000
SCALES = {
    "short": Scale(ROOT / "configs" / "table_cpu.toml", ROOT / "results" / "table.json",
                   ROOT / "results" / "table.png", "table"),
    "protocol": Scale(ROOT / "configs" / "protocol_cpu.toml", ROOT / "results" / "table_protocol.json",
                      ROOT / "results" / "table_protocol.png", "table-protocol", FIGURE_ROWS),
}
# Row name -> overrides; "@2" rows run layer-parallel on 2 processes (1 thread each).
ROWS = {
    "random": ["method=clapp_pp", "train.steps=0", "train.epochs=0"],
    "clapp": ["method=clapp"],
    "clapp_pp": ["method=clapp_pp"],
    "clapp_pp_dfb": ["method=clapp_pp_dfb"],
    "clapp_pp_both": ["method=clapp_pp_both"],
    "bp_clapp_pp": ["method=bp_clapp_pp"],
    "bp_infonce": ["method=bp_infonce"],
    "ff": ["method=ff"],
    "infonce_local": ["method=infonce_local"],
    "scff": ["method=scff"],
    "clapp_pp_dfb@2 delayed": ["method=clapp_pp_dfb", "sim.feedback=delayed", "sim.schedule=pipelined",
                               "train.threads=1"],
}
# Linear-probe top-1 % at full scale (300 epochs, width 1.0) from the paper, CIFAR-10 column (its scff row
# quotes Chen et al.'s SCFF).
PAPER = {"cifar10": {"bp_infonce": 80.69, "bp_clapp_pp": 80.49, "clapp_pp": 80.51, "clapp_pp_dfb": 80.65,
                     "clapp_pp_both": 81.18, "clapp": 73.21, "scff": 80.60}}
LABELS = {"cifar10": "CIFAR-10 (JPEG q75)", "fashion_mnist": "Fashion-MNIST"}


def load_results(scale: Scale) -> dict:
    return json.loads(scale.results.read_text()) if scale.results.exists() else {"cells": {}}


def save_results(scale: Scale, results: dict) -> None:
    scale.results.parent.mkdir(parents=True, exist_ok=True)
    temporary = scale.results.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    temporary.replace(scale.results)


def processes_of(row: str) -> int:
    return 2 if row.endswith("@2 delayed") else 1


def run_cell(scale: Scale, dataset: str, root: str, row: str, seed: int, logged: bool, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sets = [f"data.name={dataset}", f"data.root={root}", f"train.seed={seed}", *ROWS[row]]
    if logged:
        sets += [f"log.every={LOG_EVERY}", f"log.heldout={LOG_HELDOUT}", "log.align_every=0"]
    began = time.monotonic()
    summary = launch_run(scale.config, sets, out, processes=processes_of(row), progress=False)
    probe = summary.probe
    if probe.get("scored_on", "test") != "test":
        raise ValueError(f"{out}: its probe was scored on {probe['scored_on']} images; the table reports test accuracy")
    return {"test_acc": probe["probe_accuracy"], "last_block_acc": probe["per_block_probe_accuracy"][-1],
            "per_block_test_acc": probe["per_block_probe_accuracy"], "images_per_s": summary.images_per_s,
            "peak_memory_bytes": summary.peak_memory_bytes, "steps": summary.steps, "logged": logged,
            "run": str(out), "wall_s": round(time.monotonic() - began, 1),
            "world_size": summary.world_size, "code_version": code_version(), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{cpu_name()} ({available_cores()} cores)"}


def cell_key(dataset: str, row: str, seed: int) -> str:
    return f"{dataset}/{row}/{seed}"


def row_cells(cells: dict, dataset: str, row: str) -> list[dict]:
    """The finished cells of one row, in seed order."""
    return [cells[k] for k in sorted(cells) if k.startswith(f"{dataset}/{row}/")]


def render(results: dict) -> str:
    """The markdown tables of every dataset present in `results`."""
    cells = results["cells"]
    datasets = sorted({key.split("/")[0] for key in cells})
    parts = []
    for dataset in datasets:
        paper = PAPER.get(dataset, {})
        lines = [f"### {LABELS.get(dataset, dataset)}", "",
                 "| method | probe, all blocks (%) | probe, last block (%) | images/s | peak memory (MiB) | seeds "
                 "| paper, full scale (%) |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for row in ROWS:
            found = row_cells(cells, dataset, row)
            if not found:
                continue
            quiet = [c for c in found if not c.get("logged")] or found  # a logged cell also writes its log
            speed = statistics.mean(c["images_per_s"] for c in quiet) if found[0]["steps"] else None
            memory = statistics.mean(max(c["peak_memory_bytes"]) for c in quiet) / 2**20
            paper_value = paper.get(row.split("@")[0]) if "@" not in row else None
            logged = " (log on)" if quiet[0].get("logged") else ""  # only logged cells: their cost is in both
            lines.append(f"| {row} | {mean_spread([c['test_acc'] for c in found], ' (1 seed)')} | "
                         f"{mean_spread([c['last_block_acc'] for c in found], ' (1 seed)')} | "
                         f"{'-' if speed is None else f'{speed:.0f}'}{logged} | "
                         f"{memory:.0f}{logged} | {len(found)} | "
                         f"{'-' if paper_value is None else f'{paper_value:.2f}'} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cells = results["cells"]
    datasets = sorted({key.split("/")[0] for key in cells})
    kinds = {"untrained encoder": "tab:gray", "local learning": "tab:blue", "BP-SSL": "tab:red"}
    fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in ROWS if row_cells(cells, dataset, r)]
        values = [[c["test_acc"] for c in row_cells(cells, dataset, r)] for r in rows]
        means = [statistics.mean(v) for v in values]
        errors = [statistics.stdev(v) if len(v) > 1 else 0 for v in values]
        colours = [kinds["untrained encoder"] if r == "random" else kinds["BP-SSL"] if r.startswith("bp")
                   else kinds["local learning"] for r in rows]
        ax.bar(rows, means, yerr=errors, color=colours, capsize=3)
        if "random" in rows:  # the line every trained method is expected to clear
            ax.axhline(means[rows.index("random")], color=kinds["untrained encoder"], linestyle="--", linewidth=1)
        ax.set_ylim(min(means) - 5, max(means) + 3)
        ax.set_ylabel("probe accuracy, all blocks (%)")
        ax.set_title(LABELS.get(dataset, dataset))
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    axes[0][0].legend(handles=[Patch(color=c, label=k) for k, c in kinds.items()], fontsize=8, loc="upper left")
    fig.suptitle("linear probe test accuracy at CPU scale, mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_cells(scale: Scale, dataset: str, root: str, todo: list[tuple[str, int]], jobs: int, runs: Path) -> None:
    """Run the `todo` cells, `jobs` one-process cells at a time, a 2-process cell alone; each finished
    cell goes into the results file at once."""
    lock = Lock()

    def one(number: int, row: str, seed: int) -> None:
        print(f"\n== [{number}/{len(todo)}] {dataset} / {row} / seed {seed}", flush=True)
        logged = row in scale.logged_rows and seed == 0
        cell = run_cell(scale, dataset, root, row, seed, logged, runs / dataset / f"{row.replace(' ', '_')}_s{seed}")
        key = cell_key(dataset, row, seed)
        with lock:
            results = load_results(scale)  # as the file holds them now: another invocation may have added cells
            if key in results["cells"]:
                print(f"{key}: probe accuracy {results['cells'][key]['test_acc']:.2f} % before, "
                      f"{cell['test_acc']:.2f} % now (the old cell is replaced)", flush=True)
            results["cells"][key] = cell
            save_results(scale, results)  # each finished cell is kept, whatever happens next

    numbered = list(enumerate(todo, 1))
    for seed in sorted({seed for _, seed in todo}):  # every row of a seed before the next seed
        wide = [(n, r, s) for n, (r, s) in numbered if s == seed and processes_of(r) > 1]
        narrow = [(n, r, s) for n, (r, s) in numbered if s == seed and processes_of(r) == 1]
        for cell in wide:
            one(*cell)
        run_at_most(jobs, one, narrow)


def run_at_most(jobs: int, work: Callable[..., None], cells: list[tuple]) -> None:
    """work(*cell) for every cell, `jobs` at a time; after a failure no new cell starts, the running
    ones finish (their results are kept), then the failure is raised."""
    pending, running, failure = list(cells), set(), None
    with ThreadPoolExecutor(jobs) as pool:  # each cell is its own process: the threads only wait
        while running or (pending and failure is None):
            while pending and failure is None and len(running) < jobs:
                running.add(pool.submit(work, *pending.pop(0)))
            done, running = wait(running, return_when=FIRST_COMPLETED)
            errors = [d.exception() for d in done if d.exception() is not None]
            if errors and failure is None:
                failure = errors[0]
                print(f"a cell failed ({failure}); no other cell starts" + (", the running one finishes and is kept"
                      if running else ""), file=sys.stderr, flush=True)
    if failure is not None:
        raise failure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.table", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="short",
                        help="short: 600 steps at the paper's constant lr; protocol: the CPU-scale protocol")
    parser.add_argument("--data", choices=sorted(LABELS), help="dataset to train on")
    parser.add_argument("--data-root", default="", help="folder of the dataset (data.root)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows of the table to run")
    parser.add_argument("--jobs", type=positive, default=1,
                        help="one-process cells run at once, one thread each (2 on 2 cores)")
    parser.add_argument("--render", action="store_true", help="only render the table from the results file")
    parser.add_argument("--redo", action="store_true",
                        help="run the chosen cells again even if the results file has them (e.g. after a code change)")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "table", help="where the run folders go")
    args = parser.parse_args(argv)
    scale = SCALES[args.scale]
    if not args.render:
        if args.data is None:
            parser.error("--data is required unless --render")
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown:
            parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            parser.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,1,2")
        done = load_results(scale)["cells"]
        todo = [(r, seed) for seed in seeds for r in rows if args.redo or cell_key(args.data, r, seed) not in done]
        run_cells(scale, args.data, args.data_root, todo, args.jobs, args.runs / args.scale)
    results = load_results(scale)
    if not results["cells"]:
        print(f"{scale.results}: no cells yet; run some with --data")
        return 0
    table = render(results)
    chart(results, scale.chart)
    print(table)
    written = replace_between_markers(BENCHMARKS, scale.start, scale.end, table)
    print(f"\nresults: {scale.results}; chart: {scale.chart}"  # a page without the markers was named above
          + (f"; table written into {BENCHMARKS}" if written else ""))
    return 0


if __name__ == "__main__":
    run_program(main)
