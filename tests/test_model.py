"""The encoder's shapes and sizes, the B matrices of each method, and pooling checks."""
import pytest
import torch

from layers.encoder import describe_encoder
from layers.model import PoolingError, build_blocks, grid_kernels, pool_kernels
from layers.rules import RULES, get_rule
from layers.rules.rule import RuleSettings


def test_encoder_matches_the_paper():
    reports = describe_encoder(1.0, 3, 32)
    assert [r.output_shape for r in reports] == [(128, 32, 32), (256, 16, 16), (256, 16, 16), (512, 8, 8),
                                                (1024, 4, 4), (1024, 2, 2)]
    assert sum(r.conv_params for r in reports) == pytest.approx(16.2e6, rel=0.01)
    assert sum(r.macs_per_image for r in reports) == pytest.approx(1.21e9, rel=0.01)
    assert [round(r.macs_per_image / 1e6, 1) for r in reports] == [3.5, 302.0, 151.0, 302.0, 302.0, 151.0]


def test_width_and_channels_scale_the_blocks():
    reports = describe_encoder(0.125, 1, 32)
    assert [r.output_shape[0] for r in reports] == [16, 32, 32, 64, 128, 128]
    assert reports[0].conv_params == 16 * 1 * 9 + 16


def build_meta(method: str, **kwargs):
    with torch.device("meta"):  # shapes only: full-width B matrices hold 201 M parameters
        return build_blocks(get_rule(method), RuleSettings(), width=1.0, seed=0, device="meta", in_channels=3,
                            input_size=32, lr=2e-4, weight_decay=0.0, fused_optimizer=True, **kwargs)


def test_full_width_B_shapes_match_the_paper():
    dims = [8192, 4096, 4096, 8192, 4096, 4096]
    lateral = build_meta("clapp_pp")
    assert [tuple(b.heads["lateral"].weight.shape) for b in lateral] == [(d, d) for d in dims]
    assert sum(b.heads["lateral"].weight.numel() for b in lateral) == pytest.approx(201e6, rel=0.01)
    top_down = build_meta("clapp_pp_dfb")
    assert [tuple(b.heads["top"].weight.shape) for b in top_down] == [(d, 4096) for d in dims]
    assert sum(b.heads["top"].weight.numel() for b in top_down) == pytest.approx(134e6, rel=0.01)
    both = build_meta("clapp_pp_both")
    assert sum(p.numel() for b in both for p in b.heads.parameters()) == pytest.approx(335e6, rel=0.01)


def test_end_to_end_methods_have_one_head_on_the_global_mean():
    blocks = build_meta("bp_clapp_pp")
    assert [len(b.heads) for b in blocks] == [0, 0, 0, 0, 0, 1]
    assert tuple(blocks[-1].heads["lateral"].weight.shape) == (1024, 1024)
    projection = build_meta("bp_infonce")[-1].heads["projection"]
    assert tuple(projection.weight.shape) == (1024, 1024) and projection.bias is None


def test_default_pooling_per_dataset_size():
    assert grid_kernels(32) == [4, 4, 4, 2, 2, 1]
    assert grid_kernels(64) == [8, 8, 8, 4, 4, 2]
    assert grid_kernels(96) == [12, 12, 12, 6, 6, 3]
    assert pool_kernels(get_rule("clapp"), 32) == [32, 16, 16, 8, 4, 2]  # global mean


def test_pooling_that_does_not_fit_is_rejected_naming_block_map_and_kernel():
    with pytest.raises(PoolingError) as error:
        pool_kernels(get_rule("clapp_pp"), 32, [12, 12, 12, 6, 6, 3])  # the authors' CIFAR scripts
    message = str(error.value)
    assert "block 4 has a 4x4 map and kernel 6" in message
    assert "[4, 4, 4, 2, 2, 1]" in message  # the fix
    with pytest.raises(PoolingError, match="6 kernels"):
        pool_kernels(get_rule("clapp_pp"), 32, [4, 4])


def test_blocks_are_initialised_from_seed_and_index_alone():
    method, rule = get_rule("clapp_pp"), RuleSettings()
    everything = build_blocks(method, rule, width=0.0625, seed=3, in_channels=3, input_size=32, lr=2e-4,
                              weight_decay=0.0, fused_optimizer=True)
    alone = build_blocks(method, rule, width=0.0625, seed=3, indices=[4], in_channels=3, input_size=32, lr=2e-4,
                         weight_decay=0.0, fused_optimizer=True)[0]
    assert all(torch.equal(p, q) for p, q in zip(everything[4].parameters(), alone.parameters()))
    other_seed = build_blocks(method, rule, width=0.0625, seed=4, indices=[4], in_channels=3, input_size=32,
                              lr=2e-4, weight_decay=0.0, fused_optimizer=True)[0]
    assert not torch.equal(alone.conv.conv.weight, other_seed.conv.conv.weight)


def test_every_block_owns_its_optimizer():
    blocks = build_blocks(get_rule("clapp_pp_both"), RuleSettings(), width=0.0625, seed=0, in_channels=3,
                          input_size=32, lr=2e-4, weight_decay=0.0, fused_optimizer=True)
    for block in blocks:
        owned = {id(p) for group in block.optimizer.param_groups for p in group["params"]}
        assert owned == {id(p) for p in block.parameters()}
        assert isinstance(block.optimizer, torch.optim.AdamW) and block.optimizer.defaults["lr"] == 2e-4


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError) as error:
        get_rule("clap")
    assert all(name in str(error.value) for name in RULES)
