"""The local learning signal: what autograd computes is the paper's three-factor rule, it stays
inside its block, and the context carries no gradient."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from layers.block import Block
from layers.model import build_blocks
from layers.rules import get_rule
from layers.rules.rule import RuleSettings
from sim.data.datasets import dataset_info, load_split
from sim.data.views import SimCLRViews
from sim.pipeline.stage import EndToEndStage, LocalStage

WIDTH = 1 / 16


def blocks_for(method: str, seed: int = 0, **rule):
    return build_blocks(get_rule(method), RuleSettings(**rule), width=WIDTH, seed=seed, in_channels=3,
                        input_size=32, lr=2e-4, weight_decay=0.0, fused_optimizer=True)


def views(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(2 * batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (2B, 3, 32, 32)


def forward_detached(blocks, x):
    """Each block's input and pooled features, inputs detached as in local learning."""
    inputs, features = [], []
    for block in blocks:
        inputs.append(x.detach())
        out = block(inputs[-1])
        features.append(block.features(out))
        x = out
    return inputs, features


def synthetic_views(batch: int = 32) -> torch.Tensor:
    info = dataset_info("synthetic")
    images, _ = load_split("synthetic", None, "train").batch(torch.arange(batch))
    return SimCLRViews(info)(images, torch.Generator().manual_seed(0))  # (2B, 3, 32, 32)


def test_hinge_is_about_two_per_block_at_initialisation():
    """u = z.Bc is about 0 at initialisation, so the hinge is about 1 + 1 = 2."""
    blocks = build_blocks(get_rule("clapp_pp"), RuleSettings(), width=0.125, seed=0, in_channels=3, input_size=32,
                          lr=2e-4, weight_decay=0.0, fused_optimizer=True)
    _, features = forward_detached(blocks, synthetic_views())
    losses = [block.loss(f)[0].item() for block, f in zip(blocks, features)]
    assert losses[1:] == pytest.approx([2.0] * 5, abs=0.05)
    # Block 0 has the largest pooled activity (D = 1024 at width 1/8, mean activity about 0.25),
    # so with B's default initialisation its scores spread over about +-1 and its hinge starts
    # higher; it is still the hinge of those scores.
    assert 2.0 < losses[0] < 4.0


@pytest.mark.parametrize("method", ["infonce_local", "bp_infonce"])
def test_infonce_is_about_log_batch_at_initialisation(method):
    blocks = blocks_for(method)
    x = views(batch=16)
    for block in blocks:
        x = block(x)
    top = blocks[-1]
    loss, _ = top.loss(top.features(x))
    assert loss.item() == pytest.approx(math.log(16), abs=0.1)


