"""A block and everything it learns from: its convolution, its pooling, the heads its rule needs (B
matrices or a projection) and its own optimiser, so that it can live alone in a process."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.encoder import ConvBlock
from layers.rules.rule import LossStats, Rule, RuleSettings


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
        rule: Rule,
        settings: RuleSettings,
        has_loss: bool,
    ):
        super().__init__()
        self.index, self.is_top, self.pool_kernel = index, is_top, pool_kernel
        self.rule, self.settings, self.has_loss = rule, settings, has_loss
        self.top_context_dim = top_feature_dim  # what a top-down message holds per row
        self.conv = conv
        self.heads = rule.make_heads(feature_dim, top_feature_dim, settings) if has_loss else nn.ModuleDict()
        self.optimizer: torch.optim.Optimizer | None = None

    def make_optimizer(self, lr: float, weight_decay: float, fused: bool) -> None:
        """This block's AdamW. `fused`: one kernel per step over all its parameters (torch's
        fused=True); else torch's default AdamW, the authors' (multi-tensor on CUDA, a loop over
        the tensors on CPU; the updates agree up to rounding). At full width on a CPU the default
        makes several passes with temporaries over the B matrices: a third of the step."""
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None)

    @property
    def needs_top_context(self) -> bool:
        return self.has_loss and self.rule.needs_feedback and not self.is_top

    @property
    def conv_weight(self) -> nn.Parameter:
        """The convolution's kernel, (C_out, C_in, 3, 3): what the logs and the alignment compare."""
        return self.conv.conv.weight

    def forward(self, x: torch.Tensor, stash_weights: bool = False) -> torch.Tensor:
        return self.conv(self.rule.block_input(x), stash_weights)  # (2B, C, H, W)

    def forward_and_features(self, x: torch.Tensor, stash_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and what its loss sees of it: the pooled activity (`features`), or for
        rules that read it, the convolution's output before the ReLU, (2B, C, H, W)."""
        if not self.rule.reads_preactivation:
            out = self(x, stash_weights)
            return out, self.features(out)
        preactivation = self.conv.preactivation(self.rule.block_input(x), stash_weights)
        return F.relu(self.conv.pool(preactivation)), preactivation  # as ConvBlock.forward: pool, then ReLU

    def features(self, out: torch.Tensor) -> torch.Tensor:
        """Pooled activity the loss sees: AvgPool(k, stride k), flattened (C, y, x)."""
        if self.rule.reads_preactivation:
            raise ValueError(f"{self.rule.name}'s loss reads the convolution's map, not the output: use "
                             "forward_and_features")
        return F.avg_pool2d(out, self.pool_kernel).flatten(1)  # (2B, D)

    def loss(
        self, features: torch.Tensor, top_context: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, LossStats]:
        """This block's loss on its pooled activity. `top_context` is the top block's pooled
        activity on the same rows (needed by top-down methods below the top); `generator` draws
        random negatives."""
        if top_context is None and self.needs_top_context:
            raise ValueError(f"block {self.index}: method {self.rule.name} needs the top block's context")
        # the top block is its own top context: the rule is given None there, and its own activity is used
        return self.rule.loss(self.heads, features, None if self.is_top else top_context, self.settings, generator)
