"""Issue 26's alignment study program: the rank statistics it reports and what it reads of a run's log."""
from __future__ import annotations

import math

import pytest
import torch

from launch.bench import alignment as study
from tests.helpers import single_process


def test_rank_correlation_and_its_permutation_p_value():
    assert study.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert study.spearman([1, 2, 2, 3], [3, 5, 5, 9]) == pytest.approx(1.0)  # ties share their mean rank
    # six points in the same order: 2 of the 720 pairings are as extreme (the identity and its reverse)
    assert study.permutation_p(list(range(6)), [0.1, 0.5, 0.7, 2, 3, 8]) == pytest.approx(2 / 720, rel=0.25)  # sampled
    assert study.permutation_p([1, 2, 3, 4, 5, 6], [3, 1, 6, 2, 5, 4]) > 0.3  # no order: no evidence


def test_a_cell_keeps_the_second_half_of_its_blocks_cosines_and_the_table_reads_them(tmp_path, monkeypatch):
    out = tmp_path / "run"
    single_process(out, "method=clapp_pp", "train.steps=8", "log.every=2", "log.align_every=2")
    monkeypatch.setattr(study, "STUDY", study.Study(tmp_path / "alignment.json", study.STUDY.config, 8))
    kept = study.second_half_cosines(out)["cosines"]
    assert set(kept) == {str(b) for b in range(6)} and all(len(c) == 2 for c in kept.values())  # steps 4 and 6
    assert kept["5"] == pytest.approx([1.0, 1.0])  # the top block: BP's gradient is its own
    assert all(abs(c) <= 1 + 1e-9 for cosines in kept.values() for c in cosines)
    cells = {"cells": {f"clapp_pp/s{seed}": {"rule": "clapp_pp", "seed": seed, "probe_accuracy": 60.0 + seed,
                                             "cosines": kept} for seed in (0, 1)}}
    text = study.render(cells)
    assert "| clapp_pp |" in text and "61.00" not in text and "60.50 (2 seeds)" in text
    row = next(line for line in text.splitlines() if line.startswith("| clapp_pp |"))
    first = float(row.split("|")[2].split("±")[0])
    assert math.isclose(first, sum(kept["0"]) / 2, abs_tol=5e-4)


def test_a_cell_cut_short_goes_on_from_its_checkpoint_and_only_with_its_own_settings(tmp_path):
    from launch.bench.study import resumable
    from launch.runner import launch_run
    from tests.helpers import TINY, TINY_CONFIG, final_weights
    sets = [*TINY, "train.steps=8", "train.checkpoint_every=4"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    single_process(whole, "train.steps=8", "train.checkpoint_every=4")
    single_process(cut, "train.steps=8", "train.checkpoint_every=4")
    assert not resumable(cut, TINY_CONFIG, sets)  # finished: its summary is there
    (cut / "summary.json").unlink()
    (cut / "final.pt").unlink()
    for file in (cut / "checkpoints" / "step00000008").iterdir():  # the session ended before step 8's
        file.unlink()
    assert resumable(cut, TINY_CONFIG, sets)
    assert not resumable(cut, TINY_CONFIG, [*sets, "train.seed=1"])  # another cell's settings: start again
    assert not resumable(tmp_path / "nothing", TINY_CONFIG, sets)
    launch_run(TINY_CONFIG, sets, cut, progress=False, resume=True)
    resumed, uninterrupted = final_weights(cut), final_weights(whole)
    assert all(torch.equal(resumed[b][k], uninterrupted[b][k]) for b in uninterrupted for k in uninterrupted[b])
