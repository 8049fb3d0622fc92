"""Issue 26's longer runs: does CLAPP++DFB catch up with more steps, and does the margin of the trained
encoders over the untrained one keep growing?

    python -m launch.bench.longer --data-root ../shared/data/cifar10 [--jobs 2]   # resumable
    python -m launch.bench.longer --render                                       # table + figure only

The CPU protocol (launch/configs/protocol_cpu.toml: warm-up, then cosine from 1e-3 over the run, probe
on 45k images), seed 0, stretched to more steps with the same schedule shape: clapp_pp_dfb at 2x and 4x
(18,000 and 36,000 steps), clapp_pp, clapp_pp_both and bp_infonce at 3x (27,000). Every run logs every
1,000 steps the activity of 2,000 held-out test images (a ridge probe per block over training:
analysis.logged_probe) and, for the local rules, each block's cosine with the BP gradient of its rule's top
loss (analysis.gradient_alignment). The untrained encoder and the 1x points are the protocol table's
(launch/results/table_protocol.json, seed 0): an untrained encoder does not change with the step count.
"""
from __future__ import annotations

import json
from pathlib import Path

from analysis.gradient_alignment import block_alignment
from analysis.logged_probe import probe_logged_run
from analysis.store import open_run
from launch.bench.study import Study, study_main
from launch.program import run_program

ROOT = Path(__file__).parents[1]  # launch/
STUDY = Study(ROOT / "results" / "longer.json", ROOT / "configs" / "protocol_cpu.toml", 9000)
PROTOCOL = ROOT / "results" / "table_protocol.json"
FIGURE = ROOT / "results" / "longer.png"
MARKERS = ("<!-- longer:start -->", "<!-- longer:end -->")
RUNS = (("clapp_pp_dfb", 2), ("clapp_pp_dfb", 4), ("clapp_pp", 3), ("clapp_pp_both", 3), ("bp_infonce", 3))
EVERY, HELDOUT = 1000, 2000


def cells() -> list[tuple[str, list[str], dict]]:
    found = []
    for rule, times in RUNS:
        align = 0 if rule.startswith("bp_") else EVERY  # end to end: its gradient is BP's own
        found.append((f"{rule}/{times}x", [f"method={rule}", "train.seed=0", f"train.steps={times * STUDY.steps}",
                                           f"log.every={EVERY}", f"log.heldout={HELDOUT}", f"log.align_every={align}"],
                      {"rule": rule, "times": times}))
    return found


def curves(run_dir: Path) -> dict:
    """What a cell keeps of its log: per block, the ridge probe and the BP cosine at every logged step."""
    run = open_run(run_dir)
    probe = probe_logged_run(run)
    kept = {"probe_curves": {str(b): [[int(s), float(a)] for s, a in zip(probe.steps[b], probe.accuracy[b])]
                             for b in probe.steps}}
    if not run.attrs["align_every"]:  # end to end: no local gradient to compare
        return kept
    return {**kept, "alignment_curves": {str(b.block): [[int(s), float(c)] for s, c in zip(b.steps, b.cosine)]
                                         for b in block_alignment(run)}}


def protocol_point(rule: str) -> dict | None:
    """The protocol table's seed-0 cell of `rule` (1x; "random": the untrained encoder)."""
    cell = json.loads(PROTOCOL.read_text())["cells"].get(f"cifar10/{rule}/0") if PROTOCOL.exists() else None
    if cell is None:
        return None
    return {"probe": cell.get("probe_accuracy", cell.get("test_acc")),
            "last": cell.get("last_block_accuracy", cell.get("last_block_acc")),
            "blocks": cell.get("per_block_probe_accuracy", cell.get("per_block_test_acc"))}


def render(results: dict) -> str:
    untrained = protocol_point("random")
    base = untrained["probe"] if untrained else float("nan")
    lines = [f"CIFAR-10 (JPEG q75), the CPU protocol stretched (same warm-up and cosine shape), seed 0; probe on "
             f"45k images: all blocks / last block (%), gain over the untrained encoder ({base:.2f}, protocol "
             "table, seed 0); per block: each block's own probe (%). 1x: the protocol table's seed-0 run.", "",
             "| rule | steps | probe, all / last | gain | per block (0-5) |", "|---|---:|---:|---:|---|"]
    for rule in dict.fromkeys(r for r, _ in RUNS):
        points = [(1, protocol_point(rule))]
        points += [(c["times"], {"probe": c["probe_accuracy"], "last": c["last_block_accuracy"],
                                 "blocks": c["per_block_probe_accuracy"]})
                   for c in sorted(results["cells"].values(), key=lambda c: c["times"]) if c["rule"] == rule]
        for times, point in points:
            if point is None:
                continue
            blocks = " ".join(f"{a:.1f}" for a in point["blocks"])
            lines.append(f"| {rule} | {times * STUDY.steps:,} | {point['probe']:.2f} / {point['last']:.2f} | "
                         f"{point['probe'] - base:+.2f} | {blocks} |")
    return "\n".join(lines)


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 6, figsize=(16, 5.5), sharex=True)
    colours = dict(zip(dict.fromkeys(r for r, _ in RUNS), plt.get_cmap("tab10").colors))
    for key, cell in sorted(results["cells"].items()):
        for row, (name, label) in enumerate((("probe_curves", "ridge probe (%)"),
                                             ("alignment_curves", "cosine with BP"))):
            for block in range(6):
                points = cell.get(name, {}).get(str(block), [])
                ax = axes[row, block]
                if points:
                    steps, values = zip(*points)
                    scale = 100 if row == 0 else 1
                    ax.plot(steps, [v * scale for v in values], color=colours[cell["rule"]],
                            linestyle="-" if cell["times"] < 4 else "--", label=key, linewidth=1)
                ax.set_title(f"block {block}", fontsize=9)
                if block == 0:
                    ax.set_ylabel(label)
                if row == 1:
                    ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("longer runs: held-out ridge probe and alignment with BP per block over training (seed 0)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    # the table has the protocol table's 1x points before any cell of this study
    return study_main(argv, name="longer", doc=__doc__, study=STUDY, cells=cells, render=render, draw=draw,
                      figure=FIGURE, markers=MARKERS, extra=curves, needs_cells=False)


if __name__ == "__main__":
    run_program(main)
