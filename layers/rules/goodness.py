"""SCFF, self-contrastive Forward-Forward (Chen et al., Nature Communications 2025; arXiv:2409.11593):
a block learns to give high goodness to an image paired with itself and low goodness to an image
paired with another image, with no heads and no context.

In its paper, a layer's positive input concatenates x with itself along the channels, [x, x], and a
negative one x with another image's x', [x, x']; the layer applies the same kernel W to both halves
and sums. That sum is linear in each half, so with h = W * x + b, the block's convolution output,
the positive's pre-activation is 2 h(x) and the negative's h(x) + h(x'): both come from one
convolution of the batch, no second forward pass. Goodness, at every position of the map, is the
mean over channels of ReLU(pre-activation)^2, and the loss is

    softplus(theta_pos - G_pos) + softplus(G_neg - theta_neg) + lambda * ||G_pos||_2 (over positions)

averaged over rows (the paper's a = b = 1). Every row of the 2B views is an anchor; its negative is
a row of another image (rule.negatives). What goes up to the next block is the block's usual output,
ReLU and max-pool of h (the paper's positive path, halved: the next block standardises it anyway).
As in the authors' code, each block standardises its input, per row over channels and positions,
before its convolution. Where laminar differs from that code: laminar's VGG-6 (ReLU, zero padding;
theirs: 3 wider layers, reflect padding, a "triangle" activation up), one threshold pair for every
block (their first layer's), all blocks learning at once (their parallel variant), and laminar's
probe features and optimiser.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.losses import negative_rows
from layers.rules.rule import LossStats, Rule, RuleSettings


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Each row to mean 0 and standard deviation 1 over its channels and positions: (N, C, H, W)."""
    mean, std = x.mean(dim=(1, 2, 3), keepdim=True), x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-10)


def goodness(preactivation: torch.Tensor) -> torch.Tensor:
    """Per row and position, the mean over channels of ReLU(preactivation)^2: (N, C, H, W) -> (N, H, W)."""
    return F.relu(preactivation).pow(2).mean(dim=1)


def scff_loss(conv_out: torch.Tensor, negatives: torch.Tensor, settings: RuleSettings
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, positive goodness, negative goodness) of a block whose convolution gave `conv_out`,
    (2B, C, H, W) = h; row j's negative pairs it with row negatives[j]."""
    good_pos = goodness(2 * conv_out)  # [x, x] -> h(x) + h(x)
    good_neg = goodness(conv_out + conv_out[negatives])  # [x, x'] -> h(x) + h(x')
    penalty = good_pos.flatten(1).norm(dim=1).mean()  # ||G_pos|| over the positions of a row
    loss = (F.softplus(settings.threshold_pos - good_pos).mean() + F.softplus(good_neg - settings.threshold_neg).mean()
            + settings.goodness_penalty * penalty)
    return loss, good_pos, good_neg


@dataclass(frozen=True)
class GoodnessRule(Rule):
    """SCFF: no heads; the loss reads the block's convolution output."""
    reads_preactivation: bool = True
    head_passes: int = 0

    def block_input(self, x: torch.Tensor) -> torch.Tensor:
        return standardise(x)  # every layer of SCFF standardises its input

    def make_heads(self, feature_dim: int, top_feature_dim: int, settings: RuleSettings) -> nn.ModuleDict:
        return nn.ModuleDict()

    def loss(self, heads: nn.ModuleDict, features: torch.Tensor, top_context: torch.Tensor | None,
             settings: RuleSettings, generator: torch.Generator | None) -> tuple[torch.Tensor, LossStats]:
        negatives = negative_rows(len(features), settings.negatives, generator).to(features.device)
        loss, good_pos, good_neg = scff_loss(features, negatives, settings)
        return loss, LossStats(loss.detach(), good_pos.detach().mean(), good_neg.detach().mean())


RULES = (
    GoodnessRule("scff", "SCFF: goodness of an image paired with itself up, paired with another image down"),
)
