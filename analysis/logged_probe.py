"""Linear probes on the logged activity of each block, over training.

Per block and per logged step, a linear classifier is fitted to that step's held-out activations
(`block{b}/activations`, the pooled activity of the held-out test images, computed with the weights
the block had just before batch t) and scored on a disjoint part of the same images:

- split: the held-out images are split once, stratified by class, 70% to fit and 30% to score,
  with a fixed seed; the same split serves every block and step (and every run with the same
  heldout_index), so curves are comparable;
- features: standardised with the fitting part's mean and standard deviation (constant features
  are left at 0), so the deep blocks' small activity does not change the regularisation;
- classifier: ridge regression on one-hot targets, one-vs-all, solved in closed form in float64
  (primal or dual form, whichever system is smaller), predicting the class of largest output. It is
  deterministic and fast enough to run at every logged step on CPU. The penalty is
  lambda = alpha * n_fit (alpha = 1 by default): relative to the scale of standardised features, it
  keeps the fit away from the interpolation peak when features and images are about as many.

The accuracy is the fraction of the 30% scoring part classified correctly. It is a held-out
estimate on test-split images only; the run's own probe (summary.json) is trained on the training
split and is the number to report. This one tracks how linearly decodable each block is over time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from analysis.store import ENABLE_HINT, LogError, RunLog, Unreadable
from sim.record.log_format import ACTIVATIONS, STORE_NAME

TRAIN_FRACTION = 0.7
SEED = 0
ALPHA = 1.0


def stratified_split(labels: np.ndarray, train_fraction: float = TRAIN_FRACTION,
                     seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, score): in each class a fixed random `train_fraction` fits, the rest scores."""
    if not 0 < train_fraction < 1:
        raise LogError(f"train fraction {train_fraction} must lie strictly between 0 and 1, e.g. 0.7")
    rng = np.random.default_rng(seed)
    fit, score = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        # Keep at least one image on each side when a class has two or more.
        k = min(max(round(train_fraction * len(members)), 1), max(len(members) - 1, 1))
        fit.append(members[:k])
        score.append(members[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(score))


def ridge_accuracy(features: np.ndarray, labels: np.ndarray, fit: np.ndarray, score: np.ndarray,
                   num_classes: int, alpha: float = ALPHA) -> float:
    """Accuracy on `score` of a one-vs-all ridge classifier fitted on `fit` (see the module docstring)."""
    x = np.asarray(features, np.float64)  # (image, feature)
    if not np.isfinite(x).all():
        return float("nan")  # float16 overflow in the log: no meaningful fit
    mean, sd = x[fit].mean(0), x[fit].std(0)
    x = (x - mean) / np.where(sd > 0, sd, 1.0)
    targets = np.eye(num_classes)[labels[fit]]  # (fit, class)
    bias = targets.mean(0)  # the intercept: features are centred on the fitting part
    xf, lam = x[fit], alpha * len(fit)
    if xf.shape[1] <= xf.shape[0]:
        w = np.linalg.solve(xf.T @ xf + lam * np.eye(xf.shape[1]), xf.T @ (targets - bias))
    else:  # dual form: an (image x image) system when features outnumber images
        w = xf.T @ np.linalg.solve(xf @ xf.T + lam * np.eye(xf.shape[0]), targets - bias)
    predicted = (x[score] @ w + bias).argmax(1)
    return float((predicted == labels[score]).mean())


def pick_rows(n: int, points: int) -> np.ndarray:
    """`points` row indices spread evenly over 0..n-1, always with the first and last; all rows if points <= 0."""
    if points <= 0 or points >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, points).round().astype(int))


@dataclass
class ProbeResult:
    """Probe accuracy (a fraction) per block over logged steps."""
    num_classes: int
    fit_images: int
    score_images: int
    steps: dict[int, np.ndarray] = field(default_factory=dict)  # block -> (points,) int64
    accuracy: dict[int, np.ndarray] = field(default_factory=dict)  # block -> (points,) float64

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    def as_dict(self) -> dict:
        return {"num_classes": self.num_classes, "fit_images": self.fit_images, "score_images": self.score_images,
                "blocks": {str(b): {"steps": self.steps[b].tolist(), "accuracy": self.accuracy[b].tolist()}
                           for b in self.steps}}


def probe_logged_run(run: RunLog, points: int = 0, alpha: float = ALPHA, train_fraction: float = TRAIN_FRACTION,
              seed: int = SEED) -> ProbeResult:
    """Fit and score a probe for every block at `points` evenly spread logged steps (0 = every logged step).

    Steps whose activations do not decode are left out (they are in `run.damage`); a block with none left
    is absent from the result, and a LogError says so if no block has any.
    """
    run.require_rows()
    labels, k = run.heldout_labels, int(run.attrs["num_classes"])
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= k:
        raise LogError(f"heldout_labels hold values outside 0..{k - 1} (num_classes = {k}); the log is inconsistent")
    fit, score = stratified_split(labels, train_fraction, seed)
    if len(score) == 0:
        raise LogError(f"only {len(labels)} held-out images: too few to keep a scoring part; log more images")
    result = ProbeResult(k, len(fit), len(score))
    for b, block in sorted(run.blocks.items()):
        steps, accuracy = [], []
        for r in pick_rows(len(block.steps), points):  # none while its rank has not logged yet
            try:
                acts = block.activations(r)
            except Unreadable:  # in run.damage: the step is left out of this block's curve
                continue
            steps.append(block.steps[r])
            accuracy.append(ridge_accuracy(acts, labels, fit, score, k, alpha))
        if steps:
            result.steps[b], result.accuracy[b] = np.array(steps, np.int64), np.array(accuracy)
    if not result.steps:
        raise LogError(f"{run.run_dir / STORE_NAME}: no block has readable activations at a logged step "
                       f"(every {ACTIVATIONS.name} row read is damaged); {ENABLE_HINT} to log them again")
    return result


def probe_table(result: ProbeResult, columns: int = 6) -> str:
    """Accuracy (%) per block at up to `columns` steps spread over training, and at the last step."""
    all_steps = np.unique(np.concatenate(list(result.steps.values())))
    shown = all_steps[pick_rows(len(all_steps), columns)]
    lines = [(f"linear probe (ridge, {result.fit_images} fit / {result.score_images} scored held-out images), "
              f"test accuracy %, chance {100 * result.chance:.1f}%"),
             "block  " + "  ".join(f"{f'step {s}':>10}" for s in shown) + "        last"]
    for b in result.steps:
        cells = []
        for s in shown:
            hit = np.flatnonzero(result.steps[b] == s)
            cells.append(f"{100 * result.accuracy[b][hit[0]]:>10.1f}" if len(hit) else f"{'-':>10}")
        lines.append(f"{b:>5}  " + "  ".join(cells) + f"  {100 * result.accuracy[b][-1]:>10.1f}")
    return "\n".join(lines)


def probe_csv(result: ProbeResult) -> str:
    """Long format: block,step,accuracy (a fraction)."""
    rows = ["block,step,accuracy"]
    rows += [f"{b},{s},{a:.6f}" for b in result.steps for s, a in zip(result.steps[b].tolist(), result.accuracy[b])]
    return "\n".join(rows) + "\n"
