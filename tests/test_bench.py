"""The benchmark's cost model and its output format (no timing is asserted)."""
import dataclasses
import json
import platform
from pathlib import Path

import pytest

from launch.bench.__main__ import main as bench
from launch.bench.replicas import main as replicas_bench
from sim.cost.model import (
    BlockTimes,
    LinkSpeed,
    all_reduce_seconds,
    backprop_pipelined,
    local_exact_feedback,
    local_pipelined,
)
from sim.run.config import load_config
from tests.helpers import TINY_CONFIG

FREE = LinkSpeed(latency=0.0, bandwidth=float("inf"))
EVEN = BlockTimes(local=[1.0] * 6, forward=[0.5] * 6, backward=[1.0] * 6, data=0.0,
                  activation_bytes=[1000] * 6, feedback_bytes=100, gradient_bytes=[4000] * 6)
ALL, HALVES, SIXTHS = [list(range(6))], [[0, 1, 2], [3, 4, 5]], [[b] for b in range(6)]


def test_local_pipeline_runs_at_its_slowest_rank():
    assert local_pipelined(EVEN, ALL, FREE, batch=32) == pytest.approx(32 / 6)
    assert local_pipelined(EVEN, HALVES, FREE, batch=32) == pytest.approx(32 / 3)
    assert local_pipelined(EVEN, SIXTHS, FREE, batch=32) == pytest.approx(32 / 1)
    slow_link = LinkSpeed(latency=0.5, bandwidth=float("inf"))
    assert local_pipelined(EVEN, HALVES, slow_link, batch=32) == pytest.approx(32 / 3.5)  # rank 0 also sends


def test_exact_feedback_gains_nothing_from_more_ranks():
    assert local_exact_feedback(EVEN, SIXTHS, FREE, batch=32) == pytest.approx(
        local_exact_feedback(EVEN, ALL, FREE, 32))


def test_flushed_backprop_pipeline_pays_its_bubble():
    assert backprop_pipelined(EVEN, ALL, FREE, batch=32) == pytest.approx(32 / 9)  # one process, whole batch
    # EVEN as the times of one micro-batch: m + K - 1 slots of the slowest rank's micro-batch work
    two = backprop_pipelined(EVEN, HALVES, FREE, batch=32, microbatches=4)
    assert two == pytest.approx(32 / ((4 + 1) * 4.5))
    quarter = BlockTimes(**{**EVEN.__dict__, "forward": [0.125] * 6, "backward": [0.25] * 6})
    assert backprop_pipelined(quarter, HALVES, FREE, 32, 4) == pytest.approx(32 / (5 / 4 * 4.5))  # ideal scaling


def test_replicas_multiply_the_images_and_pay_the_all_reduce_of_their_blocks():
    assert local_pipelined(EVEN, ALL, FREE, batch=32, replicas=2) == pytest.approx(2 * 32 / 6)
    slow_link = LinkSpeed(latency=0.5, bandwidth=float("inf"))  # a ring all-reduce over 4: 6 messages a block
    assert local_pipelined(EVEN, HALVES, slow_link, batch=32, replicas=4) == pytest.approx(
        4 * 32 / (3 + 0.5 + 3 * 6 * 0.5))  # rank 0: its blocks, its message up, its 3 blocks' all-reduces
    assert all_reduce_seconds(LinkSpeed(0.0, 1000.0), 4000, 2) == pytest.approx(2 * 2000 / 1000)
    assert backprop_pipelined(EVEN, ALL, FREE, batch=32, replicas=2) == pytest.approx(2 * 32 / 9)


def test_replicas_benchmark_writes_its_report(tmp_path):
    assert replicas_bench(["--widths", "0.0625", "--steps", "4", "--out", str(tmp_path), "--runs",
                           str(tmp_path / "runs")]) == 0
    result = json.loads((tmp_path / "replicas.json").read_text())["results"][0]
    assert set(result["runs"]) == {"R=1 K=1", "R=1 K=2", "R=2 K=1"}
    assert result["runs"]["R=2 K=1"]["images_per_step"] == 64 and result["runs"]["R=2 K=1"]["images_per_s"] > 0
    assert set(result["eight_processes"]) == {"8x1", "4x2", "2x3", "2x4", "1x6"}
    assert "R=2 K=1" in (tmp_path / "replicas.md").read_text()
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 3 and all((run / "summary.json").is_file() for run in runs)
    assert not list((tmp_path / "runs").rglob("*.pt"))  # a benchmark keeps its figures, not its weights


