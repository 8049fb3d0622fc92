"""RUN_DIR/log.zarr: complete, identical whatever the number of processes, gapless after a crash
and resume, readable while written, and it never changes what is learned."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from sim.record.log_format import (
    ACTIVATIONS,
    ALIGN_ARRAYS,
    ALIGN_GROUP,
    FORMAT_VERSION,
    ROOT_ARRAYS,
    ROOT_FIELDS,
    SERIES,
    STORE_NAME,
    VERSION_ATTR,
    ArraySpec,
    block_group,
    root_attrs,
)
from tests.helpers import ROOT, TINY_CONFIG, args, assert_same_weights, single_process
from tests.ranks import run_ranks

LOG = ["log.every=2", "log.align_every=4", "log.heldout=24", "log.chunk=3", "train.steps=9"]
MEASURED = ("step_seconds", "bytes_sent")  # timings and traffic: they differ with the number of processes
LEARNED = [spec.name for spec in (*SERIES, ACTIVATIONS) if spec.name not in MEASURED]


def open_log(run: Path) -> zarr.Group:
    return zarr.open_group(str(run / STORE_NAME), mode="r")


def assert_follows_format(array: zarr.Array, spec: ArraySpec) -> None:
    """The writer stored `spec` with the format's dtype (the default one) and dimension names."""
    assert (array.dtype, array.metadata.dimension_names) == (np.dtype(spec.dtype), spec.dims), spec.name


def test_root_attrs_take_exactly_the_format_fields():
    fields = dict.fromkeys(ROOT_FIELDS, 0)
    assert root_attrs(**fields) == {VERSION_ATTR: FORMAT_VERSION, **fields}
    assert root_attrs(**root_attrs(**fields)) == root_attrs(**fields)  # the version may pass through
    with pytest.raises(ValueError, match=r"missing \['dataset'\], unknown \['datset'\]"):
        root_attrs(**{k: v for k, v in fields.items() if k != "dataset"}, datset="x")
    with pytest.raises(ValueError, match="log format version 1"):
        root_attrs(**fields, laminar_log=2)


def test_round_trip_of_a_small_store(tmp_path):
    single_process(tmp_path / "run", "method=clapp_pp_dfb", *LOG)
    log = open_log(tmp_path / "run")
    assert log.attrs[VERSION_ATTR] == FORMAT_VERSION
    assert log.attrs["world_size"] == 1 and log.attrs["method"] == "clapp_pp_dfb"
    assert log.attrs["config"]["log"]["every"] == 2 and log.attrs["placement"] == [[0, 1, 2, 3, 4, 5]]
    assert log.attrs["code_version"]
    assert log["heldout_labels"].shape == (24,) and log["heldout_index"].shape == (24,)
    for spec in ROOT_ARRAYS:
        assert_follows_format(log[spec.name], spec)
    for block in range(6):
        group = log[block_group(block)]
        for spec in (*SERIES, ACTIVATIONS):
            assert_follows_format(group[spec.name], spec)
        for spec in ALIGN_ARRAYS:
            assert_follows_format(group[ALIGN_GROUP][spec.name], spec)
        assert group["step"][:].tolist() == [0, 2, 4, 6, 8]
        assert group["activations"].shape == (5, 24, group.attrs["feature_dim"])
        assert np.isfinite(group["loss"][:]).all() and (group["update_norm"][:] > 0).all()
        assert np.isnan(group["feedback_norm"][:]).all() == (block == 5)  # the top block needs no feedback
        assert group["align"]["step"][:].tolist() == [0, 4, 8]
        params = int(np.prod(group.attrs["weight_shape"]))
        assert group["align"]["local_gradient"].shape == group["align"]["bp_gradient"].shape == (3, params)
    top = log["block5"]["align"]
    assert np.array_equal(top["local_gradient"][:], top["bp_gradient"][:])  # the top's own loss is the top loss


def test_logging_does_not_change_what_is_learned(tmp_path):
    silent = single_process(tmp_path / "silent", "method=clapp_pp_dfb", "log.every=0", "train.steps=9")
    logged = single_process(tmp_path / "logged", "method=clapp_pp_dfb", *LOG)
    assert_same_weights(silent, logged)
    assert not (tmp_path / "silent" / STORE_NAME).exists()


