"""Figures of a run's log, each written as one PNG. Block b is drawn in colour C{b} in every figure."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from analysis.cka import BlockCka, RunsCka
from analysis.gradient_alignment import BlockAlignment
from analysis.logged_probe import ProbeResult
from analysis.probe_curves import Curve
from analysis.store import RunLog

DPI = 110


def _figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs: Any) -> tuple[Figure, Any]:
    """A Figure without pyplot: no global state or GUI backend, so it is safe on servers and in threads."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # PNG through the Agg canvas, chosen by the file suffix
    return path


def _lines(ax: Axes, series: dict[int, tuple[np.ndarray, np.ndarray]], ylabel: str, logy: bool = False,
           style: str = "-") -> bool:
    """One line per block, skipping blocks whose values are all NaN; False if nothing was drawn."""
    drawn = False
    for b, (x, y) in sorted(series.items()):
        y = np.asarray(y, np.float64)
        finite = np.isfinite(y) & ((y > 0) if logy else True)
        if finite.any():
            # Markers too, so that a lone finite point between NaNs still shows.
            ax.plot(np.asarray(x)[finite], y[finite], style, marker=".", color=f"C{b}", label=f"block {b}",
                    lw=1.4, ms=3)
            drawn = True
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if logy and drawn:  # norms span decades over training
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, ncol=2)
    else:
        ax.text(0.5, 0.5, "none: NaN in every block", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xticks([])  # an empty 0..1 scale would read as data
        ax.set_yticks([])
    return drawn


def _series(run: RunLog, name: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {b: (blk.steps, blk.series[name]) for b, blk in run.blocks.items()}


def plot_training(run: RunLog, path: Path) -> Path:
    """Loss, scores, update norm and feedback norm per block over training."""
    fig, axes = _figure(2, 2, figsize=(11, 7.5))
    _lines(axes[0, 0], _series(run, "loss"), "local loss")
    axes[0, 0].set_title("loss per block (blocks without a loss of their own are absent)", fontsize=10)
    for name, style in (("score_pos", "-"), ("score_neg", "--")):
        _lines(axes[0, 1], _series(run, name), "mean score", style=style)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    half = len(handles) // 2  # the same blocks twice: keep one entry per block, say which style is which
    axes[0, 1].legend(handles[:half], labels[:half], fontsize=8, ncol=2)
    axes[0, 1].set_title("scores: positive (solid) and negative (dashed)", fontsize=10)
    _lines(axes[1, 0], _series(run, "update_norm"), "||delta W|| (Frobenius)", logy=True)
    axes[1, 0].set_title("size of each conv-weight update", fontsize=10)
    _lines(axes[1, 1], _series(run, "feedback_norm"), "||feedback|| (Frobenius)", logy=True)
    axes[1, 1].set_title("top-down feedback message", fontsize=10)
    fig.suptitle(f"{run.attrs['method']} on {run.attrs['dataset']}: training signals", fontsize=12)
    return _save(fig, path)


def plot_alignment(result: Sequence[BlockAlignment], path: Path, title: str = "") -> Path:
    """Cosine(local, BP gradient) over steps per block, and its mean with a 95% interval per block."""
    fig, (ax, bx) = _figure(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2.2, 1]})
    _lines(ax, {r.block: (r.steps, r.cosine) for r in result}, "cosine(local, BP gradient)")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_title("alignment of each block's local update with backprop", fontsize=10)
    x = np.arange(len(result))
    for i, r in enumerate(result):
        bx.errorbar(i, r.mean, yerr=np.nan_to_num(r.half_width), fmt="o", color=f"C{r.block}", capsize=4)
    bx.set_xticks(x, [str(r.block) for r in result])
    bx.set_xlabel("block")
    bx.set_ylabel("mean cosine")
    bx.axhline(0, color="0.5", lw=0.8)
    bx.grid(alpha=0.3)
    bx.set_title("mean, 95% interval (1.96 sd/sqrt(n))", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def plot_probe(result: ProbeResult, path: Path, title: str = "") -> Path:
    """Probe accuracy (%) per block over training, with chance."""
    fig, ax = _figure(figsize=(8, 4.5))
    _lines(ax, {b: (result.steps[b], 100 * result.accuracy[b]) for b in result.steps}, "test accuracy (%)")
    ax.set_ylim(0, 102)  # the whole scale, so that runs and blocks compare at a glance
    ax.axhline(100 * result.chance, color="0.4", ls=":", lw=1)
    ax.text(ax.get_xlim()[0], 100 * result.chance, " chance", va="bottom", fontsize=8, color="0.4")
    ax.set_title(title or f"linear probe per block ({result.score_images} scored held-out images)", fontsize=11)
    return _save(fig, path)


def plot_blocks_cka(result: BlockCka, path: Path, title: str = "") -> Path:
    """Heatmap of CKA between blocks, values written in the cells."""
    k = len(result.blocks)
    fig, ax = _figure(figsize=(1.0 * k + 2.2, 0.85 * k + 1.6))
    image = ax.imshow(result.matrix, vmin=0, vmax=1, cmap="viridis")
    for i in range(k):
        for j in range(k):
            v = result.matrix[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9, color="black" if v > 0.6 else "white")
    ax.set_xticks(range(k), [str(b) for b in result.blocks])
    ax.set_yticks(range(k), [str(b) for b in result.blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("block")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title or f"linear CKA between blocks, step {result.step}", fontsize=10)
    return _save(fig, path)


def plot_runs_cka(result: RunsCka, path: Path) -> Path:
    """CKA of the same block in two runs, one bar per block."""
    fig, ax = _figure(figsize=(7, 4))
    blocks = [r[0] for r in result.rows]
    bars = ax.bar(range(len(blocks)), [r[3] for r in result.rows], color=[f"C{b}" for b in blocks])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("block")
    ax.set_ylabel("linear CKA")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"same block, two runs\nA = {result.names[0]}\nB = {result.names[1]}", fontsize=9)
    return _save(fig, path)


def plot_throughput(run: RunLog, path: Path) -> Path:
    """Per rank: seconds of its forward action and bytes it sent, at each logged step."""
    fig, (ax, bx) = _figure(1, 2, figsize=(11, 4))
    for rank, blk in run.rank_blocks().items():
        owned = ",".join(str(b) for b, o in sorted(run.blocks.items()) if o.rank == rank)
        label = f"rank {rank} (blocks {owned})"
        ax.plot(blk.steps, 1e3 * blk.series["step_seconds"], ".-", color=f"C{rank}", label=label, lw=1.2, ms=3)
        bx.plot(blk.steps, blk.series["bytes_sent"] / 2**10, ".-", color=f"C{rank}", label=label, lw=1.2, ms=3)
    for axis, ylabel, title in ((ax, "milliseconds", "forward action time per logged step"),
                                (bx, "KiB sent", "bytes sent during the forward action")):
        axis.set_xlabel("training step")
        axis.set_ylabel(ylabel)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        axis.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_probe_curves(curves: Sequence[Curve], path: Path, title: str = "", untrained_line: bool = True) -> Path:
    """Probe accuracy (%) of several runs: all blocks (top) and last block (bottom), against images seen
    (left) and wall-clock seconds (right); with `untrained_line` (runs on the same held-out images), the
    untrained level (the runs' mean at step 0) dashed."""
    fig, axes = _figure(2, 2, figsize=(12, 8), sharey="row")
    for row, (field, name) in enumerate((("all_blocks", "all blocks"), ("last_block", "last block"))):
        untrained = [100 * getattr(c, field)[0] for c in curves if c.steps[0] == 0] if untrained_line else []
        clocks = (("images", "images seen"), ("seconds", "seconds (step x mean time per step)"))
        for column, (clock, xlabel) in enumerate(clocks):
            ax = axes[row, column]
            for i, curve in enumerate(curves):
                x = getattr(curve, clock)
                if x is not None:
                    ax.plot(x, 100 * getattr(curve, field), ".-", color=f"C{i}", label=curve.label, lw=1.4, ms=4)
            if untrained:
                ax.axhline(float(np.mean(untrained)), color="0.4", ls="--", lw=1, label="untrained (step 0)")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"probe accuracy, {name} (%)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="lower right")  # the curves rise: their lower right is the emptiest
    fig.suptitle(title or "linear probe over training (ridge on held-out activity)", fontsize=11)
    return _save(fig, path)
