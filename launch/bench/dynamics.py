"""Issue 24's study: how local learning with top-down feedback lives with feedback delays, with and
without stashed weights (and, once async runs, with free-running blocks).

    python -m launch.bench.dynamics --data-root ../shared/data/cifar10 --jobs 2   # resumable
    python -m launch.bench.dynamics --render                                      # table + figure only

Every cell is one run of `launch.train` on one process (one thread) at the CPU-scale protocol
(`launch/configs/protocol_cpu.toml`, CIFAR-10 JPEG q75, width 1/8, batch 32), shortened to STEPS
steps (the cosine schedule follows the shorter run) so that the study fits its budget; the probe is the
protocol's (10 epochs on all 50,000 training images, scored on the 10,000 test images). The untrained
encoder's level is the protocol table's `random` row (launch/results/table_protocol.json): the probe
of an untrained encoder does not depend on the number of training steps.

Cells, in the order they run: each rule at each delay with stashed weights (seed 0), then with the
eligibility trace (`sim.stash = false`; at d = 0 the two are equal bit for bit, tested, so d = 0 runs
once), then seed 1 at d = 0 and the largest d. Each finished cell goes into DYNAMICS_JSON at once.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from threading import Lock

from launch.bench.table import SCALES, run_at_most
from launch.machine import available_cores, code_version, cpu_name, mean_spread, replace_between_markers
from launch.program import run_program
from launch.runner import launch_run, positive

ROOT = Path(__file__).parents[1]  # launch/
BENCHMARKS = ROOT.parent / "BENCHMARKS.md"
CONFIG = ROOT / "configs" / "protocol_cpu.toml"
DYNAMICS_JSON = ROOT / "results" / "dynamics.json"
DELAY_FIGURE = ROOT / "results" / "dynamics_delay.png"
MARKERS = ("<!-- dynamics-delay:start -->", "<!-- dynamics-delay:end -->")
STEPS = 2000
RULES = ("clapp_pp_dfb", "clapp_pp_both")
DELAYS = (0, 1, 2, 4, 8, 16, 32)
MODES = {"stash": "sim.stash=true", "trace": "sim.stash=false"}


def delay_key(rule: str, delay: int, mode: str, seed: int) -> str:
    return f"delay/{rule}/d{delay}/{mode}/s{seed}"


def delay_cells() -> list[tuple[str, int, str, int]]:
    """(rule, delay, mode, seed) of the delay sweep, in the order they run."""
    first = [(rule, d, "stash", 0) for rule in RULES for d in DELAYS]
    traced = [(rule, d, "trace", 0) for rule in RULES for d in DELAYS if d > 0]
    seeds = [(rule, d, mode, 1) for rule in RULES for d in (0, DELAYS[-1]) for mode in MODES
             if d > 0 or mode == "stash"]
    return first + traced + seeds


def load() -> dict:
    return json.loads(DYNAMICS_JSON.read_text()) if DYNAMICS_JSON.exists() else {"cells": {}}


def save(results: dict) -> None:
    DYNAMICS_JSON.parent.mkdir(parents=True, exist_ok=True)
    temporary = DYNAMICS_JSON.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    temporary.replace(DYNAMICS_JSON)


def run_delay_cell(root: str, rule: str, delay: int, mode: str, seed: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    sets = ["data.name=cifar10", f"data.root={root}", f"method={rule}", f"train.seed={seed}",
            f"train.steps={STEPS}", f"sim.feedback_delay={delay}", MODES[mode]]
    began = time.monotonic()
    summary = launch_run(CONFIG, sets, out, progress=False)
    probe = summary.probe
    return {"rule": rule, "delay": delay, "mode": mode, "seed": seed, "steps": summary.steps,
            "probe_accuracy": probe["probe_accuracy"], "last_block_accuracy": probe["per_block_probe_accuracy"][-1],
            "per_block_probe_accuracy": probe["per_block_probe_accuracy"], "images_per_s": summary.images_per_s,
            "run": str(out), "wall_s": round(time.monotonic() - began, 1), "code_version": code_version(),
            "date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()} ({available_cores()} cores)"}


def untrained_level() -> tuple[list[float], list[float]]:
    """The protocol table's untrained encoder: probe accuracies over its seeds, all blocks and last block."""
    cells = json.loads(SCALES["protocol"].results.read_text())["cells"] if SCALES["protocol"].results.exists() else {}
    random = [c for k, c in cells.items() if k.startswith("cifar10/random/")]
    return [c["test_acc"] for c in random], [c["last_block_acc"] for c in random]


