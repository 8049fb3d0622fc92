"""Every bad input ends with exit code 2 and a line that names what was wrong, without a traceback;
faults of the disk and of checkpoints lose no data. One process, small fake files."""
from __future__ import annotations

import errno
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg

import sim.run.checkpoint
from launch.train import main
from sim.run.checkpoint import completed_steps, step_folder, unreadable_file
from sim.run.evaluation import probe_sets
from tests.helpers import ROOT, args, assert_same_weights, final_weights, run_config, single_process, summary


def fails_with(capsys, argv: list[str], code: int, *words: str) -> str:
    """Run launch.train in this process: its exit code is `code`, stderr names every word, no traceback."""
    assert main(argv + ["--no-progress"]) == code
    error = capsys.readouterr().err
    assert "Traceback" not in error
    for word in words:
        assert word in error, error
    return error


def fake_fashion_mnist(folder: Path, images: int = 64) -> None:
    """The four IDX .gz files of a tiny Fashion-MNIST, as the Debian package lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, shape in (("train-images-idx3-ubyte", (images, 28, 28)), ("train-labels-idx1-ubyte", (images,)),
                        ("t10k-images-idx3-ubyte", (images, 28, 28)), ("t10k-labels-idx1-ubyte", (images,))):
        header = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
        values = np.arange(int(np.prod(shape)), dtype=np.uint64) % (10 if len(shape) == 1 else 256)
        with gzip.open(folder / f"{stem}.gz", "wb") as file:
            file.write(header + values.astype(np.uint8).tobytes())


def fashion(folder: Path, *overrides: str) -> list[str]:
    return ["data.name=fashion_mnist", f"data.root={folder}", "train.batch_size=8", *overrides]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_dataset_file_is_named_with_how_to_get_it_again(tmp_path, capsys, damage):
    fake_fashion_mnist(tmp_path / "fm")
    victim = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2] if damage == "truncated" else b"not a gzip file at all" * 10)
    fails_with(capsys, args(*fashion(tmp_path / "fm"), out=tmp_path / "run"), 2, str(victim),
               "corrupt or truncated", "apt-get install --reinstall dataset-fashion-mnist")
    assert not (tmp_path / "run").exists()


def test_a_truncated_cifar_shard_is_named(tmp_path, capsys):
    shards = tmp_path / "cifar10"
    shards.mkdir()
    for part in ("train", "test"):
        np.save(shards / f"{part}_jpeg.npy", np.zeros(4000, np.uint8))
        np.save(shards / f"{part}_offsets.npy", np.arange(0, 4001, 100))
        np.save(shards / f"{part}_labels.npy", np.arange(40) % 10)
    shard = shards / "train_jpeg.npy"
    shard.write_bytes(shard.read_bytes()[:1000])
    fails_with(capsys, args("data.name=cifar10", f"data.root={shards}", out=tmp_path / "run"), 2, str(shard),
               "corrupt or truncated", "cifar-10-python.tar.gz")


def test_fashion_mnist_labels_past_the_classes_stop_the_run_before_training(tmp_path, capsys):
    fake_fashion_mnist(tmp_path / "fm")
    labels = tmp_path / "fm" / "train-labels-idx1-ubyte.gz"
    with gzip.open(labels, "wb") as file:  # a valid gzip whose labels 200 would break only the final probe
        values = bytes([200 if i % 7 == 3 else i % 10 for i in range(64)])
        file.write(bytes([0, 0, 8, 1]) + (64).to_bytes(4, "big") + values)
    fails_with(capsys, args(*fashion(tmp_path / "fm"), out=tmp_path / "run"), 2, str(labels), "label 200 at row 3",
               "outside 0..9", "apt-get install --reinstall dataset-fashion-mnist")
    assert not (tmp_path / "run").exists()


def test_cifar_offsets_out_of_order_name_the_offsets_file(tmp_path, capsys):
    shards = tmp_path / "cifar10"
    shards.mkdir()
    blob = encode_jpeg(torch.full((3, 32, 32), 90, dtype=torch.uint8)).numpy()
    for part in ("train", "test"):
        np.save(shards / f"{part}_jpeg.npy", np.tile(blob, 40))
        np.save(shards / f"{part}_offsets.npy", np.arange(41) * len(blob))
        np.save(shards / f"{part}_labels.npy", np.arange(40) % 10)
    offsets = np.load(shards / "train_offsets.npy")
    offsets[[5, 6]] = offsets[[6, 5]]  # the right length, out of order
    np.save(shards / "train_offsets.npy", offsets)
    error = fails_with(capsys, args("data.name=cifar10", f"data.root={shards}", out=tmp_path / "run"), 2,
                       str(shards / "train_offsets.npy"), "do not increase", "cifar-10-python.tar.gz")
    assert "train_jpeg.npy" not in error


@pytest.mark.parametrize("override, words", [
    ("optim.lr=nan", ["optim.lr = nan is not a finite number"]),
    ("model.width=nan", ["model.width = nan is not a finite number"]),
    ("sim.timeout_s=inf", ["sim.timeout_s = inf is not a finite number"]),
    ("model.width=0.001", ["model.width = 0.001 leaves block 0 with 0 channels", "model.width >= 0.03125"]),
    ("train.device=tpu", ["train.device = 'tpu' is not one of auto, cpu, cuda, cuda:N"]),
    ("train.batch_size=6000", ["train.batch_size = 6000 is larger than the 5000 training images"]),
    ("train.seed=99999999999999999999", ["train.seed = 99999999999999999999 is too large"]),
    ("probe.train_limit=1", ["probe.train_limit = 1: the probe needs at least 2 training images"]),
    ("model.width=1e3", ["model.width = 1000.0 needs about", "GiB for its weights", "use a smaller width"]),
    ("train.steps=0 train.epochs=1e30", ["train.epochs = 1e+30 ask for", "steps, more than any run can take"]),
])
def test_settings_that_cannot_run_name_the_key(tmp_path, capsys, override, words):
    fails_with(capsys, args(*override.split(), out=tmp_path / "run"), 2, *words)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is a valid device here")
def test_cuda_on_a_machine_without_one(tmp_path, capsys):
    fails_with(capsys, args("train.device=cuda", out=tmp_path / "run"), 2, "no CUDA device", "cpu")


def test_paths_that_cannot_be_used(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    fails_with(capsys, args(out=tmp_path / "a_file"), 2, "--out", "a_file", "is a file")
    fails_with(capsys, [str(ROOT / "launch/configs"), "--out", str(tmp_path / "run")], 2, "is a folder")
    fails_with(capsys, ["--resume", str(tmp_path / "nowhere")], 2, "nowhere", "no run there")
    (tmp_path / "read_only").mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere: there the folder below a file is the test
        fails_with(capsys, args(out=tmp_path / "read_only" / "run"), 2, "cannot be made")
    fails_with(capsys, args(out=tmp_path / "a_file" / "run"), 2, "cannot be made")
    assert not (tmp_path / "run").exists()


def test_a_failed_download_says_what_to_do(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(*_, **__) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)  # as on a machine without internet
    fails_with(capsys, args(*fashion(tmp_path / "empty", "data.download=true"), out=tmp_path / "run"), 2,
               f"downloading into {tmp_path / 'empty'} failed", "check the connection")


def test_the_command_line_shows_no_traceback_unless_debug(tmp_path):
    command = [sys.executable, "-m", "launch.train", *args("optim.lr=nan", out=tmp_path / "run"), "--no-progress"]
    quiet = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert len(quiet.stderr.strip().splitlines()) <= 2, quiet.stderr
    loud = subprocess.run(command + ["--debug"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr


def test_more_heldout_images_than_the_test_set_are_clamped_before_training(tmp_path, capsys):
    single_process(tmp_path / "run", "log.every=2", "log.heldout=1500", "log.align_every=0")  # synthetic: 1000
    assert "log.heldout = 1500 is more than the 1000 test images" in capsys.readouterr().out
    import zarr

    log = zarr.open_group(str(tmp_path / "run" / "log.zarr"), mode="r")
    assert log["heldout_labels"].shape == (1000,) and log["block0"]["activations"].shape[1] == 1000


def test_probe_limits_above_the_images_there_are_said_before_training(capsys):
    train, scored = probe_sets(run_config("probe.epochs=1", "probe.train_limit=6000", "probe.test_limit=100"))
    assert (len(train), len(scored)) == (5000, 100)  # synthetic: 5000 training images, 1000 test images
    out = capsys.readouterr().out
    assert out == "note: probe.train_limit = 6000 is more than the 5000 training images: the probe uses all 5000\n"
    probe_sets(run_config("probe.epochs=1", "probe.validation=1000", "probe.train_limit=4500", "probe.test_limit=2000"))
    out = capsys.readouterr().out.splitlines()
    assert out == ["note: probe.train_limit = 4500 is more than the 4000 training images left by probe.validation: "
                   "the probe uses all 4000",
                   "note: probe.test_limit = 2000 is more than the 1000 validation images: the probe uses all 1000"]


def test_resume_passes_over_a_truncated_newest_checkpoint(tmp_path, capsys):
    settings = ["train.checkpoint_every=2", "log.every=0"]
    uninterrupted = single_process(tmp_path / "whole", *settings)
    single_process(tmp_path / "broken", *settings)  # then: as if it stopped after writing step 6
    (tmp_path / "broken" / "summary.json").unlink()
    (tmp_path / "broken" / "final.pt").unlink()
    assert completed_steps(tmp_path / "broken") == [4, 6]
    victim = step_folder(tmp_path / "broken", 6) / "block3.pt"
    victim.write_bytes(victim.read_bytes()[:-200])
    assert unreadable_file(tmp_path / "broken", 6) is not None and unreadable_file(tmp_path / "broken", 4) is None
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "broken"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "the checkpoint of step 6 does not read (block3.pt" in out and "resuming" in out and "after step 4" in out
    assert (tmp_path / "broken" / "checkpoints" / "unreadable" / "step00000006" / "block3.pt").is_file()  # kept
    assert_same_weights(uninterrupted, final_weights(tmp_path / "broken"))
    assert summary(tmp_path / "broken")["steps"] == 6


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    save = torch.save

    def full_disk_at_step_4(state: dict, file) -> None:
        if state.get("step") == 4 and Path(file.name).name.startswith("block3"):
            file.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(state, file)

    monkeypatch.setattr(sim.run.checkpoint.torch, "save", full_disk_at_step_4)
    run = tmp_path / "run"
    error = fails_with(capsys, args("train.checkpoint_every=2", "log.every=0", out=run), 1,
                       str(step_folder(run, 4) / "block3.pt"), "No space left on device", "bytes",
                       "the checkpoint of step 2 is intact", f"--resume {run}")
    assert len(error.strip().splitlines()) == 1
    assert completed_steps(run) == [2] and unreadable_file(run, 2) is None
    assert not list(run.rglob("*.tmp")) and not list(step_folder(run, 4).glob("*.pt"))  # nothing partial left


def test_a_full_disk_at_the_first_checkpoint_advises_a_new_start_not_resume(tmp_path, capsys, monkeypatch):
    save = torch.save

    def full_disk_at_step_2(state: dict, file) -> None:
        if state.get("step") == 2 and Path(file.name).name.startswith("block3"):
            raise OSError(errno.ENOSPC, "No space left on device")
        save(state, file)

    monkeypatch.setattr(sim.run.checkpoint.torch, "save", full_disk_at_step_2)
    run = tmp_path / "run"
    command = args("train.checkpoint_every=2", "log.every=0", out=run)
    error = fails_with(capsys, command, 1, "No space left on device", "no earlier checkpoint exists",
                       f"start the run again: the same command after removing {run}, or with another --out")
    assert "--resume" not in error  # it would refuse: there is no complete checkpoint to resume from
    monkeypatch.setattr(sim.run.checkpoint.torch, "save", save)  # space freed
    step_folder(run, 2).mkdir(parents=True, exist_ok=True)
    (step_folder(run, 2) / "block0.pt").write_bytes(b"")  # as another rank that wrote its blocks leaves them
    fails_with(capsys, command, 2, f"{run} holds checkpoints of an unfinished run but none complete",
               f"remove {run}, or choose another --out")
    fails_with(capsys, ["--resume", str(run)], 2, f"{run} holds no complete checkpoint",
               f"start the run again from its config, e.g. python -m launch.train {run / 'config.toml'} --out")
    shutil.rmtree(run)
    assert main(command + ["--no-progress"]) == 0  # the advice works
