"""Read a run's activation log, RUN_DIR/log.zarr, read-only, and its summary.json.

The contract is the log format, defined and documented once in sim/record/log_format.py (standard library
only, the one module of `sim` imported here): its names, dtypes and dimensions are checked as read.

The store may still be being written: every array is read up to its current length, and the arrays
of one block are cut to their shortest common length.

The store may be damaged (analysis/damage.py): opening it reads metadata only, and each array is read
when an analysis first needs it, chunk by chunk if a whole read fails. What cannot be read is added to
`RunLog.damage` and handled so that it never passes for data:
- a row whose `step` cannot be read is dropped from every array of its block (or pair group): its
  values could not be placed in time;
- the activations and the gradients of an unreadable row are not returned: `BlockLog.activations`
  raises `Unreadable` and `AlignLog.pairs` leaves the pair out, so each analysis runs without it;
- a per-step scalar (loss, scores, norms, timings, bytes) that cannot be read is NaN: a gap in a plot.
A damaged root zarr.json is a LogError: nothing in the store can be found without it.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from analysis.damage import AS_NAN, DROPPED, Damage, Listing, LogError, RowReader, Unreadable, one_line, row_label, span
from sim.record.log_format import (
    ACTIVATIONS,
    ADDED_LATER,
    ALIGN_STEP,
    BLOCK_ATTRS,
    BP_GRADIENT,
    FORMAT_VERSION,
    HELDOUT_INDEX,
    HELDOUT_LABELS,
    LOCAL_GRADIENT,
    ROOT_ATTRS,
    SCALARS,
    STEP,
    STORE_NAME,
    VERSION_ATTR,
    ArraySpec,
    align_group,
    block_group,
)
from sim.record.summary import SUMMARY_NAME, RunSummary, finished

__all__ = ["AlignLog", "BlockLog", "LogError", "RunLog", "Unreadable", "open_run", "read_summary"]

ENABLE_HINT = "rerun with logging on, e.g. `--set log.every=N` (log every N training steps)"
HELDOUT_OUTCOME = "the commands that need it stop"


def _reader(listing: Listing, group: str, spec: ArraySpec, damage: list[Damage], outcome: str = DROPPED,
            check_dim: bool = True) -> RowReader:
    """The array `spec` of `group` ("" for the root), checked against the format's name, rank, dtype kind
    (integer or float: any width reads) and, with `check_dim`, first dimension. An array whose folder is
    there but whose zarr.json is not readable gives a reader of no rows, each reported when first read."""
    path = f"{group}/{spec.name}" if group else spec.name
    where, name = f"{STORE_NAME}/{path}".rsplit("/", 1)
    arr, error = listing.get(path)
    if error is not None:
        return RowReader(path, None, damage, outcome, error)
    if not isinstance(arr, zarr.Array):
        raise LogError(f"{where}: array {name!r} is missing; the log format requires it (sim/record/log_format.py "
                       "defines the format). Was the store written by another version of laminar?")
    kind, ndim = np.dtype(arr.dtype).kind, len(spec.dims)
    if arr.ndim != ndim or (kind not in "iu" if spec.integer else kind != "f"):
        want = "integer" if spec.integer else "float"
        raise LogError(f"{where}/{name}: expected a {ndim}-d {want} array, found {arr.ndim}-d {arr.dtype}; "
                       "the writer does not follow the log format")
    names, dim = arr.metadata.dimension_names, spec.dims[0]
    if check_dim and names is not None and names[0] != dim:
        raise LogError(f"{where}/{name}: first dimension is named {names[0]!r}, the format says {dim!r}")
    return RowReader(path, arr, damage, outcome)


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


def _kept_rows(step: RowReader, readers: list[RowReader]) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, their steps) of a group's complete rows whose step reads: rows every readable array
    holds, less rows not written yet at the end, less rows whose step chunk is undecodable or missing."""
    if step.length is None:
        step.read(0, 1, row_label)  # reports the unreadable metadata
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = min(r.length for r in readers if r.length is not None)
    values, ok = step.read(0, n, row_label)
    rows = np.flatnonzero(ok)
    steps = np.asarray(values, np.int64)[rows]
    m = _common_rows(steps, [])
    rows, steps = rows[:m], steps[:m]
    step.report_lost_steps(rows[steps < 0])
    return rows[steps >= 0], steps[steps >= 0]


