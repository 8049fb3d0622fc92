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

Delay cells, in the order they run: each rule at each delay with stashed weights (seed 0), then with
the eligibility trace (`sim.stash = false`; at d = 0 the two are equal bit for bit, tested, so d = 0 runs
once), then seed 1 at d = 0 and the largest d. Async cells: free-running groups with one block slowed
2x or 4x, against lockstep (`async_runs`). Each finished cell goes into DYNAMICS_JSON at once; two
invocations (`--reverse` for the second) share the cells.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from launch.bench.study import Cell, Study, add_study_arguments
from launch.bench.table import SCALES
from launch.machine import mean_spread, replace_between_markers
from launch.program import run_program

ROOT = Path(__file__).parents[1]  # launch/
BENCHMARKS = ROOT.parent / "BENCHMARKS.md"
CONFIG = ROOT / "configs" / "protocol_cpu.toml"
DYNAMICS_JSON = ROOT / "results" / "dynamics.json"
DELAY_FIGURE = ROOT / "results" / "dynamics_delay.png"
ASYNC_FIGURE = ROOT / "results" / "dynamics_async.png"
MARKERS = ("<!-- dynamics-delay:start -->", "<!-- dynamics-delay:end -->")
ASYNC_MARKERS = ("<!-- dynamics-async:start -->", "<!-- dynamics-async:end -->")
STEPS = 2000
RULES = ("clapp_pp_dfb", "clapp_pp_both")
DELAYS = (0, 1, 2, 4, 8, 16, 32)
MODES = {"stash": "sim.stash=true", "trace": "sim.stash=false"}
STUDY = Study(DYNAMICS_JSON, CONFIG, STEPS)


def delay_key(rule: str, delay: int, mode: str, seed: int) -> str:
    return f"delay/{rule}/d{delay}/{mode}/s{seed}"


def delay_cells() -> list[tuple[str, int, str, int]]:
    """(rule, delay, mode, seed) of the delay sweep, in the order they run."""
    first = [(rule, d, "stash", 0) for rule in RULES for d in DELAYS]
    traced = [(rule, d, "trace", 0) for rule in RULES for d in DELAYS if d > 0]
    seeds = [(rule, d, mode, 1) for rule in RULES for d in (0, DELAYS[-1]) for mode in MODES
             if d > 0 or mode == "stash"]
    return first + traced + seeds


def delay_runs() -> list[Cell]:
    return [(delay_key(rule, d, mode, seed),
             [f"method={rule}", f"train.seed={seed}", f"sim.feedback_delay={d}", MODES[mode]],
             {"rule": rule, "delay": d, "mode": mode, "seed": seed}) for rule, d, mode, seed in delay_cells()]


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


# Async against lockstep: one group per block, every block the same time per batch (sim.block_time), block
# STRAGGLER SLOWED times slower. Lockstep learns every batch in the same order whatever the speeds (its
# weights are those of the equal-speed run, which is the pipelined schedule with delayed feedback, bit for
# bit); only its time changes, which the virtual clock gives.
STRAGGLER = 3
ASYNC_BASE = ["sim.schedule=async", "sim.block_time=[1,1,1,1,1,1]"]


def straggler(slowed: int) -> str:
    return "sim.block_speed=[" + ",".join("1" if b != STRAGGLER else str(1 / slowed) for b in range(6)) + "]"


def async_runs() -> list[Cell]:
    cells = []
    for rule in ("clapp_pp_dfb", "clapp_pp"):
        for mailbox, slowed in (("lockstep", 1), ("newest", 2), ("newest", 4), ("fifo", 4)):
            if rule == "clapp_pp" and mailbox == "fifo":
                continue  # without feedback, fifo learns exactly what lockstep learns
            sets = [f"method={rule}", *ASYNC_BASE, f"sim.mailbox={'newest' if mailbox == 'lockstep' else mailbox}"]
            if slowed > 1:
                sets.append(straggler(slowed))
            cells.append((f"async/{rule}/{mailbox}/x{slowed}/s0", sets,
                          {"rule": rule, "mailbox": mailbox, "slowed": slowed, "seed": 0}))
    return cells


def mean_age(histogram: dict) -> float | None:
    count = sum(histogram.values())
    return sum(int(a) * n for a, n in histogram.items()) / count if count else None


