"""Start a training run as its own process (or torchrun's K processes) and read its summary: the
one launcher that the comparison, the reproduction table and the benchmarks share, so that each
run's memory and speed are its own."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launch.program import add_config_arguments
from sim.record.summary import RunSummary
from sim.run.checkpoint import delete_weights

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "fashion_mnist.toml"  # the main job's and the benchmarks'


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def benchmark_parser(prog: str, doc: str, name: str) -> argparse.ArgumentParser:
    """A benchmark program's command line: CONFIG (default: the main job's), `--set` overrides and
    `--out` (default runs/NAME_TIME); the program adds its own options."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.splitlines()[0])
    add_config_arguments(parser, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs") / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}")
    return parser


# torchrun on this machine with nothing listening beyond loopback: `--standalone` would have its
# agent host TCP stores on every interface (no option binds them to loopback). Here the rendezvous
# is a private file and rank 0 hosts the store on 127.0.0.1 (sim.pipeline.world.connect).
LOCAL_TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def local_torchrun(processes: int) -> list[str]:
    """torchrun's command for `processes` workers on this machine (with LOCAL_TORCHRUN_ENV set)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--nproc-per-node", str(processes), "--rdzv-backend", "c10d", "--rdzv-conf", "store_type=file",
            "--local-addr", "127.0.0.1"]


def command(module: str, processes: int) -> list[str]:
    """`python -m module`, or torchrun's K processes on this machine."""
    if processes == 1:
        return [sys.executable, "-m", module]
    return local_torchrun(processes) + ["-m", module]


def launch_run(config: Path, overrides: Sequence[str], out: Path, *, processes: int = 1, module: str = "launch.train",
               options: Sequence[str] = (), progress: bool = True, capture: bool = False,
               resume: bool = False) -> RunSummary:
    """Run `module` with CONFIG, `--set` overrides and `options` into `out`; its summary.
    `capture`: keep its output, and show the end of it only if it fails. `resume`: go on with the run
    in `out` from its last checkpoint, with its own config.toml (CONFIG and overrides are not given)."""
    sets = [arg for override in overrides for arg in ("--set", override)]
    given = ["--resume", str(out)] if resume else [str(config), *sets, "--out", str(out)]
    argv = command(module, processes) + [*given, *options]
    if not progress:
        argv.append("--no-progress")
    print(f"\n== {' '.join(argv[1:])}", flush=True)
    done = subprocess.run(argv, capture_output=capture, text=True, env={**os.environ, **LOCAL_TORCHRUN_ENV})
    if done.returncode != 0:
        tail = f":\n{done.stderr[-3000:]}" if capture else " (see above)"
        raise SystemExit(f"run {out} failed{tail}")
    return RunSummary.read(out)


def bench_run(processes: int, threads: int, config: Path, overrides: list[str], out: Path,
              module: str = "launch.train", options: Sequence[str] = ()) -> RunSummary:
    """One benchmark run without probe and (unless `overrides` says otherwise) without log. Its weights
    (final.pt, checkpoints/) are deleted once it ends: a benchmark keeps its figures, not gigabytes of
    full-width weights."""
    shutil.rmtree(out, ignore_errors=True)
    settings = ["probe.epochs=0", "log.every=0", *overrides, f"train.threads={threads}"]
    summary = launch_run(config, settings, out, processes=processes, module=module, options=options,
                         progress=False, capture=True)
    delete_weights(out)
    return summary