def test_quick_benchmark_writes_its_report(tmp_path):
    config = str(TINY_CONFIG)
    assert bench([config, "--quick", "--repeats", "2", "--out", str(tmp_path), "--set", "train.batch_size=8",
                  "--set", "train.steps=30"]) == 0  # the test: fewer steps than --quick takes
    result = json.loads((tmp_path / "bench.json").read_text())
    names = [run["name"] for run in result["runs"]]
    assert names == ["bp_single", "bp_pipeline_1f1b", "local_single", "local_parallel"]
    for run in result["runs"]:
        assert run["images_per_s"] > 0 and len(run["peak_memory_bytes"]) == run["world_size"]
        assert len(run["images_per_s_each_repeat"]) == 2 and run["images_per_s"] == max(run["images_per_s_each_repeat"])
    assert set(result["ratios"]) == {"local_parallel_vs_bp_pipeline", "local_parallel_vs_bp_single",
                                     "local_parallel_vs_local_sequential", "pipeline_efficiency"}
    assert result["analytic_bounds"]["local_parallel_vs_bp_pipeline"] == pytest.approx((4 + 2 - 1) / 4)
    assert set(result["cost_model"]["runs"]) == set(names)
    assert (tmp_path / "bench.md").read_text().startswith("synthetic")
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_table_renders_mean_and_spread_next_to_the_paper(tmp_path):
    from launch.bench.table import chart, render

    def cell(acc: float) -> dict:
        return {"test_acc": acc, "last_block_acc": acc - 10, "images_per_s": 100.0, "peak_memory_bytes": [2**20],
                "steps": 750}

    results = {"cells": {"cifar10/clapp_pp/0": cell(50.0), "cifar10/clapp_pp/1": cell(52.0),
                         "cifar10/random/0": {**cell(40.0), "steps": 0}}}
    table = render(results)
    assert "### CIFAR-10 (JPEG q75)" in table
    assert "| clapp_pp | 51.00 ± 1.41 | 41.00 ± 1.41 | 100 | 1 | 2 | 80.51 |" in table
    assert "| random | 40.00 (1 seed) | 30.00 (1 seed) | - |" in table
    chart(results, tmp_path / "table.png")
    assert (tmp_path / "table.png").stat().st_size > 10_000


def tmp_scales(table_module, tmp_path: Path, monkeypatch) -> dict:
    """Both scales of the table writing into tmp_path, BENCHMARKS.md with both scales' markers."""
    scales = {name: dataclasses.replace(scale, results=tmp_path / f"{name}.json", chart=tmp_path / f"{name}.png")
              for name, scale in table_module.SCALES.items()}
    monkeypatch.setattr(table_module, "SCALES", scales)
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("".join(f"# {n}\n{s.start}\n| old |\n{s.end}\n" for n, s in scales.items()) + "tail\n")
    monkeypatch.setattr(table_module, "BENCHMARKS", page)
    return scales


def fake_cells(table_module, monkeypatch) -> list:
    """run_cell replaced by a recorder: (scale's marker, row, seed, logged) per call, in call order."""
    runs = []

    def fake_cell(scale, dataset: str, root: str, row: str, seed: int, logged: bool, out: Path) -> dict:
        runs.append((scale.marker, row, seed, logged))
        return {"test_acc": 50.0 + len(runs), "last_block_acc": 40.0, "images_per_s": 10.0,
                "peak_memory_bytes": [2**20], "steps": 0 if row == "random" else 600}

    monkeypatch.setattr(table_module, "run_cell", fake_cell)
    return runs


def test_table_resumes_from_its_results_file_and_redoes_only_when_asked(tmp_path, monkeypatch):
    import launch.bench.table as table_module

    tmp_scales(table_module, tmp_path, monkeypatch)
    runs = fake_cells(table_module, monkeypatch)
    command = ["--data", "fashion_mnist", "--rows", "random,clapp", "--seeds", "0"]
    assert table_module.main(command) == 0
    assert runs == [("table", "random", 0, False), ("table", "clapp", 0, False)]
    assert table_module.main([*command[:-1], "0,1"]) == 0  # only the new seed's cells run
    assert [r[1:3] for r in runs[2:]] == [("random", 1), ("clapp", 1)]
    kept = json.loads((tmp_path / "short.json").read_text())["cells"]
    assert kept["fashion_mnist/clapp/0"]["test_acc"] == 52.0 and len(kept) == 4
    assert table_module.main([*command, "--redo"]) == 0  # seed 0 again, replaced in the file
    assert [r[1:3] for r in runs[4:]] == [("random", 0), ("clapp", 0)]
    assert json.loads((tmp_path / "short.json").read_text())["cells"]["fashion_mnist/clapp/0"]["test_acc"] == 56.0
    assert (tmp_path / "short.png").exists()
    page = (tmp_path / "BENCHMARKS.md").read_text()  # only the short scale's table was replaced
    assert page.count("| old |") == 1 and "| clapp |" in page.split("table-protocol")[0]