def _step_label(rows: np.ndarray, steps: np.ndarray, lo: int, hi: int) -> str | None:
    """The logged steps held by store rows lo..hi, or None when none of them is analysed."""
    held = steps[(rows >= lo) & (rows <= hi)]
    return span("step", [int(held[0]), int(held[-1])]) if len(held) else None


@dataclass
class AlignLog:
    """Gradient pairs of one block: row i holds the local and the back-propagated gradient at step[i]."""
    step_reader: RowReader  # (align,) int64
    local_gradient: RowReader  # (align, param), read row blocks at a time: full-width rows are large
    bp_gradient: RowReader

    @cached_property
    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        return _kept_rows(self.step_reader, [self.step_reader, self.local_gradient, self.bp_gradient])

    @property
    def step(self) -> np.ndarray:
        """(pairs,) int64: the steps of the pairs whose step reads."""
        return self._index[1]

    def __len__(self) -> int:
        return len(self.step)

    def _label(self, lo: int, hi: int) -> str | None:
        return _step_label(*self._index, lo, hi)

    def pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps (rows,) and float64 (rows, param) local and BP gradients of pairs start..stop-1 whose
        gradients both decode; the others are left out (and in the run's damage)."""
        rows, steps = self._index[0][start:stop], self.step[start:stop]
        if not len(rows):
            return steps, np.zeros((0, 0)), np.zeros((0, 0))
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        (local, ok_local), (bp, ok_bp) = (g.read(lo, hi, self._label) for g in (self.local_gradient, self.bp_gradient))
        if local is None or bp is None:
            return steps[:0], np.zeros((0, 0)), np.zeros((0, 0))
        at = rows - lo
        ok = ok_local[at] & ok_bp[at]
        return steps[ok], np.asarray(local[at][ok], np.float64), np.asarray(bp[at][ok], np.float64)


@dataclass
class BlockLog:
    """One block group: its attributes and its arrays, each read when first needed."""
    index: int
    attrs: dict[str, Any]
    arrays: dict[str, RowReader]  # SERIES names and "activations"
    align: AlignLog | None

    @cached_property
    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        return _kept_rows(self.arrays[STEP.name], list(self.arrays.values()))

    @property
    def steps(self) -> np.ndarray:
        """(rows,) int64: the logged steps analysed (complete, and with a readable step)."""
        return self._index[1]

    def _label(self, lo: int, hi: int) -> str | None:
        return _step_label(*self._index, lo, hi)

    @cached_property
    def series(self) -> dict[str, np.ndarray]:
        """SERIES name -> (rows,): "step" int64, every other float64 (NaN where a row did not decode)."""
        rows = self._index[0]
        n = int(rows[-1]) + 1 if len(rows) else 0
        out = {STEP.name: self.steps}
        for spec in SCALARS:
            if spec.name not in self.arrays:  # a log older than the array (ADDED_LATER)
                out[spec.name] = np.full(len(rows), np.nan)
                continue
            values, ok = self.arrays[spec.name].read(0, n, self._label)
            column = np.full(n, np.nan) if values is None else np.asarray(values, np.float64)
            column[~ok] = np.nan
            out[spec.name] = column[rows]
        return out

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
        """float32 (image, feature) pooled activity of the held-out images at logged row `row`; `Unreadable`
        if that row does not decode."""
        if not 0 <= row < len(self.steps):  # rows past the common length may not be written yet
            raise IndexError(f"block {self.index} has {len(self.steps)} complete logged rows, not row {row}")
        reader, at = self.arrays[ACTIVATIONS.name], int(self._index[0][row])
        values, ok = reader.read(at, at + 1, self._label)
        if values is None or not ok[0]:
            raise Unreadable(f"{STORE_NAME}/{reader.path}: step {self.steps[row]} cannot be read ({reader.why(at)})")
        return np.asarray(values[0], np.float32)


@dataclass
class RunLog:
    """Everything the analysis reads about one run."""
    run_dir: Path
    attrs: dict[str, Any]
    heldout: dict[str, RowReader]  # heldout_labels and heldout_index, read when first needed
    num_images: int | None  # from the held-out arrays' metadata; None if neither is readable
    blocks: dict[int, BlockLog]  # by block index; only blocks whose rank has created their arrays
    summary: RunSummary | None  # summary.json, written when the run ends
    damage: list[Damage] = field(default_factory=list)  # what could not be read so far, in reading order

    @property
    def name(self) -> str:
        return f"{self.attrs['method']} ({self.run_dir.name})"

    def _whole(self, name: str) -> np.ndarray:
        reader = self.heldout[name]
        n = 1 if reader.length is None else reader.length  # one row when unknown: enough to report the metadata
        values, ok = reader.read(0, n, lambda lo, hi: span("image", [lo, hi]))
        if values is None or not ok.all():
            raise Unreadable(f"{STORE_NAME}/{reader.path} cannot be read ({reader.why(int(np.argmin(ok)))}), and "
                             "this analysis needs every held-out image's entry")
        return np.asarray(values, np.int64)

    @cached_property
    def heldout_labels(self) -> np.ndarray:
        """(image,) int64; `Unreadable` if any part of it does not decode."""
        return self._whole(HELDOUT_LABELS.name)

    @cached_property
    def heldout_index(self) -> np.ndarray:
        """(image,) int64 indices in the test split; `Unreadable` if any part of it does not decode."""
        return self._whole(HELDOUT_INDEX.name)

    def warnings(self, store: str = STORE_NAME) -> list[str]:
        """One line per damaged part read so far, each once."""
        return list(dict.fromkeys(d.line(store) for d in self.damage))

    def require_rows(self) -> None:
        """Stop with a clear message when no block has a logged step to analyse: every one damaged, or none
        logged yet."""
        if any(len(b.steps) for b in self.blocks.values()):
            return
        groups = [block_group(b) for b in range(int(self.attrs["num_blocks"]))]
        steps = {*groups, *(f"{g}/{STEP.name}" for g in groups)}  # a block left out, or its steps unreadable
        self.require_undamaged("step", lambda path: path in steps, "log.every")
        raise LogError(f"{self.run_dir / STORE_NAME} holds no logged steps yet (log_every = "
                       f"{self.attrs['log_every']}): wait until the run logs its first step, or {ENABLE_HINT}")

    def require_undamaged(self, what: str, holds: Callable[[str], bool], setting: str) -> None:
        """For a command left with no `what` to analyse: a LogError saying that damage took them all when a
        damaged part of the store (a path for which `holds` is true) held them; else nothing."""
        if any(holds(d.path) for d in self.damage):  # the part itself: a warning, and on the error's line
            raise LogError(f"{self.run_dir / STORE_NAME} holds no readable logged {what}: every one is in a damaged "
                           f"part of the store; rerun with `--set {setting}=N` to log them again")

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


def _read_block(listing: Listing, index: int, num_images: int | None, damage: list[Damage]) -> BlockLog | None:
    prefix = block_group(index)
    where = f"{STORE_NAME}/{prefix}"
    group, error = listing.get(prefix)
    if error is not None or not isinstance(group, zarr.Group):
        # Without its attributes nothing of the block can be interpreted (rank, feature_dim, weight_shape).
        damage.append(Damage(prefix, "every row", error or "not a group", f"block {index} left out"))
        return None
    attrs = group.attrs.asdict()
    missing = [k for k in BLOCK_ATTRS if k not in attrs]
    if missing:
        raise LogError(f"{where}: attributes {missing} are missing; the writer must set {list(BLOCK_ATTRS)}")
    arrays = {STEP.name: _reader(listing, prefix, STEP, damage)}
    arrays |= {spec.name: _reader(listing, prefix, spec, damage, AS_NAN) for spec in SCALARS
               if spec.name not in ADDED_LATER or listing.get(f"{prefix}/{spec.name}") != (None, None)}
    acts = arrays[ACTIVATIONS.name] = _reader(listing, prefix, ACTIVATIONS, damage)
    want = (num_images, attrs["feature_dim"])
    if acts.array is not None and num_images is not None and acts.array.shape[1:] != want:
        raise LogError(f"{where}/{ACTIVATIONS.name}: rows are {acts.array.shape[1:]}, expected (images, feature_dim) = "
                       f"{want} from heldout_labels and the block's attributes")
    return BlockLog(index, attrs, arrays, _read_align(listing, index, attrs, damage))


def _read_align(listing: Listing, index: int, attrs: dict[str, Any], damage: list[Damage]) -> AlignLog | None:
    prefix = align_group(index)
    node, error = listing.get(f"{prefix}/{ALIGN_STEP.name}")
    if node is None and error is None:
        return None  # end-to-end methods and align_every = 0 write no pairs (or an empty group)
    where = f"{STORE_NAME}/{prefix}"
    step = _reader(listing, prefix, ALIGN_STEP, damage)
    local = _reader(listing, prefix, LOCAL_GRADIENT, damage)
    bp = _reader(listing, prefix, BP_GRADIENT, damage)
    params = math.prod(attrs["weight_shape"])
    for reader in (local, bp):
        if reader.array is not None and reader.array.shape[1] != params:
            raise LogError(f"{where}/{reader.path.rsplit('/', 1)[1]}: rows hold {reader.array.shape[1]} values, but "
                           f"weight_shape {attrs['weight_shape']} has {params}")
    return None if step.length == 0 else AlignLog(step, local, bp)


def read_summary(run_dir: Path) -> RunSummary | None:
    """summary.json, or None while the run has not finished."""
    return RunSummary.read(run_dir) if finished(run_dir) else None


def _not_a_run(folder: Path) -> str:
    """What to pass instead of `folder`, which holds none of a run's files: the runs just below it, if any."""
    try:
        runs = sorted(p for p in folder.iterdir() if (p / STORE_NAME).is_dir())
    except OSError:  # a folder it may not list: the message goes without the runs below
        runs = []
    below = f"; the runs in it: {', '.join(map(str, runs[:5]))}{', ...' if len(runs) > 5 else ''}" if runs else ""
    return (f"{folder} is not a run folder (it holds no {STORE_NAME}, config.toml or {SUMMARY_NAME}); pass "
            f"the --out folder of launch.train{below}")


def open_run(run_dir: str | Path) -> RunLog:
    """Open RUN_DIR/log.zarr read-only, reading metadata only; a LogError says what is missing and how to get it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LogError(f"{run_dir} is not a folder; pass a run folder (the --out of launch.train)")
    path = run_dir / STORE_NAME
    if not path.exists() and not any((run_dir / name).exists() for name in ("config.toml", SUMMARY_NAME)):
        raise LogError(_not_a_run(run_dir))
    if not path.exists():
        raise LogError(f"{path} does not exist: the run was made without logging. {ENABLE_HINT[0].upper()}"
                       f"{ENABLE_HINT[1:]}; summary.json and the checkpoints do not hold per-step activations.")
    try:
        root = zarr.open_group(path, mode="r")
        attrs = root.attrs.asdict()
    except Exception as err:  # any decoding error: the root metadata is what every other node is found from
        if (path / "zarr.json").exists():
            raise LogError(f"{path} is unreadable: its root zarr.json is damaged ({one_line(err)}), so none of the "
                           "log can be found; get it again by rerunning the run with log.every > 0 "
                           "(`--set log.every=N`)") from err
        raise LogError(f"{path} is not a readable zarr group ({one_line(err)}); rank 0 writes it when training "
                       "starts") from err
    if attrs.get(VERSION_ATTR) != FORMAT_VERSION:
        raise LogError(f"{path}: log format version {attrs.get(VERSION_ATTR)!r}, this analysis reads version "
                       f"{FORMAT_VERSION}; analyse it with the laminar version that wrote it")
    missing = [k for k in ROOT_ATTRS if k not in attrs]
    if missing:
        raise LogError(f"{path}: root attributes {missing} are missing; the writer must set all of {list(ROOT_ATTRS)}")
    listing = Listing(root, path)  # one concurrent listing: much faster than node by node
    damage: list[Damage] = []
    # The held-out arrays never grow, so the name of their one dimension is not checked.
    heldout = {spec.name: _reader(listing, "", spec, damage, HELDOUT_OUTCOME, check_dim=False)
               for spec in (HELDOUT_LABELS, HELDOUT_INDEX)}
    lengths = {r.length for r in heldout.values()} - {None}
    if len(lengths) > 1:
        raise LogError(f"{path}: heldout_labels has {heldout[HELDOUT_LABELS.name].length} entries but heldout_index "
                       f"{heldout[HELDOUT_INDEX.name].length}")
    num_images = lengths.pop() if lengths else None
    # Rank 0 creates every block group; the owning rank then creates its arrays, `step` last: a group
    # without `step` is one whose rank has not started yet.
    blocks = {}
    for b in range(int(attrs["num_blocks"])):
        node, error = listing.get(f"{block_group(b)}/{STEP.name}")
        block = None if node is None and error is None else _read_block(listing, b, num_images, damage)
        if block is not None:
            blocks[b] = block
    return RunLog(run_dir, attrs, heldout, num_images, blocks, read_summary(run_dir), damage)
