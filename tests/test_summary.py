"""summary.json: one format, written by either engine, read back as written, old files included."""
import dataclasses
import json

from sim.record.summary import RankResult, RunSummary


def two_ranks() -> list[RankResult]:
    return [RankResult(rank=r, blocks=[3 * r, 3 * r + 1, 3 * r + 2], steps=40, seconds=10.0 + r, busy_seconds=8.0 + r,
                       wait_seconds=2.0, bytes_sent=1000, peak_memory_bytes=2**20, loss_per_block={3 * r: 1.5},
                       feedback_delays={3 * r + i: 1 - r for i in range(3)}, window_seconds=[5.0, 2.0, 4.0])
            for r in range(2)]


def test_summary_from_results_round_trips(tmp_path):
    summary = RunSummary.from_results(
        two_ranks(), 32, method="clapp_pp_dfb", dataset="synthetic", engine="local", steps=40, probe=None,
        placement=[[0, 1, 2], [3, 4, 5]], schedule="pipelined", feedback="delayed", device="cpu", threads=1,
        torch="2.14", config={})
    assert summary.train_seconds == 11.0 and summary.images_per_s == 40 * 32 / 11.0
    assert summary.images_per_s_steady == 20 / 4.0 * 32  # the last rank's median window, the first left out
    assert summary.loss_per_block == [1.5, None, None, 1.5, None, None]
    assert summary.feedback_delay_steps == [1, 1, 1, 0, 0, 0]
    assert summary.pipeline_efficiency() == 9.0 / 11.0
    summary.write(tmp_path)
    assert RunSummary.read(tmp_path) == summary


def test_summaries_of_earlier_versions_still_read(tmp_path):
    common = {"method": "bp_infonce", "dataset": "synthetic", "world_size": 1, "steps": 3, "images_per_s": 9.0,
              "peak_memory_bytes": [1], "placement": [[0, 1, 2, 3, 4, 5]], "train_seconds": 1.0, "device": "cpu",
              "threads": 1, "torch": "2.14", "config": {}}
    old_pipeline = {**common, "schedule": "1f1b", "microbatches": 4, "loss": 3.2, "step_end_seconds": [0.3, 0.6, 1.0],
                    "ranks": [{"rank": 0, "blocks": [0, 1, 2, 3, 4, 5], "seconds": 1.0, "busy_seconds": 0.9,
                               "wait_seconds": 0.1, "bytes_sent": 0}]}
    (tmp_path / "summary.json").write_text(json.dumps(old_pipeline))
    summary = RunSummary.read(tmp_path)
    assert summary.engine == "bp_pipeline" and summary.loss_per_block == [None] * 5 + [3.2]
    old_local = {**common, "method": "clapp_pp", "schedule": "pipelined", "feedback": None,
                 "images_per_s_steady": None, "loss_per_block": [2.0] * 6, "probe": None,
                 "feedback_delay_steps": [0] * 6,
                 "ranks": [{"rank": 0, "blocks": [0, 1, 2, 3, 4, 5], "seconds": 1.0, "wait_seconds": 0.25,
                            "bytes_sent": 0}]}
    (tmp_path / "summary.json").write_text(json.dumps(old_local))
    summary = RunSummary.read(tmp_path)
    assert summary.engine == "local" and summary.ranks[0]["busy_seconds"] == 0.75
    assert set(dataclasses.asdict(summary)) == {f.name for f in dataclasses.fields(RunSummary)}
    for probe, scored_on in (({"test_acc": 61.5, "per_block_test_acc": [50.0] * 6, "test_images": 100}, "test"),
                             ({"test_acc": 70.0, "per_block_test_acc": [60.0] * 6, "test_images": 100,
                               "scored_on": "validation"}, "validation")):
        (tmp_path / "summary.json").write_text(json.dumps({**old_local, "probe": probe}))
        read = RunSummary.read(tmp_path).probe  # the probe's old names, in today's
        assert read == {"probe_accuracy": probe["test_acc"], "per_block_probe_accuracy": probe["per_block_test_acc"],
                        "scored_images": 100, "scored_on": scored_on}
        assert f"linear probe {scored_on} accuracy: {probe['test_acc']:.2f}%" in RunSummary.read(tmp_path).text()
