"""A deep MLP trained by local SSL, whose alignment with BP can be measured at any time (Fig. 3b).

Every layer learns from its own loss (its input detached); B^l maps the context (this layer's
activity, or the top layer's for direct feedback) to a prediction of this layer's activity. How B
learns (`B_RULES`):
- `trained`: from the same local loss + l2 ||B||^2 / 2, with W (the authors' CLAPP-like rule);
- `frozen`: B^l stays at its random initialisation for the whole run ("random fixed B": fixed
  feedback, as in feedback alignment; the top B still learns from the top loss);
- `match_bp`: B^l learns to make the local learning signal equal BP's: it minimises
  sum ||dL^l/dh^l - dL^L/dh^l||^2 over the batch (`match = "activity"`, the authors' objective, at the
  layer's activity), or sum ||dL^l/dW^l - dL^L/dW^l||^2 (`match = "update"`). W still learns from
  the local loss; the top B learns from the top loss.
"""
from __future__ import annotations

import torch
from torch import nn

from layers.theory.alignment import CONTEXTS, LossSpec, layer_contexts, layer_cosines, random_b, score_loss, updates
from layers.theory.networks import TheoryMLP, check_choice

B_RULES = ("trained", "frozen", "match_bp")
MATCH_TARGETS = ("activity", "update")


class LocalLearner:
    """`net` and its B matrices, one Adam optimiser over everything that learns."""

    def __init__(self, net: TheoryMLP, context: str, b_rule: str, spec: LossSpec, lr: float, seed: int = 0,
                 match: str = "activity") -> None:
        check_choice("B rule", b_rule, B_RULES)
        check_choice("match target", match, MATCH_TARGETS)
        self.net, self.context, self.b_rule, self.spec, self.match = net, context, b_rule, spec, match
        check_choice("context", context, CONTEXTS)
        widths = net.widths
        contexts = [w if context == "lateral" else widths[-1] for w in widths]  # D_context of each B
        generator = torch.Generator().manual_seed(seed)
        dtype = net.weights[0].dtype
        self.bs = nn.ParameterList(nn.Parameter(random_b(w, c, generator, dtype)) for w, c in zip(widths, contexts))
        if b_rule == "frozen":
            for b in list(self.bs)[:-1]:
                b.requires_grad_(False)
        learned = [p for p in [*net.parameters(), *self.bs] if p.requires_grad]
        self.optimizer = torch.optim.Adam(learned, lr=lr)

    def _local_losses(self, features: list[torch.Tensor], negatives: torch.Tensor) -> list[torch.Tensor]:
        contexts = layer_contexts(features, self.context)
        return [score_loss(f, c, b, negatives, self.spec.contrast) for f, c, b in zip(features, contexts, self.bs)]

    def step(self, x: torch.Tensor, negatives: torch.Tensor) -> list[float]:
        """One optimiser step on batch x (2B, D_0); returns every layer's loss (without the penalty)."""
        self.optimizer.zero_grad(set_to_none=True)
        features = self.net(x, detach=True)  # [(2B, D_l)]: no gradient crosses layers
        losses = self._local_losses(features, negatives)
        penalty = sum(b.square().sum() for b in self.bs if b.requires_grad) * self.spec.l2 / 2
        # match_bp differentiates the local losses again (through W for match = "update")
        (sum(losses) + penalty).backward(retain_graph=self.b_rule == "match_bp")
        if self.b_rule == "match_bp":
            self._match_bp(x, features, negatives)
        self.optimizer.step()
        return [loss.item() for loss in losses]

    def _match_bp(self, x: torch.Tensor, features: list[torch.Tensor], negatives: torch.Tensor) -> None:
        """Replace the gradient of every B^l below the top by that of the matching objective."""
        activities = self.net(x)  # with the graph across layers, for BP
        b_top = self.bs[-1].detach()
        top = score_loss(activities[-1], activities[-1], b_top, negatives, self.spec.contrast)
        contexts = layer_contexts([f.detach() for f in features], self.context)
        lower = range(len(self.bs) - 1)
        if self.match == "activity":
            ideal = torch.autograd.grad(top, [activities[l] for l in lower])  # dL^L/dh^l, (2B, D_l)
            for l in lower:
                h = features[l].detach().requires_grad_(True)
                loss = score_loss(h, contexts[l], self.bs[l], negatives, self.spec.contrast)
                signal = torch.autograd.grad(loss, h, create_graph=True)[0]  # dL^l/dh^l as a function of B^l
                self.bs[l].grad = torch.autograd.grad((signal - ideal[l]).square().sum(), self.bs[l])[0]
        else:
            weights = [self.net.weights[l] for l in lower]
            ideal = torch.autograd.grad(top, weights)  # dL^L/dW^l
            for l in lower:
                loss = score_loss(features[l], contexts[l], self.bs[l], negatives, self.spec.contrast)
                update = torch.autograd.grad(loss, weights[l], create_graph=True)[0]
                self.bs[l].grad = torch.autograd.grad((update - ideal[l]).square().sum(), self.bs[l])[0]

    def alignment(self, x: torch.Tensor, negatives: torch.Tensor) -> list[float]:
        """Cosine of the local and the BP update of every layer's weight on batch x, with the
        current B (B^L for BP); nothing is changed."""
        activities = self.net(x)
        contexts = layer_contexts(activities, self.context)
        local, bp = updates(list(self.net.weights), activities, contexts, list(self.bs), negatives,
                            self.spec.contrast)
        return layer_cosines(local, bp)
