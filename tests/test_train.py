"""End to end in one process: the run folder, determinism, the probe, and clear failures."""
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from launch.train import main
from layers.model import build_blocks
from layers.rules import get_rule
from layers.rules.rule import RuleSettings
from sim.data.datasets import DatasetMissing
from sim.pipeline.stage import LocalStage, NonFiniteLoss, negatives_generator
from sim.run.config import Config, load_config
from sim.run.job import run_job
from sim.run.plan import make_plan
from tests.helpers import TINY_CONFIG, Weights, batches_of, blocks_of, final_weights

TINY = ["data.name=synthetic", "model.width=0.0625", "train.batch_size=8", "train.steps=6",
        "probe.epochs=1", "probe.train_limit=400", "probe.test_limit=200", "probe.augment=false",
        "train.threads=1", "log.heldout=32"]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, TINY + list(overrides))


def run(config: Config, out_dir: Path, progress: bool = False) -> dict:
    """One process, as launch.train runs it: the plan, then the job; the summary as a dict."""
    return dataclasses.asdict(run_job(make_plan(config, 1), out_dir, progress=progress))


@torch.no_grad()
def losses_on(config: Config, batches: Sequence[torch.Tensor], weights: Weights | None = None) -> list[float | None]:
    """Each block's loss summed over a run's `batches` (None: a block without a loss of its own), with
    `weights`, or the weights the run starts from. In float64, so that rounding cannot order two sums."""
    blocks = blocks_of(config)
    for block in blocks:
        if weights is not None:
            block.load_state_dict(weights[block.index])
        block.double()
    totals = [0.0 if block.has_loss else None for block in blocks]
    for step, x in enumerate(batches):
        features = []  # (2B, D) per block
        x = x.double()
        for block in blocks:
            x = block(x)
            features.append(block.features(x))
        for block, feature in zip(blocks, features):
            if block.has_loss:  # as in training: the top block's activity is the context of those that take it
                context = features[-1] if block.needs_top_context else None
                loss, _ = block.loss(feature, context, negatives_generator(block, config.train.seed, step))
                totals[block.index] += loss.item()
    return totals


def assert_learned(config: Config, out_dir: Path) -> None:
    """The run in `out_dir` learned: each block's weights moved, and on the run's own batches, final.pt
    gives a lower loss than the weights it started from, summed over the blocks and in the first block
    with a loss of its own (the images it sees are the same before and after)."""
    start, final = {b.index: b.state_dict() for b in blocks_of(config)}, final_weights(out_dir)
    assert [b for b in start if torch.equal(start[b]["conv.conv.weight"], final[b]["conv.conv.weight"])] == []
    batches = batches_of(config)
    before, after = losses_on(config, batches), losses_on(config, batches, final)
    first = next(b for b, loss in enumerate(before) if loss is not None)
    assert after[first] < before[first], (first, before, after)
    assert sum(a for a in after if a is not None) < sum(b for b in before if b is not None), (before, after)


