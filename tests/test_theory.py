"""The theory of deep linear networks (method.md, section 5), checked numerically on small batches.

Inputs are smooth random images (neighbouring pixels correlated, so a patch and the patch below
it, or two overlapping crops, are related as in real images); nothing here needs a dataset.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from launch.theory import main, patch_rows, run_figure
from layers.losses import negative_rows
from layers.theory.alignment import (
    LossSpec,
    batch_updates,
    fit_optimal_b,
    layer_cosines,
    score_loss,
    transfer_matrix,
)
from layers.theory.figures import FIG3B_RULES, FrozenCurve, TrainingSetup, run_fig3b, run_frozen
from layers.theory.networks import TheoryCNN, TheoryMLP, pool_features

SHRINKING = [128, 64, 32, 16, 8, 4]


@pytest.fixture(autouse=True)
def one_thread():
    # Small float64 matrices: one thread is the fastest, and the machine may be shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, side + 4, side + 4, generator=g, dtype=torch.float64)
    return F.avg_pool2d(noise, 5, stride=1) * 5  # (n, 1, side, side), unit-ish variance


def patch_batch(seed: int, images: int = 16) -> torch.Tensor:
    return patch_rows(smooth_images(images, 28, seed))  # (4 * images, 196): 2 * images pairs


def crop_batch(seed: int, images: int = 16) -> torch.Tensor:
    big = smooth_images(images, 20, seed)
    return torch.cat([big[..., :16, :16], big[..., 4:, 4:]])  # (2 * images, 1, 16, 16): two overlapping crops


@pytest.mark.parametrize("contrast", ["softhinge", "linear", "phyll"])
def test_all_assumptions_give_the_bp_update(contrast):
    """Linear, orthogonal W (square above layer 1), every B at its optimum: local = BP in every layer."""
    net = TheoryMLP(196, [128] * 6, "linear", "orthogonal")
    local, bp = batch_updates(net, patch_batch(0), [1] * 6, "lateral", "optimal", LossSpec(contrast))
    assert min(layer_cosines(local, bp)) >= 0.9999
    for a, b in zip(local, bp):  # element by element, not only in direction
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8 * b.abs().max().item())


@pytest.mark.parametrize("activation, init", [("linear", "default"), ("relu", "orthogonal"), ("relu", "default")])
def test_default_init_or_relu_break_the_equivalence(activation, init):
    net = TheoryMLP(196, [128] * 6, activation, init)
    cosines = layer_cosines(*batch_updates(net, patch_batch(1), [1] * 6, "lateral", "optimal", LossSpec()))
    assert max(cosines[:3]) < 0.8  # lower layers clearly below 1
    assert cosines[-1] == pytest.approx(1.0)  # the top layer's local loss is the top loss


def test_optimal_b_equals_the_theorems_b():
    """Orthogonal M = W^L ... W^{l+1}: the fitted optimum of every layer is M^T B^L M (lateral),
    and L-BFGS (the authors' solver) finds the same optimum as the default Newton solver."""
    net = TheoryMLP(196, [128] * 6, "linear", "orthogonal")
    activities = [a.detach() for a in net(patch_batch(2))]
    negatives, spec = negative_rows(len(activities[0]), "next_row"), LossSpec()
    b_top = fit_optimal_b(activities[-1], activities[-1], negatives, spec)
    for l in range(5):
        m = transfer_matrix(net, activities, l)
        b = fit_optimal_b(activities[l], activities[l], negatives, spec)
        assert (b - m.T @ b_top @ m).norm() <= 1e-8 * b.norm()
    small = [a[:, :24] for a in activities]  # a smaller problem, so that L-BFGS converges quickly
    newton = fit_optimal_b(small[3], small[3], negatives, spec)
    lbfgs = fit_optimal_b(small[3], small[3], negatives, spec, solver="lbfgs")
    assert (newton - lbfgs).norm() <= 1e-4 * newton.norm()


def test_optimal_b_is_a_stationary_point():
    net = TheoryMLP(196, [64] * 3, "relu", "default")
    features = net(patch_batch(3))[0].detach()
    negatives, spec = negative_rows(len(features), "next_row"), LossSpec("softhinge", l2=0.01)
    b = fit_optimal_b(features, features, negatives, spec).requires_grad_(True)
    objective = score_loss(features, features, b, negatives, spec.contrast) + spec.l2 * b.square().sum() / 2
    assert torch.autograd.grad(objective, b)[0].abs().max() < 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_top_context_is_closer_to_bp_with_shrinking_widths(seed):
    """Semi-orthogonal W, 128-64-32-16-8-4, optimal B, linear f (where the optimum is in closed
    form and the paper's argument holds): with the top block's context the local update is at
    least as close to BP, in Frobenius distance, as with the lateral context, in every layer.
    (With softhinge this is not true layer by layer on these batches; the cosine usually is.)"""
    net = TheoryMLP(196, SHRINKING, "linear", "orthogonal", seed=seed)
    x, spec = patch_batch(10 + seed), LossSpec("linear")
    distance = {}
    for context in ("lateral", "top"):
        local, bp = batch_updates(net, x, [1] * 6, context, "optimal", spec)
        distance[context] = [(a - b).norm().item() for a, b in zip(local, bp)]
    for l, (lateral, top) in enumerate(zip(distance["lateral"][:-1], distance["top"][:-1])):
        assert top <= lateral, f"layer {l + 1}: top-context distance {top} > lateral {lateral}"


def test_linear_cnn_no_pooling_is_exact_global_pooling_is_not():
    """Linear CNN 4 x 32, kernel 2 stride 2, 16 px. Its M (layer l's map -> the top's 32 values) is
    not square, so the theorem's premise fails and the L2-penalised optimum of B^l is NOT M^T B^L M;
    but B^l = M^T B^L M makes layer l's score equal the top score row by row, hence local = BP
    exactly, and that B is representable when B^l sees the unpooled map (kernel 1). With global
    pooling, B^l only acts through the averaging A (score z^T A^T B A c), and no A^T B A comes near
    M^T B^L M: local and BP updates differ whatever B is fitted."""
    net, x, spec = TheoryCNN(1, (32,) * 4, 2), crop_batch(4), LossSpec("softhinge", l2=0.02)
    unpooled = [1, 1, 1, 1]
    local, bp = batch_updates(net, x, unpooled, "lateral", "theorem", spec)
    assert min(layer_cosines(local, bp)) >= 0.9999
    for a, b in zip(local, bp):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8 * b.abs().max().item())
    local, bp = batch_updates(net, x, unpooled, "top", "theorem", spec)  # direct feedback: B^l = M^T B^L
    assert min(layer_cosines(local, bp)) >= 0.9999
    fitted = layer_cosines(*batch_updates(net, x, unpooled, "lateral", "optimal", spec))
    assert max(fitted[:3]) < 0.99  # the optimum does not reach it
    pooled = layer_cosines(*batch_updates(net, x, [8, 4, 2, 1], "lateral", "optimal", spec))
    assert max(pooled[:3]) < 0.9
    # Representability: the best A^T B A (least squares) misses M^T B^L M by most of its norm.
    activities = [a.detach() for a in net(x)]
    top = activities[-1].flatten(1)
    b_top = fit_optimal_b(top, top, negative_rows(len(x), "next_row"), spec)
    for l, kernel in enumerate([8, 4, 2]):
        m = transfer_matrix(net, activities, l)  # (32, D_l)
        target = m.T @ b_top @ m  # (D_l, D_l)
        shape = activities[l].shape[1:]
        average = pool_features(torch.eye(m.shape[1], dtype=m.dtype).reshape(-1, *shape), kernel).T  # (C, D_l)
        pinv = torch.linalg.pinv(average)  # A^T (A A^T)^-1
        best = average.T @ (pinv.T @ target @ pinv) @ average
        assert (target - best).norm() > 0.5 * target.norm()


