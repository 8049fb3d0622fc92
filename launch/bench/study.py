"""Studies made of cells, each one run of `launch.train` at a shortened CPU protocol: a cell's result
goes into the study's results file as soon as it ends, so a study resumes where it stopped (a cell cut
short goes on from its last checkpoint), and two invocations (one per core, the second with its cell
list reversed) can fill one file at once.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launch.bench.table import run_at_most
from launch.machine import available_cores, code_version, cpu_name, replace_between_markers
from launch.runner import launch_run, positive
from sim.errors import ConfigError
from sim.record.summary import SUMMARY_NAME
from sim.run.checkpoint import completed_steps
from sim.run.config import load_config

Cell = tuple[str, list[str], dict]  # key, `--set` overrides, fields recorded with the result
CHECKPOINT_EVERY = 500  # steps: a stopped cell loses at most this many (a few MiB a checkpoint at width 1/8)
BENCHMARKS = Path(__file__).resolve().parents[2] / "BENCHMARKS.md"


def add_study_arguments(parser: argparse.ArgumentParser, runs: Path) -> None:
    """The options every study program takes; `runs`: where its run folders go by default."""
    parser.add_argument("--data-root", default="", help="folder of CIFAR-10 (data.root)")
    parser.add_argument("--reverse", action="store_true",
                        help="run the cells from the last: a second invocation beside a first one shares the work")
    parser.add_argument("--jobs", type=positive, default=1, help="cells at once, one thread each (2 on 2 cores)")
    parser.add_argument("--render", action="store_true", help="only render the tables and figures from the results")
    parser.add_argument("--redo", action="store_true", help="run every cell again, even those the results have")
    parser.add_argument("--runs", type=Path, default=runs, help="where the run folders go")


def resumable(out: Path, config: Path, sets: list[str]) -> bool:
    """Whether `out` holds an unfinished run of `config` with `sets` that has a complete checkpoint."""
    if (out / SUMMARY_NAME).exists() or not completed_steps(out):
        return False
    try:
        return load_config(out / "config.toml") == load_config(config, sets)
    except (OSError, ConfigError):  # no config there, or one this version no longer reads: start again
        return False


@dataclass(frozen=True)
class Study:
    results: Path  # the JSON file of every finished cell
    config: Path  # the protocol
    steps: int  # what the protocol is shortened to

    def load(self) -> dict:
        return json.loads(self.results.read_text()) if self.results.exists() else {"cells": {}}

    def save_cell(self, key: str, cell: dict) -> None:
        """Add one finished cell to the results as the file holds them now (another invocation may
        have added cells since this one started)."""
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with open(self.results.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            results = self.load()
            results["cells"][key] = cell
            temporary = self.results.with_suffix(".tmp")
            temporary.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            temporary.replace(self.results)

    def run_cell(self, root: str, overrides: list[str], out: Path) -> dict:
        """One run of the protocol, `steps` steps, with `overrides`; what the tables need of it. A run
        that was stopped (a session's end) goes on from its last checkpoint if `out` holds one of a
        run with these very settings; anything else there is cleared and the run starts again."""
        sets = ["data.name=cifar10", f"data.root={root}", f"train.steps={self.steps}",
                f"train.checkpoint_every={CHECKPOINT_EVERY}", *overrides]
        resume = resumable(out, self.config, sets)
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        began = time.monotonic()
        summary = launch_run(self.config, sets, out, progress=False, resume=resume)
        probe = summary.probe
        return {"steps": summary.steps, "probe_accuracy": probe["probe_accuracy"],
                "last_block_accuracy": probe["per_block_probe_accuracy"][-1],
                "per_block_probe_accuracy": probe["per_block_probe_accuracy"], "images_per_s": summary.images_per_s,
                "free_running": summary.free_running, "run": str(out), "wall_s": round(time.monotonic() - began, 1),
                "code_version": code_version(), "date": time.strftime("%Y-%m-%d"), "resumed": resume,
                "machine": f"{cpu_name()} ({available_cores()} cores)"}

    def run(self, cells: list[Cell], root: str, jobs: int, runs: Path, redo: bool,
            extra: Callable[[Path], dict] | None = None) -> None:
        """Run the cells not yet in the results (checked again before each starts), `jobs` at a time;
        `extra`: what else a cell records, read from its run folder."""
        todo = [c for c in cells if redo or c[0] not in self.load()["cells"]]

        def one(number: int, key: str, sets: list[str], fields: dict) -> None:
            if not redo and key in self.load()["cells"]:
                return  # another invocation did it meanwhile
            print(f"\n== [{number}/{len(todo)}] {key}", flush=True)
            out = runs / key.replace("/", "_")
            result = self.run_cell(root, sets, out)
            self.save_cell(key, {**fields, **result, **(extra(out) if extra else {})})

        run_at_most(jobs, one, [(n, *c) for n, c in enumerate(todo, 1)])


def study_main(argv: list[str] | None, *, name: str, doc: str, study: Study, cells: Callable[[], list[Cell]],
               render: Callable[[dict], str], draw: Callable[[dict, Path], None], figure: Path,
               markers: tuple[str, str], extra: Callable[[Path], dict] | None = None,
               needs_cells: bool = True) -> int:
    """The command line of a study program `launch.bench.NAME`: run the cells the results lack (unless
    --render), then put the table between `markers` in BENCHMARKS.md and draw `figure` (once there are
    cells; with `needs_cells`, no table either before)."""
    parser = argparse.ArgumentParser(prog=f"python -m launch.bench.{name}", description=doc.splitlines()[0])
    add_study_arguments(parser, Path("runs") / name)
    args = parser.parse_args(argv)
    if not args.render:
        found = cells()
        study.run(found[::-1] if args.reverse else found, args.data_root, args.jobs, args.runs, args.redo,
                  extra=extra)
    results = study.load()
    if needs_cells and not results["cells"]:
        print(f"{study.results}: no cells yet")
        return 0
    text = render(results)
    if results["cells"]:
        draw(results, figure)
    replace_between_markers(BENCHMARKS, *markers, text)
    print(f"{text}\n\nresults: {study.results}; figure: {figure}")
    return 0