def test_autograd_update_is_the_three_factor_rule():
    """dL/dW = sum over rows and positions of gamma x (B c) x rho'(a) x input, for the hinge."""
    block = blocks_for("clapp_pp")[2]  # a block without max-pool: conv -> ReLU -> AvgPool(k)
    torch.manual_seed(0)
    x = torch.rand(8, block.conv.conv.in_channels, 16, 16)  # (2B, C_in, 16, 16), input of block 2
    with torch.no_grad():  # a B whose scores spread over [-2, 2]: some hinges active, some not
        h = block.features(block(x))
        weight = block.heads["lateral"].weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
        weight.div_((h @ weight.T * h.roll(4, 0)).sum(1).std())
    block.zero_grad()
    loss, _ = block.loss(block.features(block(x)))
    loss.backward()

    with torch.no_grad():
        a = block.conv.conv(x)  # (2B, C, 16, 16) pre-activation
        k, rows = block.pool_kernel, len(x)
        h = F.avg_pool2d(torch.relu(a), k).flatten(1)  # (2B, D)
        prediction = h @ block.heads["lateral"].weight.T  # B c with c = lateral context, (2B, D)
        target_row = (torch.arange(rows) + rows // 2) % rows  # row whose activity is row j's target
        negative_row = target_row[(torch.arange(rows) + 1) % rows]  # next row's target
        u_pos = (h[target_row] * prediction).sum(1)
        u_neg = (h[negative_row] * prediction).sum(1)
        gamma_pos = -(u_pos < 1).float() / rows  # the neuromodulator: which hinge is active
        gamma_neg = (u_neg > -1).float() / rows
        assert 0 < (u_pos < 1).sum() < rows or 0 < (u_neg > -1).sum() < rows  # both cases occur
        # dL/dh: every row receives modulator x prediction from the rows that use it.
        dh = torch.zeros_like(h)
        dh.index_add_(0, target_row, gamma_pos[:, None] * prediction)
        dh.index_add_(0, negative_row, gamma_neg[:, None] * prediction)
        grid = a.shape[-1] // k
        dh_map = dh.view(rows, -1, grid, grid).repeat_interleave(k, 2).repeat_interleave(k, 3) / k**2
        post = dh_map * (a > 0).float()  # x rho'(a): the post-synaptic factor
        pre = F.unfold(x, kernel_size=3, padding=1)  # (2B, C_in*9, 256): the pre-synaptic input
        weight_grad = torch.einsum("nol,nil->oi", post.flatten(2), pre).view_as(block.conv.conv.weight)
        bias_grad = post.sum(dim=(0, 2, 3))
    assert torch.allclose(block.conv.conv.weight.grad, weight_grad, rtol=1e-4, atol=1e-7)
    assert torch.allclose(block.conv.conv.bias.grad, bias_grad, rtol=1e-4, atol=1e-7)
    assert weight_grad.abs().max() > 0


@pytest.mark.parametrize("method", ["clapp_pp", "clapp_pp_dfb", "clapp_pp_both", "infonce_local"])
def test_no_gradient_crosses_blocks(method):
    """In `LocalStage` every block gets a detached input, and the gradient each block learned from
    is its own loss's alone: a gradient that crossed down from the block above would arrive after
    the lower block's zero_grad and stay in its .grad."""
    blocks = blocks_for(method)
    at_start = copy.deepcopy(blocks)  # the weights the stage took its gradients at (its steps move them)
    inputs: dict[int, torch.Tensor] = {}

    def keep_input(block: Block, block_args: tuple) -> None:
        x = block_args[0]  # (2B, C_in, H, W)
        assert x.grad_fn is None and not x.requires_grad, f"block {block.index}'s input is attached to a graph"
        inputs[block.index] = x.clone()

    hooks = [block.register_forward_pre_hook(keep_input) for block in blocks]
    lower, upper = LocalStage(blocks[:3], seed=0), LocalStage(blocks[3:], seed=0)  # two ranks' stages
    upper.forward(lower.forward(views(), step=0), step=0)
    lower.apply_feedback(0, upper.top_context)  # the top block's context arrives: top-down blocks learn
    for hook in hooks:
        hook.remove()
    assert sorted(inputs) == list(range(6)) and not lower.pending

    for block, alone in zip(blocks, at_start):
        context = upper.top_context if alone.needs_top_context else None
        loss, _ = alone.loss(alone.features(alone(inputs[block.index])), context)
        own = torch.autograd.grad(loss, list(alone.parameters()))
        for (name, parameter), expected in zip(block.named_parameters(), own):
            assert parameter.grad is not None, f"block {block.index} {name} did not learn"
            assert torch.equal(parameter.grad, expected), f"block {block.index} {name}: not its own loss's gradient"


def test_local_stage_updates_each_block_from_its_own_loss_only():
    """One step of the stage equals training each block alone on its (detached) input."""
    blocks, reference = blocks_for("clapp_pp_dfb"), blocks_for("clapp_pp_dfb")
    x = views()
    _, features = forward_detached(reference, x)
    top_context = features[-1].detach()
    for block, f in zip(reference, features):
        loss, _ = block.loss(f, top_context if block.needs_top_context else None)
        block.optimizer.zero_grad()
        loss.backward()
        block.optimizer.step()
    LocalStage(blocks, seed=0).forward(x, step=0)
    for trained, expected in zip(blocks, reference):
        for p, q in zip(trained.parameters(), expected.parameters()):
            assert torch.allclose(p, q, atol=1e-7)


def test_top_context_is_detached():
    """Lower blocks' top-down losses never put a gradient in the top block."""
    blocks = blocks_for("clapp_pp_dfb")
    x = views()
    for block in blocks:
        x = block(x)  # not detached: any leak would reach the top block through the context
    top_features = blocks[-1].features(x)
    lower = blocks[0]
    for block in blocks:
        block.zero_grad()
    lower.loss(lower.features(lower(views())), top_features)[0].backward()
    assert all(p.grad is None for p in blocks[-1].parameters())
    assert lower.heads["top"].weight.grad is not None


def test_lateral_context_is_detached():
    """The loss gradient on h flows through the target rows only, as if c were a constant."""
    block = blocks_for("clapp_pp")[5]
    h = torch.rand(8, block.heads["lateral"].in_features, requires_grad=True)
    loss, _ = block.loss(h)
    (grad,) = torch.autograd.grad(loss, h)
    constant_context = h.detach().clone()
    prediction = constant_context @ block.heads["lateral"].weight.T
    target = torch.cat([h[4:], h[:4]])
    u_pos = (target * prediction).sum(1)
    u_neg = (target.roll(-1, 0) * prediction).sum(1)
    (expected,) = torch.autograd.grad((torch.relu(1 - u_pos) + torch.relu(1 + u_neg)).mean(), h)
    assert torch.allclose(grad, expected)


def test_end_to_end_gradient_reaches_every_block():
    blocks = blocks_for("bp_infonce")
    before = [copy.deepcopy(b.conv.state_dict()) for b in blocks]
    EndToEndStage(blocks, seed=0).forward(views(), step=0)
    for block, old in zip(blocks, before):
        assert not torch.equal(block.conv.conv.weight, old["conv.weight"]), f"block {block.index} did not learn"


@pytest.mark.parametrize("maxpool", [True, False])
def test_a_conv_block_pools_before_its_relu_with_the_same_output_and_gradients(maxpool):
    """ConvBlock runs conv -> max-pool -> ReLU: the paper's conv -> ReLU -> max-pool, bit for bit."""
    from layers.encoder import ConvBlock
    block = ConvBlock(4, 8, maxpool)
    x = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, :, :4] = 0.0  # flat regions: ties in every pooling window
    out = block(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(out, list(block.parameters()), grad)
    pre = F.conv2d(x, block.conv.weight, block.conv.bias, padding=1)
    reference = F.relu(pre)
    reference = F.max_pool2d(reference, 2) if maxpool else reference
    assert torch.equal(out, reference)
    assert all(torch.equal(a, b) for a, b in zip(ours, torch.autograd.grad(reference, list(block.parameters()), grad)))