def delay_points(cells: dict, rule: str, mode: str, field: str) -> list[tuple[int, list[float]]]:
    """(delay, values over seeds) of one rule and mode; d = 0 is shared by both modes."""
    points = []
    for d in DELAYS:
        found = [c[field] for c in cells.values()
                 if c.get("rule") == rule and c["delay"] == d and (c["mode"] == mode or d == 0)]
        if found:
            points.append((d, found))
    return points


def render_delay(cells: dict) -> str:
    every, last = untrained_level()
    lines = [f"CIFAR-10 (JPEG q75), {STEPS} steps of the CPU protocol, one process; probe accuracy (%), all blocks "
             "/ last block (mean ± sd where 2 seeds). Untrained encoder: "
             f"{mean_spread(every, ' (1 seed)') if every else '-'} / "
             f"{mean_spread(last, ' (1 seed)') if last else '-'}.",
             "", "| rule | weights | " + " | ".join(f"d = {d}" for d in DELAYS) + " |",
             "|---|---|" + "---:|" * len(DELAYS)]
    for rule in RULES:
        for mode in MODES:
            every = dict(delay_points(cells, rule, mode, "probe_accuracy"))
            last = dict(delay_points(cells, rule, mode, "last_block_accuracy"))
            row = [f"{mean_spread(every[d], '')} / {mean_spread(last[d], '')}" if d in every else "-" for d in DELAYS]
            lines.append(f"| {rule} | {mode} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def draw_delay(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every, last = untrained_level()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, field, level, title in ((axes[0], "probe_accuracy", every, "all blocks"),
                                    (axes[1], "last_block_accuracy", last, "last block")):
        for rule, colour in zip(RULES, ("tab:blue", "tab:green")):
            for mode, style in (("stash", "-"), ("trace", "--")):
                points = delay_points(cells, rule, mode, field)
                if points:
                    ax.errorbar([d for d, _ in points], [statistics.mean(v) for _, v in points],
                                yerr=[statistics.stdev(v) if len(v) > 1 else 0 for _, v in points], color=colour,
                                linestyle=style, marker="o", capsize=3, label=f"{rule}, {mode}")
        if level:
            ax.axhline(statistics.mean(level), color="tab:gray", linestyle=":", label="untrained encoder")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(list(DELAYS), [str(d) for d in DELAYS])
        ax.set_xlabel("feedback delay d (steps)")
        ax.set_ylabel(f"probe accuracy, {title} (%)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"top-down feedback d steps late, CIFAR-10 (JPEG q75), {STEPS} steps, width 1/8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_delays(root: str, jobs: int, runs: Path, redo: bool) -> None:
    results, lock = load(), Lock()
    todo = [c for c in delay_cells() if redo or delay_key(*c) not in results["cells"]]

    def one(number: int, rule: str, delay: int, mode: str, seed: int) -> None:
        print(f"\n== [{number}/{len(todo)}] {rule} d={delay} {mode} seed {seed}", flush=True)
        cell = run_delay_cell(root, rule, delay, mode, seed, runs / f"{rule}_d{delay}_{mode}_s{seed}")
        with lock:
            results["cells"][delay_key(rule, delay, mode, seed)] = cell
            save(results)  # each finished cell is kept, whatever happens next

    run_at_most(jobs, one, [(n, *c) for n, c in enumerate(todo, 1)])


def render(results: dict) -> str:
    cells = {k: c for k, c in results["cells"].items() if k.startswith("delay/")}
    if not cells:
        return "no delay cells yet"
    draw_delay(cells, DELAY_FIGURE)
    table = render_delay(cells)
    replace_between_markers(BENCHMARKS, *MARKERS, table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.dynamics", description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="", help="folder of CIFAR-10 (data.root)")
    parser.add_argument("--jobs", type=positive, default=1, help="cells at once, one thread each (2 on 2 cores)")
    parser.add_argument("--render", action="store_true", help="only render the table and figure from the results")
    parser.add_argument("--redo", action="store_true", help="run every cell again, even those the results have")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "dynamics", help="where the run folders go")
    args = parser.parse_args(argv)
    if not args.render:
        run_delays(args.data_root, args.jobs, args.runs / "delay", args.redo)
    print(render(load()))
    print(f"\nresults: {DYNAMICS_JSON}; figure: {DELAY_FIGURE}")
    return 0


if __name__ == "__main__":
    run_program(main)
