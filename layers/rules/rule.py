"""What a learning rule is: the object that the block, the plan, the cost model and the schedule ask.

A rule says which heads each block needs (`make_heads`: the cost model reads their sizes from heads
made on the meta device, each parameter a matrix that every row passes through once), how a block's
loss is computed from its pooled activity (`loss`), which contexts it predicts from ("lateral": the
block's own activity on the other view; "top": the top block's, which below the top arrives as a
feedback message) and whether it is end-to-end (one loss at the top, back-propagated through every
block: the BP-SSL baselines). A new rule is one module in this
package that defines `RULES`, a tuple of its rule objects (layers.rules finds it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

CONTEXTS = ("lateral", "top")


@dataclass(frozen=True)
class LossStats:
    loss: torch.Tensor  # scalar, detached
    score_pos: torch.Tensor  # mean positive score (u+, or cosine for InfoNCE)
    score_neg: torch.Tensor  # mean negative score


@dataclass
class RuleSettings:
    """How a block learns, the `[rule]` section of a run's config; its defaults are the paper's."""
    contrast: str = "hinge"  # f: hinge | softhinge | phyll | linear
    negatives: str = "next_row"  # next_row (the authors' code) | random
    pool: list[int] = field(default_factory=list)  # AvgPool kernel per block; [] = the rule's default
    proj_dim: int = 1024  # projection size of the InfoNCE heads
    # B of rank r: B = W2 W1, W1 (r x context), W2 (D x r), the CLAPP authors' --use_proj_head --low_rank_dim r;
    # 0: a full D x context B (the paper's)
    predictor_rank: int = 0
    temperature: float = 0.1  # InfoNCE temperature
    # SCFF (layers.rules.goodness): goodness above threshold_pos for positives, below threshold_neg for
    # negatives, and goodness_penalty times the positives' goodness norm; the SCFF authors' first layer
    threshold_pos: float = 0.0
    threshold_neg: float = 1.0
    goodness_penalty: float = 0.0012


@dataclass(frozen=True)
class Rule:
    """A learning rule named in a config's `method`. Subclasses define the heads and the loss."""
    name: str
    summary: str
    end_to_end: bool = False  # True: one loss at the top block, gradient back-propagated through all blocks
    pooling: str = "grid"  # "global" (spatial mean) or "grid" (2D pooling to the paper's grid)
    contexts: tuple[str, ...] = ("lateral",)  # what the block's activity is predicted from (CONTEXTS)
    head_passes: int = 2  # passes per step over the first matrix of each head: 2 if its input is detached (B), 3 if not
    # the loss reads the convolution's output before the ReLU and max-pool, (2B, C, H, W), not pooled activity
    reads_preactivation: bool = False

    def __post_init__(self) -> None:
        unknown = [source for source in self.contexts if source not in CONTEXTS]
        if unknown or not self.contexts:
            raise ValueError(f"rule {self.name!r}: contexts {self.contexts} must be among {', '.join(CONTEXTS)}")

    @property
    def uses_top_context(self) -> bool:
        return "top" in self.contexts

    @property
    def needs_feedback(self) -> bool:
        """Blocks below the top wait for a top-down message (the top block's context) before learning."""
        return self.uses_top_context and not self.end_to_end

    @property
    def learns_predictor(self) -> bool:
        """Its heads include a learned B (a prediction of the block's activity from a context)."""
        return False

    def check_settings(self, settings: RuleSettings) -> None:
        """Refuse settings this rule cannot honour (ValueError naming the key)."""
        if settings.predictor_rank < 0:
            raise ValueError(f"rule.predictor_rank must be >= 0 (0: a full B), got {settings.predictor_rank}")
        if settings.predictor_rank and not self.learns_predictor:
            raise ValueError(f"rule.predictor_rank = {settings.predictor_rank}: method {self.name} learns no B (use "
                             "a CLAPP rule: clapp, clapp_pp, clapp_pp_dfb, clapp_pp_both, bp_clapp_pp), or set it to 0")

    def block_input(self, x: torch.Tensor) -> torch.Tensor:
        """What a block's convolution sees of the input `x` it receives: `x` itself, unless the rule
        prepares it (SCFF standardises it)."""
        return x

    def context_dims(self, feature_dim: int, top_feature_dim: int) -> list[int]:
        """The size of each context a block with `feature_dim` features predicts from."""
        return [top_feature_dim if source == "top" else feature_dim for source in self.contexts]

    def make_heads(self, feature_dim: int, top_feature_dim: int, settings: RuleSettings) -> nn.ModuleDict:
        """The trainable heads of a block with a loss, by name."""
        raise NotImplementedError

    def loss(self, heads: nn.ModuleDict, features: torch.Tensor, top_context: torch.Tensor | None,
             settings: RuleSettings, generator: torch.Generator | None) -> tuple[torch.Tensor, LossStats]:
        """The loss of a block on its pooled activity `features` (2B, D) (with `reads_preactivation`, its
        convolution's output, (2B, C, H, W)); `top_context` is the top
        block's pooled activity on the same rows, None for the top block itself (its own activity is
        its top context) and for rules that predict from lateral context only."""
        raise NotImplementedError
