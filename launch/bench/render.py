"""The benchmark's readable outputs: a markdown table and a bar chart."""
from __future__ import annotations

from pathlib import Path


def markdown(result: dict) -> str:
    k, m = result["world_size"], result["microbatches"]
    machine = result["machine"]
    lines = [f"{result['dataset']}, width {result['width']}, batch {result['batch_size']}, {result['steps']} steps, "
             f"K = {k}, M = {m} micro-batches; {machine['cuda'] or machine['cpu']} ({machine['cores']} cores), "
             f"torch {machine['torch']}, {result['date']}", "",
             "| run | processes x threads | images/s | predicted | peak memory per process (MiB) "
             "| busy / idle per rank (s) |",
             "|---|---|---:|---:|---|---|"]
    predictions = result["cost_model"]["runs"]
    for run in result["runs"]:
        memory = ", ".join(f"{b / 2**20:.0f}" for b in run["peak_memory_bytes"])
        ranks = "; ".join(f"{r['busy_s']:.1f} / {r['idle_s']:.1f}" for r in run["ranks"])
        lines.append(f"| {run['name']} | {run['world_size']} x {run['threads_per_process']} | "
                     f"{run['images_per_s']:.1f} | {predictions[run['name']]['predicted']:.1f} | {memory} | {ranks} |")
    ratios, bounds = result["ratios"], result["analytic_bounds"]
    lines += ["", "| ratio | measured | analytic bound |", "|---|---:|---:|"]
    for name, value in ratios.items():
        bound = bounds.get(name)
        lines.append(f"| {name} | {value:.3f} | {'-' if bound is None else f'{bound:.3f}'} |")
    lines += ["", f"Best BP pipeline: {result['best_bp_pipeline']}. Flushed BP pipelines idle (K - 1) of every "
              f"M + K - 1 slots, so local SSL's ceiling against them is (M + K - 1) / M = "
              f"{bounds['local_parallel_vs_bp_pipeline']:.2f}.",
              f"Peak memory, largest local-parallel process / BP single process: "
              f"{result['memory_local_parallel_vs_bp_single']:.2f}.",
              f"Cost model: largest error on these runs {100 * result['cost_model']['max_abs_error']:.0f} %."]
    full = result["cost_model"].get("full_width_predictions")
    if full:
        lines += ["", f"Predicted images/s at full width ({full['device']}, batch {full['batch_size']}):", "",
                  "| K | local pipelined | DFB exact | DFB delayed | BP (single / 1F1B) | local placement |",
                  "|---:|---:|---:|---:|---:|---|"]
        for k_value, row in full["images_per_s"].items():
            bp = row.get("bp_single", row.get("bp_1f1b"))
            lines.append(f"| {k_value} | {row['local_pipelined']:.1f} | {row['dfb_exact']:.1f} | "
                         f"{row['dfb_delayed']:.1f} | {bp:.1f} | {row['placement_local']} |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [r["name"].replace("_", "\n", 1) for r in runs]
    colours = ["tab:red" if r["method"].startswith("bp") else "tab:blue" for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    bars = left.bar(names, [r["images_per_s"] for r in runs], color=colours)
    left.bar_label(bars, fmt="%.0f", fontsize=8)
    left.scatter(names, [result["cost_model"]["runs"][r["name"]]["predicted"] for r in runs], color="black",
                 marker="_", s=400, label="cost model", zorder=3)
    left.set_ylabel("images/s (median of timed windows)")
    left.legend(loc="upper left", fontsize=8)
    left.tick_params(axis="x", labelsize=7)
    memory = [max(r["peak_memory_bytes"]) / 2**20 for r in runs]
    bars = right.bar(names, memory, color=colours)
    right.bar_label(bars, fmt="%.0f", fontsize=8)
    right.set_ylabel("peak memory of the largest process (MiB)")
    right.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"local SSL (blue) vs BP-SSL (red): {result['dataset']}, width {result['width']}, "
                 f"batch {result['batch_size']}, K = {result['world_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
