"""Issue 26's alignment study: do the local rules whose updates point where backprop's do learn better?

    python -m launch.bench.alignment --data-root ../shared/data/cifar10                # resumable
    python -m launch.bench.alignment --data-root ../shared/data/cifar10 --reverse      # beside it, the other core
    python -m launch.bench.alignment --render                                          # table + figure only

Every local rule, 2 seeds, at the full CPU protocol (9,000 steps, launch/configs/protocol_cpu.toml),
logging every 500 steps the pair (local gradient, BP gradient) of every block's convolution
(log.align_every). The BP reference is the gradient of the top block's loss of the same rule,
back-propagated through every block on the same batch and negatives (sim.pipeline.recording's
AlignmentPass): for the CLAPP family that is the paper's comparison, BP of the CLAPP-type loss at the
top; for the others (ff, infonce_local, scff) it is end-to-end training of the rule's own objective,
the only BP counterpart each has. A block's alignment: the mean cosine of its pairs over the second
half of training (steps >= 4,500), both seeds' pairs pooled, with a 95 % interval (analysis
gradient_alignment). A rule's: the mean over blocks 0-4 (the top block's cosine is 1 by
construction). The rank correlation of rule-and-seed alignment with probe accuracy has a two-sided
permutation p-value (100,000 seeded permutations; no scipy needed).
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from analysis.gradient_alignment import Z95, block_alignment
from analysis.store import open_run
from launch.bench.study import Study, study_main
from launch.program import run_program

ROOT = Path(__file__).parents[1]  # launch/
STUDY = Study(ROOT / "results" / "alignment.json", ROOT / "configs" / "protocol_cpu.toml", 9000)
FIGURE = ROOT / "results" / "alignment.png"
MARKERS = ("<!-- alignment:start -->", "<!-- alignment:end -->")
RULES = ("clapp", "clapp_pp", "clapp_pp_dfb", "clapp_pp_both", "ff", "infonce_local", "scff")
SEEDS = (0, 1)
EVERY = 500
BELOW_TOP = 5  # blocks 0-4: the top block's pair is the same gradient twice


def cells() -> list[tuple[str, list[str], dict]]:
    return [(f"{rule}/s{seed}", [f"method={rule}", f"train.seed={seed}", f"log.every={EVERY}",
                                 f"log.align_every={EVERY}", "log.heldout=64"], {"rule": rule, "seed": seed})
            for seed in SEEDS for rule in RULES]


def second_half_cosines(run_dir: Path) -> dict:
    """What a cell keeps of its log: each block's cosines from the second half of training on."""
    run = open_run(run_dir)
    half = STUDY.steps // 2
    return {"cosines": {str(b.block): [float(c) for s, c in zip(b.steps, b.cosine) if s >= half and np.isfinite(c)]
                        for b in block_alignment(run)}}


def ranks(values: list[float]) -> np.ndarray:
    """Rank of each value from 0, ties given their mean rank."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation: Pearson's correlation of the ranks."""
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def permutation_p(x: list[float], y: list[float], permutations: int = 100_000, seed: int = 0) -> float:
    """Two-sided: the share of shuffled pairings whose |rank correlation| reaches the observed one."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean()), (ry - ry.mean()) / np.linalg.norm(ry - ry.mean())
    shuffled = np.random.default_rng(seed).permuted(np.tile(ry, (permutations, 1)), axis=1)  # (permutations, n)
    hits = int((np.abs(shuffled @ rx) >= abs(float(rx @ ry)) - 1e-12).sum())
    return (hits + 1) / (permutations + 1)


def rule_points(results: dict) -> list[dict]:
    """One point per cell: its rule, seed, probe accuracy and mean alignment over blocks 0-4."""
    points = []
    for cell in results["cells"].values():
        means = [statistics.fmean(c) for b, c in cell["cosines"].items() if int(b) < BELOW_TOP and c]
        if means:
            points.append({"rule": cell["rule"], "seed": cell["seed"], "probe": cell["probe_accuracy"],
                           "alignment": statistics.fmean(means)})
    return points


def render(results: dict) -> str:
    cells = results["cells"]
    rules = [r for r in RULES if any(c["rule"] == r for c in cells.values())]
    lines = [f"CIFAR-10 (JPEG q75), the CPU protocol ({STUDY.steps:,} steps); cosine between each block's local "
             f"gradient and the BP gradient of the rule's top loss, every {EVERY} steps, mean over steps >= "
             f"{STUDY.steps // 2:,} with both seeds' pairs pooled (± 95 % interval); probe: all blocks, mean of the "
             "seeds.", "", "| rule | " + " | ".join(f"block {b}" for b in range(BELOW_TOP)) + " | probe (%) |",
             "|---|" + "---:|" * (BELOW_TOP + 1)]
    for rule in rules:
        own = [c for c in cells.values() if c["rule"] == rule]
        row = []
        for block in range(BELOW_TOP):
            pairs = [v for c in own for v in c["cosines"].get(str(block), [])]
            width = Z95 * statistics.stdev(pairs) / len(pairs) ** 0.5 if len(pairs) > 1 else float("nan")
            row.append(f"{statistics.fmean(pairs):+.3f} ± {width:.3f}" if pairs else "-")
        probe = statistics.fmean(c["probe_accuracy"] for c in own)
        lines.append(f"| {rule} | " + " | ".join(row) + f" | {probe:.2f} ({len(own)} seed{'s' * (len(own) > 1)}) |")
    points = rule_points(results)
    if len(points) >= 4:
        x, y = [p["alignment"] for p in points], [p["probe"] for p in points]
        lines += ["", f"Rank correlation of mean alignment (blocks 0-{BELOW_TOP - 1}) with probe accuracy over "
                      f"{len(points)} runs: {spearman(x, y):+.3f}, permutation p = {permutation_p(x, y):.4f}."]
    return "\n".join(lines)


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = rule_points(results)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colours = dict(zip(RULES, plt.get_cmap("tab10").colors))
    for rule in RULES:
        own = [p for p in points if p["rule"] == rule]
        if own:
            ax.scatter([p["alignment"] for p in own], [p["probe"] for p in own], color=colours[rule], label=rule)
    if len(points) >= 4:
        x, y = [p["alignment"] for p in points], [p["probe"] for p in points]
        ax.set_title(f"rank correlation {spearman(x, y):+.2f} (permutation p = {permutation_p(x, y):.3f})",
                     fontsize=9)
    ax.set_xlabel(f"mean cosine with BP, blocks 0-{BELOW_TOP - 1}, second half of training")
    ax.set_ylabel("linear probe, all blocks (%)")
    ax.legend(fontsize=8)
    fig.suptitle("alignment with BP-SSL against accuracy, one point per rule and seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return study_main(argv, name="alignment", doc=__doc__, study=STUDY, cells=cells, render=render, draw=draw,
                      figure=FIGURE, markers=MARKERS, extra=second_half_cosines)


if __name__ == "__main__":
    run_program(main)
