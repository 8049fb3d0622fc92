"""Linear-probe accuracy over training for several runs side by side: the learning curve of each method.

For each run, at every step logged by all its blocks, the ridge probe of analysis.logged_probe (same
fit/score split of the held-out images, same penalty) is fitted on two feature sets:
- all blocks: the pooled activity of every block, concatenated (what the run's final probe reads);
- last block: the top block's pooled activity alone.
Two clocks for the x axis:
- images seen: step x batch size x replicas (the images the encoder has learned from);
- wall-clock seconds: step x the run's seconds per step, from summary.json's images/s (over the loop
  of its last call, logging included, so right for a resumed run too). An average rate: a run with a
  slow start is drawn evenly. A run without summary.json (still training) has no seconds axis.
Curves compare runs only on the same held-out images: `same_images` says whether they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.logged_probe import ALPHA, TRAIN_FRACTION, ridge_accuracy, stratified_split
from analysis.store import LogError, RunLog, Unreadable
from sim.record.log_format import STORE_NAME


@dataclass
class Curve:
    """One run's probe accuracy (fractions) at its logged steps."""
    label: str
    steps: np.ndarray  # (points,) int64
    images: np.ndarray  # (points,) images seen
    seconds: np.ndarray | None  # (points,) wall-clock; None while the run has no summary.json
    all_blocks: np.ndarray  # (points,)
    last_block: np.ndarray  # (points,)

    def as_dict(self) -> dict:
        return {"label": self.label, "steps": self.steps.tolist(), "images": self.images.tolist(),
                "seconds": None if self.seconds is None else self.seconds.round(1).tolist(),
                "all_blocks": self.all_blocks.tolist(), "last_block": self.last_block.tolist()}


def replicas_of(run: RunLog) -> int:
    return int(run.attrs["config"].get("sim", {}).get("replicas", 1))


def run_label(run: RunLog) -> str:
    """'method, K processes, delayed feedback (run folder)': the parts that are not the defaults."""
    parts = [str(run.attrs["method"])]
    replicas = replicas_of(run)
    world = int(run.attrs["world_size"])
    if replicas > 1:
        parts.append(f"{replicas} replicas x {world // replicas} stages")
    elif world > 1:
        parts.append(f"{world} processes")
    if run.summary is not None and run.summary.feedback == "delayed":  # None: a method without feedback
        parts.append("delayed feedback")
    return f"{', '.join(parts)} ({run.run_dir.name})"


def probe_curve(run: RunLog, alpha: float = ALPHA, train_fraction: float = TRAIN_FRACTION) -> Curve:
    """The curve of one run; steps whose activations do not decode are left out (they are in run.damage)."""
    run.require_rows()
    labels, k = run.heldout_labels, int(run.attrs["num_classes"])
    fit, score = stratified_split(labels, train_fraction)
    top = int(run.attrs["num_blocks"]) - 1
    if top not in run.blocks:
        raise LogError(f"{run.run_dir / STORE_NAME}: the top block ({top}) has logged nothing yet; its rank has not "
                       "started, or its group is damaged")
    steps, whole, last = [], [], []
    for step in run.common_steps().tolist():
        try:
            features = [run.blocks[b].activations(run.blocks[b].row_of(step)) for b in sorted(run.blocks)]
        except Unreadable:
            continue
        steps.append(step)
        whole.append(ridge_accuracy(np.concatenate(features, axis=1), labels, fit, score, k, alpha))
        last.append(ridge_accuracy(features[-1], labels, fit, score, k, alpha))  # blocks sorted: the top is last
    if not steps:
        raise LogError(f"{run.run_dir}: no step logged by every block can be read; nothing to draw")
    step_array = np.array(steps, np.int64)
    images = step_array * int(run.attrs["config"]["train"]["batch_size"]) * replicas_of(run)
    seconds = None
    if run.summary is not None and run.summary.images_per_s > 0:
        seconds = images / run.summary.images_per_s
    return Curve(run_label(run), step_array, images, seconds, np.array(whole), np.array(last))


def same_images(runs: list[RunLog]) -> bool:
    """Whether every run logged the same held-out images (same indices, same order)."""
    first = runs[0].heldout_index
    return all(np.array_equal(first, run.heldout_index) for run in runs[1:])


def curves_table(curves: list[Curve], columns: int = 6) -> str:
    """Accuracy (%) of each run, all blocks / last block, at up to `columns` of its logged steps."""
    lines = ["linear probe (ridge on held-out activity) over training, test images, % all blocks / last block"]
    for curve in curves:
        picks = np.unique(np.linspace(0, len(curve.steps) - 1, min(columns, len(curve.steps))).round().astype(int))
        cells = [f"step {curve.steps[i]}: {100 * curve.all_blocks[i]:.1f} / {100 * curve.last_block[i]:.1f}"
                 for i in picks]
        lines.append(f"{curve.label}: " + "; ".join(cells))
        if curve.seconds is None:
            lines.append("    (no summary.json yet: drawn against images seen only)")
    return "\n".join(lines)
