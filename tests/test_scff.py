"""SCFF (layers/rules/goodness.py) against a hand-written reference of its paper's layer: the
positive input [x, x] and the negative [x, x'] concatenated along the channels, one kernel on both
halves, goodness the mean over channels of ReLU^2 at each position, softplus on both sides of the
thresholds and a penalty on the positives' goodness norm. And the rule runs as every rule does: the
same weights on one process and on two."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layers.losses import negative_rows
from layers.model import build_blocks
from layers.rules import get_rule
from layers.rules.goodness import scff_loss
from layers.rules.rule import RuleSettings
from tests.helpers import args, assert_same_weights, final_weights, single_process
from tests.ranks import run_ranks


def reference_loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, negatives: list[int],
                   settings: RuleSettings) -> torch.Tensor:
    """The paper's layer, written out: concatenated inputs, a doubled kernel, loops over rows and positions."""
    doubled_weight, doubled_bias = torch.cat([weight, weight], dim=1), 2 * bias  # one kernel for both halves
    rows = len(x)
    pos_terms, neg_terms, norms = [], [], []
    for j in range(rows):
        positive = F.conv2d(torch.cat([x[j], x[j]])[None], doubled_weight, doubled_bias, padding=1)[0]
        negative = F.conv2d(torch.cat([x[j], x[negatives[j]]])[None], doubled_weight, doubled_bias, padding=1)[0]
        channels, height, width = positive.shape
        squares = []
        for y in range(height):
            for z in range(width):
                good_pos = sum(positive[c, y, z].clamp(min=0) ** 2 for c in range(channels)) / channels
                good_neg = sum(negative[c, y, z].clamp(min=0) ** 2 for c in range(channels)) / channels
                pos_terms.append(torch.log(1 + torch.exp(settings.threshold_pos - good_pos)))
                neg_terms.append(torch.log(1 + torch.exp(good_neg - settings.threshold_neg)))
                squares.append(good_pos ** 2)
        norms.append(torch.sqrt(sum(squares)))
    return (sum(pos_terms) / len(pos_terms) + sum(neg_terms) / len(neg_terms)
            + settings.goodness_penalty * sum(norms) / rows)


@pytest.mark.parametrize("negatives_mode", ["next_row", "random"])
def test_scff_loss_and_gradient_equal_the_written_out_layer(negatives_mode):
    torch.manual_seed(0)
    settings = RuleSettings(negatives=negatives_mode, threshold_pos=0.5, threshold_neg=1.5, goodness_penalty=0.01)
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)  # 2B = 6 rows: 3 images, two views
    weight = (0.5 * torch.randn(3, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    bias = (0.1 * torch.randn(3, dtype=torch.float64)).requires_grad_()
    negatives = negative_rows(6, negatives_mode, torch.Generator().manual_seed(1))
    assert all(n % 3 != j % 3 for j, n in enumerate(negatives.tolist()))  # always another image
    loss, good_pos, good_neg = scff_loss(F.conv2d(x, weight, bias, padding=1), negatives, settings)
    expected = reference_loss(x, weight, bias, negatives.tolist(), settings)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-10)
    ours = torch.autograd.grad(loss, [weight, bias])
    theirs = torch.autograd.grad(expected, [weight, bias])
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert good_pos.shape == good_neg.shape == (6, 4, 4)


def test_scff_learns_to_separate_an_image_paired_with_itself_from_a_pair_of_images():
    rule, settings = get_rule("scff"), RuleSettings()
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    images = torch.randn(8, 3, 8, 8)
    x = torch.cat([images, images + 0.1 * torch.randn_like(images)])  # two views of 8 images
    optimizer = torch.optim.AdamW(conv.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, stats = rule.loss(torch.nn.ModuleDict(), conv(x), None, settings, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else (stats.score_pos.item(), stats.score_neg.item(), loss.item())
    pos, neg = stats.score_pos.item(), stats.score_neg.item()
    assert loss.item() < 0.8 * first[2] and pos > 2.5 * first[0] and neg < first[1]  # the pairs' goodness apart
    assert pos / neg > 2 * first[0] / first[1]


def test_a_block_standardises_its_input_and_its_loss_reads_the_convolution_map():
    blocks = build_blocks(get_rule("scff"), RuleSettings(), width=0.0625, in_channels=3, input_size=32, seed=0,
                          lr=1e-3, weight_decay=0.0, fused_optimizer=False, indices=[0])
    x = 3 + 2 * torch.randn(4, 3, 32, 32)
    out, features = blocks[0].forward_and_features(x)
    assert features.shape == (4, out.shape[1], 32, 32) and torch.equal(F.relu(features), out)  # block 0: no max-pool
    assert torch.equal(blocks[0](x), out)
    row = (x[1] - x[1].mean()) / x[1].std()  # the input, standardised per row, is what the convolution sees
    assert torch.allclose(features[1], blocks[0].conv.preactivation(row[None])[0], atol=1e-5)
    with pytest.raises(ValueError, match="forward_and_features"):  # pooled output is not what its loss reads
        blocks[0].features(out)


def test_scff_gives_the_same_weights_on_one_process_and_two(tmp_path):
    reference = single_process(tmp_path / "k1", "method=scff")
    outcomes = run_ranks(2, args("method=scff", out=tmp_path / "k2"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0], outcomes[0].log[-2000:]
    assert_same_weights(reference, final_weights(tmp_path / "k2"))
