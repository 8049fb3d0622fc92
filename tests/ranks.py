"""Run `launch.train.main` on K spawned processes, as torchrun would, with a file:// rendezvous.

Each rank runs with one thread and writes its output to rank{r}.log. A rank can be given a fault:
its stage's input at one step becomes NaN, so its first block's loss is NaN (on the first attempt
only, like a transient fault).

No rank outlives the test that started it: `ranks_running` kills, each by its id, every rank still
running when its `with` block is left, however it is left (a failed assertion included); on Linux a
rank is also killed when the test process itself dies.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path

from sim.run.checkpoint import completed_steps

PR_SET_PDEATHSIG = 1  # prctl: the signal this process gets when its parent dies (Linux)


@dataclass
class Outcome:
    exitcode: int | None  # None: still running when the wait ended (a hang)
    log: str


def _rank_main(rank: int, world_size: int, init_file: str, argv: list[str], log_dir: str, fault: tuple | None,
               parent: int) -> None:
    _die_with(parent)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LAMINAR_INIT_METHOD=f"file://{init_file}", OMP_NUM_THREADS="1")
    log = open(Path(log_dir) / f"rank{rank}.log", "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import torch

    torch.set_num_threads(1)
    if fault is not None and fault[0] == rank:
        poison_input_at(fault[1])
    from launch.train import main

    code = main(argv + ["--no-progress"])
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _die_with(parent: int) -> None:
    """Linux: have the kernel kill this rank when the test process `parent` dies (a pytest killed by a
    time limit cannot run its clean-up, and a long run would train on for hours)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above: no signal will come
        os._exit(1)


def poison_input_at(step: int) -> None:
    from sim.pipeline.stage import LocalStage

    forward = LocalStage.forward

    def poisoned(self, x, s):
        return forward(self, x * float("nan") if s == step else x, s)

    LocalStage.forward = poisoned


@contextmanager
def ranks_running(world_size: int, argv: list[str], workdir: Path,
                  fault: tuple[int, int] | None = None) -> Iterator[list[BaseProcess]]:
    """The ranks of one run, started; every one still running when the block is left is killed. Else
    a failed test leaves its ranks training, and pytest, which joins them at exit (multiprocessing
    waits for its children), does not return until they end."""
    workdir.mkdir(parents=True, exist_ok=True)
    init_file = workdir / f"rendezvous{time.monotonic_ns()}"
    context = multiprocessing.get_context("spawn")
    processes: list[BaseProcess] = []
    try:
        for rank in range(world_size):
            process = context.Process(target=_rank_main, args=(rank, world_size, str(init_file), argv, str(workdir),
                                                                fault, os.getpid()))
            process.start()
            processes.append(process)
        yield processes
    finally:
        for process in processes:
            if process.exitcode is None:  # still running: only the processes of this run, each by its id
                process.kill()
        for process in processes:
            process.join()


def wait(processes: list[BaseProcess], workdir: Path, timeout_s: float = 180) -> list[Outcome]:
    """Each rank's exit code and log once all have ended, or `timeout_s` has passed (None: a hang)."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    return [Outcome(process.exitcode, _log(workdir, rank)) for rank, process in enumerate(processes)]


def _log(workdir: Path, rank: int) -> str:
    path = workdir / f"rank{rank}.log"
    return path.read_text() if path.is_file() else f"(rank {rank} wrote no log: it ended before it opened one)"


def run_ranks(world_size: int, argv: list[str], workdir: Path, fault: tuple[int, int] | None = None,
              timeout_s: float = 180) -> list[Outcome]:
    with ranks_running(world_size, argv, workdir, fault) as processes:
        return wait(processes, workdir, timeout_s)


def wait_for_checkpoint(out: Path, step: int, processes: list[BaseProcess], workdir: Path,
                        timeout_s: float = 300) -> int:
    """The first checkpointed step at or past `step` of the run that `processes` write into `out`.
    Any later one will do: a run that checkpoints every few steps deletes a checkpoint soon after
    it writes the next, so a poll can miss any one of them. Fails as soon as a rank has ended."""
    deadline = time.monotonic() + timeout_s  # waiting for the start, not timing it: a loaded machine may take minutes
    while True:
        reached = [s for s in completed_steps(out) if s >= step]  # the format's own reader
        if reached:
            return min(reached)
        ended = [rank for rank, process in enumerate(processes) if process.exitcode is not None]
        assert not ended, f"rank {ended[0]} ended before step {step}:\n{_log(workdir, ended[0])[-2000:]}"
        assert time.monotonic() < deadline, f"no checkpoint at or past step {step} after {timeout_s} s"
        time.sleep(0.2)

