"""Gradient alignment: how close each block's local update is to the backprop update, over training.

For every pair logged in "block{b}/align" (every `align_every` steps), the cosine similarity between
`local_gradient` (the gradient of the block's own local loss w.r.t. its conv weight, flattened) and
`bp_gradient` (the gradient of the TOP block's loss on the same batch and negatives, back-propagated
to the same weight). A descent update is minus the gradient, so this is also the cosine between the
local and the BP update. For the top block both gradients are the same: its cosine is 1 by
construction, a check that the pairs were written as the format says.

Over training each block gets the mean cosine and a 95% interval for that mean,
mean +- 1.96 sd / sqrt(n), with sd the sample standard deviation (ddof = 1) over its n pairs (a
normal approximation that treats the pairs as independent; successive steps are correlated, so read
it as a lower bound on the uncertainty).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.store import LogError, RunLog
from sim.record.log_format import ALIGN_GROUP, STORE_NAME

ROWS_PER_READ = 8  # gradient rows read at once: a full-width block's row holds 590k values (4.7 MB in float64)
Z95 = 1.96


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (rows, n) arrays, in float64; NaN where a row is all zeros."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, np.einsum("ij,ij->i", a, b) / norms, np.nan)


@dataclass
class BlockAlignment:
    """One block's cosines over training and their summary."""
    block: int
    steps: np.ndarray  # (pairs,) int64
    cosine: np.ndarray  # (pairs,) float64, NaN for a zero gradient

    @property
    def n(self) -> int:
        return int(np.isfinite(self.cosine).sum())

    @property
    def mean(self) -> float:
        return float(np.nanmean(self.cosine)) if self.n else float("nan")

    @property
    def half_width(self) -> float:
        """Half-width of the 95% interval of the mean: 1.96 sd / sqrt(n) (NaN for fewer than 2 pairs)."""
        if self.n < 2:
            return float("nan")
        return Z95 * float(np.nanstd(self.cosine, ddof=1)) / np.sqrt(self.n)

    def as_dict(self) -> dict:
        return {"block": self.block, "pairs": self.n, "mean": self.mean, "ci95_low": self.mean - self.half_width,
                "ci95_high": self.mean + self.half_width, "steps": self.steps.tolist(),
                "cosine": [None if np.isnan(c) else float(c) for c in self.cosine]}


def block_alignment(run: RunLog) -> list[BlockAlignment]:
    """Cosines of every block that logged gradient pairs, without the pairs that do not decode (they are in
    `run.damage`); a LogError if no block has a readable pair."""
    out = []
    for b, block in sorted(run.blocks.items()):
        if block.align is None or not len(block.align):
            continue
        parts = [block.align.pairs(i, i + ROWS_PER_READ) for i in range(0, len(block.align), ROWS_PER_READ)]
        steps = np.concatenate([p[0] for p in parts])
        if len(steps):
            out.append(BlockAlignment(b, steps, np.concatenate([cosines(p[1], p[2]) for p in parts if len(p[0])])))
    if not out:
        run.require_undamaged("gradient pair", lambda path: f"/{ALIGN_GROUP}/" in path, "log.align_every")
        store = run.run_dir / STORE_NAME
        why = ("align_every = 0" if not run.attrs["align_every"]
               else "no pair logged yet, or the method is end to end (its blocks have no local loss to compare)")
        raise LogError(f"{store} holds no gradient pairs ({why}); rerun with "
                       "`--set log.align_every=N` (a local method, N a multiple of log.every) to log them")
    return out


def alignment_table(result: list[BlockAlignment]) -> str:
    """Per block: pairs, mean cosine, its 95% interval, and the first and last cosine."""
    lines = ["block  pairs  steps            mean cos  95% interval (mean +- 1.96 sd/sqrt(n))  first    last",
             "-----  -----  ---------------  --------  ---------------------------------------  -------  -------"]
    for r in result:
        span = f"{r.steps[0]}..{r.steps[-1]}" if len(r.steps) else "-"
        lo, hi = r.mean - r.half_width, r.mean + r.half_width
        interval = f"[{lo:+.4f}, {hi:+.4f}]" if np.isfinite(r.half_width) else "- (one pair)"
        lines.append(f"{r.block:>5}  {r.n:>5}  {span:<15}  {r.mean:>+8.4f}  {interval:<39}  "
                     f"{r.cosine[0]:>+7.4f}  {r.cosine[-1]:>+7.4f}")
    return "\n".join(lines)


def alignment_csv(result: list[BlockAlignment]) -> str:
    """Long format, one line per pair: block,step,cosine."""
    rows = ["block,step,cosine"]
    rows += [f"{r.block},{s},{c:.8g}" for r in result for s, c in zip(r.steps.tolist(), r.cosine)]
    return "\n".join(rows) + "\n"
