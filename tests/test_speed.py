"""The speed-ups keep the numerics (fused AdamW, the patch-product convolution gradient); the
floor's FLOP count matches hand-worked numbers; the step timer of launch.bench.speed runs (no time is asserted)."""
import json
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from layers.encoder import PATCH_GRADIENT_MAX_PIXELS, conv3x3
from layers.learning_rate import LearningRate
from layers.model import build_blocks
from layers.rules import get_rule
from layers.rules.rule import RuleSettings
from sim.errors import ConfigError
from sim.pipeline.stage import LocalStage, make_stage
from sim.run.config import load_config
from sim.run.freed_memory import keeping_pays
from sim.run.plan import make_plan
from tests.helpers import ROOT, adamw_step_bound

MACS_32PX = [3 * 128 * 9 * 32 * 32, 128 * 256 * 9 * 32 * 32, 256 * 256 * 9 * 16 * 16, 256 * 512 * 9 * 16 * 16,
             512 * 1024 * 9 * 8 * 8, 1024 * 1024 * 9 * 4 * 4]  # full width, per image, forward


LR, DECAY = 1e-3, 1e-5


def _rounding(weight: torch.Tensor) -> torch.Tensor:
    """A few float32 roundings of each of `weight`'s entries and of a step of about lr (measured: 2.3)."""
    return 4 * torch.finfo(torch.float32).eps * (weight.abs() + LR)


def _trained(fused: bool, steps: int = 3) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[float]]:
    """Every parameter before training and after each of `steps` steps on one batch; the gradients
    of the first step; the losses."""
    blocks = build_blocks(get_rule("clapp_pp"), RuleSettings(), width=0.0625, in_channels=3, input_size=32, seed=0,
                          lr=LR, weight_decay=DECAY, fused_optimizer=fused)
    stage, views, losses = make_stage(blocks, 0), torch.randn(16, 3, 32, 32, generator=torch.manual_seed(1)), []
    parameters = [p for b in blocks for p in b.parameters()]
    weights, gradients = [[p.detach().clone() for p in parameters]], []
    for step in range(steps):
        stage.forward(views, step)  # clapp_pp: every block steps within the call
        losses += [u.stats.loss.item() for u in stage.updates]
        stage.updates.clear()
        weights.append([p.detach().clone() for p in parameters])
        gradients = gradients or [p.grad.clone() for p in parameters]
    return weights, gradients, losses


def test_fused_adamw_is_the_default_adamw_up_to_rounding():
    fused, gradients, fused_losses = _trained(True)
    plain, plain_gradients, plain_losses = _trained(False)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(gradients, plain_gradients))  # same weights, same first gradient
    for weights in (fused, plain):
        # the first step by hand, in float64: decay, then lr * m / (sqrt(v) + eps) = lr * g / (|g| + eps)
        for start, gradient, after in zip(weights[0], gradients, weights[1]):
            start, gradient = start.double(), gradient.double()
            expected = start * (1 - LR * DECAY) - LR * gradient / (gradient.abs() + 1e-8)
            assert ((after - expected).abs() <= _rounding(start)).all()
        # no later step goes further than AdamW (torch's betas, the blocks') can: 1.0014 lr at step 2, 1.0036 at 3
        for step in range(2, len(weights)):
            for before, after in zip(weights[step - 1], weights[step]):
                limit = LR * adamw_step_bound(step) + LR * DECAY * before.abs() + _rounding(before)
                assert ((after - before).abs() <= limit).all(), step
    # Adam divides by the gradient's running size: where a gradient is near zero, a rounding
    # difference in a later step can turn that step's update around (the two runs part by up to
    # twice its size there); elsewhere they agree to float32 rounding
    differences = torch.cat([(a - b).abs().flatten() for a, b in zip(fused[-1], plain[-1])])
    assert (differences > 1e-6).float().mean() < 0.05


def test_the_config_chooses_the_optimiser():
    for fused in (True, False):
        plan = make_plan(load_config(ROOT / "launch/configs/tiny.toml", [f"optim.fused={str(fused).lower()}"]), 1)
        block = plan.build_blocks([0], torch.device("cpu"))[0]
        assert bool(block.optimizer.defaults["fused"]) is fused


