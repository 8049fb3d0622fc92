"""analysis/: stores written here with zarr by the log format (the spec), read back and analysed.

`write_fake_store` writes RUN_DIR/log.zarr the way the real runs do, through the names, dtypes and
dimensions of sim/record/log_format.py: rank 0 creates the root, its attributes and the held-out arrays,
then each "rank" (a thread) creates and appends to the groups of its own blocks, concurrently, one
logged step at a time.
"""
import json
import math
import subprocess
import sys
import threading
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zarr
from matplotlib.image import imread

from analysis.__main__ import main
from analysis.cka import blocks_cka, linear_cka, runs_cka
from analysis.logged_probe import probe_logged_run, stratified_split
from analysis.probe_curves import probe_curve
from analysis.store import LogError, _common_rows, open_run
from sim.record.log_format import (
    ACTIVATIONS,
    ALIGN_ARRAYS,
    ALIGN_STEP,
    BLOCK_ARRAYS,
    BLOCK_ATTRS,
    BP_GRADIENT,
    GRADIENTS,
    HELDOUT_INDEX,
    HELDOUT_LABELS,
    LOCAL_GRADIENT,
    SCALARS,
    STEP,
    STORE_NAME,
    ArraySpec,
    align_group,
    block_group,
    root_attrs,
)
from sim.record.summary import RunSummary

ROOT = Path(__file__).resolve().parents[1]
CHANNELS, GRIDS = (2, 4, 4, 8, 8, 8), (2, 2, 2, 1, 1, 1)
DIMS = tuple(c * g * g for c, g in zip(CHANNELS, GRIDS))
Acts = Callable[[int, int, np.random.Generator], np.ndarray]  # (block, row, rng) -> (image, feature)


def random_acts(labels: np.ndarray) -> Acts:
    return lambda b, row, rng: rng.normal(size=(len(labels), DIMS[b]))


def separable_acts(labels: np.ndarray) -> Acts:
    """Each class at its own point (a random mean per class and block) plus small noise."""
    def make(b: int, row: int, rng: np.random.Generator) -> np.ndarray:
        means = np.random.default_rng(100 + b).normal(size=(labels.max() + 1, DIMS[b])) * 2
        return means[labels] + 0.3 * rng.normal(size=(len(labels), DIMS[b]))
    return make


def fake_series(rng: np.random.Generator, rows: int, log_every: int) -> dict[str, np.ndarray]:
    """One block's per-step series, each in the format's dtype."""
    data = {STEP.name: np.arange(rows) * log_every, "bytes_sent": rng.integers(0, 5000, rows)}  # drawn first
    data |= {spec.name: rng.normal(size=rows) for spec in SCALARS if spec.name not in data}
    for name in ("loss", "update_norm", "step_seconds"):  # positive, like the real ones
        data[name] = np.abs(data[name])
    data["feedback_norm"][:] = np.nan  # clapp_pp: no block receives top-down feedback
    return {spec.name: data[spec.name].astype(spec.dtype) for spec in (STEP, *SCALARS)}


def create(group: zarr.Group, spec: ArraySpec, values: np.ndarray, whole: bool, chunk: int | None = None) -> zarr.Array:
    """`spec`'s array in `group`, holding `values` if `whole`, else empty (to be appended to)."""
    array = group.create_array(spec.name, shape=(len(values) if whole else 0, *values.shape[1:]), dtype=spec.dtype,
                               chunks="auto" if chunk is None else (chunk, *values.shape[1:]),
                               dimension_names=spec.dims, fill_value=spec.fill_value)
    if whole:
        array[:] = values
    return array


