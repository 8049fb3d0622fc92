"""What a torchrun run leaves on the machine it shares: no worker outlives a killed agent, and a
run on one machine listens on loopback only (issue 13). Real torchrun runs of the tiny config,
one thread per worker; processes and sockets are read from /proc (Linux)."""
from __future__ import annotations

import ctypes
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from launch.runner import LOCAL_TORCHRUN_ENV, local_torchrun
from sim.pipeline.world import World, is_loopback, stop_with_launcher
from tests.helpers import ROOT, TINY_CONFIG

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

TORCHRUN = Path(sys.executable).parent / "torchrun"
# The README's command for K processes on this machine: the agent hosts no TCP store (its server
# would listen on every interface), rank 0 hosts it on 127.0.0.1 instead.
LOCAL_TORCHRUN = local_torchrun(2)
LOCAL_ENVIRONMENT = LOCAL_TORCHRUN_ENV
STANDALONE_TORCHRUN = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2"]
# Long enough to be still training when looked at; a checkpoint every 2 steps says training has begun.
LONG_RUN = ["--set", "train.steps=100000", "--set", "train.threads=1", "--set", "probe.epochs=0",
            "--set", "train.checkpoint_every=2", "--set", "log.every=0", "--no-progress"]
PR_SET_CHILD_SUBREAPER = 36


@contextmanager
def torchrun(launcher: list[str], environment: dict[str, str], out: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A long training run under `launcher`; whatever is left of it is killed on the way out."""
    command = launcher + ["-m", "launch.train", str(TINY_CONFIG), *LONG_RUN, "--out", str(out)]
    with open(log, "w") as output:
        # TMPDIR: the file rendezvous leaves its store file there (torchrun does not remove it)
        agent = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                 env={**os.environ, **environment, "OMP_NUM_THREADS": "1", "TMPDIR": str(log.parent)})
    workers: list[int] = []
    try:
        wait_for_training(agent, out, log)
        workers += children(agent.pid)
        yield agent
    finally:
        if not workers and agent.poll() is None:  # training never began: the workers it has started so far
            workers += children(agent.pid)
        for pid in [agent.pid] + workers:  # only the processes of this run, each by its id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it has ended (and was reaped)
                pass
        agent.wait()
        for pid in workers:  # adopted ones (see adopting_orphans) are reaped here
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:  # not a child of this process, or already reaped
                pass


def wait_for_training(agent: subprocess.Popen, out: Path, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not any((out / "checkpoints").glob("*")):
        assert agent.poll() is None, f"torchrun ended before training began:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint after {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers start sessions of their own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # it ended meanwhile
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # after "pid (comm)": state, ppid
                found.append(int(entry.name))
    return found


@contextmanager
def adopting_orphans() -> Iterator[None]:
    """Make this process the one that orphans of its descendants are given to, so that the exit
    codes of a killed agent's workers can be read with waitpid."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def exit_codes(pids: list[int], timeout_s: float) -> dict[int, int | None]:
    """pid -> exit code of each adopted process, None for those still running after `timeout_s`."""
    codes: dict[int, int | None] = dict.fromkeys(pids)
    deadline = time.monotonic() + timeout_s
    while None in codes.values() and time.monotonic() < deadline:
        for pid in [p for p, code in codes.items() if code is None]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.2)
    return codes


@pytest.mark.parametrize("launcher", ["local", "standalone"])
def test_workers_stop_when_the_torchrun_agent_is_killed(tmp_path, launcher):
    command, environment = (LOCAL_TORCHRUN, LOCAL_ENVIRONMENT) if launcher == "local" else (STANDALONE_TORCHRUN, {})
    log = tmp_path / "torchrun.log"
    with adopting_orphans(), torchrun(command, environment, tmp_path / "run", log) as agent:
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(agent.pid, signal.SIGKILL)  # the agent cannot stop its workers: they must stop by themselves
        agent.wait()  # its workers are this process's children from now on
        codes = exit_codes(workers, timeout_s=60)
    output = log.read_text()
    assert None not in codes.values(), f"workers still running 60 s after the agent died: {codes}\n{output[-3000:]}"
    assert all(code != 0 for code in codes.values()), codes
    assert f"the torchrun agent (pid {agent.pid}) died; stopping" in output, output[-3000:]


def test_a_worker_killed_under_torchrun_leaves_the_other_a_line_of_its_own(tmp_path):
    log, out = tmp_path / "torchrun.log", tmp_path / "run"
    with torchrun(LOCAL_TORCHRUN, LOCAL_ENVIRONMENT, out, log) as agent:
        workers = children(agent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # the agent sees it die and stops the other with SIGTERM
        agent.wait(timeout=120)
    output = log.read_text()
    assert "torchrun stopped this worker (another worker failed or was killed" in output, output[-3000:]
    assert f"continue it from its last checkpoint with --resume {out}" in output


def listening_addresses(pids: list[int]) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) of every listening TCP socket that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((kernel_address(address), int(port, 16)))
    return found


def kernel_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp* writes it: 32-bit words in the machine's byte order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] if sys.byteorder == "little" else raw[i:i + 4] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    return getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1 is 127.0.0.1


def test_a_run_on_one_machine_listens_on_loopback_only(tmp_path):
    with torchrun(LOCAL_TORCHRUN, LOCAL_ENVIRONMENT, tmp_path / "run", tmp_path / "torchrun.log") as agent:
        workers = children(agent.pid)
        addresses = listening_addresses([agent.pid] + workers)
    assert len(workers) == 2, workers
    assert addresses, "no listening socket found: the test no longer sees the run's connections"
    beyond = [f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
              for address, port in addresses if not address.is_loopback]
    assert not beyond, f"listening beyond loopback: {beyond}"


@pytest.mark.parametrize("host, loopback", [("localhost", True), ("127.0.0.1", True), ("::1", True),
                                            ("192.0.2.1", False), ("10.0.0.1", False), ("no-such-host.invalid", False)])
def test_loopback_addresses_are_recognised(host, loopback):
    assert is_loopback(host) is loopback


def test_nothing_watches_outside_torchrun(monkeypatch):
    """One process, or the tests' own ranks (RANK, WORLD_SIZE, LAMINAR_INIT_METHOD but no
    TORCHELASTIC_ variables): no thread waits for a launcher, whatever the parent does."""
    for name in [n for n in os.environ if n.startswith("TORCHELASTIC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LAMINAR_INIT_METHOD", "file:///tmp/unused")
    stop_with_launcher(World.from_env())
    assert "laminar-agent-watch" not in [thread.name for thread in threading.enumerate()]
