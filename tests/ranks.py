"""Run `launch.train.main` on K spawned processes, as torchrun would, with a file:// rendezvous.

Each rank runs with one thread and writes its output to rank{r}.log. A rank can be given a fault:
its stage's input at one step becomes NaN, so its first block's loss is NaN (on the first attempt
only, like a transient fault).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Outcome:
    exitcode: int | None  # None: still running when the wait ended (a hang)
    log: str


def _rank_main(rank: int, world_size: int, init_file: str, argv: list[str], log_dir: str, fault: tuple | None) -> None:
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


def poison_input_at(step: int) -> None:
    from sim.stage import LocalStage

    forward = LocalStage.forward

    def poisoned(self, x, s):
        return forward(self, x * float("nan") if s == step else x, s)

    LocalStage.forward = poisoned


def start_ranks(world_size: int, argv: list[str], workdir: Path, fault: tuple[int, int] | None = None) -> list:
    workdir.mkdir(parents=True, exist_ok=True)
    init_file = workdir / f"rendezvous{time.monotonic_ns()}"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_rank_main, args=(r, world_size, str(init_file), argv, str(workdir), fault))
                 for r in range(world_size)]
    for process in processes:
        process.start()
    return processes


def wait(processes: list, workdir: Path, timeout_s: float = 180) -> list[Outcome]:
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    outcomes = []
    for rank, process in enumerate(processes):
        outcomes.append(Outcome(process.exitcode, (workdir / f"rank{rank}.log").read_text()))
        if process.exitcode is None:
            os.kill(process.pid, signal.SIGKILL)
    return outcomes


def run_ranks(world_size: int, argv: list[str], workdir: Path, fault: tuple[int, int] | None = None,
              timeout_s: float = 180) -> list[Outcome]:
    return wait(start_ranks(world_size, argv, workdir, fault), workdir, timeout_s)
