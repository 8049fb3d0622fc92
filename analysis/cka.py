"""Linear CKA (Kornblith et al. 2019) between the logged representations of blocks.

For two representations of the same n images, X (n, p) and Y (n, q), with linear kernels
K = X X^T and L = Y Y^T and the centring matrix H = I - 11^T / n,

    HSIC(K, L) = tr(K H L H) / (n - 1)^2,    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

With column-centred Xc = H X and Yc = H Y this equals ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)
(trace cyclicity), which is cheaper when features are fewer than images; `linear_cka` uses whichever
form is cheaper. CKA is 1 for representations equal up to an orthogonal transform and an isotropic
scaling, and near 0 for independent ones (for n much larger than p and q).

Two uses: every pair of blocks of one run at one logged step, and the same block of two runs (e.g.
`clapp_pp` against `bp_infonce`), which requires both runs to have logged the same held-out images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.store import ENABLE_HINT, BlockLog, LogError, RunLog, Unreadable


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two (n, features) representations of the same n images; NaN if one is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"CKA needs two 2-d arrays with the same number of rows, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    x, y = x - x.mean(0), y - y.mean(0)
    n, p, q = len(x), x.shape[1], y.shape[1]
    if n * (p + q) < p * q + p * p + q * q:  # Gram form: n x n matrices
        k, l_ = x @ x.T, y @ y.T
        hsic_xy, hsic_xx, hsic_yy = (k * l_).sum(), (k * k).sum(), (l_ * l_).sum()
    else:  # feature form: p x q matrices
        hsic_xy = np.square(y.T @ x).sum()
        hsic_xx, hsic_yy = np.square(x.T @ x).sum(), np.square(y.T @ y).sum()
    denominator = np.sqrt(hsic_xx * hsic_yy)
    return float(hsic_xy / denominator) if denominator > 0 else float("nan")


@dataclass
class BlockCka:
    """CKA between every pair of blocks of one run at one step."""
    step: int
    blocks: list[int]
    matrix: np.ndarray  # (blocks, blocks), symmetric, 1 on the diagonal

    def as_dict(self) -> dict:
        return {"step": self.step, "blocks": self.blocks, "cka": self.matrix.tolist()}


@dataclass
class RunsCka:
    """CKA between the same block of two runs; each run's step is recorded."""
    names: tuple[str, str]
    rows: list[tuple[int, int, int, float]]  # (block, step in run A, step in run B, cka)

    def as_dict(self) -> dict:
        return {"runs": list(self.names), "blocks": [{"block": b, "step_a": sa, "step_b": sb, "cka": c}
                                                     for b, sa, sb, c in self.rows]}


def _read(block: BlockLog, row: int) -> np.ndarray | None:
    """The activations of `row`, or None when they do not decode (the damage is in the run's warnings)."""
    try:
        return block.activations(row)
    except Unreadable:
        return None


def blocks_cka(run: RunLog, step: int | None = None) -> BlockCka:
    """CKA between all blocks of `run` at `step` (default: the last step every block has logged).

    Blocks whose activations at the step do not decode, or with no readable logged step, are left out. By
    default the step is the last one at which every block's activations read, or failing that the one at
    which the most blocks do.
    """
    run.require_rows()
    # Blocks without a readable logged step (their rank has not logged yet, or their steps are damaged) are
    # left out rather than leaving no step in common.
    blocks = [b for b in sorted(run.blocks) if len(run.blocks[b].steps)]
    common = sorted(set.intersection(*(set(run.blocks[b].steps.tolist()) for b in blocks)))
    if step is None and not common:
        raise LogError("the blocks have no logged step in common yet (their ranks are at different steps); "
                       "pass --step with a step every block has logged, or wait")
    best: dict[int, np.ndarray] = {}
    asked = step
    for s in [step] if step is not None else common[::-1]:
        rows = {b: run.blocks[b].row_of(s) for b in blocks}  # a LogError for a step some block did not log
        acts = {b: a for b in blocks if (a := _read(run.blocks[b], rows[b])) is not None}
        if len(acts) > len(best):
            step, best = s, acts
        if len(best) == len(blocks):
            break
    if not best:
        if asked is not None:
            raise LogError(f"no block's activations at step {asked} can be read (the log is damaged there); pass "
                           "--step with another logged step")
        raise LogError(f"no block's activations can be read at any step the blocks logged in common (the log is "
                       f"damaged); {ENABLE_HINT} to log them again")
    used = sorted(best)
    matrix = np.eye(len(used))
    for i in range(len(used)):
        for j in range(i + 1, len(used)):
            matrix[i, j] = matrix[j, i] = linear_cka(best[used[i]], best[used[j]])
    return BlockCka(int(step), used, matrix)


def check_same_images(a: RunLog, b: RunLog) -> None:
    """CKA across runs compares representations of the same images: stop unless heldout_index agree."""
    ia, ib = a.heldout_index, b.heldout_index
    if len(ia) != len(ib):
        raise LogError(f"{a.run_dir} logged {len(ia)} held-out images and {b.run_dir} {len(ib)}: CKA needs the same "
                       "images; rerun one of them with the other's log settings (same dataset and held-out count)")
    if not np.array_equal(ia, ib):
        first = int(np.flatnonzero(ia != ib)[0])
        raise LogError(f"{a.run_dir} and {b.run_dir} logged different held-out images (heldout_index differs first "
                       f"at position {first}: {ia[first]} vs {ib[first]}); rerun one with the other's log settings")


def runs_cka(a: RunLog, b: RunLog, step: int | None = None) -> RunsCka:
    """CKA between block k of run `a` and block k of run `b`, for each block both logged.

    Each run is read at `step`, or by default at its own last logged step whose activations read (runs
    of different lengths are compared at their ends). A block unreadable in either run is left out.
    """
    check_same_images(a, b)
    a.require_rows()
    b.require_rows()
    rows = []
    for k in sorted(set(a.blocks) & set(b.blocks)):
        ba, bb = a.blocks[k], b.blocks[k]
        if not (len(ba.steps) and len(bb.steps)):
            continue
        ra, xa = _pick(ba, step)
        rb, xb = _pick(bb, step)
        if xa is not None and xb is not None:  # else not logged yet, or unreadable: in the runs' warnings
            rows.append((k, int(ba.steps[ra]), int(bb.steps[rb]), linear_cka(xa, xb)))
    if not rows:
        raise LogError(f"{a.run_dir} and {b.run_dir} have no logged block in common whose activations can be read")
    return RunsCka((a.name, b.name), rows)


def _pick(block: BlockLog, step: int | None) -> tuple[int, np.ndarray | None]:
    """(row, activations) at `step`, or by default at the last logged row whose activations read."""
    if step is not None:
        row = block.row_of(step)
        return row, _read(block, row)
    for row in range(len(block.steps) - 1, -1, -1):
        if (acts := _read(block, row)) is not None:
            return row, acts
    return -1, None


def blocks_cka_table(result: BlockCka) -> str:
    lines = [f"linear CKA between blocks at step {result.step}",
             "block " + "".join(f"{b:>8}" for b in result.blocks)]
    lines += [f"{b:>5} " + "".join(f"{v:>8.3f}" for v in row) for b, row in zip(result.blocks, result.matrix)]
    return "\n".join(lines)


def runs_cka_table(result: RunsCka) -> str:
    lines = [f"linear CKA, same block: A = {result.names[0]}, B = {result.names[1]}",
             "block  step A    step B     CKA"]
    lines += [f"{b:>5}  {sa:>6}  {sb:>8}  {c:>6.3f}" for b, sa, sb, c in result.rows]
    return "\n".join(lines)
