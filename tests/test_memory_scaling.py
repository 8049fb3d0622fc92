"""launch.bench.memory_scaling: one process's blocks measured alone (step_timer.py --blocks), what the
plan says they hold, the skip of a measurement the machine cannot hold, and the ratios its table shows."""
from __future__ import annotations

import pytest

from launch.bench import memory_scaling
from launch.bench.memory_scaling import CASES, markdown, measure_alone, predicted_peak, ratios, run_case

MIB = 2**20


def test_a_process_alone_trains_its_blocks_on_input_of_the_block_belows_shape():
    one = measure_alone("clapp_pp", 0.0625, 4, [], [3])
    two = measure_alone("clapp_pp", 0.0625, 4, ["rule.predictor_rank=4"], [3, 4])
    assert one["blocks"] == [3] and two["blocks"] == [3, 4] and one["peak_memory_bytes"] > 0
    assert one["speedups"]["freed_memory_kept"] is None  # glibc's default allocator, as the program says


def test_a_measurement_that_would_not_fit_is_skipped_and_said(monkeypatch):
    monkeypatch.setattr(memory_scaling, "available_bytes", lambda: 10 * MIB)  # a machine with 10 MiB free
    processes = {}
    run_case("clapp_pp K=3", 1.0, 32, processes, lambda: None)
    assert len(processes) == 3 and all(key.startswith("clapp_pp K=3: blocks ") for key in processes)
    cell = processes["clapp_pp K=3: blocks 4-5"]["32"]  # full width: [[0, 1], [2, 3], [4, 5]]
    assert "GiB free" in cell["skipped"] and "peak_bytes" not in cell
    assert cell["b_state"] > cell["conv_state"] > 0 and cell["activity"] > 0  # full width: B's state dominates


def test_a_peak_is_predicted_from_the_batch_before():
    holds = {"b_state": 100, "conv_state": 0, "activity": 50}
    assert predicted_peak({}, "p", 32, holds) == 200  # nothing measured yet: state and twice the activity
    measured = {"p": {"32": {"peak_bytes": 400}}}
    assert predicted_peak(measured, "p", 64, holds) == 100 + 300 * 2  # the state stays, the rest doubles


def test_the_largest_process_is_set_against_bp_where_both_were_measured():
    def cell(peak: int | None) -> dict:
        return {"b_state": 0, "conv_state": 0, "activity": 0,
                **({"peak_bytes": peak} if peak else {"skipped": "needs about 30.0 GiB, 20.0 GiB free"})}
    processes = {"bp_infonce: blocks 0-5": {"32": cell(1000), "64": cell(None)},
                 "clapp_pp K=6: blocks 0-0": {"32": cell(300), "64": cell(500)},
                 "clapp_pp K=6: blocks 1-1": {"32": cell(700), "64": cell(1300)}}
    result = {"width": 1.0, "batches": [32, 64], "machine": {"cpu": "test"}, "processes": processes}
    assert ratios(result) == {"clapp_pp K=6": {"32": pytest.approx(0.7)}}  # 64: BP was not measured
    table = markdown(result)
    assert "| clapp_pp K=6 | 0.70 | - |" in table and "not run: needs about 30.0 GiB" in table
    assert set(CASES) >= {"bp_infonce", "clapp_pp K=6", "clapp_pp K=3"}
