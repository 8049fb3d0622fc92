"""Read a run's activation log, RUN_DIR/log.zarr, read-only, and its summary.json.

The contract is the log format (zarr v3, one store per run, written while training by every rank):

- Root attributes: "laminar_log" (format version, 1), "config" (nested dict), "code_version",
  "world_size", "placement" (block groups per rank), "dataset", "method", "num_blocks",
  "log_every", "align_every" (0 = no alignment pairs), "heldout_split", "num_classes".
- Root arrays: heldout_labels (image,) int64; heldout_index (image,) int64 (indices in the test split).
- Group "block{b}", attributes "block", "rank", "feature_dim", "grid", "channels", "has_loss",
  "weight_shape"; arrays along dimension "step": step int64, loss, score_pos, score_neg, update_norm,
  feedback_norm, step_seconds float32, bytes_sent int64, activations (step, image, feature) float16.
- Group "block{b}/align" (absent or empty for end-to-end methods), arrays along dimension "align":
  step int64, local_gradient (align, param) float32, bp_gradient (align, param) float32.

The store may still be being written: every array is read up to its current length, and the arrays
of one block are cut to their shortest common length. Nothing here imports from `sim`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

FORMAT_VERSION = 1
ROOT_ATTRS = ("laminar_log", "config", "code_version", "world_size", "placement", "dataset", "method",
              "num_blocks", "log_every", "align_every", "heldout_split", "num_classes")
BLOCK_ATTRS = ("block", "rank", "feature_dim", "grid", "channels", "has_loss", "weight_shape")
# Per-step scalar series of a block group, and whether each holds integers.
SERIES = {"step": True, "loss": False, "score_pos": False, "score_neg": False, "update_norm": False,
          "feedback_norm": False, "step_seconds": False, "bytes_sent": True}
ENABLE_HINT = "rerun with logging on, e.g. `--set log.every=N` (log every N training steps)"


class LogError(ValueError):
    """A log that cannot be analysed: says what is wrong and what to do instead."""


Nodes = dict[str, "zarr.Array | zarr.Group"]  # every array and group of the store, by path ("block0/align/step")


def _array(nodes: Nodes, path: str, ndim: int, integer: bool, dim: str | None) -> zarr.Array:
    """The array at `path`, checked against the format's name, rank, dtype kind and first dimension."""
    where, name = f"log.zarr/{path}".rsplit("/", 1)
    arr = nodes.get(path)
    if not isinstance(arr, zarr.Array):
        raise LogError(f"{where}: array {name!r} is missing; the log format requires it (analysis/store.py "
                       "lists the format). Was the store written by another version of laminar?")
    kind = np.dtype(arr.dtype).kind
    if arr.ndim != ndim or (kind not in "iu" if integer else kind != "f"):
        want = "integer" if integer else "float"
        raise LogError(f"{where}/{name}: expected a {ndim}-d {want} array, found {arr.ndim}-d {arr.dtype}; "
                       "the writer does not follow the log format")
    names = arr.metadata.dimension_names
    if dim is not None and names is not None and names[0] != dim:
        raise LogError(f"{where}/{name}: first dimension is named {names[0]!r}, the format says {dim!r}")
    return arr


def _common_rows(steps: np.ndarray, lengths: list[int]) -> int:
    """Rows every array of a group already holds, less trailing rows whose step is not yet written.

    An append grows an array before it fills it, so a reader can see fill values at the end of `step`:
    -1 (sim/logbook.py's fill value) or 0 after larger steps. Steps are >= 0 and strictly increase, so
    such rows are cut rather than misread.
    """
    n = min([len(steps), *lengths])
    while n > 0 and (steps[n - 1] < 0 or (n > 1 and steps[n - 1] <= steps[n - 2])):
        n -= 1
    return n


