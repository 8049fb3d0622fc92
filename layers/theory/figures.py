"""The paper's theory figures (method.md, section 5) as data, and the runs that turn batches into
per-layer alignment curves. `launch.theory` supplies the batches and writes the files.

Frozen-W figures (fig2, fig3a, fig4): for every batch, every B is fitted (or drawn) with W frozen
and the cosine of the local and the BP update of every weight is recorded; a curve is the mean and
95% interval of those cosines over batches. Curves of one figure that share an initialisation
share the same W, and batch i gets the same negatives and random draws in every curve.
fig3b trains a ReLU MLP with each local rule and measures its alignment after every epoch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch

from layers.losses import negative_rows
from layers.seeding import keyed_generator
from layers.theory.alignment import LossSpec, TheoryNet, batch_updates, layer_cosines, summarize
from layers.theory.networks import TheoryCNN, TheoryMLP
from layers.theory.training import LocalLearner

FIGURES = ("fig2", "fig3a", "fig3b", "fig4")
PATCH_DIM = 14 * 14  # the MLP figures' inputs: 14x14 patches
Progress = Callable[[Iterable, int, str], Iterable]  # (iterable, length, label) -> iterable, e.g. a tqdm bar
_STREAM_BATCH, _STREAM_STEP = 11, 12  # seeding streams of this module


@dataclass(frozen=True)
class FrozenCurve:
    """One curve of a frozen-W figure: its network, pooling kernels, context and kind of B."""
    build: Callable[[], TheoryNet]
    pools: tuple[int, ...]
    context: str  # lateral | top
    b_mode: str  # optimal | random | theorem
    spec: LossSpec


def frozen_figure(name: str, seed: int = 0) -> tuple[dict[str, FrozenCurve], dict[str, FrozenCurve]]:
    """(curves, extra curves) of fig2, fig3a or fig4. Extra curves go beyond the paper's figure."""
    mlp = partial(TheoryMLP, PATCH_DIM, seed=seed)
    six = (1,) * 6
    if name == "fig2":  # 6 x 128, softhinge, l2 0.01
        spec = LossSpec("softhinge", l2=0.01)

        def curve(activation: str, init: str, b_mode: str = "optimal") -> FrozenCurve:
            return FrozenCurve(partial(mlp, [128] * 6, activation, init), six, "lateral", b_mode, spec)

        return {"all_assumptions": curve("linear", "orthogonal"),
                "random_fixed_B": curve("linear", "orthogonal", "random"),
                "non_orthogonal_W": curve("linear", "default"),
                "relu": curve("relu", "orthogonal"),
                "relu_non_orthogonal": curve("relu", "default")}, {}
    if name == "fig3a":  # shrinking widths, semi-orthogonal W, linear and softhinge f
        shrinking = partial(mlp, [128, 64, 32, 16, 8, 4], "linear", "orthogonal")
        curves = {f"{f}_{label}": FrozenCurve(shrinking, six, context, "optimal", LossSpec(f, l2=0.01))
                  for f in ("linear", "softhinge") for label, context in (("lateral", "lateral"), ("dfb", "top"))}
        return curves, {}
    if name == "fig4":  # linear CNN 4 x 32, kernel 2 stride 2, 16 px: maps 8, 4, 2, 1; l2 0.02 as the authors
        cnn = partial(TheoryCNN, 1, (32,) * 4, 2, "linear", "orthogonal", seed=seed)
        spec = LossSpec("softhinge", l2=0.02)
        unpooled, global_pool = (1, 1, 1, 1), (8, 4, 2, 1)
        return {
            "global_pool": FrozenCurve(cnn, global_pool, "lateral", "optimal", spec),
            "pool_2d": FrozenCurve(cnn, unpooled, "lateral", "optimal", spec),
            "pool_2d_dfb": FrozenCurve(cnn, unpooled, "top", "optimal", spec),
        }, {
            # B^l = M^T B^L M (or M^T B^L with the top context): representable only without pooling
            "pool_2d_theorem_B": FrozenCurve(cnn, unpooled, "lateral", "theorem", spec),
            "pool_2d_dfb_theorem_B": FrozenCurve(cnn, unpooled, "top", "theorem", spec),
        }
    raise ValueError(f"{name!r} is not a frozen-W figure; choose one of fig2, fig3a, fig4")