KEEP = """
import sys, torch
from pathlib import Path
from sim.run.freed_memory import keep_freed_memory, kept_setting
def resident():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
setting = None
if sys.argv[1] == "keep":
    setting = keep_freed_memory()
    assert keep_freed_memory() == kept_setting() == setting  # once is enough; it says what it set
big = torch.ones(2**24)  # 64 MiB, above glibc's largest mmap threshold (32 MiB)
held = resident()
del big
print(setting, "|", held - resident())  # KiB handed back to the kernel by the free
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_stays_in_the_process():
    settings, returned = {}, {}
    for mode in ("keep", "default"):
        done = subprocess.run([sys.executable, "-c", KEEP, mode], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        settings[mode], kib = done.stdout.strip().rsplit("|", 1)
        returned[mode] = int(kib)
    assert "M_MMAP_MAX=0" in settings["keep"] and settings["default"].strip() == "None"
    assert returned["keep"] < 1024  # kept: a later step reuses those pages without faulting them in
    assert returned["default"] > 60 * 1024  # glibc's default unmapped all 64 MiB at once


def test_floor_flops_are_the_hand_worked_ones():
    def work(method: str):
        config = load_config(None, [f"method={method}", "data.name=synthetic", "model.width=1.0",
                                    "train.batch_size=32"])
        return make_plan(config, 1).step_work()

    rows = 64
    local = work("clapp_pp")  # forward and weight gradient of every conv; B: forward and gradient
    assert local.conv_flops == 2 * 2 * rows * sum(MACS_32PX)
    assert local.head_flops == 2 * 2 * rows * (2 * 8192**2 + 4 * 4096**2)
    assert local.optimizer_bytes == 28 * (sum(c.numel() for c in _conv_params()) + 2 * 8192**2 + 4 * 4096**2)
    assert local.conv_flops / 1e9 == pytest.approx(310.1, abs=0.1)  # the figure
    dfb = work("clapp_pp_dfb")  # every B maps the top block's 4,096 features
    assert dfb.head_flops == 2 * 2 * rows * (8192 + 4096 + 4096 + 8192 + 4096 + 4096) * 4096
    bp = work("bp_infonce")  # plus the input gradient of blocks 1 to 5; the projection 1024 -> 1024
    assert bp.conv_flops == 2 * rows * (2 * MACS_32PX[0] + 3 * sum(MACS_32PX[1:]))
    assert bp.head_flops == 3 * 2 * rows * 1024 * 1024  # the projection's input takes a gradient too


def _conv_params() -> list[torch.Tensor]:
    blocks = build_blocks(get_rule("clapp"), RuleSettings(), width=1.0, in_channels=3, input_size=32, seed=0,
                          lr=2e-4, weight_decay=0.0, fused_optimizer=True, device="meta")
    return [p for b in blocks for p in b.conv.parameters()]


def test_held_memory_of_local_and_backprop_processes():
    config = load_config(None, ["method=clapp_pp", "data.name=synthetic", "model.width=1.0", "train.batch_size=32"])
    six = make_plan(config, 6)
    block0 = six.held_memory([0])
    assert block0["optimizer_state"] == 16 * (3 * 128 * 9 + 128 + 8192**2)
    assert block0["activity"] == 64 * (3 * 32 * 32 + 128 * 32 * 32) * 4  # its input and its ReLU output (in place)
    block1 = six.held_memory([1])["activity"]  # input, ReLU output before the max-pool, pooled map and indices
    assert block1 == 64 * (128 * 32 * 32 * 4 + 256 * 32 * 32 * 4 + 256 * 16 * 16 * (4 + 8))
    everything = make_plan(config, 1).held_memory(list(range(6)))
    assert everything["activity"] == max(six.held_memory([b])["activity"] for b in range(6))  # one block at a time
    bp = load_config(None, ["method=bp_infonce", "data.name=synthetic", "model.width=1.0", "train.batch_size=32"])
    kept = make_plan(bp, 1).held_memory(list(range(6)))["activity"]
    assert kept == sum(six.held_memory([b])["activity"] for b in range(6))  # backprop keeps them all


def test_step_timer_reports_steps_memory_and_speedups():
    argv = [sys.executable, str(ROOT / "launch/bench/step_timer.py"), "--method", "clapp_pp", "--width", "0.0625",
            "--batch", "8", "--warmup", "1", "--steps", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["step_seconds"]) == 2 and all(s > 0 for s in result["step_seconds"])
    assert result["peak_memory_bytes"] > 0 and result["speedups"]["fused_adamw"] is True


@pytest.mark.parametrize("side", [4, 8])
def test_patch_product_gradients_equal_the_convolutions(side: int):
    x = torch.randn(6, 5, side, side, requires_grad=True)
    weight, bias = torch.randn(7, 5, 3, 3, requires_grad=True), torch.randn(7, requires_grad=True)
    assert side * side <= PATCH_GRADIENT_MAX_PIXELS  # conv3x3 takes the patch product here
    grad_out = torch.randn(6, 7, side, side)
    ours = torch.autograd.grad(conv3x3(x, weight, bias), (x, weight, bias), grad_out)
    reference = torch.autograd.grad(F.conv2d(x, weight, bias, padding=1), (x, weight, bias), grad_out)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv3x3(x, weight, bias), F.conv2d(x, weight, bias, padding=1))  # through _Conv3x3


def test_a_late_update_uses_the_rate_of_its_own_batch():
    blocks = build_blocks(get_rule("clapp_pp_dfb"), RuleSettings(), width=0.0625, in_channels=3, input_size=32,
                          seed=0, lr=1e-3, weight_decay=0.0, fused_optimizer=True, indices=[0])
    rate = LearningRate(1e-3, "cosine", warmup_steps=2, total_steps=4)  # 5e-4 at step 0, 1e-3 at step 1
    stage = LocalStage(blocks, seed=0, learning_rate=rate)  # block 0 waits for the top block's context
    views, context = torch.randn(8, 3, 32, 32), torch.randn(8, blocks[0].heads["top"].in_features)
    stage.forward(views, 0)
    stage.forward(views, 1)
    stage.apply_feedback(0, context)  # batch 0's update, applied after batch 1's forward
    assert blocks[0].optimizer.param_groups[0]["lr"] == rate.at(0) != rate.at(1)
    stage.apply_feedback(1, context)
    assert blocks[0].optimizer.param_groups[0]["lr"] == rate.at(1)


def test_freed_memory_is_kept_by_default_only_where_state_outweighs_activity():
    def held(*overrides: str, blocks=range(6), processes: int = 1) -> dict:
        return make_plan(load_config(None, ["data.name=synthetic", "model.width=1.0", "train.batch_size=32",
                                            *overrides]), processes).held_memory(blocks)
    assert keeping_pays(held("method=clapp_pp"))  # full width, 32 px: the B matrices (+2 to +5 % measured)
    assert keeping_pays(held("method=clapp_pp_dfb"))  # +4 % measured
    assert keeping_pays(held("method=clapp"))  # 144 MiB of activity: +17 % (110 MiB) for 17 % faster steps
    assert not keeping_pays(held("method=bp_infonce"))  # 328 MiB of activity: +14 %
    assert not keeping_pays(held("method=clapp_pp", "data.name=synthetic_96"))  # +9 %
    assert keeping_pays(held("method=bp_infonce", "model.width=0.125"))  # small: 20 MiB for 15-25 % faster steps
    assert not keeping_pays(held("method=clapp_pp", "data.name=synthetic_96", blocks=[1], processes=6))  # +55 %
    auto = load_config(None, ["data.name=synthetic"])
    assert auto.train.keep_freed_memory == "auto"
    with pytest.raises(ConfigError, match='train.keep_freed_memory = .sometimes.: use "auto"'):
        load_config(None, ["train.keep_freed_memory=sometimes"])
    assert load_config(None, ["train.keep_freed_memory=false"]).train.keep_freed_memory is False  # old files


GIVE_BACK = """
import torch
from pathlib import Path
from sim.run.freed_memory import give_back_freed_memory, keep_freed_memory
def resident():
    return next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
keep_freed_memory()
big = torch.ones(2**24)  # 64 MiB
del big
kept = resident()
give_back_freed_memory()  # as a rank does when its training ends, before the probe
returned = kept - resident()
again = torch.ones(2**24)  # glibc's defaults again: mapped on its own, unmapped when freed
held = resident()
del again
print(returned, held - resident())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_goes_back_when_training_ends():
    done = subprocess.run([sys.executable, "-c", GIVE_BACK], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    returned, unmapped = (int(kib) for kib in done.stdout.split())
    assert returned > 60 * 1024 and unmapped > 60 * 1024