def write_fake_store(run_dir: Path, rows: int = 5, log_every: int = 10, align_every: int = 20, images: int = 40,
                     num_classes: int = 4, placement=((0, 1, 2), (3, 4, 5)), acts: Callable[..., Acts] = random_acts,
                     index_offset: int = 0, seed: int = 0, row_by_row: bool = False) -> dict:
    """Write a log.zarr by the format from two concurrent "ranks"; returns everything written, as numpy.

    With `row_by_row` each rank appends one logged step at a time, as training does (slower: each append
    rewrites the arrays' metadata); otherwise each array is written whole.
    """
    rng = np.random.default_rng(seed)
    labels = (np.arange(images) % num_classes).astype(HELDOUT_LABELS.dtype)
    index = (np.arange(images) * 3 + index_offset).astype(HELDOUT_INDEX.dtype)
    config = {"method": "clapp_pp", "train": {"steps": rows * log_every, "batch_size": 8}}
    attrs = root_attrs(config=config, code_version="unknown",
                       world_size=len(placement), placement=[list(g) for g in placement], dataset="synthetic",
                       method="clapp_pp", num_blocks=6, log_every=log_every, align_every=align_every,
                       heldout_split="test", num_classes=num_classes)
    root = zarr.open_group(run_dir / STORE_NAME, mode="w", attributes=attrs)
    for spec, values in ((HELDOUT_LABELS, labels), (HELDOUT_INDEX, index)):
        create(root, spec, values, whole=True)
    make_acts = acts(labels)
    written: dict = {"attrs": attrs, "labels": labels, "index": index, "blocks": {}}
    for b in range(6):  # the data first (one generator, so the content does not depend on thread timing)
        weight = [CHANNELS[b], CHANNELS[b - 1] if b else 1, 3, 3]
        data = fake_series(rng, rows, log_every)
        data[ACTIVATIONS.name] = np.array([make_acts(b, r, rng) for r in range(rows)], ACTIVATIONS.dtype).reshape(
            rows, images, DIMS[b])
        steps = data[STEP.name]
        align_steps = steps[steps % align_every == 0] if align_every else steps[:0]
        params = math.prod(weight)
        local = rng.normal(size=(len(align_steps), params)).astype(LOCAL_GRADIENT.dtype)
        bp = (local + rng.normal(size=local.shape)).astype(BP_GRADIENT.dtype)
        align = {ALIGN_STEP.name: align_steps, LOCAL_GRADIENT.name: local, BP_GRADIENT.name: bp}
        written["blocks"][b] = {"attrs": {"block": b, "rank": next(r for r, g in enumerate(placement) if b in g),
                                          "feature_dim": DIMS[b], "grid": GRIDS[b], "channels": CHANNELS[b],
                                          "has_loss": True, "weight_shape": weight},
                                "series": data, "align": align if align_every else None}
        assert tuple(written["blocks"][b]["attrs"]) == BLOCK_ATTRS  # exactly the format's names

    def rank(blocks: tuple[int, ...]) -> None:
        store = zarr.open_group(run_dir / STORE_NAME, mode="r+")
        arrays: dict[tuple, zarr.Array] = {}
        for b in blocks:  # created in the writer's order: step last
            w = written["blocks"][b]
            group = store.create_group(block_group(b), attributes=w["attrs"])
            for spec in BLOCK_ARRAYS:
                arrays[b, spec.name] = create(group, spec, w["series"][spec.name], not row_by_row, chunk=2)
            if w["align"] is not None:
                align = store.create_group(align_group(b))
                for spec in ALIGN_ARRAYS:
                    chunk = 1 if spec in GRADIENTS else 2  # as sim/record/logbook.py: one gradient pair per chunk
                    arrays[b, "align", spec.name] = create(align, spec, w["align"][spec.name], not row_by_row, chunk)
        for r in range(rows if row_by_row else 0):  # append one logged step at a time, as training does
            for b in blocks:
                w = written["blocks"][b]
                for spec in BLOCK_ARRAYS:
                    arrays[b, spec.name].append(w["series"][spec.name][r:r + 1])
                step = w["series"][STEP.name][r]
                if w["align"] is not None and step % align_every == 0:
                    i = int(np.searchsorted(w["align"][ALIGN_STEP.name], step))
                    for spec in ALIGN_ARRAYS:
                        arrays[b, "align", spec.name].append(w["align"][spec.name][i:i + 1])

    threads = [threading.Thread(target=rank, args=(tuple(g),)) for g in placement]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return written


def open_block(run_dir: Path, block: int) -> zarr.Group:
    """A block's group, to change by hand."""
    return zarr.open_group(run_dir / STORE_NAME / block_group(block), mode="r+")


class TagChecker(HTMLParser):
    """Checks that the report's tags nest and close (void tags such as <img> and <meta> need no end tag)."""
    VOID = frozenset({"img", "meta", "br"})

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.seen: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.seen.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack.pop() == tag, f"</{tag}> closes another tag"


