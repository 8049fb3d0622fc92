"""InfoNCE rules: a projection of the block's pooled activity, cosine similarities / temperature, the
other view of the same image as the one positive among the batch (SimCLR's loss, one direction)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from layers.losses import infonce_logits
from layers.rules.rule import LossStats, Rule, RuleSettings


@dataclass(frozen=True)
class InfoNCERule(Rule):
    """A projection head (trained, its input not detached: three passes per step) and InfoNCE."""
    head_passes: int = 3

    def make_heads(self, feature_dim: int, top_feature_dim: int, settings: RuleSettings) -> nn.ModuleDict:
        return nn.ModuleDict({"projection": nn.Linear(feature_dim, settings.proj_dim, bias=False)})

    def loss(self, heads: nn.ModuleDict, features: torch.Tensor, top_context: torch.Tensor | None,
             settings: RuleSettings, generator: torch.Generator | None) -> tuple[torch.Tensor, LossStats]:
        half = len(features) // 2
        projected = heads["projection"](features)  # (2B, P); nothing detached
        logits = infonce_logits(projected[:half], projected[half:], settings.temperature)  # (B, B)
        loss = F.cross_entropy(logits, torch.arange(half, device=logits.device))
        cosine = logits.detach() * settings.temperature
        off_diagonal = ~torch.eye(half, dtype=torch.bool, device=cosine.device)
        return loss, LossStats(loss.detach(), cosine.diagonal().mean(), cosine[off_diagonal].mean())


RULES = (
    InfoNCERule("bp_infonce", "BP-InfoNCE (SimCLR-like BP-SSL): projection, cosine / temperature, end to end",
                end_to_end=True, pooling="global"),
    InfoNCERule("infonce_local", "Layer-wise InfoNCE (Greedy InfoMax style): a projection and InfoNCE per block"),
)
