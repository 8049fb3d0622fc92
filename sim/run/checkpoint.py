"""Checkpoints and final weights: plain dicts of tensors, written atomically, read with
`weights_only=True`.

A checkpoint is one file per block, `checkpoints/step00000100/block3.pt`, written by whichever
rank owns the block: a run can resume with any number of processes and any placement. A step is
complete when all six block files exist; each rank keeps its blocks' last `KEEP` steps. A write
that fails (a full disk, no permission) removes what it wrote of that step and raises
`CheckpointWriteError`, naming the path and the bytes needed; earlier steps are left as they were.
A step whose files cannot all be read is set aside in `checkpoints/unreadable/`, never deleted.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from layers.block import Block
from layers.encoder import NUM_BLOCKS

KEEP = 2  # checkpoints kept per block: a crash while writing one leaves the previous one whole
UNREADABLE = "unreadable"  # checkpoints/unreadable/stepNNNNNNNN: steps set aside by a resume


class CheckpointWriteError(OSError):
    """A checkpoint or final.pt could not be written: names the path, the cause and the bytes needed."""


def _tensor_bytes(obj: object) -> int:
    """Bytes of the tensors in a (nested) state dict: about what its file needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _save_atomic(obj: object, path: Path) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())  # on disk before it takes the real name, even if the host crashes
        os.replace(temporary, path)  # a crash leaves the previous file intact, never half of one
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        temporary.unlink(missing_ok=True)
        needed, free = _tensor_bytes(obj), shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        cause = error.strerror if isinstance(error, OSError) and error.strerror else "the write failed"
        if free < needed:
            cause = "No space left on device"
        raise CheckpointWriteError(f"could not write {path}: {cause}; it needs about {needed:,} bytes "
                                   f"and {free:,} are free there") from None


FINAL = "final.pt"  # a finished run's weights, in its run folder


def checkpoints_folder(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_folder(run_dir: Path, step: int) -> Path:
    return checkpoints_folder(run_dir) / f"step{step:08d}"


def delete_weights(run_dir: Path) -> None:
    """Remove a run's weights (final.pt and every checkpoint), keeping its config, log and summary."""
    (run_dir / FINAL).unlink(missing_ok=True)
    shutil.rmtree(checkpoints_folder(run_dir), ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, blocks: Sequence[Block],
                    recent_losses: Mapping[int, Iterable[float]] | None = None) -> None:
    """Everything needed to continue after `step` steps: weights, B matrices, optimiser states, and
    each block's latest losses (`recent_losses`: what summary.json averages, so that a resumed run
    reports what an uninterrupted one does)."""
    written = []
    for block in blocks:
        state = {"step": step, "block": block.state_dict(), "optimizer": block.optimizer.state_dict(),
                 "recent_losses": [float(v) for v in (recent_losses or {}).get(block.index, [])]}
        path = step_folder(run_dir, step) / f"block{block.index}.pt"
        try:
            _save_atomic(state, path)
        except CheckpointWriteError as error:
            for done in written:  # a step this rank could not finish holds nothing of it
                done.unlink(missing_ok=True)
            earlier = completed_steps(run_dir)
            then = (f"the checkpoint of step {earlier[-1]} is intact. Free space, then continue with --resume {run_dir}"
                    if earlier else "no earlier checkpoint exists, so there is nothing to resume from. Free space, "
                    f"then start the run again: the same command after removing {run_dir}, or with another --out")
            raise CheckpointWriteError(f"{error}; {then}") from None
        written.append(path)
    complete = completed_steps(run_dir)
    if len(complete) < KEEP:
        return
    for old in completed_steps(run_dir, [b.index for b in blocks]):
        if old >= complete[-KEEP]:
            break
        for block in blocks:
            (step_folder(run_dir, old) / f"block{block.index}.pt").unlink(missing_ok=True)
        try:
            step_folder(run_dir, old).rmdir()  # only once every rank removed its files
        except OSError:
            pass


def completed_steps(run_dir: Path, blocks: Sequence[int] = range(NUM_BLOCKS)) -> list[int]:
    """Steps (ascending) at which every block in `blocks` has a checkpoint."""
    folder = checkpoints_folder(run_dir)
    if not folder.is_dir():
        return []
    steps = [int(p.name[4:]) for p in folder.glob("step*") if p.name[4:].isdigit()]
    return sorted(s for s in steps if all((step_folder(run_dir, s) / f"block{b}.pt").is_file() for b in blocks))


def has_checkpoints(run_dir: Path) -> bool:
    """Whether any block file of any step is in the run folder."""
    return any(checkpoints_folder(run_dir).glob("step*/block*.pt"))


def unreadable_file(run_dir: Path, step: int) -> str | None:
    """Why the checkpoint of `step` cannot be loaded (the first block file that fails its archive's
    checksums, or is no archive at all), or None when every block file reads."""
    for block in range(NUM_BLOCKS):
        path = step_folder(run_dir, step) / f"block{block}.pt"
        try:
            with zipfile.ZipFile(path) as archive:  # torch.save writes a zip archive; this reads it all
                bad = archive.testzip()
            if bad is not None:
                return f"{path.name}: {bad} fails its checksum"
        except (OSError, zipfile.BadZipFile, EOFError) as error:
            return f"{path.name}: {error}"
    return None


def set_aside(run_dir: Path, step: int) -> Path:
    """Move the checkpoint of `step` to checkpoints/unreadable/, where nothing deletes it."""
    target = checkpoints_folder(run_dir) / UNREADABLE / step_folder(run_dir, step).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(step_folder(run_dir, step), target)
    return target


def load_checkpoint(run_dir: Path, step: int, blocks: Sequence[Block]) -> dict[int, list[float]]:
    """Restore `blocks` (weights, B matrices, optimiser states) as they were after `step` steps; returns
    each block's latest losses (none from checkpoints written before they were kept)."""
    losses = {}
    for block in blocks:
        path = step_folder(run_dir, step) / f"block{block.index}.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        block.load_state_dict(state["block"])
        block.optimizer.load_state_dict(state["optimizer"])
        losses[block.index] = list(state.get("recent_losses", []))
    return losses


def discard_after(run_dir: Path, step: int) -> None:
    """Remove checkpoints later than `step` (incomplete ones of a crashed run) before resuming, or
    all of them (`step` = -1) before starting afresh."""
    for path in checkpoints_folder(run_dir).glob("step*"):
        if path.name[4:].isdigit() and int(path.name[4:]) > step:
            shutil.rmtree(path, ignore_errors=True)


def save_final(path: Path, blocks: Sequence[Block]) -> None:
    """final.pt: {block index: that block's state_dict (conv weights and B matrices)}."""
    _save_atomic({b.index: {k: v.cpu() for k, v in b.state_dict().items()} for b in blocks}, path)


def load_final(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    return torch.load(path, map_location="cpu", weights_only=True)