def test_round_trip_of_every_field_from_two_concurrent_ranks(tmp_path):
    w = write_fake_store(tmp_path, row_by_row=True)
    run = open_run(tmp_path)
    assert run.attrs == w["attrs"] and run.summary is None
    np.testing.assert_array_equal(run.heldout_labels, w["labels"])
    np.testing.assert_array_equal(run.heldout_index, w["index"])
    assert sorted(run.blocks) == list(range(6))
    for b, blk in run.blocks.items():
        assert blk.attrs == w["blocks"][b]["attrs"]
        for name, v in w["blocks"][b]["series"].items():
            if name != "activations":
                np.testing.assert_array_equal(blk.series[name], v)
        for r in range(len(blk.steps)):
            np.testing.assert_array_equal(blk.activations(r), w["blocks"][b]["series"]["activations"][r])
        np.testing.assert_array_equal(blk.align.step, w["blocks"][b]["align"]["step"])
        steps, local, bp = blk.align.pairs(0, len(blk.align))
        np.testing.assert_array_equal(steps, blk.align.step)
        np.testing.assert_array_equal(local, w["blocks"][b]["align"]["local_gradient"])
        np.testing.assert_array_equal(bp, w["blocks"][b]["align"]["bp_gradient"])
    assert {r: blk.index for r, blk in run.rank_blocks().items()} == {0: 0, 1: 3}


def test_reader_tolerates_a_store_being_written(tmp_path, capsys):
    write_fake_store(tmp_path, rows=4, align_every=0)
    g = open_block(tmp_path, 1)
    g["loss"].append(np.full(1, np.nan, np.float32))  # one array a row ahead of the others
    g[STEP.name].append(np.array([40]))
    g[ACTIVATIONS.name].append(np.zeros((1, 40, DIMS[1]), np.float16))
    h = open_block(tmp_path, 2)
    for name in h.array_keys():  # grown but not filled yet: the step row reads as the fill value, -1
        h[name].resize((5, *h[name].shape[1:]))
    del open_block(tmp_path, 5)[STEP.name]  # its rank is still creating arrays
    run = open_run(tmp_path)
    assert [len(run.blocks[b].steps) for b in range(5)] == [4] * 5 and 5 not in run.blocks
    assert all(blk.align is None for blk in run.blocks.values())
    assert [_common_rows(np.array(s), [9]) for s in ([0, 10, -1], [-1], [0, 10, 0, 0], [0, 10])] == [2, 0, 2, 2]
    assert main(["alignment", str(tmp_path)]) == 2
    assert "no gradient pairs (align_every = 0)" in capsys.readouterr().err


def test_analysis_imports_no_torch():
    """Reading a log must not need torch: of sim, analysis imports only the format (standard library)."""
    code = "import analysis.__main__, analysis.store, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", "importing analysis imported torch"


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "runs" / "logged" / STORE_NAME).mkdir(parents=True)
    assert main(["report", str(tmp_path / "runs")]) == 2  # the folder above a run is not one
    error = capsys.readouterr().err
    assert f"{tmp_path / 'runs'} is not a run folder" in error and "without logging" not in error
    assert f"the runs in it: {tmp_path / 'runs' / 'logged'}" in error
    with pytest.raises(LogError, match="not a run folder.*the --out folder of launch.train"):
        open_run(tmp_path / "runs" / "logged" / STORE_NAME)
    (tmp_path / "config.toml").write_text("")  # a run, but one made without a log
    with pytest.raises(LogError, match=r"without logging.*--set log.every=N"):
        open_run(tmp_path)
    write_fake_store(tmp_path, rows=0)
    assert main(["probe", str(tmp_path)]) == 2
    assert "no logged steps yet" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    write_fake_store(other, index_offset=1)
    (tmp_path / "b").mkdir()
    write_fake_store(tmp_path / "b")
    with pytest.raises(LogError, match="different held-out images"):
        runs_cka(open_run(other), open_run(tmp_path / "b"))
    del open_block(other, 3)["score_neg"]
    with pytest.raises(LogError, match="block3: array 'score_neg' is missing"):
        open_run(other)


def test_alignment_command_cosine_equals_direct_computation(tmp_path):
    w = write_fake_store(tmp_path, rows=9, log_every=5, align_every=10)
    assert main(["alignment", str(tmp_path)]) == 0
    out = tmp_path / "analysis"
    lines = (out / "alignment.csv").read_text().splitlines()[1:]
    got = {(int(b), int(s)): float(c) for b, s, c in (line.split(",") for line in lines)}
    summary = {d["block"]: d for d in json.loads((out / "alignment.json").read_text())}
    for b in range(6):
        a = w["blocks"][b]["align"]
        x, y = a["local_gradient"].astype(np.float64), a["bp_gradient"].astype(np.float64)
        direct = (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))
        assert len(direct) == 5  # steps 0, 10, ..., 40
        np.testing.assert_allclose([got[b, s] for s in a["step"].tolist()], direct, rtol=1e-6)
        half = 1.96 * direct.std(ddof=1) / np.sqrt(len(direct))
        assert summary[b]["mean"] == pytest.approx(direct.mean())
        assert summary[b]["ci95_high"] - summary[b]["mean"] == pytest.approx(half)
    assert imread(out / "alignment.png").shape[1] > 500


