"""RUN_DIR/log.zarr, written while training: what every block did at every logged step.

One zarr v3 store per run. Rank 0 creates the root (attributes: config, code version, world size,
placement, dataset) and one group per block; each rank then writes only the groups of its own
blocks. Rows (one per logged step, dimension "step") wait in memory and are appended a chunk at a
time; at every checkpoint the buffer is flushed, so the store always holds every logged step before
the last checkpoint, and a resumed run truncates what came after it and appends from there: no
gap, no duplicate. The `step` arrays are appended last and filled with -1 until written: a reader
of a store still being written takes the rows whose step is >= 0, and every other array already
holds them. The layout is documented in analysis/store.py, which reads it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

SCALARS = {"loss": "float32", "score_pos": "float32", "score_neg": "float32", "update_norm": "float32",
           "feedback_norm": "float32", "step_seconds": "float32", "bytes_sent": "int64"}


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


def create_store(path: Path, attrs: dict, blocks: Sequence[BlockInfo], heldout_labels: np.ndarray,
                 heldout_index: np.ndarray) -> None:
    """Rank 0, before any rank writes: the root, its attributes and an empty group per block."""
    root = zarr.open_group(str(path), mode="w", attributes={"laminar_log": 1, **attrs})
    root.create_array("heldout_labels", data=heldout_labels.astype(np.int64), dimension_names=("image",))
    root.create_array("heldout_index", data=heldout_index.astype(np.int64), dimension_names=("image",))
    for info in blocks:
        attributes = {**info.__dict__, "weight_shape": list(info.weight_shape)}
        root.create_group(f"block{info.block}", attributes=attributes)


class BlockWriter:
    """Rows of one block: filled field by field, appended in step order."""

    def __init__(self, root: zarr.Group, info: BlockInfo, settings: LogSettings, start_step: int):
        self.info, self.settings = info, settings
        group = root[f"block{info.block}"]
        chunk = settings.chunk
        self.arrays = {name: _array(group, name, (0,), (chunk,), dtype, ("step",)) for name, dtype in SCALARS.items()}
        self.arrays["activations"] = _array(group, "activations", (0, settings.heldout, info.feature_dim),
                                            (chunk, settings.heldout, info.feature_dim), settings.dtype,
                                            ("step", "image", "feature"))
        self.arrays["step"] = _array(group, "step", (0,), (chunk,), "int64", ("step",), fill_value=-1)  # last
        params = int(np.prod(info.weight_shape))
        align = group.require_group("align")
        self.align = {"local_gradient": _array(align, "local_gradient", (0, params), (1, params), "float32",
                                               ("align", "param")),
                      "bp_gradient": _array(align, "bp_gradient", (0, params), (1, params), "float32",
                                            ("align", "param")),
                      "step": _array(align, "step", (0,), (chunk,), "int64", ("align",), fill_value=-1)}
        _truncate(self.arrays, start_step)  # a resumed run rewrites what came after its checkpoint
        _truncate(self.align, start_step)
        self.rows: dict[int, dict] = {}  # step -> fields recorded so far
        self.ready: list[dict] = []  # complete rows, in step order, not yet written
        self.pairs: dict[int, dict] = {}  # step -> {"local_gradient", "bp_gradient"}

    def record(self, step: int, part: str | None = None, **fields) -> None:
        """Add fields to row `step`. A row is complete once both its parts are in: "forward" (the
        rank's forward action of the step is over) and "update" (the block learned from the step's
        batch, which for delayed feedback comes later)."""
        row = self.rows.setdefault(step, {"step": step, "parts": set()})
        row.update(fields)
        if part is not None:
            row["parts"].add(part)
        if row["parts"] == {"forward", "update"}:
            self._complete(step)

    def _complete(self, step: int) -> None:
        row = self.rows.pop(step)  # missing scalars are NaN: no loss of its own, no feedback
        if self.ready and self.ready[-1]["step"] >= step:
            raise RuntimeError(f"block {self.info.block}: log row {step} completed out of order")
        for name, dtype in SCALARS.items():
            row.setdefault(name, np.nan if dtype == "float32" else 0)
        self.ready.append(row)
        if len(self.ready) >= self.settings.chunk:
            self.flush()

    def record_pair(self, step: int, **gradients: np.ndarray) -> None:
        pair = self.pairs.setdefault(step, {})
        pair.update(gradients)
        if len(pair) == 2:
            del self.pairs[step]
            for name in ("local_gradient", "bp_gradient"):
                self.align[name].append(pair[name].reshape(1, -1).astype(np.float32))
            self.align["step"].append(np.array([step], dtype=np.int64))  # last: the row is now whole

    def flush(self) -> None:
        if not self.ready:
            return
        for name, array in self.arrays.items():  # "step" comes last
            values = np.stack([np.asarray(row[name]) for row in self.ready]).astype(array.dtype)
            array.append(values)
        self.ready.clear()


def _array(group: zarr.Group, name: str, shape: tuple, chunks: tuple, dtype: str, dims: tuple,
           fill_value: float | None = None) -> zarr.Array:
    if name in group:
        return group[name]
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims,
                              fill_value=fill_value)


def _truncate(arrays: dict[str, zarr.Array], start_step: int) -> None:
    """Drop rows of steps >= start_step (and any row beyond the shortest field)."""
    steps = arrays["step"][:]
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
