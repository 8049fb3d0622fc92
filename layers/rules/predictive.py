"""CLAPP and its variants: a block predicts its activity on one view from a context on the other view
(its own activity: lateral; the top block's: top-down) through a matrix B, and a contrast f of the
positive and negative scores is its loss (method.md, section 2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layers.losses import contrast, negative_rows, predictive_scores, swap_views
from layers.rules.rule import LossStats, Rule, RuleSettings


@dataclass(frozen=True)
class PredictiveRule(Rule):
    """u+ = z(other view) . B c, u- = z(another image) . B c; `learned`: B is trained (else B = I)."""
    learned: bool = True

    @property
    def learns_predictor(self) -> bool:
        return self.learned

    def make_heads(self, feature_dim: int, top_feature_dim: int, settings: RuleSettings) -> nn.ModuleDict:
        heads = nn.ModuleDict()
        if self.learned:  # B maps a context to a prediction of this block's activity
            rank = settings.predictor_rank
            for source, context_dim in zip(self.contexts, self.context_dims(feature_dim, top_feature_dim)):
                heads[source] = (nn.Sequential(nn.Linear(context_dim, rank, bias=False),
                                               nn.Linear(rank, feature_dim, bias=False)) if rank > 0 else
                                 nn.Linear(context_dim, feature_dim, bias=False))
        return heads

    def loss(self, heads: nn.ModuleDict, features: torch.Tensor, top_context: torch.Tensor | None,
             settings: RuleSettings, generator: torch.Generator | None) -> tuple[torch.Tensor, LossStats]:
        lateral = features.detach()  # the context never carries gradient
        contexts = {"lateral": lateral, "top": lateral if top_context is None else top_context}
        target = swap_views(features)  # (2B, D): row j holds the other view of row j's image
        negatives = negative_rows(len(features), settings.negatives, generator).to(features.device)
        total, pos, neg = 0.0, 0.0, 0.0
        for source in self.contexts:
            context = contexts[source].detach()  # (2B, D_context)
            prediction = heads[source](context) if self.learned else context
            u_pos, u_neg = predictive_scores(target, prediction, negatives)
            total = total + contrast(u_pos, u_neg, settings.contrast).mean()
            pos, neg = pos + u_pos.detach().mean(), neg + u_neg.detach().mean()
        count = len(self.contexts)
        return total, LossStats(total.detach(), pos / count, neg / count)


RULES = (
    PredictiveRule("clapp", "CLAPP: hinge loss per block, global pooling, lateral context", pooling="global"),
    PredictiveRule("clapp_pp", "CLAPP++: CLAPP with 2D spatial pooling"),
    PredictiveRule("clapp_pp_dfb", "CLAPP++DFB: context from the top block (direct top-down feedback)",
                   contexts=("top",)),
    PredictiveRule("clapp_pp_both", "CLAPP++both: lateral and top-block context, two B per block, losses summed",
                   contexts=("lateral", "top")),
    PredictiveRule("bp_clapp_pp", "BP-CLAPP++ (CPC-like BP-SSL): one hinge loss on the last block's mean, end to end",
                   end_to_end=True, pooling="global"),
    PredictiveRule("ff", "Forward-Forward-like: B fixed to the identity, the score is z . c", learned=False),
)
