"""The theory of the paper on deep linear networks (method.md, section 5): when does a local update
equal the BP update of the top loss? Networks, the optimal and random B, per-layer alignment, and
the paper's figures as data. Pure PyTorch; `launch.theory` runs the figures."""
from layers.theory.alignment import (
    LossSpec,
    batch_updates,
    cosine,
    fit_optimal_b,
    layer_cosines,
    random_b,
    score_loss,
    summarize,
    transfer_matrix,
    updates,
)
from layers.theory.figures import FIGURES, frozen_figure, run_fig3b, run_frozen
from layers.theory.networks import TheoryCNN, TheoryMLP, pool_features
from layers.theory.training import LocalLearner

__all__ = [
    "FIGURES", "LocalLearner", "LossSpec", "TheoryCNN", "TheoryMLP", "batch_updates", "cosine", "fit_optimal_b",
    "frozen_figure", "layer_cosines", "pool_features", "random_b", "run_fig3b", "run_frozen", "score_loss",
    "summarize", "transfer_matrix", "updates",
]