def test_random_b_is_drawn_afresh_for_every_batch():
    """The same batch twice gives different cosines: B is not carried over from batch to batch."""
    x = patch_batch(5)
    curve = FrozenCurve(lambda: TheoryMLP(196, [32] * 3), (1, 1, 1), "lateral", "random", LossSpec())
    means = []
    for i in range(2):
        result = run_frozen({"random": curve}, [x, x], seed=i)[0]["random"]
        means.append(result["cosine_mean"])
        assert result["cosine_ci95"][0] > 0  # batch 0 and batch 1 differ although x is the same
    assert means[0] != means[1]


def test_fig3b_rules_train_and_report_every_curve():
    setup = TrainingSetup(epochs=1, width=32, depth=3)
    batches = [patch_batch(6, 8).float() for _ in range(3)]
    curves, history = run_fig3b(lambda epoch: iter(batches), len(batches), batches[:2], setup)
    assert list(curves) == list(FIG3B_RULES) == ["local", "dfb", "trained_B", "random_fixed_B"]
    for name, curve in curves.items():
        assert curve["layers"] == [1, 2, 3] and curve["cosine_mean"][-1] == pytest.approx(1.0, abs=1e-5)
        assert history[name]["epochs"] == [0, 1] and len(history[name]["cosine_mean"]) == 2