def test_stratified_split_is_fixed_and_disjoint():
    labels = np.arange(100) % 4
    fit, score = stratified_split(labels)
    assert len(np.intersect1d(fit, score)) == 0 and len(fit) + len(score) == 100
    assert np.bincount(labels[fit]).tolist() == [18] * 4  # round(0.7 * 25)
    np.testing.assert_array_equal(fit, stratified_split(labels)[0])


def test_probe_separable_high_random_near_chance(tmp_path):
    (tmp_path / "sep").mkdir()
    (tmp_path / "rnd").mkdir()
    write_fake_store(tmp_path / "sep", rows=3, images=120, acts=separable_acts)
    write_fake_store(tmp_path / "rnd", rows=3, images=120, acts=random_acts)
    sep, rnd = probe_logged_run(open_run(tmp_path / "sep")), probe_logged_run(open_run(tmp_path / "rnd"))
    assert all(len(sep.accuracy[b]) == 3 for b in range(6))
    assert min(a.min() for a in sep.accuracy.values()) > 0.95
    assert abs(np.mean([a.mean() for a in rnd.accuracy.values()]) - rnd.chance) < 0.12
    assert main(["probe", str(tmp_path / "sep"), "--points", "2"]) == 0
    assert "block,step,accuracy" in (tmp_path / "sep/analysis/probe.csv").read_text()


def test_curves_of_two_runs_against_images_and_seconds(tmp_path, capsys):
    for name, acts in (("sep", separable_acts), ("rnd", random_acts)):
        (tmp_path / name).mkdir()
        write_fake_store(tmp_path / name, rows=3, images=120, acts=acts)
    RunSummary(  # only "sep" has finished: its seconds per step are 6 / 30
        method="clapp_pp", dataset="synthetic", engine="local", world_size=2, steps=30, images_per_s=40.0,
        images_per_s_steady=None, loss_per_block=[1.0] * 6, probe=None, peak_memory_bytes=[1, 1],
        placement=[[0, 1, 2], [3, 4, 5]], schedule="pipelined", feedback=None, feedback_delay_steps=[0] * 6,
        ranks=[], train_seconds=6.0, device="cpu", threads=1, torch="2", config={}).write(tmp_path / "sep")
    out = tmp_path / "curves"
    assert main(["curves", str(tmp_path / "sep"), str(tmp_path / "rnd"), "--out", str(out)]) == 0
    sep, rnd = json.loads((out / "curves.json").read_text())
    assert sep["steps"] == rnd["steps"] == [0, 10, 20]
    assert sep["images"] == [0, 80, 160]  # step x batch size 8
    assert sep["seconds"] == [0.0, 2.0, 4.0] and rnd["seconds"] is None
    assert min(sep["all_blocks"] + sep["last_block"]) > 0.95
    assert abs(np.mean(rnd["all_blocks"] + rnd["last_block"]) - 0.25) < 0.15  # 4 classes: chance 0.25
    assert sep["label"] == "clapp_pp, 2 processes (sep)"
    assert imread(out / "curves.png").shape[1] > 1000
    assert "(no summary.json yet: drawn against images seen only)" in capsys.readouterr().out  # rnd's note
    (tmp_path / "other").mkdir()  # other held-out images: a warning, and no common untrained line
    write_fake_store(tmp_path / "other", rows=3, images=120, index_offset=1)
    assert main(["curves", str(tmp_path / "sep"), str(tmp_path / "other"), "--out", str(out)]) == 0
    assert "logged different held-out images" in capsys.readouterr().err
    (tmp_path / "nolog").mkdir()
    (tmp_path / "nolog" / "config.toml").write_text("")
    assert main(["curves", str(tmp_path / "sep"), str(tmp_path / "nolog")]) == 2
    assert "was made without logging" in capsys.readouterr().err


