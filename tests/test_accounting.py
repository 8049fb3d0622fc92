"""What a run computed, moved and held (summary.json's `accounting`, issue 25): the same arithmetic as
the cost model, the zeros of each block's input measured, synaptic operations from them, bytes by
message kind as they travel, and the log's per-step zero fraction."""
import numpy as np
import pytest

from analysis.store import open_run
from launch.bench.codecs import bytes_per_image
from layers.encoder import describe_encoder
from sim.run.plan import make_plan
from tests.helpers import TINY, TINY_CONFIG, args, run_config, single_process, summary
from tests.ranks import run_ranks


@pytest.mark.parametrize("method", ["clapp_pp", "clapp_pp_dfb", "bp_infonce"])
def test_the_multiply_accumulates_are_the_cost_models(method):
    plan = make_plan(run_config(f"method={method}"), 1)
    operations = plan.block_operations()
    macs = sum(o["forward"] + o["update"] + o["backward"] for o in operations)
    assert 2 * macs == pytest.approx(plan.step_work().flops)  # a multiply-accumulate is two FLOPs
    conv = [r.macs_per_image * 2 * plan.config.train.batch_size for r in describe_encoder(0.0625, 3, 32)]
    assert [o["convolution"] for o in operations] == conv
    backward = [o["backward"] for o in operations]
    assert backward == ([0.0] + conv[1:] if method == "bp_infonce" else [0.0] * 6)  # not into the image


def test_an_eligibility_trace_pays_a_second_forward_pass():
    stashed = make_plan(run_config("method=clapp_pp_dfb", "sim.feedback_delay=2"), 1).block_operations()
    traced = make_plan(run_config("method=clapp_pp_dfb", "sim.feedback_delay=2", "sim.stash=false"), 1)
    for block, (s, t) in enumerate(zip(stashed, traced.block_operations())):
        assert t["update"] - s["update"] == (s["convolution"] if block < 5 else 0)  # the top block waits for nothing


def test_a_run_counts_its_inputs_zeros_and_its_synaptic_operations(tmp_path):
    single_process(tmp_path / "run", "log.every=2")
    blocks = summary(tmp_path / "run")["accounting"]["blocks"]
    assert blocks["0"]["input_zero_fraction"] == 0.0  # images are dense
    for block in map(str, range(1, 6)):  # after a ReLU: zeros, not all
        entry = blocks[block]
        assert 0.05 < entry["input_zero_fraction"] < 0.95
        dense = entry["synaptic_ops"] / (1 - entry["input_zero_fraction"])
        assert dense == pytest.approx(describe_encoder(0.0625, 3, 32)[int(block)].macs_per_image * 2)
        assert entry["state_bytes"]["optimizer_state"] > 0 and entry["state_bytes"]["activity"] > 0
    logged = open_run(tmp_path / "run").blocks[3].series["input_zero_fraction"]
    assert len(logged) == 3 and np.all((0 < logged) & (logged < 1))


def test_bytes_are_counted_by_kind_as_they_travel(tmp_path):
    outcomes = run_ranks(2, args("log.every=3", out=tmp_path / "run"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0], outcomes[0].log[-2000:]
    found = summary(tmp_path / "run")
    accounting = found["accounting"]
    assert sum(accounting["bytes_sent"].values()) == sum(r["bytes_sent"] for r in found["ranks"])
    # held-out images at logged steps, gradients at alignment steps; the weights gathered after training are not
    assert set(accounting["bytes_sent"]) == {"activations", "heldout", "gradient"}
    assert accounting["bytes_sent_per_image"]["activations"] == bytes_per_image("clapp_pp", "fp32", "fp32",
                                                                               TINY_CONFIG, tuple(TINY))
