"""The linear probe of the paper: every block's output average-pooled to its grid, flattened and
concatenated, one linear layer; plus one linear layer per block."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def probe_features(blocks: Sequence[nn.Module], images: torch.Tensor, kernels: Sequence[int]) -> list[torch.Tensor]:
    """Each block's output pooled with its grid kernel and flattened: a list of (N, D_l)."""
    features, x = [], images
    for block, kernel in zip(blocks, kernels):
        x = block(x)  # (N, C_l, H_l, W_l)
        features.append(F.avg_pool2d(x, kernel).flatten(1))
    return features


class LinearProbe(nn.Module):
    """Linear classifiers trained side by side on the same features: one per block, and one on
    the concatenation of all blocks (the paper's probe).

    With `standardize`, each feature is first standardised by batch statistics in training and,
    in evaluation, by their average over all training batches (BatchNorm without affine parameters
    and with a cumulative average, as in MAE's linear probe): still one linear map per classifier,
    but deep blocks whose activity is tiny at initialisation are not handicapped by their scale in
    a short probe.
    """

    def __init__(self, feature_dims: Sequence[int], num_classes: int, standardize: bool = True):
        super().__init__()
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(d, affine=False, momentum=None) if standardize else nn.Identity() for d in feature_dims
        )
        self.per_block = nn.ModuleList(nn.Linear(d, num_classes) for d in feature_dims)
        self.concatenated = nn.Linear(sum(feature_dims), num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Logits of every classifier: per block first, the concatenated probe last."""
        features = [norm(f) for norm, f in zip(self.norms, features)]
        logits = [head(f) for head, f in zip(self.per_block, features)]
        return logits + [self.concatenated(torch.cat(features, dim=1))]

    def loss(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Sum of the classifiers' cross-entropies: they share no parameter, so this trains each alone."""
        return sum(F.cross_entropy(logits, labels) for logits in self(features))

    @torch.no_grad()
    def correct(self, features: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Number of correct predictions of every classifier, (num_blocks + 1,)."""
        return torch.stack([(logits.argmax(1) == labels).sum() for logits in self(features)])
