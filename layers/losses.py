"""Pure loss functions of the local rules and the BP-SSL heads (method.md, section 2).

Conventions: a batch of B images gives 2B rows, rows 0..B-1 the first view and rows B..2B-1 the
second view of the same images. `features` are a block's pooled activities, (2B, D).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CONTRAST_MODES = ("hinge", "softhinge", "phyll", "linear")
NEGATIVE_MODES = ("next_row", "random")


def contrast(u_pos: torch.Tensor, u_neg: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-row loss f(u+, u-): the paper's 'contrast mode'."""
    if mode == "hinge":  # CLAPP
        return torch.relu(1 - u_pos) + torch.relu(1 + u_neg)
    if mode == "softhinge":
        return F.softplus(1 - u_pos) + F.softplus(1 + u_neg)
    if mode == "phyll":
        return F.softplus(u_neg - u_pos)
    if mode == "linear":
        return u_neg - u_pos
    raise ValueError(f"unknown contrast mode {mode!r}; choose one of {', '.join(CONTRAST_MODES)}")


def swap_views(rows: torch.Tensor) -> torch.Tensor:
    """Row j of the result holds the other view of the image in row j."""
    half = rows.shape[0] // 2
    return torch.cat([rows[half:], rows[:half]])  # (2B, D)


def negative_rows(num_rows: int, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Index of the negative of each row: always a row of a different image.

    `next_row` is what the authors' released code does (row j takes row j+1); `random` draws, for
    every row, any row of another image, from `generator`.
    """
    rows = torch.arange(num_rows)
    if mode == "next_row":
        return (rows + 1) % num_rows
    if mode == "random":
        half = num_rows // 2
        # Offsets 1..2B-1 except B (the same image's other view): draw from 2B-2 choices.
        offset = torch.randint(1, num_rows - 1, (num_rows,), generator=generator)
        offset = offset + (offset >= half).long()
        return (rows + offset) % num_rows
    raise ValueError(f"unknown negatives {mode!r}; choose one of {', '.join(NEGATIVE_MODES)}")


def predictive_scores(
    target: torch.Tensor, prediction: torch.Tensor, negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """u+_j = Z_j . P_j and u-_j = Z_{n(j)} . P_j, where P = B c is the prediction of row j."""
    u_pos = (target * prediction).sum(dim=1)  # (2B,)
    u_neg = (target[negatives] * prediction).sum(dim=1)  # (2B,)
    return u_pos, u_neg


def infonce_logits(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR-style InfoNCE logits in one direction: query i must pick key i among the B keys
    (cross-entropy with target i, softmax over the batch).

    queries, keys: (B, P) projections of view 1 and view 2; logits are cosine / temperature.
    """
    return F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T / temperature  # (B, B)