def run_frozen(curves: dict[str, FrozenCurve], batches: list[torch.Tensor], seed: int = 0,
               progress: Progress | None = None) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """({curve name: summarize(...)}, {curve name: per-layer mean of ||local - BP|| / ||BP||})
    over `batches` (each (2B, ...) in the project's row order). The relative Frobenius distance is
    the paper's measure for direct feedback (fig3a); the cosine ignores the update's size."""
    results, distances = {}, {}
    for name, curve in curves.items():
        net = curve.build()
        per_batch, distance = [], []
        rows = batches if progress is None else progress(batches, len(batches), name)
        for i, x in enumerate(rows):
            generator = keyed_generator(seed, _STREAM_BATCH, i)
            local, bp = batch_updates(net, x.to(net.weights[0].dtype), list(curve.pools), curve.context,
                                      curve.b_mode, curve.spec, generator)
            per_batch.append(layer_cosines(local, bp))
            distance.append([float((a - b).norm() / b.norm()) for a, b in zip(local, bp)])
        results[name] = summarize(per_batch)
        distances[name] = torch.tensor(distance, dtype=torch.float64).mean(0).tolist()
    return results, distances


# ---------------------------------------------------------------- fig3b: alignment during training
# curve name -> (context, B rule)
FIG3B_RULES = {"local": ("lateral", "trained"), "dfb": ("top", "trained"),
               "trained_B": ("top", "match_bp"), "random_fixed_B": ("top", "frozen")}


@dataclass(frozen=True)
class TrainingSetup:
    """The paper's Fig. 3b: ReLU MLP 6 x 512 with biases, default initialisation, softhinge,
    Adam 5e-5 annealed (cosine, per epoch) to 1e-5 as the authors' script does, 20 epochs."""
    epochs: int = 20
    width: int = 512
    depth: int = 6
    lr: float = 5e-5
    lr_min: float = 1e-5
    spec: LossSpec = field(default_factory=lambda: LossSpec("softhinge", l2=0.01))
    match: str = "activity"  # what trained_B matches: dL/dh (the authors) or dL/dW


def evaluate(learner: LocalLearner, batches: list[torch.Tensor], spec: LossSpec, seed: int) -> dict[str, list]:
    per_batch = []
    for i, x in enumerate(batches):
        negatives = negative_rows(len(x), spec.negatives, keyed_generator(seed, _STREAM_BATCH, i))
        per_batch.append(learner.alignment(x, negatives))
    return summarize(per_batch)


def run_fig3b(train_epoch: Callable[[int], Iterator[torch.Tensor]], steps_per_epoch: int,
              eval_batches: list[torch.Tensor], setup: TrainingSetup = TrainingSetup(), seed: int = 0,
              progress: Progress | None = None, log: Callable[[str], None] | None = None,
              finished: dict[str, dict] | None = None, on_curve: Callable[[str, dict], None] | None = None,
              ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Train one network per rule of FIG3B_RULES from the same initial W on the same batches
    (`train_epoch(e)` yields the (2B, 196) batches of epoch e). Returns (curves, over_training):
    the alignment after the last epoch, and its mean per layer after every epoch (0 = at init).
    `log` receives one line per epoch with the current alignment. A long run can be resumed curve
    by curve: `on_curve(name, record)` gets each finished curve's record, and a record passed back
    in `finished[name]` is used instead of training that curve again."""
    curves, over_training = {}, {}
    for name, (context, rule) in FIG3B_RULES.items():
        if finished and name in finished:
            curves[name], over_training[name] = finished[name]["curve"], finished[name]["over_training"]
            continue
        net = TheoryMLP(PATCH_DIM, [setup.width] * setup.depth, "relu", "default", bias=True, seed=seed,
                        dtype=torch.float32)
        learner = LocalLearner(net, context, rule, setup.spec, setup.lr, seed, setup.match)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(learner.optimizer, max(setup.epochs, 1), setup.lr_min)
        history = [evaluate(learner, eval_batches, setup.spec, seed)]
        step, losses = 0, []
        for epoch in range(setup.epochs):
            batches = train_epoch(epoch)
            if progress is not None:
                batches = progress(batches, steps_per_epoch, f"{name} epoch {epoch + 1}/{setup.epochs}")
            for x in batches:
                negatives = negative_rows(len(x), setup.spec.negatives, keyed_generator(seed, _STREAM_STEP, step))
                losses = learner.step(x, negatives)
                step += 1
            if not all(torch.isfinite(torch.tensor(losses))):
                raise FloatingPointError(f"fig3b {name}: a loss is {losses} after epoch {epoch + 1}; lower the lr")
            schedule.step()
            history.append(evaluate(learner, eval_batches, setup.spec, seed))
            if log is not None:
                cosines = " ".join(f"{c:.3f}" for c in history[-1]["cosine_mean"])
                mean_loss = sum(losses) / len(losses)
                log(f"{name} epoch {epoch + 1}: last batch's mean layer loss {mean_loss:.3f}, cosine {cosines}")
        curves[name] = history[-1]
        over_training[name] = {"epochs": list(range(setup.epochs + 1)),
                               "cosine_mean": [h["cosine_mean"] for h in history],
                               "cosine_ci95": [h["cosine_ci95"] for h in history]}
        if on_curve is not None:
            on_curve(name, {"curve": curves[name], "over_training": over_training[name]})
    return curves, over_training
