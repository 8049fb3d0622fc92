"""Read a run's activation log, RUN_DIR/log.zarr, read-only, and its summary.json.

The contract is the log format, defined and documented once in sim/log_format.py (standard library
only, the one module of `sim` imported here): its names, dtypes and dimensions are checked as read.

The store may still be being written: every array is read up to its current length, and the arrays
of one block are cut to their shortest common length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from sim.log_format import (
    ACTIVATIONS,
    ALIGN_STEP,
    BLOCK_ATTRS,
    BP_GRADIENT,
    FORMAT_VERSION,
    HELDOUT_INDEX,
    HELDOUT_LABELS,
    LOCAL_GRADIENT,
    ROOT_ATTRS,
    SERIES,
    STEP,
    STORE_NAME,
    VERSION_ATTR,
    ArraySpec,
    align_group,
    block_group,
)
from sim.summary import RunSummary, finished

ENABLE_HINT = "rerun with logging on, e.g. `--set log.every=N` (log every N training steps)"


class LogError(ValueError):
    """A log that cannot be analysed: says what is wrong and what to do instead."""


Nodes = dict[str, "zarr.Array | zarr.Group"]  # every array and group of the store, by path ("block0/align/step")


def _array(nodes: Nodes, group: str, spec: ArraySpec, check_dim: bool = True) -> zarr.Array:
    """The array `spec` of `group` ("" for the root), checked against the format's name, rank, dtype kind
    (integer or float: any width reads) and, with `check_dim`, first dimension."""
    path = f"{group}/{spec.name}" if group else spec.name
    where, name = f"{STORE_NAME}/{path}".rsplit("/", 1)
    arr = nodes.get(path)
    if not isinstance(arr, zarr.Array):
        raise LogError(f"{where}: array {name!r} is missing; the log format requires it (sim/log_format.py "
                       "defines the format). Was the store written by another version of laminar?")
    kind, ndim = np.dtype(arr.dtype).kind, len(spec.dims)
    if arr.ndim != ndim or (kind not in "iu" if spec.integer else kind != "f"):
        want = "integer" if spec.integer else "float"
        raise LogError(f"{where}/{name}: expected a {ndim}-d {want} array, found {arr.ndim}-d {arr.dtype}; "
                       "the writer does not follow the log format")
    names, dim = arr.metadata.dimension_names, spec.dims[0]
    if check_dim and names is not None and names[0] != dim:
        raise LogError(f"{where}/{name}: first dimension is named {names[0]!r}, the format says {dim!r}")
    return arr


def _common_rows(steps: np.ndarray, lengths: list[int]) -> int:
    """Rows every array of a group already holds, less trailing rows whose step is not yet written.

    An append grows an array before it fills it, so a reader can see fill values at the end of `step`:
    -1 (the format's NOT_WRITTEN) or 0 after larger steps. Steps are >= 0 and strictly increase, so such
    rows are cut rather than misread.
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
    series: dict[str, np.ndarray]  # SERIES name -> (rows,), float64 or int64; "step" included
    activations_array: zarr.Array  # (step, image, feature), read one step at a time
    align: AlignLog | None

    @property
    def steps(self) -> np.ndarray:
        return self.series[STEP.name]

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
    summary: RunSummary | None  # summary.json, written when the run ends

    @property
    def name(self) -> str:
        return f"{self.attrs['method']} ({self.run_dir.name})"

    def require_rows(self) -> None:
        """Stop with a clear message when no block has logged a step yet."""
        if not any(len(b.steps) for b in self.blocks.values()):
            raise LogError(f"{self.run_dir / STORE_NAME} holds no logged steps yet (log_every = "
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
    prefix = block_group(index)
    where = f"{STORE_NAME}/{prefix}"
    attrs = nodes[prefix].attrs.asdict()
    missing = [k for k in BLOCK_ATTRS if k not in attrs]
    if missing:
        raise LogError(f"{where}: attributes {missing} are missing; the writer must set {list(BLOCK_ATTRS)}")
    arrays = {spec.name: _array(nodes, prefix, spec) for spec in SERIES}
    acts = _array(nodes, prefix, ACTIVATIONS)
    if acts.shape[1:] != (num_images, attrs["feature_dim"]):
        raise LogError(f"{where}/{ACTIVATIONS.name}: rows are {acts.shape[1:]}, expected (images, feature_dim) = "
                       f"({num_images}, {attrs['feature_dim']}) from heldout_labels and the block's attributes")
    steps = np.asarray(arrays[STEP.name][:], np.int64)
    n = _common_rows(steps, [a.shape[0] for a in arrays.values()] + [acts.shape[0]])
    series = {spec.name: np.asarray(arrays[spec.name][:n], np.int64 if spec.integer else np.float64) for spec in SERIES}
    return BlockLog(index, attrs, series, acts, _read_align(nodes, index, attrs))


def _read_align(nodes: Nodes, index: int, attrs: dict[str, Any]) -> AlignLog | None:
    prefix = align_group(index)
    if not isinstance(nodes.get(f"{prefix}/{ALIGN_STEP.name}"), zarr.Array):
        return None  # end-to-end methods and align_every = 0 write no pairs (or an empty group)
    where = f"{STORE_NAME}/{prefix}"
    step = _array(nodes, prefix, ALIGN_STEP)
    local = _array(nodes, prefix, LOCAL_GRADIENT)
    bp = _array(nodes, prefix, BP_GRADIENT)
    params = math.prod(attrs["weight_shape"])
    for arr, name in ((local, LOCAL_GRADIENT.name), (bp, BP_GRADIENT.name)):
        if arr.shape[1] != params:
            raise LogError(f"{where}/{name}: rows hold {arr.shape[1]} values, but weight_shape "
                           f"{attrs['weight_shape']} has {params}")
    steps = np.asarray(step[:], np.int64)
    n = _common_rows(steps, [local.shape[0], bp.shape[0]])
    return AlignLog(steps[:n], local, bp) if n else None


def read_summary(run_dir: Path) -> RunSummary | None:
    """summary.json, or None while the run has not finished."""
    return RunSummary.read(run_dir) if finished(run_dir) else None


def open_run(run_dir: str | Path) -> RunLog:
    """Open RUN_DIR/log.zarr read-only; a LogError says what is missing and how to get it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LogError(f"{run_dir} is not a folder; pass a run folder (the --out of launch.train)")
    path = run_dir / STORE_NAME
    if not path.exists():
        raise LogError(f"{path} does not exist: the run was made without logging. {ENABLE_HINT[0].upper()}"
                       f"{ENABLE_HINT[1:]}; summary.json and the checkpoints do not hold per-step activations.")
    try:
        root = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError) as err:  # no root zarr.json yet, or not a zarr group
        raise LogError(f"{path} is not a readable zarr group ({err}); rank 0 writes it when training starts") from err
    attrs = root.attrs.asdict()
    if attrs.get(VERSION_ATTR) != FORMAT_VERSION:
        raise LogError(f"{path}: log format version {attrs.get(VERSION_ATTR)!r}, this analysis reads version "
                       f"{FORMAT_VERSION}; analyse it with the laminar version that wrote it")
    missing = [k for k in ROOT_ATTRS if k not in attrs]
    if missing:
        raise LogError(f"{path}: root attributes {missing} are missing; the writer must set all of {list(ROOT_ATTRS)}")
    nodes: Nodes = dict(root.members(max_depth=None))  # one concurrent listing: much faster than node by node
    # The held-out arrays never grow, so the name of their one dimension is not checked.
    labels = np.asarray(_array(nodes, "", HELDOUT_LABELS, check_dim=False)[:], np.int64)
    index = np.asarray(_array(nodes, "", HELDOUT_INDEX, check_dim=False)[:], np.int64)
    if len(labels) != len(index):
        raise LogError(f"{path}: heldout_labels has {len(labels)} entries but heldout_index {len(index)}")
    # Rank 0 creates every block group; the owning rank then creates its arrays, `step` last: a group
    # without `step` is one whose rank has not started yet.
    blocks = {b: _read_block(nodes, b, len(labels)) for b in range(int(attrs["num_blocks"]))
              if isinstance(nodes.get(f"{block_group(b)}/{STEP.name}"), zarr.Array)}
    return RunLog(run_dir, attrs, labels, index, blocks, read_summary(run_dir))
