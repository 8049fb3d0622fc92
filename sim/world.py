"""The processes of a run: who am I, how many are we, and the process group that connects us.

`World.from_env()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); without it the run is a single process and needs no process group. A launcher of its
own (the tests) may set LAMINAR_INIT_METHOD to a `file://` rendezvous instead of MASTER_ADDR/PORT.
Backend: gloo on CPU, nccl on GPUs (one GPU per process, LOCAL_RANK).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    init_method: str = "env://"  # or file:///path for tests
    attempt: int = 0  # torchrun's restart count: a restarted job resumes from its checkpoints

    @staticmethod
    def from_env() -> World:
        if "WORLD_SIZE" not in os.environ:
            return World()
        return World(
            rank=int(os.environ["RANK"]),
            size=int(os.environ["WORLD_SIZE"]),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            init_method=os.environ.get("LAMINAR_INIT_METHOD", "env://"),
            attempt=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        )

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self, requested: str) -> torch.device:
        """The device of this process: 'auto' is cuda:LOCAL_RANK when GPUs are present."""
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(requested)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"train.device = {requested!r} but no CUDA device is available; use 'cpu' or 'auto'")
            if device.index is None:
                device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device


def connect(world: World, device: torch.device, setup_timeout_s: float) -> dist.Store:
    """Join the process group; returns the key-value store shared by all ranks.

    The store outlives a crashed rank (torchrun keeps it in its agent; tests keep it in a file), so
    the first rank to fail can leave its reason there for the others to report.
    """
    timeout = datetime.timedelta(seconds=setup_timeout_s)
    if world.init_method.startswith("file://"):
        store = dist.FileStore(world.init_method[len("file://"):], world.size)
    else:
        # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE): every worker is a client.
        agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                              world.size, is_master=world.rank == 0 and not agent_hosts, timeout=timeout)
    dist.init_process_group(store=dist.PrefixStore(f"pg{world.attempt}", store), rank=world.rank,
                            world_size=world.size, timeout=timeout, **_backend(device))
    return dist.PrefixStore(f"laminar{world.attempt}", store)


def connect_alone(device: torch.device) -> None:
    """A process group of one, for a single process that still needs one (the BP pipeline's
    stages do, even when they send nothing)."""
    dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **_backend(device))


def _backend(device: torch.device) -> dict:
    """gloo on CPUs, nccl (bound to this process's GPU) on GPUs."""
    if device.type == "cuda":
        return {"backend": "nccl", "device_id": device}
    return {"backend": "gloo"}


def disconnect() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