@pytest.mark.parametrize("match", ["activity", "update"])
def test_trained_b_moves_the_local_learning_signal_toward_bp(match):
    """B^l learned to match BP's signal (at the activity or at the update): a few steps on one batch
    bring the local updates of layers 1 and 2 closer in direction to the BP updates."""
    from layers.theory.training import LocalLearner

    net = TheoryMLP(196, [32] * 3, "linear", "default", seed=3)
    learner = LocalLearner(net, "top", "match_bp", LossSpec(), lr=1e-3, match=match)
    x = patch_batch(7, 8)
    negatives = negative_rows(len(x), "next_row")
    before = learner.alignment(x, negatives)
    for _ in range(30):
        learner.step(x, negatives)
    after = learner.alignment(x, negatives)
    assert after[0] > before[0] + 0.1 and after[1] > before[1] + 0.1, (before, after)


def test_cli_quick_writes_the_figure_json_and_png(tmp_path):
    assert main(["fig3a", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "fig3a.json").read_text())
    assert result["figure"] == "fig3a" and result["quick"] is True
    assert result["data"]["name"] in ("fashion_mnist", "synthetic_gray")
    assert list(result["curves"]) == ["linear_lateral", "linear_dfb", "softhinge_lateral", "softhinge_dfb"]
    for curve in result["curves"].values():
        assert set(curve) == {"layers", "cosine_mean", "cosine_ci95"}
        assert curve["layers"] == [1, 2, 3, 4, 5, 6]
        assert len(curve["cosine_mean"]) == len(curve["cosine_ci95"]) == 6
        assert all(-1 <= c <= 1 + 1e-9 for c in curve["cosine_mean"]) and min(curve["cosine_ci95"]) >= 0
    assert set(result["relative_distance"]) == set(result["curves"])
    assert (tmp_path / "fig3a.png").stat().st_size > 10_000


def test_fig3b_resumes_curve_by_curve(tmp_path):
    partial = tmp_path / "fig3b.partial.json"
    first = run_figure("fig3b", True, None, progress=False, train_images=64, partial=partial)
    saved = json.loads(partial.read_text())
    assert list(saved["finished"]) == list(first["curves"])
    saved["finished"]["dfb"]["curve"]["cosine_mean"] = [0.5] * 6  # a marker: this curve must not be retrained
    del saved["finished"]["random_fixed_B"]
    partial.write_text(json.dumps(saved))
    second = run_figure("fig3b", True, None, progress=False, train_images=64, partial=partial)
    assert second["curves"]["dfb"]["cosine_mean"] == [0.5] * 6
    assert second["curves"]["random_fixed_B"] == first["curves"]["random_fixed_B"]  # retrained, same seed
    with pytest.raises(ValueError, match="another fig3b setting"):
        run_figure("fig3b", True, None, progress=False, train_images=96, partial=partial)


def test_unknown_names_fail_with_the_choices():
    with pytest.raises(ValueError, match="choose one of orthogonal, default"):
        TheoryMLP(196, [8], init="xavier")
    with pytest.raises(ValueError, match="needs a linear network"):
        net = TheoryMLP(196, [8, 8], "relu")
        batch_updates(net, patch_batch(0, 2).double(), [1, 1], "lateral", "theorem", LossSpec())
    with pytest.raises(ValueError, match="bias=False"):
        net = TheoryMLP(196, [8, 8], bias=True)
        batch_updates(net, patch_batch(0, 2).double(), [1, 1], "lateral", "theorem", LossSpec())
    with pytest.raises(ValueError, match="does not divide"):
        batch_updates(TheoryCNN(), crop_batch(0, 2), [3, 1, 1, 1], "lateral", "optimal", LossSpec())
