"""The processes of a run: who am I, how many are we, and the process group that connects us.

`World.from_env()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); without it the run is a single process and needs no process group. A launcher of its
own (the tests) may set LAMINAR_INIT_METHOD to a `file://` rendezvous instead of MASTER_ADDR/PORT.
Backend: gloo on CPU, nccl on GPUs (one GPU per process, LOCAL_RANK).

Two duties towards the machine the run shares with others:
- nothing listens beyond loopback unless an address is named: when MASTER_ADDR is a loopback address,
  gloo and nccl are kept on the loopback interface, and a store that rank 0 hosts listens there only;
- no orphans: under torchrun, `stop_with_launcher` ends a worker whose agent died.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sim.errors import ConfigError


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
                raise ConfigError(f"train.device = {requested!r} but this machine has no CUDA device; "
                                  "use train.device = \"cpu\" or \"auto\"")
            if device.index is None:
                device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device


def connect(world: World, device: torch.device, setup_timeout_s: float) -> dist.Store:
    """Join the process group; returns the key-value store shared by all ranks.

    The store outlives a crashed rank when torchrun's agent keeps it (tests keep it in a file), so
    the first rank to fail can leave its reason there for the others to report. Under the loopback
    command (the agent hosts no store: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) rank 0 hosts it, and
    it ends with rank 0.
    """
    timeout = datetime.timedelta(seconds=setup_timeout_s)
    if world.init_method.startswith("file://"):
        store = dist.FileStore(world.init_method[len("file://"):], world.size)
    else:
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
        local = is_loopback(host)
        if local:
            _stay_on_loopback()
        # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE), unless told not to share
        # it (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): then rank 0 does.
        agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        hosts = world.rank == 0 and not agent_hosts
        # A TCPStore server ignores its host name and listens on every interface: a local one gets
        # a socket already bound to the loopback address instead.
        listener = _loopback_listener(host, port) if hosts and local else None
        store = dist.TCPStore(host, port, world.size, is_master=hosts, timeout=timeout, master_listen_fd=listener)
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


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback one (localhost, 127.0.0.1, ::1)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:  # a name that does not resolve here names no loopback address
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _stay_on_loopback() -> None:
    """Keep gloo and nccl on the loopback interface, unless the user chose one: by default gloo
    listens on the address of the host name and nccl on the first interface that is not loopback,
    both reachable from the network, though every process of this run is on this machine."""
    names = {name for _, name in socket.if_nameindex()}
    interface = next((name for name in ("lo", "lo0") if name in names), None)  # Linux, BSD and macOS
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", f"={interface}")  # '=': this name exactly, not a prefix


def _loopback_listener(host: str, port: int) -> int:
    """A listening socket on `host`'s (loopback) address and `port`, for the TCPStore server to own."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.create_server(address[:2], family=family)
    return listener.detach()  # the store closes it: Python must not close it a second time


_watched = False


def stop_with_launcher(world: World, out_dir: Path | None = None) -> None:
    """Under torchrun, stop this worker as soon as its agent dies, naming the cause (exit code 1); and
    when the agent ends it (SIGTERM: another worker failed or was killed, or the run was interrupted),
    say so in one line of its own, with the command that continues the run in `out_dir`.

    Killed with SIGKILL, the agent cannot stop its workers, which would train on as orphans. A
    thread waits for the agent (the parent process) to exit; it does not wait on the main thread,
    which may be inside a collective for minutes. Nothing happens outside torchrun: one process,
    or the tests' own ranks, which set no TORCHELASTIC_ variables."""
    global _watched
    if _watched or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _watched = True
    signal.signal(signal.SIGTERM, lambda *_: _ended_by_agent(world.rank, out_dir))
    agent = os.getppid()
    if agent == 1 and not _is_torchrun(1):  # the agent died before this process got here
        _stop(world.rank, agent)
    threading.Thread(target=_watch, args=(world.rank, agent), name="laminar-agent-watch", daemon=True).start()


def _watch(rank: int, agent: int) -> None:
    try:
        handle = os.pidfd_open(agent)  # readable once the agent has exited (Linux >= 5.3)
    except (AttributeError, OSError):  # no pidfd here, or the agent is already gone: ask every 0.2 s
        handle = None
    if handle is not None and os.getppid() == agent:
        select.select([handle], [], [])
    while os.getppid() == agent:
        time.sleep(0.2)
    _stop(rank, agent)


def _stop(rank: int, agent: int) -> None:
    """End this process at once: its output first, then the cause, without waiting on any peer."""
    flush = threading.Thread(target=_flush, daemon=True)
    flush.start()
    flush.join(5.0)  # stdout may be a pipe that nobody reads any more
    try:
        os.write(2, f"error (rank {rank}): the torchrun agent (pid {agent}) died; stopping\n".encode())
    except OSError:
        pass
    os._exit(1)


def _ended_by_agent(rank: int, out_dir: Path | None) -> None:
    """torchrun's SIGTERM: its line, then the exit a SIGTERM gives (143)."""
    _flush()
    resume = f"; continue it from its last checkpoint with --resume {out_dir}" if out_dir is not None else ""
    try:
        os.write(2, f"error (rank {rank}): torchrun stopped this worker (another worker failed or was killed: its "
                    f"exit is above; or the run was interrupted){resume}\n".encode())
    except OSError:
        pass
    os._exit(128 + signal.SIGTERM)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing more to show
            pass


def _is_torchrun(pid: int) -> bool:
    """Whether process `pid` is a torchrun agent (torchrun in a container may be pid 1)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            command = file.read()
    except OSError:  # cannot tell: assume it is, so as not to stop a healthy run
        return True
    return any(name in command for name in (b"torchrun", b"torch.distributed.run", b"torch.distributed.launch"))
