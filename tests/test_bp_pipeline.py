"""The BP pipeline (launch.bp_pipeline): GPipe and 1F1B over two processes end with the weights of
a single-process reference that back-propagates the mean micro-batch loss; requests that cannot run
are clear errors; summary.json has the format the benchmark driver reads."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.bp_pipeline import load_request, main
from layers.encoder import block_channels, map_sizes
from sim.data.datasets import load_split
from sim.data.feed import ViewFeed
from sim.data.views import SimCLRViews
from sim.errors import ConfigError
from sim.pipeline.bp_engine import microbatches
from sim.pipeline.schedule import PipelineSettings
from sim.record.summary import RunSummary
from sim.run.plan import make_plan
from tests.helpers import ROOT, TINY_CONFIG

CONFIG = str(TINY_CONFIG)
BATCH, COUNT, STEPS = 8, 4, 3
OVERRIDES = ["data.name=synthetic", "model.width=0.0625", f"train.batch_size={BATCH}", "train.threads=1",
             "sim.timeout_s=60"]


def cli_args(schedule: str, out: Path, *extra: str) -> list[str]:
    sets = [arg for override in [*OVERRIDES, *extra] for arg in ("--set", override)]
    return [CONFIG, "--schedule", schedule, "--microbatches", str(COUNT), "--steps", str(STEPS), *sets,
            "--out", str(out)]


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory) -> dict[str, Path]:
    """Run folders of the two schedules on two processes under torchrun."""
    base = tmp_path_factory.mktemp("bp_pipeline")
    torchrun = Path(sys.executable).parent / "torchrun"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for schedule in ("gpipe", "1f1b"):
        runs[schedule] = base / schedule
        command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "launch.bp_pipeline",
                   *cli_args(schedule, runs[schedule])]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment,
                              check=False)  # the return code is asserted, with the log
        assert done.returncode == 0, done.stderr[-3000:]
    return runs


def reference_weights() -> dict[int, dict[str, torch.Tensor]]:
    """All six blocks in this process, one AdamW each; each step back-propagates the mean over
    micro-batches of the loss of micro-batch i = both views of images i*b .. (i+1)*b - 1."""
    config = load_request(CONFIG, OVERRIDES, STEPS)
    plan = make_plan(config, 1)
    blocks = plan.build_blocks(range(6), torch.device("cpu"))
    feed = ViewFeed(load_split("synthetic", None, "ssl"), SimCLRViews(plan.info, torch.device("cpu")), BATCH,
                    config.train.seed)
    b = BATCH // COUNT
    for step in range(STEPS):
        first, second = feed.views_at(step).chunk(2)  # (B, C, S, S) each
        losses = []
        for i in range(COUNT):
            x = torch.cat([first[i * b:(i + 1) * b], second[i * b:(i + 1) * b]])
            for block in blocks:
                x = block(x)
            losses.append(blocks[-1].loss(blocks[-1].features(x))[0])
        for block in blocks:
            block.optimizer.zero_grad(set_to_none=True)
        (sum(losses) / COUNT).backward()
        for block in blocks:
            block.optimizer.step()
    return {block.index: block.state_dict() for block in blocks}


def assert_close_weights(expected: dict, actual: dict) -> None:
    assert sorted(expected) == sorted(actual) == list(range(6))
    for index, tensors in expected.items():
        assert tensors.keys() == actual[index].keys()
        for key, tensor in tensors.items():
            # `where` is bound now, so the message names this tensor whenever it is built.
            torch.testing.assert_close(actual[index][key], tensor, atol=1e-5, rtol=1e-5,
                                       msg=lambda text, where=f"block {index} {key}": f"{where}: {text}")


def test_microbatches_keep_both_views_of_an_image_together():
    views = torch.arange(12.0).view(12, 1, 1, 1)  # 6 images: rows 0..5 view 1, rows 6..11 view 2
    parts = microbatches(views, 3)
    assert [p.flatten().tolist() for p in parts] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]


def test_gpipe_and_1f1b_equal_the_single_process_micro_batched_reference(pipelined, tmp_path):
    gpipe = torch.load(pipelined["gpipe"] / "final.pt", weights_only=True)
    one_f_one_b = torch.load(pipelined["1f1b"] / "final.pt", weights_only=True)
    assert_close_weights(gpipe, one_f_one_b)
    reference = reference_weights()
    assert_close_weights(reference, gpipe)
    assert main(cli_args("gpipe", tmp_path / "k1")) == 0  # one process, no torchrun
    assert_close_weights(reference, torch.load(tmp_path / "k1" / "final.pt", weights_only=True))


def test_requests_that_cannot_run_are_clear_errors(tmp_path, capsys):
    assert main([*cli_args("gpipe", tmp_path / "a"), "--set", "train.batch_size=10"]) == 2
    assert "train.batch_size = 10 is not divisible by --microbatches 4" in capsys.readouterr().err
    assert main([*cli_args("gpipe", tmp_path / "b"), "--set", "method=clapp_pp"]) == 2
    error = capsys.readouterr().err
    assert "method = 'clapp_pp' learns locally" in error and "bp_infonce" in error
    config = load_request(CONFIG, OVERRIDES, STEPS)
    with pytest.raises(ConfigError, match="1F1B needs at least as many micro-batches as processes"):
        make_plan(config, 4, pipeline=PipelineSettings("1f1b", 2))
    accepted = load_request(CONFIG, [*OVERRIDES, "method=bp_clapp_pp"], STEPS)
    make_plan(accepted, 2, pipeline=PipelineSettings("gpipe", 4))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_summary_has_the_format_the_driver_reads(pipelined):
    summary = json.loads((pipelined["1f1b"] / "summary.json").read_text())
    assert {field.name for field in dataclasses.fields(RunSummary)} == summary.keys()  # the one format
    assert (summary["method"], summary["engine"], summary["world_size"], summary["steps"], summary["schedule"],
            summary["microbatches"]) == ("bp_infonce", "bp_pipeline", 2, STEPS, "1f1b", COUNT)
    assert summary["images_per_s"] > 0 and len(summary["peak_memory_bytes"]) == 2
    assert summary["loss_per_block"][:5] == [None] * 5 and summary["loss_per_block"][5] > 0  # the top block's
    assert [b for group in summary["placement"] for b in group] == list(range(6))
    channels, sizes = block_channels(0.0625), map_sizes(32)
    cut = summary["placement"][0][-1]  # the last block of rank 0: its output goes up, its gradient down
    crossing = STEPS * 4 * 2 * BATCH * channels[cut] * sizes[cut] ** 2
    for rank in summary["ranks"]:
        assert rank.keys() == {"rank", "blocks", "seconds", "busy_seconds", "wait_seconds", "bytes_sent",
                               "freed_memory_kept"}  # no phase_seconds: the BP pipeline's engine does not time them
        assert rank["blocks"] == summary["placement"][rank["rank"]]
        assert rank["busy_seconds"] > 0
        assert rank["busy_seconds"] + rank["wait_seconds"] == pytest.approx(rank["seconds"])
        assert rank["bytes_sent"] == crossing  # activations up from rank 0, their gradient down from rank 1
    assert summary["accounting"]["bytes_sent"] == {"activations": crossing, "gradient": crossing}  # by kind too
