"""Reading a damaged log: arrays decoded chunk by chunk, and what could not be read, named.

A chunk file can be corrupted (a disk error, a copy cut short, a node killed mid-write) and an
array's zarr.json can be lost. zarr then raises from deep inside a codec, for the whole read. The
analysis reads every array through a `RowReader`: a whole read first (the fast path), and when that
fails, one chunk of rows at a time, so every row that decodes is kept. Each chunk of rows that does
not decode becomes one `Damage`, naming the array, the logged steps it held and the codec's error;
the commands print them as warnings and analyse without those rows.

What is done with an unreadable row is the caller's choice, made in analysis/store.py: rows are
dropped where a value must be real (steps, activations, gradients) and NaN where the series is a
float plot line. Never zeros: zarr's fill value must not pass for data.

What cannot be seen: a float chunk whose file is gone reads as zeros, exactly like a chunk zarr never
wrote because it held only the fill value, so it is not reported. A `step` chunk gone reads as -1
(NOT_WRITTEN), which is damage before later steps, but at the end looks like rows still being written.
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from sim.record.log_format import NOT_WRITTEN, STORE_NAME

# Store rows lo..hi (both included) -> "steps 20..30", or None when none of them is analysed anyway
# (past the rows every array holds, or already dropped because their step is unreadable).
Label = Callable[[int, int], str | None]
DROPPED = "analysed without them"
AS_NAN = "shown as NaN"


class LogError(ValueError):
    """A log that cannot be analysed: says what is wrong and what to do instead."""


class Unreadable(LogError):
    """A row the analysis needs could not be decoded; the damage is also in the run's warnings."""


@dataclass(frozen=True)
class Damage:
    """One part of the store that could not be read."""
    path: str  # inside the store, e.g. "block2/activations"
    what: str  # "steps 20..30", "rows 4..5" (when the steps are unreadable too) or "every row"
    reason: str  # "chunk c/1/0/0: Zstd decompression error: invalid input data", "zarr.json missing"
    outcome: str  # DROPPED or AS_NAN

    def line(self, store: str = STORE_NAME) -> str:
        return f"warning: {store}/{self.path}: {self.what} unreadable ({self.reason}); {self.outcome}"


