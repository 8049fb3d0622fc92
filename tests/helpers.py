"""What several test modules share: the tiny run they train, its command line, and how its results
are read and compared. Test modules import from here, never from one another."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from launch.train import main
from sim.config import Config, load_config

ROOT = Path(__file__).parent.parent
TINY_CONFIG = ROOT / "launch/configs/tiny.toml"
# Small enough for a few seconds per process on two shared cores; random negatives, so that the
# keyed negative generators are part of what must match across world sizes.
TINY = ["data.name=synthetic", "model.width=0.0625", "train.batch_size=4", "train.steps=6", "train.threads=1",
        "rule.negatives=random", "probe.epochs=0", "sim.timeout_s=30", "log.heldout=32"]

Weights = dict[int, dict[str, torch.Tensor]]  # block -> state dict, as in final.pt


def args(*overrides: str, out: Path) -> list[str]:
    """The command line of `launch.train` for the tiny run with `overrides`, writing into `out`."""
    argv = [str(TINY_CONFIG)]
    for override in TINY + list(overrides):
        argv += ["--set", override]
    return argv + ["--out", str(out)]


def run_config(*overrides: str) -> Config:
    """The config `args(*overrides)` gives a run, for tests that rebuild the run in-process."""
    return load_config(TINY_CONFIG, TINY + list(overrides))


def single_process(out: Path, *overrides: str) -> Weights:
    """Train the tiny run in this process; its final weights."""
    assert main(args(*overrides, out=out) + ["--no-progress"]) == 0
    return final_weights(out)


def final_weights(out: Path) -> Weights:
    return torch.load(out / "final.pt", weights_only=True)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def differing_tensors(a: Weights, b: Weights) -> list[str]:
    """'block key' of every tensor that is not bit for bit the same in `a` and `b`."""
    assert sorted(a) == sorted(b) == list(range(6))
    differing = []
    for block in a:
        assert a[block].keys() == b[block].keys()
        differing += [f"block {block} {key}" for key in a[block] if not torch.equal(a[block][key], b[block][key])]
    return differing


def assert_same_weights(a: Weights, b: Weights) -> None:
    differing = differing_tensors(a, b)
    assert not differing, f"{', '.join(differing)} differ"