def render_async(cells: dict) -> str:
    """The straggler table: time, what each block learned from, context ages, accuracy. (Input ages
    are 0 throughout: `newest` takes the freshest input, and a fifo of depth 1 has no queue.)"""
    lines = [f"Block {STRAGGLER} slowed 2x or 4x; one group per block, equal times per batch otherwise. Time: the "
             "virtual clock's, relative to lockstep with the same straggler (lockstep: every group waits for the "
             f"slowest at every step). CIFAR-10 (JPEG q75), {STEPS} steps of the CPU protocol, seed 0.", "",
             "| rule | mailbox | block 3 | time vs lockstep | batches learned per block | mean context age per block "
             "| probe, all / last block (%) |", "|---|---|---:|---:|---|---|---:|"]
    for key in sorted(cells):
        c = cells[key]
        dynamics = c["free_running"]
        blocks = [dynamics["blocks"][b] for b in sorted(dynamics["blocks"], key=int)]
        lockstep = c["mailbox"] == "lockstep"
        time_text = "1.00" if lockstep else f"{1 / dynamics['speedup_over_lockstep']:.2f}"
        ages = [mean_age(b["context_age"]) for b in blocks]
        lines.append(f"| {c['rule']} | {c['mailbox']} | {c['slowed']}x slower{' (any)' if lockstep else ''} | "
                     f"{time_text} | {' '.join(str(b['batches']) for b in blocks)} | "
                     f"{' '.join('-' if a is None else f'{a:.1f}' for a in ages)} | "
                     f"{c['probe_accuracy']:.2f} / {c['last_block_accuracy']:.2f} |")
    return "\n".join(lines)


def draw_async(cells: dict, path: Path) -> None:
    """Accuracy of each straggler run (all blocks, last block), its time against lockstep on the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every, last = untrained_level()
    ordered = [cells[k] for k in sorted(cells)]
    names = [f"{c['rule']}\n{c['mailbox']} x{c['slowed']}" for c in ordered]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, field, level, title in ((axes[0], "probe_accuracy", every, "all blocks"),
                                    (axes[1], "last_block_accuracy", last, "last block")):
        bars = ax.bar(names, [c[field] for c in ordered],
                      color=["tab:gray" if c["mailbox"] == "lockstep" else "tab:blue" for c in ordered])
        for bar, c in zip(bars, ordered):
            speed = 1.0 if c["mailbox"] == "lockstep" else 1 / c["free_running"]["speedup_over_lockstep"]
            ax.annotate(f"time {speed:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
        if level:
            ax.axhline(statistics.mean(level), color="tab:gray", linestyle=":", label="untrained encoder")
            ax.legend(fontsize=8)
        values = [c[field] for c in ordered] + ([statistics.mean(level)] if level else [])
        ax.set_ylim(min(values) - 5, max(values) + 3)
        ax.set_ylabel(f"probe accuracy, {title} (%)")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"free-running blocks, block {STRAGGLER} slowed; time relative to lockstep (grey bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict) -> str:
    parts = []
    delays = {k: c for k, c in results["cells"].items() if k.startswith("delay/")}
    if delays:
        draw_delay(delays, DELAY_FIGURE)
        parts.append(render_delay(delays))
        replace_between_markers(BENCHMARKS, *MARKERS, parts[-1])
    free = {k: c for k, c in results["cells"].items() if k.startswith("async/")}
    if free:
        draw_async(free, ASYNC_FIGURE)
        parts.append(render_async(free))
        replace_between_markers(BENCHMARKS, *ASYNC_MARKERS, parts[-1])
    return "\n\n".join(parts) or "no cells yet"


PARTS = {"delay": delay_runs, "async": async_runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.bench.dynamics", description=__doc__.splitlines()[0])
    add_study_arguments(parser, Path("runs") / "dynamics")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all", help="which cells to run")
    args = parser.parse_args(argv)
    if not args.render:
        cells = [c for name, make in PARTS.items() if args.part in (name, "all") for c in make()]
        STUDY.run(cells[::-1] if args.reverse else cells, args.data_root, args.jobs, args.runs, args.redo)
    print(render(STUDY.load()))
    print(f"\nresults: {DYNAMICS_JSON}; figures: {DELAY_FIGURE}, {ASYNC_FIGURE}")
    return 0


if __name__ == "__main__":
    run_program(main)