def one_line(err: BaseException, limit: int = 160) -> str:
    """An exception as a short single line (codec errors can carry a multi-line context)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def span(word: str, values: list[int]) -> str:
    """"steps 20..30", or "step 20" for one value."""
    return f"{word}s {values[0]}..{values[-1]}" if values[-1] != values[0] else f"{word} {values[0]}"


def row_label(lo: int, hi: int) -> str:
    """The label of rows whose step is unknown: their row numbers."""
    return span("row", [lo, hi] if hi > lo else [lo])


@dataclass
class RowReader:
    """One array of the store, read by rows along its first dimension.

    `array` is None when its metadata (zarr.json) is unreadable; `error` then says why, and every row
    is unreadable. Chunks that failed once are not read again, and each is reported once.
    """
    path: str  # inside the store
    array: zarr.Array | None
    damage: list[Damage]  # the run's list, shared by all its readers
    outcome: str = DROPPED
    error: str | None = None
    bad: dict[int, str] = field(default_factory=dict)  # chunk row index -> why it failed
    reported: bool = False  # the unreadable metadata, reported once

    @property
    def length(self) -> int | None:
        """Rows the array holds; None when its metadata is unreadable."""
        return None if self.array is None else self.array.shape[0]

    def why(self, row: int) -> str:
        """Why row `row` could not be read."""
        if self.array is None:
            return str(self.error)
        return self.bad.get(row // self.array.chunks[0], "unreadable")

    def read(self, start: int, stop: int, label: Label) -> tuple[np.ndarray | None, np.ndarray]:
        """Rows start..stop-1 and a boolean mask of those that decoded.

        Rows that did not decode hold NaN (floats) or NOT_WRITTEN (integers) and are False in the mask;
        the values are None when the metadata is unreadable (the row shape is then unknown).
        """
        ok = np.zeros(max(stop - start, 0), bool)
        if self.array is None:
            if len(ok) and not self.reported:
                self.reported = True
                self.damage.append(Damage(self.path, "every row", str(self.error), self.outcome))
            return None, ok
        arr, c = self.array, self.array.chunks[0]
        if not self.bad:
            try:
                return np.asarray(arr[start:stop]), ~ok  # the fast path: one read of every chunk
            except Exception:  # any codec or store error: find the chunks that fail below
                pass
        out = np.full((len(ok), *arr.shape[1:]), np.nan if arr.dtype.kind == "f" else NOT_WRITTEN, arr.dtype)
        for i in range(start // c, math.ceil(stop / c)):
            lo, hi = max(start, i * c), min(stop, (i + 1) * c)
            if i in self.bad:
                continue
            try:
                out[lo - start:hi - start] = arr[lo:hi]
                ok[lo - start:hi - start] = True
            except Exception as err:  # any decoding failure marks the chunk, not the run
                self.bad[i] = self._reason(i, err)
                what = label(i * c, min((i + 1) * c, arr.shape[0]) - 1)
                if what is not None:
                    self.damage.append(Damage(self.path, what, self.bad[i], self.outcome))
        return out, ok

    def _reason(self, i: int, err: Exception) -> str:
        """Name the failing chunk of row chunk `i`: along the other dimensions, the first that fails."""
        arr = self.array
        assert arr is not None
        grid = [range(math.ceil(s / c)) for s, c in zip(arr.shape[1:], arr.chunks[1:])]
        for rest in itertools.product(*grid):
            where = tuple(slice(j * c, (j + 1) * c) for j, c in zip((i, *rest), arr.chunks))
            try:
                arr[where]
            except Exception as e:  # the codec's own error is the message
                err = e
                key = arr.metadata.chunk_key_encoding.encode_chunk_key((i, *rest))
                return f"chunk {key}: {one_line(err)}"
        return one_line(err)

    def report_lost_steps(self, rows: np.ndarray) -> None:
        """Rows of this `step` array that read -1 before later steps. Not rows being written (rows are
        appended in order, step last): the fill value of a step chunk whose file is gone."""
        for lo, hi in consecutive_runs(rows):
            self.damage.append(Damage(self.path, row_label(lo, hi), "step chunk missing: reads as the fill value -1",
                                      self.outcome))


def metadata_error(store_dir: Path, path: str, err: Exception | None) -> str:
    """Why the zarr.json of node `path` cannot be read."""
    meta = store_dir / path / "zarr.json"
    if not meta.exists():
        return "zarr.json missing"
    return f"zarr.json: {one_line(err)}" if err is not None else "zarr.json unreadable"


def consecutive_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs (first, last) of sorted row numbers."""
    out: list[tuple[int, int]] = []
    for r in rows.tolist():
        if out and r == out[-1][1] + 1:
            out[-1] = (out[-1][0], r)
        else:
            out.append((r, r))
    return out


class Listing:
    """The store's nodes by path, listed once; when a zarr.json below the root is damaged, the listing
    fails as a whole, and each node the format names is then opened alone."""

    def __init__(self, root: zarr.Group, store_dir: Path):
        self.root, self.store_dir = root, store_dir
        try:
            with warnings.catch_warnings():  # zarr warns of a folder without zarr.json; `get` names it instead
                warnings.simplefilter("ignore")
                self.nodes: dict[str, zarr.Array | zarr.Group] | None = dict(root.members(max_depth=None))
        except Exception:  # a damaged zarr.json somewhere below the root
            self.nodes = None

    def get(self, path: str) -> tuple[zarr.Array | zarr.Group | None, str | None]:
        """(node, None); (None, why) when its folder is there but its metadata unreadable; (None, None) if absent."""
        if self.nodes is not None and path in self.nodes:
            return self.nodes[path], None
        if not (self.store_dir / path).is_dir():
            return None, None  # not created (yet): the caller decides whether that is allowed
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self.root[path], None
        except Exception as err:  # missing or invalid zarr.json
            return None, metadata_error(self.store_dir, path, err)