def test_curves_count_every_replica_s_images_and_the_resumed_loop_s_rate(tmp_path):
    write_fake_store(tmp_path, rows=3)
    store = zarr.open_group(tmp_path / STORE_NAME, mode="r+")
    config = store.attrs["config"]
    store.attrs["config"] = {**config, "sim": {"replicas": 2}}
    store.attrs["world_size"] = 4
    # Resumed at step 15: the last call trained 15 steps of 2 x 8 images in 12 s, so images/s = 20
    # (train_seconds / steps would give 12 / 30 = 0.4 s a step instead of 0.8).
    RunSummary(
        method="clapp_pp", dataset="synthetic", engine="local", world_size=4, steps=30, images_per_s=20.0,
        images_per_s_steady=None, loss_per_block=[1.0] * 6, probe=None, peak_memory_bytes=[1] * 4,
        placement=[[0, 1, 2], [3, 4, 5]], schedule="pipelined", feedback="delayed", feedback_delay_steps=[0] * 6,
        ranks=[], train_seconds=12.0, device="cpu", threads=1, torch="2", config={}, replicas=2).write(tmp_path)
    curve = probe_curve(open_run(tmp_path))
    assert curve.images.tolist() == [0, 160, 320]  # step x 8 x 2 replicas
    assert curve.seconds.tolist() == [0.0, 8.0, 16.0]
    assert curve.label == f"clapp_pp, 2 replicas x 2 stages, delayed feedback ({tmp_path.name})"


def test_cka_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.5 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, rng.normal(size=(300, 12))) < 0.1
    small, wide = rng.normal(size=(20, 50)), rng.normal(size=(20, 40))  # the Gram form is used here
    xc, yc = small - small.mean(0), wide - wide.mean(0)
    direct = np.square(yc.T @ xc).sum() / np.sqrt(np.square(xc.T @ xc).sum() * np.square(yc.T @ yc).sum())
    assert linear_cka(small, wide) == pytest.approx(direct)


def test_cka_commands(tmp_path):
    (tmp_path / "a").mkdir()
    write_fake_store(tmp_path / "a", rows=3)
    run = open_run(tmp_path / "a")
    result = blocks_cka(run)
    assert result.step == 20
    np.testing.assert_allclose(np.diag(result.matrix), 1.0)
    np.testing.assert_allclose(result.matrix, result.matrix.T)
    assert runs_cka(run, run).rows == [(b, 20, 20, pytest.approx(1.0)) for b in range(6)]
    (tmp_path / "b").mkdir()
    write_fake_store(tmp_path / "b", rows=3, seed=1)
    assert main(["cka", str(tmp_path / "a"), str(tmp_path / "b"), "--step", "10"]) == 0
    rows = json.loads((tmp_path / "a/analysis/cka_vs_b.json").read_text())["blocks"]
    assert all(r["step_a"] == r["step_b"] == 10 and r["cka"] < 0.6 for r in rows)
    assert main(["cka", str(tmp_path / "a"), "--step", "7"]) == 2


def test_report_builds_from_a_fake_two_rank_store(tmp_path):
    write_fake_store(tmp_path, rows=6, row_by_row=True)
    block0 = open_block(tmp_path, 0)  # as in BP-SSL: no loss of its own
    block0.attrs["has_loss"] = False
    block0["loss"][:] = np.nan
    (tmp_path / "config.toml").write_text('method = "clapp_pp"\n[train]\nsteps = 60\n')
    RunSummary(
        method="clapp_pp", dataset="synthetic", engine="local", world_size=2, steps=60, images_per_s=123.4,
        images_per_s_steady=None, loss_per_block=[1.0, 1.1, None, 1.2, 1.3, 1.4],
        probe={"test_acc": 50.0, "per_block_test_acc": [40] * 6}, peak_memory_bytes=[2**27, 2**27],
        placement=[[0, 1, 2], [3, 4, 5]], schedule="pipelined", feedback=None, feedback_delay_steps=[0] * 6,
        ranks=[{"rank": r, "blocks": [3 * r, 3 * r + 1, 3 * r + 2], "seconds": 5.0, "busy_seconds": 4.0,
                "wait_seconds": 1.0, "bytes_sent": 10**6} for r in range(2)],
        train_seconds=5.0, device="cpu", threads=1, torch="2", config={}).write(tmp_path)
    out = tmp_path / "page"
    assert main(["report", str(tmp_path), "--out", str(out), "--points", "3"]) == 0
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5
    assert "123.4" in page and "steps = 60" in page and "blocks [0] have no loss of their own" in page
    checker = TagChecker()
    checker.feed(page)
    assert checker.stack == [] and checker.seen >= {"table", "img", "pre", "h2"}
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["alignment.png", "cka_blocks.png", "probe.png", "throughput.png", "training.png"]
    for p in pngs:
        image = imread(p)
        assert image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0.01
