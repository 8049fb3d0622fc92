"""Rules are objects that the block, the plan, the cost model and the schedule ask: a new rule is one
module of layers/rules (defining RULES) and its test. Proved here with a rule that exists nowhere
else: a cosine-similarity contrast of the lateral context, without heads."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layers.rules import RULES, discover, get_rule
from layers.rules.rule import LossStats, Rule, RuleSettings
from sim.pipeline.stage import make_stage
from sim.run.config import load_config
from sim.run.plan import make_plan

TOY_MODULE = '''
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn
from layers.rules.rule import LossStats, Rule

@dataclass(frozen=True)
class CosineRule(Rule):
    def make_heads(self, feature_dim, top_feature_dim, settings):
        return nn.ModuleDict()

    def loss(self, heads, features, top_context, settings, generator):
        half = len(features) // 2
        cosine = F.cosine_similarity(features[:half], features[half:].detach())  # (B,)
        loss = -cosine.mean()
        return loss, LossStats(loss.detach(), cosine.detach().mean(), cosine.detach().mean())

RULES = (CosineRule("toy_cosine", "a rule no other file names", contexts=("top",)),)
'''


@pytest.fixture
def toy_rule(tmp_path, monkeypatch):
    """A new rule module, found by the registry's discovery as layers.rules finds its own."""
    package = tmp_path / "toy_rules"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "cosine.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover("toy_rules", [str(package)])
    monkeypatch.setitem(RULES, "toy_cosine", found["toy_cosine"])
    yield found["toy_cosine"]
    sys.modules.pop("toy_rules.cosine", None)
    sys.modules.pop("toy_rules", None)


def test_the_registry_finds_every_rule_module():
    assert list(discover()) and set(discover()) == set(RULES)
    assert {r.name for r in RULES.values() if r.end_to_end} == {"bp_clapp_pp", "bp_infonce"}
    assert RULES["clapp_pp_dfb"].needs_feedback and not RULES["bp_infonce"].needs_feedback
    with pytest.raises(ValueError, match="unknown method 'clap'; choose one of: clapp, clapp_pp"):
        get_rule("clap")


def test_a_new_rule_runs_through_plan_schedule_cost_model_and_stage(toy_rule):
    config = load_config(None, ["method=toy_cosine", "data.name=synthetic", "model.width=0.0625",
                                "train.batch_size=4", "log.every=0"])
    plan = make_plan(config, 3)
    assert plan.rule is toy_rule
    # top context below the top: ranks 0 and 1 wait for feedback; the top rank never does
    assert plan.schedule.waits_for_feedback == (True, True, False)
    assert all(heads == [] for heads in plan.head_matrices())  # no head: the cost model counts none
    assert plan.step_work().head_flops == 0 and plan.held_memory(range(6))["optimizer_state"] > 0
    blocks = make_plan(config, 1).build_blocks(range(6), torch.device("cpu"))
    assert all(len(b.heads) == 0 for b in blocks) and blocks[0].needs_top_context
    before = [b.conv_weight.detach().clone() for b in blocks]
    stage = make_stage(blocks, seed=0)
    stage.forward(torch.randn(8, 3, 32, 32), 0)  # one process: the top context is here, all learn
    assert sorted(u.block for u in stage.updates) == list(range(6))  # the top first, then those it fed
    assert all(not torch.equal(b.conv_weight, w) for b, w in zip(blocks, before))


def test_a_rule_that_reuses_a_name_is_refused(tmp_path, monkeypatch):
    package = tmp_path / "twice"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("a", "b"):
        (package / f"{name}.py").write_text("from layers.rules.predictive import RULES as OURS\nRULES = OURS[:1]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="two rules are named 'clapp'"):
        discover("twice", [str(package)])


def test_the_block_asks_its_rule_for_heads_and_loss():
    @dataclass(frozen=True)
    class Counting(Rule):
        def make_heads(self, feature_dim: int, top_feature_dim: int, settings: RuleSettings) -> nn.ModuleDict:
            return nn.ModuleDict({"mine": nn.Linear(feature_dim, 3, bias=False)})

        def loss(self, heads, features, top_context, settings, generator):
            out = heads["mine"](features)  # (2B, 3)
            return out.pow(2).mean(), LossStats(out.detach().mean(), out.detach().max(), out.detach().min())

    from layers.model import build_blocks
    blocks = build_blocks(Counting("counting", "test"), RuleSettings(), width=0.0625, in_channels=1, input_size=32,
                          seed=0, lr=1e-3, weight_decay=0.0, fused_optimizer=False)
    assert [b.heads["mine"].out_features for b in blocks] == [3] * 6
    x = F.relu(torch.randn(4, 1, 32, 32))
    out = blocks[0](x)
    loss, stats = blocks[0].loss(blocks[0].features(out))
    assert loss.item() == pytest.approx(blocks[0].heads["mine"](blocks[0].features(out)).pow(2).mean().item())



def test_a_low_rank_B_is_two_factors_that_the_cost_model_counts_and_that_learn():
    """rule.predictor_rank = r: B = W2 W1 (the CLAPP authors' --use_proj_head --low_rank_dim r)."""
    full = load_config(None, ["method=clapp_pp_both", "data.name=synthetic", "model.width=0.125", "train.batch_size=4"])
    low = load_config(None, ["method=clapp_pp_both", "data.name=synthetic", "model.width=0.125", "train.batch_size=4",
                             "rule.predictor_rank=8"])
    full_plan, low_plan = make_plan(full, 1), make_plan(low, 1)
    blocks = low_plan.build_blocks(range(6), torch.device("cpu"))
    for block, full_matrices, low_matrices in zip(blocks, full_plan.head_matrices(), low_plan.head_matrices()):
        dim, top = (params for params, _ in full_matrices)  # lateral: D x D; top: D x D_top
        dim, top = int(dim**0.5), top // int(dim**0.5)
        lateral = block.heads["lateral"]
        assert [w.shape for w in lateral.parameters()] == [(8, dim), (dim, 8)]
        assert torch.linalg.matrix_rank(lateral[1].weight @ lateral[0].weight) <= 8
        # W1 (r x context): forward and weight gradient; W2 (D x r): its input gradient too
        assert low_matrices == [(8 * dim, 2), (dim * 8, 3), (8 * top, 2), (dim * 8, 3)]
    rows = 2 * 4
    expected = sum(passes * 2 * rows * params for block in low_plan.head_matrices() for params, passes in block)
    assert low_plan.step_work().head_flops == expected < full_plan.step_work().head_flops
    assert (low_plan.held_memory(range(6))["optimizer_state"] < full_plan.held_memory(range(6))["optimizer_state"])
    stage = make_stage(blocks, seed=0)
    before = [p.detach().clone() for p in blocks[2].heads.parameters()]
    views = torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stage.forward(views, 0)
    stage.forward(views, 1)
    assert all(not torch.equal(b, p) for b, p in zip(before, blocks[2].heads.parameters()))  # both factors learn


@pytest.mark.parametrize("setting, message", [("method=scff", "method scff learns no B"),
                                               ("method=ff", "method ff learns no B"),
                                               ("method=clapp_pp", "must be >= 0")])
def test_a_predictor_rank_the_rule_cannot_use_is_refused(setting, message):
    from sim.errors import ConfigError
    rank = "rule.predictor_rank=-1" if "0" in message else "rule.predictor_rank=4"
    with pytest.raises(ConfigError, match=message):
        load_config(None, [setting, "data.name=synthetic", rank])
