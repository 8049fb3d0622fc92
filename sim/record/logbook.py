"""RUN_DIR/log.zarr, written while training: what every block did at every logged step.

One zarr v3 store per run. Rank 0 creates the root (attributes: config, code version, world size,
placement, dataset) and one group per block; each rank then writes only the groups of its own
blocks. Rows (one per logged step, dimension "step") wait in memory and are appended a chunk at a
time; at every checkpoint the buffer is flushed, so the store always holds every logged step before
the last checkpoint, and a resumed run truncates what came after it and appends from there: no
gap, no duplicate. The `step` arrays are appended last and filled with -1 until written: a reader
of a store still being written takes the rows whose step is >= 0, and every other array already
holds them. The layout (names, dtypes, dimensions) is defined once, in sim/record/log_format.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from sim.record.log_format import (
    ACTIVATIONS,
    ALIGN_GROUP,
    ALIGN_STEP,
    BLOCK_ARRAYS,
    BLOCK_ATTRS,
    GRADIENTS,
    HELDOUT_INDEX,
    HELDOUT_LABELS,
    SCALARS,
    STEP,
    ArraySpec,
    block_group,
    root_attrs,
)


@dataclass(frozen=True)
class LogSettings:
    every: int  # steps between logged steps; 0: no log
    align_every: int  # steps between gradient-alignment pairs; 0: none
    heldout: int  # held-out images whose pooled activity is logged
    dtype: str  # of the logged activity
    chunk: int  # logged steps per chunk

    def logs(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def aligns(self, step: int) -> bool:
        return self.every > 0 and self.align_every > 0 and step % self.align_every == 0


@dataclass(frozen=True)
class BlockInfo:
    block: int
    rank: int
    feature_dim: int  # pooled features of one held-out image
    grid: int
    channels: int
    has_loss: bool
    weight_shape: tuple[int, ...]


def create_store(path: Path, attrs: dict[str, Any], blocks: Sequence[BlockInfo], heldout_labels: np.ndarray,
                 heldout_index: np.ndarray) -> None:
    """Rank 0, before any rank writes: the root, its attributes and an empty group per block.

    `attrs` holds the root fields of the format (see `root_attrs`); a missing or unknown one is an error.
    """
    root = zarr.open_group(str(path), mode="w", attributes=root_attrs(**attrs))
    for spec, values in ((HELDOUT_LABELS, heldout_labels), (HELDOUT_INDEX, heldout_index)):
        root.create_array(spec.name, data=values.astype(spec.dtype), dimension_names=spec.dims)
    for info in blocks:  # getattr: a BlockInfo without a field the format names fails here, not in a reader
        attributes = {name: getattr(info, name) for name in BLOCK_ATTRS} | {"weight_shape": list(info.weight_shape)}
        root.create_group(block_group(info.block), attributes=attributes)


class BlockWriter:
    """Rows of one block: filled field by field, appended in step order."""

    def __init__(self, root: zarr.Group, info: BlockInfo, settings: LogSettings, start_step: int):
        self.info, self.settings = info, settings
        group = root[block_group(info.block)]
        chunk, one_step = settings.chunk, (settings.heldout, info.feature_dim)  # (image, feature) of a logged step
        self.arrays: dict[str, zarr.Array] = {}  # in BLOCK_ARRAYS order, step last: flush appends in this order
        for spec in BLOCK_ARRAYS:
            row, dtype = (one_step, settings.dtype) if spec is ACTIVATIONS else ((), None)
            self.arrays[spec.name] = _array(group, spec, (0, *row), (chunk, *row), dtype)
        params = int(np.prod(info.weight_shape))
        align = group.require_group(ALIGN_GROUP)
        self.align = {spec.name: _array(align, spec, (0, params), (1, params)) for spec in GRADIENTS}
        self.align[ALIGN_STEP.name] = _array(align, ALIGN_STEP, (0,), (chunk,))
        _truncate(self.arrays, start_step)  # a resumed run rewrites what came after its checkpoint
        _truncate(self.align, start_step)
        self.rows: dict[int, dict] = {}  # step -> fields recorded so far
        self.ready: list[dict] = []  # complete rows, in step order, not yet written
        self.pairs: dict[int, dict] = {}  # step -> {"local_gradient", "bp_gradient"}

    def record(self, step: int, part: str | None = None, **fields) -> None:
        """Add fields to row `step`. A row is complete once both its parts are in: "forward" (the
        rank's forward action of the step is over) and "update" (the block learned from the step's
        batch, which for delayed feedback comes later)."""
        row = self.rows.setdefault(step, {STEP.name: step, "parts": set()})
        row.update(fields)
        if part is not None:
            row["parts"].add(part)
        if row["parts"] == {"forward", "update"}:
            self._complete(step)

    def _complete(self, step: int) -> None:
        row = self.rows.pop(step)  # missing scalars are NaN: no loss of its own, no feedback
        if self.ready and self.ready[-1][STEP.name] >= step:
            raise RuntimeError(f"block {self.info.block}: log row {step} completed out of order")
        for spec in SCALARS:
            row.setdefault(spec.name, 0 if spec.integer else np.nan)
        self.ready.append(row)
        if len(self.ready) >= self.settings.chunk:
            self.flush()

    def record_pair(self, step: int, **gradients: np.ndarray) -> None:
        pair = self.pairs.setdefault(step, {})
        pair.update(gradients)
        if len(pair) == len(GRADIENTS):
            del self.pairs[step]
            for spec in GRADIENTS:
                self.align[spec.name].append(pair[spec.name].reshape(1, -1).astype(spec.dtype))
            self.align[ALIGN_STEP.name].append(np.array([step], dtype=ALIGN_STEP.dtype))  # last: the row is now whole

    def flush(self) -> None:
        if not self.ready:
            return
        for name, array in self.arrays.items():  # "step" comes last
            values = np.stack([np.asarray(row[name]) for row in self.ready]).astype(array.dtype)
            array.append(values)
        self.ready.clear()


def _array(group: zarr.Group, spec: ArraySpec, shape: tuple[int, ...], chunks: tuple[int, ...],
           dtype: str | None = None) -> zarr.Array:
    """The array `spec` of `group`: the one already there (a resumed run), or a new empty one."""
    if spec.name in group:
        return group[spec.name]
    return group.create_array(spec.name, shape=shape, chunks=chunks, dtype=spec.pick(dtype), dimension_names=spec.dims,
                              fill_value=spec.fill_value)


def _truncate(arrays: dict[str, zarr.Array], start_step: int) -> None:
    """Drop rows of steps >= start_step (and any row beyond the shortest field)."""
    steps = arrays[STEP.name][:]  # ALIGN_STEP has the same name
    steps = steps[: int(np.argmax(steps < 0)) if (steps < 0).any() else len(steps)]  # rows fully written
    keep = min(int(np.searchsorted(steps, start_step)), *(a.shape[0] for a in arrays.values()))
    for array in arrays.values():
        if array.shape[0] != keep:
            array.resize((keep, *array.shape[1:]))


class RankLog:
    """This rank's writer: one BlockWriter per block it owns."""

    def __init__(self, path: Path, blocks: Sequence[BlockInfo], settings: LogSettings, start_step: int):
        self.settings = settings
        root = zarr.open_group(str(path), mode="r+")
        self.blocks = {info.block: BlockWriter(root, info, settings, start_step) for info in blocks}

    def flush(self) -> None:
        for writer in self.blocks.values():
            writer.flush()
