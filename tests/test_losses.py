"""Loss values checked against numbers worked out by hand on tiny tensors."""
import math

import pytest
import torch

from layers.block import Block
from layers.encoder import ConvBlock
from layers.losses import contrast, infonce_logits, negative_rows, predictive_scores, swap_views
from layers.rules import get_rule
from layers.rules.rule import RuleSettings

# Two images, two views, D = 2. Rows: image 0 view 1, image 1 view 1, image 0 view 2, image 1 view 2.
H = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
B = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
# By hand: predictions P_j = B H_j = [1,1], [0,1], [1,2], [2,2]; targets Z = H swapped = [1,1], [2,0],
# [1,0], [0,1]; next-row negatives N_j = Z_{j+1} = [2,0], [1,0], [0,1], [1,1].
U_POS = [2.0, 0.0, 1.0, 2.0]  # Z_j . P_j
U_NEG = [2.0, 0.0, 2.0, 4.0]  # N_j . P_j


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


EXPECTED = {
    "hinge": (0 + 3 + 1 + 1 + 0 + 3 + 0 + 5) / 4,  # max(0, 1-u+) + max(0, 1+u-)
    "softhinge": sum(softplus(1 - p) + softplus(1 + n) for p, n in zip(U_POS, U_NEG)) / 4,
    "phyll": sum(softplus(n - p) for p, n in zip(U_POS, U_NEG)) / 4,
    "linear": (0 + 0 + 1 + 2) / 4,  # u- - u+
}


def test_scores_by_hand():
    u_pos, u_neg = predictive_scores(swap_views(H), H @ B.T, negative_rows(4, "next_row"))
    assert u_pos.tolist() == U_POS
    assert u_neg.tolist() == U_NEG


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_contrast_by_hand(mode):
    loss = contrast(torch.tensor(U_POS), torch.tensor(U_NEG), mode).mean()
    assert loss.item() == pytest.approx(EXPECTED[mode], rel=1e-6)


@pytest.mark.parametrize("mode", list(EXPECTED))
def test_block_loss_wiring_by_hand(mode):
    block = Block(0, True, ConvBlock(1, 2, False), 1, 2, 2, get_rule("clapp_pp"), RuleSettings(contrast=mode), True)
    with torch.no_grad():
        block.heads["lateral"].weight.copy_(B)
    loss, stats = block.loss(H.clone().requires_grad_())
    assert loss.item() == pytest.approx(EXPECTED[mode], rel=1e-6)
    assert stats.score_pos.item() == pytest.approx(sum(U_POS) / 4)
    assert stats.score_neg.item() == pytest.approx(sum(U_NEG) / 4)


def test_identity_predictor_scores_plain_inner_products():
    block = Block(0, True, ConvBlock(1, 2, False), 1, 2, 2, get_rule("ff"), RuleSettings(contrast="linear"), True)
    assert len(block.heads) == 0  # B is fixed to the identity: nothing to learn
    loss, _ = block.loss(H)
    # u+ = Z_j . H_j = 1, 0, 1, 0; u- = N_j . H_j = 2, 0, 1, 2 -> mean(u- - u+) = 0.75
    assert loss.item() == pytest.approx(0.75)


def test_random_negatives_never_pick_the_same_image():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        rows = negative_rows(8, "random", generator)
        image = torch.arange(8) % 4
        assert (image[rows] != image).all()
    assert not torch.equal(negative_rows(8, "random", torch.Generator().manual_seed(1)),
                           negative_rows(8, "random", torch.Generator().manual_seed(2)))


def test_infonce_by_hand():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    logits = infonce_logits(queries, keys, temperature=0.5)
    # cosines: q0.k0 = 1, q0.k1 = 1/sqrt2, q1.k0 = 0, q1.k1 = 1/sqrt2; divided by 0.5
    r = 1 / math.sqrt(2)
    assert logits.flatten().tolist() == pytest.approx([2.0, 2 * r, 0.0, 2 * r])
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(2)).item()
    by_hand = (-2.0 + math.log(math.exp(2.0) + math.exp(2 * r)) - 2 * r + math.log(1 + math.exp(2 * r))) / 2
    assert loss == pytest.approx(by_hand, rel=1e-6)


def test_unknown_modes_name_the_choices():
    with pytest.raises(ValueError, match="hinge, softhinge, phyll, linear"):
        contrast(torch.zeros(1), torch.zeros(1), "square")
    with pytest.raises(ValueError, match="next_row, random"):
        negative_rows(4, "hardest")