def test_ranks_writing_at_once_give_the_single_process_log(tmp_path):
    single_process(tmp_path / "k1", "method=clapp_pp_dfb", *LOG)
    outcomes = run_ranks(3, args("method=clapp_pp_dfb", *LOG, out=tmp_path / "k3"), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0, 0], outcomes[0].log
    one, three = open_log(tmp_path / "k1"), open_log(tmp_path / "k3")
    assert three.attrs["world_size"] == 3
    for block in range(6):
        for name in LEARNED:  # timings and traffic differ, the science must not
            assert np.array_equal(one[f"block{block}/{name}"][:], three[f"block{block}/{name}"][:], equal_nan=True), \
                (block, name)
        for name in ("step", "local_gradient", "bp_gradient"):  # back-propagated across ranks, bit for bit
            assert np.array_equal(one[f"block{block}/align/{name}"][:], three[f"block{block}/align/{name}"][:])
        assert (three[f"block{block}/bytes_sent"][:] > 0).all()  # activations up, feedback down
        assert (one[f"block{block}/bytes_sent"][:] == 0).all()


def test_crash_and_resume_leave_a_complete_gapless_store(tmp_path):
    overrides = ["method=clapp_pp_dfb", *LOG, "train.checkpoint_every=4"]
    single_process(tmp_path / "whole", *overrides)
    out = tmp_path / "stopped"
    crashed = run_ranks(2, args(*overrides, out=out), tmp_path / "logs1", fault=(1, 7))  # after the step-4 checkpoint
    assert all(o.exitcode not in (0, None) for o in crashed)
    partial = open_log(out)
    assert partial["block0/step"][:].tolist()[:2] == [0, 2]  # readable up to what was flushed
    resumed = run_ranks(2, ["--resume", str(out)], tmp_path / "logs2")
    assert [o.exitcode for o in resumed] == [0, 0], resumed[0].log
    whole, after = open_log(tmp_path / "whole"), open_log(out)
    for block in range(6):
        assert after[f"block{block}/step"][:].tolist() == [0, 2, 4, 6, 8]
        assert after[f"block{block}/align/step"][:].tolist() == [0, 4, 8]
        for name in ("loss", "update_norm", "activations"):
            assert np.array_equal(whole[f"block{block}/{name}"][:], after[f"block{block}/{name}"][:], equal_nan=True)


def test_a_store_can_be_read_while_it_is_written(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "launch.train", str(TINY_CONFIG), "--out", str(out),
               "--no-progress", "--set", "train.steps=400", "--set", "log.every=1", "--set", "log.chunk=2",
               "--set", "log.heldout=16", "--set", "log.align_every=0", "--set", "probe.epochs=0",
               "--set", "train.threads=1"]
    writer = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lengths = []
        deadline = time.monotonic() + 120
        while writer.poll() is None and time.monotonic() < deadline:
            if (out / STORE_NAME / "block0" / "step" / "zarr.json").exists():  # created after the others
                group = open_log(out)["block0"]
                steps = group["step"][:]
                steps = steps[steps >= 0]  # -1: a row still being written
                lengths.append(len(steps))
                assert steps.tolist() == list(range(len(steps)))  # a prefix, never a hole
                assert group["activations"].shape[0] >= len(steps)  # written before its step
                assert group["loss"][: len(steps)].shape == (len(steps),)
            time.sleep(0.2)
        assert writer.wait(timeout=120) == 0, writer.stderr.read().decode()[-2000:]
    finally:
        writer.kill()
    assert any(0 < n < 400 for n in lengths), lengths  # seen part-way
    assert len(open_log(out)["block0/step"][:]) == 400


def test_analysis_of_a_real_two_rank_run(tmp_path):
    """The alignment command's cosines equal a direct computation on the stored tensors, and the
    report builds from a tiny two-rank run."""
    import json

    from analysis.__main__ import main as analyse

    run = tmp_path / "run"
    outcomes = run_ranks(2, args("method=clapp_pp_dfb", *LOG, "probe.epochs=1", "probe.train_limit=200",
                                 "probe.test_limit=100", out=run), tmp_path / "logs")
    assert [o.exitcode for o in outcomes] == [0, 0], outcomes[0].log
    assert analyse(["alignment", str(run)]) == 0
    reported = json.loads((run / "analysis" / "alignment.json").read_text())
    log = open_log(run)
    for entry in reported:
        pairs = log[f"block{entry['block']}/align"]
        local, bp = pairs["local_gradient"][:].astype(np.float64), pairs["bp_gradient"][:].astype(np.float64)
        direct = (local * bp).sum(1) / np.linalg.norm(local, axis=1) / np.linalg.norm(bp, axis=1)
        assert entry["steps"] == pairs["step"][:].tolist()
        assert entry["cosine"] == pytest.approx(direct.tolist(), abs=1e-6)
    assert reported[-1]["cosine"] == pytest.approx([1.0] * 3, abs=1e-6)  # the top block is its own BP
    assert analyse(["report", str(run)]) == 0
    html = (run / "analysis" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "clapp_pp_dfb" in html
    for png in (run / "analysis").glob("*.png"):
        assert png.stat().st_size > 10_000
