"""A block and everything it learns from: its convolution, its pooling, its B matrices (or
projection) and its own optimiser, so that it can live alone in a process."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from layers.encoder import ConvBlock
from layers.losses import contrast, infonce_logits, negative_rows, predictive_scores, swap_views
from layers.methods import Method


@dataclass
class RuleSettings:
    """How a block learns, the `[rule]` section of a run's config; its defaults are the paper's."""
    contrast: str = "hinge"  # f: hinge | softhinge | phyll | linear
    negatives: str = "next_row"  # next_row (the authors' code) | random
    pool: list[int] = field(default_factory=list)  # AvgPool kernel per block; [] = the method's default
    proj_dim: int = 1024  # projection size of the InfoNCE heads
    temperature: float = 0.1  # InfoNCE temperature


@dataclass(frozen=True)
class LossStats:
    loss: torch.Tensor  # scalar, detached
    score_pos: torch.Tensor  # mean positive score (u+, or cosine for InfoNCE)
    score_neg: torch.Tensor  # mean negative score


class Block(nn.Module):
    """Block `index` of the encoder. `has_loss` is False for the lower blocks of BP-SSL methods,
    whose only learning signal is the gradient from the top."""

    def __init__(
        self,
        index: int,
        is_top: bool,
        conv: ConvBlock,
        pool_kernel: int,
        feature_dim: int,
        top_feature_dim: int,
        method: Method,
        rule: RuleSettings,
        has_loss: bool,
    ):
        super().__init__()
        self.index, self.is_top, self.pool_kernel = index, is_top, pool_kernel
        self.method, self.rule, self.has_loss = method, rule, has_loss
        self.conv = conv
        self.heads = nn.ModuleDict()
        if has_loss and method.predictor == "bilinear":
            for source in method.contexts:  # B maps a context to a prediction of this block's activity
                context_dim = top_feature_dim if source == "top" else feature_dim
                self.heads[source] = nn.Linear(context_dim, feature_dim, bias=False)
        elif has_loss and method.predictor == "infonce":
            self.heads["projection"] = nn.Linear(feature_dim, rule.proj_dim, bias=False)
        self.optimizer: torch.optim.Optimizer | None = None

    def make_optimizer(self, lr: float, weight_decay: float, fused: bool) -> None:
        """This block's AdamW. `fused`: one kernel per step over all its parameters (torch's
        fused=True); else torch's default AdamW, the authors' (multi-tensor on CUDA, a loop over
        the tensors on CPU; the updates agree up to rounding). At full width on a CPU the default
        makes several passes with temporaries over the B matrices: a third of the step."""
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)

    @property
    def needs_top_context(self) -> bool:
        return self.has_loss and self.method.uses_top_context and not self.is_top

    @property
    def conv_weight(self) -> nn.Parameter:
        """The convolution's kernel, (C_out, C_in, 3, 3): what the logs and the alignment compare."""
        return self.conv.conv.weight

    def forward(self, x: torch.Tensor, stash_weights: bool = False) -> torch.Tensor:
        return self.conv(x, stash_weights)  # (2B, C, H, W)

    def features(self, out: torch.Tensor) -> torch.Tensor:
        """Pooled activity the loss sees: AvgPool(k, stride k), flattened (C, y, x)."""
        return F.avg_pool2d(out, self.pool_kernel).flatten(1)  # (2B, D)

    def loss(
        self, features: torch.Tensor, top_context: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, LossStats]:
        """This block's loss on its pooled activity. `top_context` is the top block's pooled
        activity on the same rows (needed by top-down methods below the top); `generator` draws
        random negatives."""
        if self.method.predictor == "infonce":
            return self._infonce_loss(features)
        lateral = features.detach()  # the context never carries gradient
        contexts = {"lateral": lateral, "top": lateral if self.is_top else top_context}
        if contexts["top"] is None and self.method.uses_top_context:
            raise ValueError(f"block {self.index}: method {self.method.name} needs the top block's context")
        target = swap_views(features)  # (2B, D): row j holds the other view of row j's image
        negatives = negative_rows(len(features), self.rule.negatives, generator).to(features.device)
        total, pos, neg = 0.0, 0.0, 0.0
        for source in self.method.contexts:
            context = contexts[source].detach()  # (2B, D_context)
            prediction = context if self.method.predictor == "identity" else self.heads[source](context)
            u_pos, u_neg = predictive_scores(target, prediction, negatives)
            total = total + contrast(u_pos, u_neg, self.rule.contrast).mean()
            pos, neg = pos + u_pos.detach().mean(), neg + u_neg.detach().mean()
        count = len(self.method.contexts)
        return total, LossStats(total.detach(), pos / count, neg / count)

    def _infonce_loss(self, features: torch.Tensor) -> tuple[torch.Tensor, LossStats]:
        half = len(features) // 2
        projected = self.heads["projection"](features)  # (2B, P); nothing detached
        logits = infonce_logits(projected[:half], projected[half:], self.rule.temperature)  # (B, B)
        loss = F.cross_entropy(logits, torch.arange(half, device=logits.device))
        cosine = logits.detach() * self.rule.temperature
        off_diagonal = ~torch.eye(half, dtype=torch.bool, device=cosine.device)
        return loss, LossStats(loss.detach(), cosine.diagonal().mean(), cosine[off_diagonal].mean())
