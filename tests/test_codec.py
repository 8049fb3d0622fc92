"""Message codecs (sim.codec, sim.codec_feedback, issue 25): round-trip error bounds and unbiased
rounding per codec, the same weights on one process and on three with any codec (the packed bytes
travel, and fewer of them), and settings that cannot work refused before any work."""
import json

import pytest
import torch

from launch.bench.codec_speed import CODECS as CODECS_MEASURED
from launch.bench.codec_speed import main as codec_speed
from launch.bench.codecs import bytes_per_image
from sim.cost.measure import measure_block_times
from sim.errors import ConfigError
from sim.pipeline.codec import CODECS, Codec
from sim.run.plan import make_plan
from tests.helpers import (
    TINY,
    TINY_CONFIG,
    args,
    assert_same_weights,
    final_weights,
    run_config,
    single_process,
    summary,
)
from tests.ranks import run_ranks

# codec -> the largest error of one value, relative to the message's largest magnitude
BOUNDS = {"fp32": 0.0, "fp16": 2**-11, "bf16": 2**-8, "int8": 1 / 127, "int4": 1 / 7, "spike": 1.0}


@pytest.mark.parametrize("name", CODECS)
def test_each_codec_decodes_within_its_bound_in_the_bytes_it_says(name):
    codec = Codec(name)
    x = torch.rand(8, 16, 5, 5) * 3.0  # non-negative, as ReLU outputs are
    decoded, packed = codec.roundtrip(x, seed=0, block=2, step=7)
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape
    assert float((decoded - x).abs().max()) <= BOUNDS[name] * float(x.abs().max()) * (1 + 1e-6)
    sent = sum(t.numel() * t.element_size() for t in packed)
    assert sent == codec.message_bytes(tuple(x.shape))
    assert sent == x.numel() * codec.bits // 8 + (4 if name in ("int8", "int4", "spike") else 0)
    again, _ = codec.roundtrip(x, seed=0, block=2, step=7)
    assert torch.equal(again, decoded)  # keyed by (seed, block, step): the same on every process


@pytest.mark.parametrize("name", ["int8", "int4", "spike"])
def test_stochastic_codecs_are_unbiased(name):
    codec, x = Codec(name), torch.rand(4000) * 2.0
    mean = torch.stack([codec.roundtrip(x, seed=0, block=1, step=s)[0] for s in range(200)]).mean(0)
    spread = BOUNDS[name] * float(x.max()) / 200**0.5  # the sd of a mean of 200 draws is at most this
    assert float((mean - x).abs().mean()) < spread  # the mean error over values: within one sd of a value's
    assert abs(float((mean - x).mean())) < spread / 10


def test_signed_values_round_both_ways_and_spikes_refuse_them():
    x = torch.randn(1000)
    for name in ("int8", "int4"):
        decoded, _ = Codec(name).roundtrip(x, seed=1, block=0, step=0)
        assert float((decoded - x).abs().max()) <= BOUNDS[name] * float(x.abs().max()) * (1 + 1e-6)
    with pytest.raises(ValueError, match="sends values >= 0"):
        Codec("spike").encode(x, seed=1, block=0, step=0)
    assert torch.equal(Codec("int8").roundtrip(torch.zeros(5), 0, 0, 0)[0], torch.zeros(5))  # all-zero messages


@pytest.mark.parametrize("overrides", [
    ["method=clapp_pp", "sim.codec=int8"],
    ["method=clapp_pp_dfb", "sim.codec=int4", "sim.codec_feedback=spike"],
])
def test_one_process_and_three_give_the_same_weights_with_a_codec(tmp_path, overrides):
    alone = single_process(tmp_path / "k1", *overrides)
    outcomes = run_ranks(3, args(*overrides, "sim.placement=[[0,1],[2,3],[4,5]]", out=tmp_path / "k3"),
                         tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0, 0], outcomes[0].log[-2000:]
    assert_same_weights(alone, final_weights(tmp_path / "k3"))
    plain = single_process(tmp_path / "fp32", overrides[0])
    assert any(not torch.equal(plain[b][k], alone[b][k]) for b in plain for k in plain[b])  # the codec counts


def test_the_packed_bytes_travel(tmp_path):
    sent = {}
    for name in ("fp32", "int8", "spike"):
        run = args(f"sim.codec={name}", "log.every=0", out=tmp_path / name)
        outcomes = run_ranks(2, run, tmp_path / f"logs_{name}")
        assert [o.exitcode for o in outcomes] == [0, 0], outcomes[0].log[-2000:]
        sent[name] = summary(tmp_path / name)["ranks"][0]["bytes_sent"]  # rank 0: its activations (no log)
    assert sent["fp32"] / 4.1 < sent["int8"] < sent["fp32"] / 3.9
    assert sent["fp32"] / 33 < sent["spike"] < sent["fp32"] / 31
    images = 6 * 4  # TINY: 6 steps of 4 images; the codec study counts the same bytes (launch.bench.codecs)
    for name, count in sent.items():
        assert count / images == bytes_per_image("clapp_pp", name, "fp32", TINY_CONFIG, tuple(TINY))


def test_free_running_processes_send_packed_messages(tmp_path):
    run = ["method=clapp_pp_dfb", "sim.schedule=async", "sim.mailbox=fifo", "sim.codec=int8",
           "sim.codec_feedback=fp16"]
    outcomes = run_ranks(2, args(*run, out=tmp_path / "run"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0], outcomes[0].log[-2000:]
    assert summary(tmp_path / "run")["free_running"]["blocks"]["5"]["batches"] == 6


@pytest.mark.parametrize("overrides, message", [
    (["sim.codec=int2"], "sim.codec = 'int2' is not one of fp32, fp16, bf16, int8, int4, spike"),
    (["sim.codec_feedback=fp8"], "sim.codec_feedback = 'fp8' is not one of"),
])
def test_a_codec_that_does_not_exist_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_config(*overrides)


def test_end_to_end_rules_refuse_a_codec():
    with pytest.raises(ConfigError, match="bp_infonce is end-to-end backprop"):
        make_plan(run_config("method=bp_infonce", "sim.codec=int8"), 1)


def test_the_cost_model_counts_the_packed_bytes():
    plan = make_plan(run_config("sim.codec=int8", "sim.codec_feedback=spike"), 1)
    blocks = plan.build_blocks(range(6), torch.device("cpu"))
    views = torch.randn(8, 3, 32, 32)
    coded = measure_block_times(blocks, views, threads=1, data_seconds=0.0, repeats=1, codecs=plan.codecs)
    plain = measure_block_times(blocks, views, threads=1, data_seconds=0.0, repeats=1)
    assert [c - 4 for c in coded.activation_bytes] == [p // 4 for p in plain.activation_bytes]  # + the scale
    assert coded.feedback_bytes == plain.feedback_bytes // 32 + 4


def test_the_codec_speed_benchmark_runs_end_to_end(tmp_path):
    """`launch.bench.codec_speed --dry-run`: every codec run on 2 processes and predicted (not a measurement)."""
    assert codec_speed(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "codec_speed.json").read_text())
    assert [r["codec"] for r in result["runs"]] == list(CODECS_MEASURED) and result["dry_run"]
    for run in result["runs"]:
        assert run["measured"] > 0 and run["predicted"] > 0
        assert run["predicted_on_slower_links"]["100 Mbit/s"] <= run["predicted"]  # a slower link is never faster
    sizes = {r["codec"]: r["message_bytes"] for r in result["runs"]}
    assert sizes["spike"] < sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    assert "a dry run, not a measurement" in (tmp_path / "codec_speed.md").read_text()