def test_protocol_table_logs_the_figure_rows_seed_0_and_runs_a_two_process_cell_alone(tmp_path, monkeypatch):
    import launch.bench.table as table_module

    scales = tmp_scales(table_module, tmp_path, monkeypatch)
    runs = fake_cells(table_module, monkeypatch)
    rows = "random,clapp_pp,clapp_pp_dfb@2 delayed"
    assert table_module.main(["--scale", "protocol", "--data", "cifar10", "--rows", rows, "--seeds", "0,4",
                              "--jobs", "2"]) == 0
    assert all(marker == "table-protocol" for marker, *_ in runs)
    by_seed = [[r[1:] for r in runs if r[2] == seed] for seed in (0, 4)]
    for seed, cells in zip((0, 4), by_seed):  # each seed's 2-process cell first, before the pool starts
        assert cells[0] == ("clapp_pp_dfb@2 delayed", seed, seed == 0)
        assert sorted(cells[1:]) == [("clapp_pp", seed, seed == 0), ("random", seed, False)]
    assert runs.index(("table-protocol", "clapp_pp_dfb@2 delayed", 4, False)) == 3  # seed 0 wholly before seed 4
    assert scales["protocol"].results.exists() and not scales["short"].results.exists()
    assert len(json.loads(scales["protocol"].results.read_text())["cells"]) == 6  # every concurrent save kept
    assert (tmp_path / "BENCHMARKS.md").read_text().count("| old |") == 1


def test_table_stops_at_a_failed_cell_and_keeps_the_finished_ones(tmp_path, monkeypatch):
    import launch.bench.table as table_module

    scales = tmp_scales(table_module, tmp_path, monkeypatch)
    runs = fake_cells(table_module, monkeypatch)
    recorder = table_module.run_cell

    def failing(scale, dataset, root, row, seed, logged, out):
        if row == "clapp":
            raise SystemExit(f"run {out} failed (see above)")
        return recorder(scale, dataset, root, row, seed, logged, out)

    monkeypatch.setattr(table_module, "run_cell", failing)
    with pytest.raises(SystemExit, match="failed"):
        table_module.main(["--data", "cifar10", "--rows", "random,clapp,clapp_pp", "--seeds", "0"])
    assert [r[1] for r in runs] == ["random"]  # clapp_pp was cancelled, not run
    assert list(json.loads(scales["short"].results.read_text())["cells"]) == ["cifar10/random/0"]


def test_every_scale_of_the_table_has_its_markers_in_benchmarks():
    from launch.bench.table import BENCHMARKS, SCALES

    page = BENCHMARKS.read_text()
    for scale in SCALES.values():
        assert page.count(scale.start) == 1 and page.count(scale.end) == 1, scale.marker


