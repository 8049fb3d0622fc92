"""Issue 26's longer runs: what a cell keeps of its log, and the table beside the protocol's 1x points."""
from __future__ import annotations

import json

from launch.bench import longer
from tests.helpers import single_process


def test_a_cell_keeps_probe_and_alignment_curves_per_block(tmp_path):
    out = tmp_path / "run"
    single_process(out, "method=clapp_pp_dfb", "train.steps=8", "log.every=2", "log.align_every=4",
                   "log.heldout=40")
    kept = longer.curves(out)
    assert set(kept["probe_curves"]) == {str(b) for b in range(6)}
    assert [s for s, _ in kept["probe_curves"]["0"]] == [0, 2, 4, 6]
    assert all(0 <= a <= 1 for curve in kept["probe_curves"].values() for _, a in curve)
    assert [s for s, _ in kept["alignment_curves"]["3"]] == [0, 4]
    assert all(c == 1.0 or abs(c) < 1 for _, c in kept["alignment_curves"]["3"])
    assert [round(c, 6) for _, c in kept["alignment_curves"]["5"]] == [1.0, 1.0]  # the top block: BP's own


def test_the_table_sets_each_longer_run_beside_its_protocol_point(tmp_path, monkeypatch):
    old_names = {"test_acc": 61.0, "last_block_acc": 47.0, "per_block_test_acc": [50] * 6}  # files before issue 23
    protocol = {"cells": {"cifar10/random/0": old_names,
                          "cifar10/clapp_pp_dfb/0": {"probe_accuracy": 64.0, "last_block_accuracy": 40.0,
                                                      "per_block_probe_accuracy": [55.0] * 6}}}
    (tmp_path / "protocol.json").write_text(json.dumps(protocol))
    monkeypatch.setattr(longer, "PROTOCOL", tmp_path / "protocol.json")
    results = {"cells": {"clapp_pp_dfb/2x": {"rule": "clapp_pp_dfb", "times": 2, "probe_accuracy": 65.5,
                                             "last_block_accuracy": 42.0, "per_block_probe_accuracy": [56.0] * 6}}}
    text = longer.render(results)
    assert "| clapp_pp_dfb | 9,000 | 64.00 / 40.00 | +3.00 |" in text
    assert "| clapp_pp_dfb | 18,000 | 65.50 / 42.00 | +4.50 |" in text
    assert [c[0] for c in longer.cells()] == ["clapp_pp_dfb/2x", "clapp_pp_dfb/4x", "clapp_pp/3x",
                                               "clapp_pp_both/3x", "bp_infonce/3x"]