def test_run_folder_and_summary(tmp_path):
    config = tiny_config("method=clapp_pp_dfb", "train.checkpoint_every=3")
    summary = run(config, tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.toml", "final.pt", "summary.json", "checkpoints"}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert (on_disk["method"], on_disk["dataset"], on_disk["world_size"], on_disk["steps"]) == \
        ("clapp_pp_dfb", "synthetic", 1, 6)
    assert on_disk["images_per_s"] > 0 and len(on_disk["peak_memory_bytes"]) == 1
    assert len(on_disk["loss_per_block"]) == 6 and all(v > 0 for v in on_disk["loss_per_block"])
    assert_learned(config, tmp_path)
    probe = on_disk["probe"]
    assert 0 <= probe["probe_accuracy"] <= 100 and len(probe["per_block_probe_accuracy"]) == 6
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert sorted(final) == list(range(6))
    assert {"conv.conv.weight", "conv.conv.bias", "heads.top.weight"} <= set(final[0])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step00000003", "step00000006"]
    for block in range(6):
        checkpoint = torch.load(tmp_path / "checkpoints" / "step00000006" / f"block{block}.pt", weights_only=True)
        assert checkpoint["step"] == 6 and checkpoint["optimizer"]["state"]  # AdamW moments are kept
    assert (tmp_path / "config.toml").read_text().startswith('method = "clapp_pp_dfb"')


@pytest.mark.parametrize("method", ["clapp_pp", "bp_infonce"])
def test_same_seed_same_result(tmp_path, method):
    config = tiny_config(f"method={method}", "rule.negatives=random", "probe.epochs=0")
    first = run(config, tmp_path / "a", progress=False)
    second = run(config, tmp_path / "b", progress=False)
    assert first["loss_per_block"] == second["loss_per_block"]
    a, b = (torch.load(tmp_path / d / "final.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    other = run(load_config(None, TINY + [f"method={method}", "probe.epochs=0", "train.seed=1"]),
                tmp_path / "c", progress=False)
    assert other["loss_per_block"] != first["loss_per_block"]


def test_probe_learns_the_synthetic_set_on_a_random_encoder(tmp_path):
    summary = run(tiny_config("train.epochs=0", "train.steps=0", "probe.epochs=3", "probe.train_limit=2000",
                              "probe.test_limit=500"), tmp_path, progress=False)
    assert summary["steps"] == 0
    assert summary["probe"]["probe_accuracy"] > 50  # chance is 10 %


def test_every_method_trains(tmp_path):
    for method in ("clapp", "clapp_pp", "clapp_pp_both", "bp_clapp_pp", "ff", "infonce_local"):
        config = tiny_config(f"method={method}", "train.steps=2", "probe.epochs=0")
        losses = run(config, tmp_path / method, progress=False)["loss_per_block"]
        if get_rule(method).end_to_end:
            assert losses[:5] == [None] * 5 and losses[5] is not None
        else:
            assert all(v is not None for v in losses)
        assert_learned(config, tmp_path / method)


def test_missing_dataset_fails_at_once_with_the_path(tmp_path):
    with pytest.raises(DatasetMissing) as error:
        run(load_config(None, TINY + ["data.name=cifar10", f"data.root={tmp_path}"]), tmp_path / "run")
    assert str(tmp_path) in str(error.value)
    assert not (tmp_path / "run").exists()  # failed before anything was written


def test_command_line_reports_errors_without_a_traceback(capsys):
    assert main([str(TINY_CONFIG), "--set", "method=clap"]) == 2
    assert "unknown method 'clap'" in capsys.readouterr().err


def test_finished_run_is_not_overwritten(tmp_path):
    run(tiny_config("train.steps=1", "probe.epochs=0"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds a finished run"):
        run(tiny_config("train.steps=1", "probe.epochs=0"), tmp_path, progress=False)


def test_non_finite_loss_names_block_and_step():
    blocks = build_blocks(get_rule("clapp_pp"), RuleSettings(), width=0.0625, seed=0, in_channels=3, input_size=32,
                          lr=2e-4, weight_decay=0.0, fused_optimizer=True)
    x = torch.randn(8, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="block 0 at step 3"):
        LocalStage(blocks, seed=0).forward(x, step=3)


def test_progress_bars_in_a_log_file_refresh_rarely(tmp_path):
    """In a pipe or a file every refresh of a bar is a line: training's and the probe's bars write their
    first and last state (and one line every 30 s), not one line per batch."""
    import subprocess
    import sys
    command = [sys.executable, "-m", "launch.train", str(TINY_CONFIG), "--set", "train.steps=20", "--set",
               "probe.epochs=3", "--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    updates = {bar: done.stderr.count(f"{bar}:") for bar in ("train", "probe")}
    assert 1 <= updates["train"] <= 3 and 1 <= updates["probe"] <= 3, (updates, done.stderr[-2000:])