@dataclass
class AlignLog:
    """Gradient pairs of one block: row i holds the local and the back-propagated gradient at step[i]."""
    step: np.ndarray  # (align,) int64
    local_gradient: zarr.Array  # (align, param), read row blocks at a time: full-width rows are large
    bp_gradient: zarr.Array

    def __len__(self) -> int:
        return len(self.step)

    def rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """float64 (rows, param) local and BP gradients of rows start..stop."""
        stop = min(stop, len(self.step))
        return (np.asarray(self.local_gradient[start:stop], np.float64),
                np.asarray(self.bp_gradient[start:stop], np.float64))


@dataclass
class BlockLog:
    """One block group: its attributes, its per-step series (cut to a common length) and lazy activations."""
    index: int
    attrs: dict[str, Any]
    series: dict[str, np.ndarray]  # name -> (rows,), float64 or int64; "step" included
    activations_array: zarr.Array  # (step, image, feature), read one step at a time
    align: AlignLog | None

    @property
    def steps(self) -> np.ndarray:
        return self.series["step"]

    @property
    def rank(self) -> int:
        return int(self.attrs["rank"])

    def row_of(self, step: int) -> int:
        """The row that holds training step `step`; a LogError naming the logged steps if there is none."""
        rows = np.flatnonzero(self.steps == step)
        if len(rows) == 0:
            have = f"{self.steps[0]} to {self.steps[-1]}" if len(self.steps) else "none yet"
            raise LogError(f"block {self.index} has no logged step {step} (logged: {have}, every log_every "
                           "steps); pass one of its logged steps")
        return int(rows[0])

    def activations(self, row: int) -> np.ndarray:
        """float32 (image, feature) pooled activity of the held-out images at logged row `row`."""
        if not 0 <= row < len(self.steps):  # rows past the common length may not be written yet
            raise IndexError(f"block {self.index} has {len(self.steps)} complete logged rows, not row {row}")
        return np.asarray(self.activations_array[row], np.float32)


@dataclass
class RunLog:
    """Everything the analysis reads about one run."""
    run_dir: Path
    attrs: dict[str, Any]
    heldout_labels: np.ndarray  # (image,) int64
    heldout_index: np.ndarray  # (image,) int64
    blocks: dict[int, BlockLog]  # by block index; only blocks whose rank has created their arrays
    summary: dict[str, Any] | None  # summary.json, written when the run ends

    @property
    def name(self) -> str:
        return f"{self.attrs['method']} ({self.run_dir.name})"

    def require_rows(self) -> None:
        """Stop with a clear message when no block has logged a step yet."""
        if not any(len(b.steps) for b in self.blocks.values()):
            raise LogError(f"{self.run_dir / 'log.zarr'} holds no logged steps yet (log_every = "
                           f"{self.attrs['log_every']}): wait until the run logs its first step, or {ENABLE_HINT}")

    def common_steps(self) -> np.ndarray:
        """Steps logged by every block present (blocks on different ranks may be at different steps)."""
        sets = [set(b.steps.tolist()) for b in self.blocks.values()]
        return np.array(sorted(set.intersection(*sets)) if sets else [], np.int64)

    def rank_blocks(self) -> dict[int, BlockLog]:
        """One block per rank (its lowest): each rank's step_seconds and bytes_sent are the same on all its blocks."""
        out: dict[int, BlockLog] = {}
        for b in sorted(self.blocks):
            out.setdefault(self.blocks[b].rank, self.blocks[b])
        return dict(sorted(out.items()))


