"""analysis/ on a damaged log.zarr: corrupted and truncated chunk files, lost or invalid zarr.json.

Each command runs as a user runs it (`python -m analysis`, in a subprocess), so a traceback would show
on its stderr. The store is the fake two-rank store of test_analysis.py: 6 logged steps per block
(0, 10, ..., 50) in chunks of 2 rows, gradient pairs at steps 0, 20 and 40, one pair per chunk.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis.damage import Unreadable
from analysis.store import open_run
from sim.record.log_format import STORE_NAME
from tests.test_analysis import write_fake_store

ROOT = Path(__file__).resolve().parents[1]
GARBAGE = b"not a zstd frame, just bytes"


def analyse(*argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m analysis ARGV`."""
    done = subprocess.run([sys.executable, "-m", "analysis", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    return done.returncode, done.stdout, done.stderr


def warnings_of(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def steps_in_csv(path: Path, block: int) -> list[int]:
    lines = path.read_text().splitlines()[1:]
    return [int(s) for b, s, _ in (line.split(",") for line in lines) if int(b) == block]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_fake_store(tmp_path, rows=6)
    return tmp_path


def chunk(run_dir: Path, array: str, key: str) -> Path:
    path = run_dir / STORE_NAME / array / key
    assert path.is_file(), path
    return path


def test_corrupted_activations_chunk(run_dir):
    chunk(run_dir, "block2/activations", "c/1/0/0").write_bytes(GARBAGE)  # rows 2..3: steps 20 and 30
    rc, out, err = analyse("probe", str(run_dir))
    assert rc == 0, err
    assert warnings_of(err) == ["warning: log.zarr/block2/activations: steps 20..30 unreadable (chunk c/1/0/0: Zstd "
                                "decompression error: invalid input data); analysed without them"]
    csv = run_dir / "analysis/probe.csv"
    assert steps_in_csv(csv, 2) == [0, 10, 40, 50] and steps_in_csv(csv, 1) == [0, 10, 20, 30, 40, 50]
    assert json.loads((run_dir / "analysis/probe.json").read_text())["blocks"]["2"]["steps"] == [0, 10, 40, 50]

    rc, out, err = analyse("cka", str(run_dir), "--step", "20")  # block 2 cannot be read at step 20
    assert rc == 0 and "block2/activations: steps 20..30" in warnings_of(err)[0]
    assert json.loads((run_dir / "analysis/cka_blocks.json").read_text())["blocks"] == [0, 1, 3, 4, 5]
    rc, out, err = analyse("cka", str(run_dir))  # the last step, 50, reads in every block: nothing to say
    assert rc == 0 and warnings_of(err) == []
    assert json.loads((run_dir / "analysis/cka_blocks.json").read_text())["blocks"] == list(range(6))
    rc, out, err = analyse("alignment", str(run_dir))  # reads no activations, so it has no warning
    assert rc == 0 and warnings_of(err) == []

    block = open_run(run_dir).blocks[2]
    with pytest.raises(Unreadable, match=r"block2/activations: step 30 cannot be read \(chunk c/1/0/0"):
        block.activations(3)


def test_corrupted_align_gradient(run_dir):
    chunk(run_dir, "block1/align/bp_gradient", "c/1/0").write_bytes(GARBAGE)  # the pair of step 20
    rc, out, err = analyse("alignment", str(run_dir))
    assert rc == 0, err
    assert warnings_of(err) == ["warning: log.zarr/block1/align/bp_gradient: step 20 unreadable (chunk c/1/0: Zstd "
                                "decompression error: invalid input data); analysed without them"]
    csv = run_dir / "analysis/alignment.csv"
    assert steps_in_csv(csv, 1) == [0, 40] and steps_in_csv(csv, 0) == [0, 20, 40]
    summary = {d["block"]: d for d in json.loads((run_dir / "analysis/alignment.json").read_text())}
    assert summary[1]["pairs"] == 2 and summary[1]["steps"] == [0, 40] and summary[2]["pairs"] == 3


def test_truncated_chunk_files(run_dir):
    path = chunk(run_dir, "block4/activations", "c/2/0/0")  # steps 40 and 50
    path.write_bytes(path.read_bytes()[:10])
    chunk(run_dir, "block0/activations", "c/0/0/0").write_bytes(b"")  # steps 0 and 10, cut to nothing
    rc, out, err = analyse("probe", str(run_dir), "--points", "0")
    assert rc == 0, err
    lines = warnings_of(err)
    assert len(lines) == 2
    assert "log.zarr/block0/activations: steps 0..10 unreadable (chunk c/0/0/0" in lines[0]
    assert "log.zarr/block4/activations: steps 40..50 unreadable (chunk c/2/0/0" in lines[1]
    csv = run_dir / "analysis/probe.csv"
    assert steps_in_csv(csv, 0) == [20, 30, 40, 50] and steps_in_csv(csv, 4) == [0, 10, 20, 30]


def test_damaged_step_array(run_dir):
    written = write_fake_store(run_dir / "copy", rows=6)  # the same content (same seed), to compare with
    chunk(run_dir, "block3/step", "c/2").write_bytes(GARBAGE)  # the steps of rows 4..5 are unknown
    # A step chunk gone reads as the fill value, -1: before later steps that is damage, not a row being written.
    chunk(run_dir, "block0/step", "c/1").unlink()
    rc, out, err = analyse("probe", str(run_dir))
    assert rc == 0, err
    lines = warnings_of(err)
    assert "log.zarr/block0/step: rows 2..3 unreadable (step chunk missing" in lines[0]
    assert lines[1].startswith("warning: log.zarr/block3/step: rows 4..5 unreadable (chunk c/2: Zstd")
    csv = run_dir / "analysis/probe.csv"
    assert steps_in_csv(csv, 3) == [0, 10, 20, 30] and steps_in_csv(csv, 0) == [0, 10, 40, 50]

    block = open_run(run_dir).blocks[0]  # rows dropped from every array of the block together
    assert block.steps.tolist() == [0, 10, 40, 50]
    series = written["blocks"][0]["series"]
    np.testing.assert_array_equal(block.series["loss"], series["loss"][[0, 1, 4, 5]])
    np.testing.assert_array_equal(block.activations(2), series["activations"][4])


def test_every_step_damaged_is_said_as_damage_not_as_a_run_yet_to_log(run_dir):
    for path in (run_dir / STORE_NAME).glob("block*/step/c/*"):
        path.write_bytes(GARBAGE)
    for command in ("probe", "report", "cka"):
        rc, out, err = analyse(command, str(run_dir))
        assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "holds no readable logged step: every one is in a damaged part of the store" in err, err
        assert "no logged steps yet" not in err and "wait until" not in err
        assert "--set log.every=N" in err and "[unreadable: block0/step: rows 0..1 (chunk c/0: Zstd" in err


def test_damaged_array_metadata(run_dir):
    (run_dir / STORE_NAME / "block3/loss/zarr.json").unlink()
    (run_dir / STORE_NAME / "block5/activations/zarr.json").write_text("{not json")
    rc, out, err = analyse("probe", str(run_dir))
    assert rc == 0, err
    assert warnings_of(err) == ["warning: log.zarr/block5/activations: every row unreadable (zarr.json: Expecting "
                                "property name enclosed in double quotes: line 1 column 2 (char 1)); analysed "
                                "without them"]
    assert json.loads((run_dir / "analysis/probe.json").read_text())["blocks"].keys() == {"0", "1", "2", "3", "4"}
    rc, out, err = analyse("report", str(run_dir), "--points", "2")
    assert rc == 0, err
    lines = warnings_of(err)
    assert "warning: log.zarr/block3/loss: every row unreadable (zarr.json missing); shown as NaN" in lines
    assert "Damaged log" in (run_dir / "analysis/report.html").read_text()
    assert np.isnan(open_run(run_dir).blocks[3].series["loss"]).all()


def test_damaged_root_metadata_and_nothing_left(run_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    write_fake_store(other, rows=6)
    for path in (other / STORE_NAME).glob("block*/activations/c/*/0/0"):
        path.write_bytes(GARBAGE)
    rc, out, err = analyse("probe", str(other))  # no activations left at all: nothing to fit
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "no block has readable activations" in err and "block0/activations: steps 0..10" in err
    (other / STORE_NAME / "heldout_labels/c/0").write_bytes(GARBAGE)
    rc, out, err = analyse("probe", str(other))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "log.zarr/heldout_labels cannot be read (chunk c/0: Zstd" in err
    assert analyse("alignment", str(other))[0] == 0  # it needs neither

    (run_dir / STORE_NAME / "zarr.json").write_text('{"zarr_format": 3, "node_type"')
    for command in ("alignment", "probe", "cka", "report"):
        rc, out, err = analyse(command, str(run_dir))
        assert rc == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1
        assert "log.zarr is unreadable: its root zarr.json is damaged" in err and "log.every > 0" in err