def test_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    """`launch.bench.gpu --dry-run`: the program a lent GPU will run, exercised here at width 1/16."""
    from launch.bench.gpu import main as gpu_bench
    assert gpu_bench(["--dry-run", "--methods", "clapp_pp,bp_infonce", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["method"] for r in result["runs"]] == ["clapp_pp", "bp_infonce"] and result["dry_run"]
    assert all(r["images_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["steady"] for r in result["runs"])
    table = (tmp_path / "gpu.md").read_text()
    assert "| bp_infonce |" in table and "| 1.00x | 1.00x |" in table and "a dry run, not a measurement" in table
    assert gpu_bench(["--dry-run", "--methods", "clapp,nope", "--out", str(tmp_path / "bad")]) == 2
    assert "--methods clapp,nope: nope; choose among clapp" in capsys.readouterr().err


def test_the_kernel_profile_counts_each_convolution_of_a_step(tmp_path):
    from launch.bench.kernels import convolution_flops, main
    forward = convolution_flops("aten::mkldnn_convolution", [[64, 32, 16, 16], [128, 32, 3, 3], [128]], True)
    assert forward == 2 * 64 * 128 * 16 * 16 * 32 * 9
    shapes = [[64, 128, 16, 16], [64, 32, 16, 16], [128, 32, 3, 3]]  # gradient, input, weight
    assert convolution_flops("aten::convolution_backward", shapes, True) == 2 * forward  # weight's and input's
    assert convolution_flops("aten::convolution_backward", shapes, False) == forward  # local: the input is detached
    image = convolution_flops("aten::convolution_backward", [[64, 32, 32, 32], [64, 3, 32, 32], [32, 3, 3, 3]], True)
    small = convolution_flops("aten::convolution_backward", [[64, 128, 4, 4], [64, 64, 4, 4], [128, 64, 3, 3]], True)
    assert image == 2 * 64 * 32 * 32 * 32 * 3 * 9  # the image takes no gradient
    assert small == 2 * 64 * 128 * 4 * 4 * 64 * 9  # the weight's: a patch product (an mm the profiler counts)
    assert main(["--width", "0.0625", "--steps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels.json").read_text())
    names = {k["name"] for k in result["kernels"]}
    assert {"aten::mkldnn_convolution", "aten::convolution_backward"} <= names
    convolutions = [k for k in result["kernels"] if k["name"] == "aten::mkldnn_convolution"]
    assert len(convolutions) == 6 and all(k["gflop"] > 0 for k in convolutions)  # one per block, by its shapes
    assert "| aten::" in (tmp_path / "kernels.md").read_text()
    assert len(result["gemm"]) == 6 and all(g["forward"]["onednn"] > 0 and g["forward"]["gemm"] > 0
                                            for g in result["gemm"])  # each shape, both ways


def test_the_allocator_benchmark_sets_the_three_policies_side_by_side(tmp_path, monkeypatch):
    from launch.bench import allocator
    monkeypatch.setitem(allocator.PROCESSES, 32, {"clapp_pp": ("clapp_pp", "0,1,2,3,4,5")})
    assert allocator.main(["--width", "0.0625", "--steps", "1", "--sizes", "32", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "allocator.json").read_text())["runs"]["32 px clapp_pp"]
    assert set(runs) == {"true", "auto", "false"} and all(r["peak_bytes"] > 0 for r in runs.values())
    assert runs["true"]["kept"] and runs["false"]["kept"] is None  # glibc: mmap and trimming as set
    assert "| 32 px | clapp_pp |" in (tmp_path / "allocator.md").read_text()


def test_a_measured_placement_balances_measured_block_times(monkeypatch):
    from launch.bench import predictions
    from sim.cost.model import BlockTimes
    config = load_config(TINY_CONFIG, [])
    groups = predictions.measured_placement(config, 2, repeats=1)  # measured here, on the tiny run
    assert len(groups) == 2 and sum(groups, []) == list(range(6))
    heavy_top = BlockTimes([1, 1, 1, 1, 1, 10], [0] * 6, [0] * 6, 0.0, [0] * 6, 0, [0] * 6)
    monkeypatch.setattr(predictions, "plan_block_times", lambda *args: heavy_top)
    monkeypatch.setattr(predictions, "plan_data_seconds", lambda plan: 0.0)
    assert predictions.measured_placement(config, 2) == [[0, 1, 2, 3, 4], [5]]
    views_heavy = BlockTimes([1] * 6, [0] * 6, [0] * 6, 2.0, [0] * 6, 0, [0] * 6)  # the views count on rank 0
    monkeypatch.setattr(predictions, "plan_block_times", lambda *args: views_heavy)
    assert predictions.measured_placement(config, 2) == [[0, 1], [2, 3, 4, 5]]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_block_times_are_measured_with_freed_memory_kept_as_the_run_keeps_it(monkeypatch):
    from launch.bench import predictions
    from sim.run.freed_memory import kept_setting
    from sim.run.plan import make_plan
    during = []
    monkeypatch.setattr(predictions.measure, "measure_block_times",
                        lambda *args, **kwargs: during.append(kept_setting()))
    before = kept_setting()
    for keep in ("auto", "false"):  # the tiny run's activity is a few MiB: "auto" keeps it, as its run does
        plan = make_plan(load_config(TINY_CONFIG, [f"train.keep_freed_memory={keep}"]), 1)
        predictions.plan_block_times(plan, 1, 0.0, repeats=1)
    assert during[0] is not None and during[1] is None
    assert kept_setting() == before  # the benchmark's own process is left as it was
