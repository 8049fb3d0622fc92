"""Checkpoints and the final weights: plain dicts of tensors, written atomically, read with
`weights_only=True`."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from layers.block import Block


def _save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)  # a crash leaves the previous file intact, never half of one


def save_checkpoint(path: Path, step: int, blocks: Sequence[Block]) -> None:
    """Everything needed to continue after `step` steps: weights, B matrices, optimiser states."""
    _save_atomic(
        {
            "step": step,
            "blocks": {b.index: b.state_dict() for b in blocks},
            "optimizers": {b.index: b.optimizer.state_dict() for b in blocks},
        },
        path,
    )


def load_checkpoint(path: Path, blocks: Sequence[Block]) -> int:
    """Restore `blocks` from a checkpoint; returns the number of steps already done."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for block in blocks:
        if block.index not in state["blocks"]:
            raise ValueError(f"{path} holds blocks {sorted(state['blocks'])}, not block {block.index}")
        block.load_state_dict(state["blocks"][block.index])
        block.optimizer.load_state_dict(state["optimizers"][block.index])
    return int(state["step"])


def save_final(path: Path, blocks: Sequence[Block]) -> None:
    """final.pt: {block index: that block's state_dict (conv weights and B matrices)}."""
    _save_atomic({b.index: {k: v.cpu() for k, v in b.state_dict().items()} for b in blocks}, path)


def load_final(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    return torch.load(path, map_location="cpu", weights_only=True)