def _read_block(nodes: Nodes, index: int, num_images: int) -> BlockLog:
    prefix = f"block{index}"
    where = f"log.zarr/{prefix}"
    attrs = nodes[prefix].attrs.asdict()
    missing = [k for k in BLOCK_ATTRS if k not in attrs]
    if missing:
        raise LogError(f"{where}: attributes {missing} are missing; the writer must set {list(BLOCK_ATTRS)}")
    arrays = {name: _array(nodes, f"{prefix}/{name}", 1, integer, "step") for name, integer in SERIES.items()}
    acts = _array(nodes, f"{prefix}/activations", 3, False, "step")
    if acts.shape[1:] != (num_images, attrs["feature_dim"]):
        raise LogError(f"{where}/activations: rows are {acts.shape[1:]}, expected (images, feature_dim) = "
                       f"({num_images}, {attrs['feature_dim']}) from heldout_labels and the block's attributes")
    steps = np.asarray(arrays["step"][:], np.int64)
    n = _common_rows(steps, [a.shape[0] for a in arrays.values()] + [acts.shape[0]])
    series = {name: np.asarray(a[:n], np.int64 if SERIES[name] else np.float64) for name, a in arrays.items()}
    return BlockLog(index, attrs, series, acts, _read_align(nodes, f"{prefix}/align", attrs))


def _read_align(nodes: Nodes, prefix: str, attrs: dict[str, Any]) -> AlignLog | None:
    if not isinstance(nodes.get(f"{prefix}/step"), zarr.Array):
        return None  # end-to-end methods and align_every = 0 write no pairs (or an empty group)
    where = f"log.zarr/{prefix}"
    step = _array(nodes, f"{prefix}/step", 1, True, "align")
    local = _array(nodes, f"{prefix}/local_gradient", 2, False, "align")
    bp = _array(nodes, f"{prefix}/bp_gradient", 2, False, "align")
    params = math.prod(attrs["weight_shape"])
    for arr, name in ((local, "local_gradient"), (bp, "bp_gradient")):
        if arr.shape[1] != params:
            raise LogError(f"{where}/{name}: rows hold {arr.shape[1]} values, but weight_shape "
                           f"{attrs['weight_shape']} has {params}")
    steps = np.asarray(step[:], np.int64)
    n = _common_rows(steps, [local.shape[0], bp.shape[0]])
    return AlignLog(steps[:n], local, bp) if n else None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, or None while the run has not finished."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def open_run(run_dir: str | Path) -> RunLog:
    """Open RUN_DIR/log.zarr read-only; a LogError says what is missing and how to get it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LogError(f"{run_dir} is not a folder; pass a run folder (the --out of launch.train)")
    path = run_dir / "log.zarr"
    if not path.exists():
        raise LogError(f"{path} does not exist: the run was made without logging. {ENABLE_HINT[0].upper()}"
                       f"{ENABLE_HINT[1:]}; summary.json and the checkpoints do not hold per-step activations.")
    try:
        root = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError) as err:  # no root zarr.json yet, or not a zarr group
        raise LogError(f"{path} is not a readable zarr group ({err}); rank 0 writes it when training starts") from err
    attrs = root.attrs.asdict()
    if attrs.get("laminar_log") != FORMAT_VERSION:
        raise LogError(f"{path}: log format version {attrs.get('laminar_log')!r}, this analysis reads version "
                       f"{FORMAT_VERSION}; analyse it with the laminar version that wrote it")
    missing = [k for k in ROOT_ATTRS if k not in attrs]
    if missing:
        raise LogError(f"{path}: root attributes {missing} are missing; the writer must set all of {list(ROOT_ATTRS)}")
    nodes: Nodes = dict(root.members(max_depth=None))  # one concurrent listing: much faster than node by node
    labels = np.asarray(_array(nodes, "heldout_labels", 1, True, None)[:], np.int64)
    index = np.asarray(_array(nodes, "heldout_index", 1, True, None)[:], np.int64)
    if len(labels) != len(index):
        raise LogError(f"{path}: heldout_labels has {len(labels)} entries but heldout_index {len(index)}")
    # Rank 0 creates every block group; the owning rank then creates its arrays, `step` last: a group
    # without `step` is one whose rank has not started yet.
    blocks = {b: _read_block(nodes, b, len(labels))
              for b in range(int(attrs["num_blocks"])) if isinstance(nodes.get(f"block{b}/step"), zarr.Array)}
    return RunLog(run_dir, attrs, labels, index, blocks, read_summary(run_dir))
