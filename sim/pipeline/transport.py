"""How messages travel between the ranks of one replica's pipeline, behind one interface.

`Transport` is what an engine talks to: it sends and receives tensors by (peer, kind), counts bytes
sent and seconds spent waiting, and checks every message against the schedule's list for the
current action (`begin` / `end`, from `Schedule.messages`): the protocol check lives here, once.
Two implementations:
- `InProcess`: every block in this process (K = 1). Its schedule lists no messages, so any send or
  receive is a protocol error; collectives are the identity. No `None` transport anywhere in the engines.
- `Distributed`: torch.distributed point-to-point messages (gloo on CPU, nccl on GPUs).
  Activations travel up (rank r to r + 1) and feedback travels down (the top rank to a lower one),
  always as tensors of shapes both sides computed from the config, so no shape ever travels. Each
  directed pair of ranks carries one stream of messages, so messages arrive in the order they were
  sent; downward messages use a process group of their own, so that on GPUs (one NCCL stream per
  group) a large feedback message never waits behind an activation going the other way. No wait is
  unbounded: a receive that takes longer than `timeout_s`, or a peer whose connection drops, raises
  `PeerFailure` with the name of the rank that failed first.
A message may be several tensors: a codec's packing (`send_packed`, `recv_packed`; sim.pipeline.codec),
counted in `bytes_sent` as they travel.
"""
from __future__ import annotations

import contextlib
import datetime
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from sim.pipeline.codec import Codec
from sim.pipeline.schedule import Message

FAILURE_KEY = "first_failure"
FLOAT32 = Codec("fp32")  # weights, held-out activity, gradients: as they are


class PeerFailure(RuntimeError):
    """Another rank failed; the message names it."""


def record_failure(store: dist.Store, reason: str) -> str:
    """Leave `reason` in the store unless another rank already left one; returns the first reason
    (`reason` itself when the store is gone: rank 0 hosts it when torchrun's agent does not)."""
    try:
        return store.compare_set(FAILURE_KEY, "", reason).decode()
    except Exception:  # noqa: BLE001 - any failure of a dead store means: nobody else can say more
        return reason


def first_failure(store: dist.Store, patience_s: float = 2.0) -> str | None:
    """The reason left by the first rank that failed, waiting up to `patience_s` for it to arrive."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if store.check([FAILURE_KEY]):
                return store.get(FAILURE_KEY).decode()
        except Exception:  # the store itself is gone: nothing more to learn
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


class ProtocolError(RuntimeError):
    """A rank sent or received a message that its schedule does not list: a bug in laminar."""


class Transport:
    """This rank's sends and receives, checked against the schedule; subclasses move the tensors.
    Within an action of a schedule (`begin` .. `end`), every message must be the next one listed."""

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device
        self.bytes_sent = 0
        self.bytes_by_kind: dict[str, dict[str, int]] = {"sent": {}, "received": {}}  # kind -> bytes
        self.wait_seconds = 0.0
        self.expected: deque[Message] | None = None  # what the current action still sends and receives

    def begin(self, messages: Sequence[Message]) -> None:
        """The next action's messages, in order (Schedule.messages)."""
        self.expected = deque(messages)

    def end(self, action: object) -> None:
        if self.expected:
            raise ProtocolError(f"rank {self.rank}: {action} did not {', '.join(map(str, self.expected))}, "
                                "although its schedule lists it")
        self.expected = None

    def _check(self, message: Message) -> None:
        if self.expected is None:  # outside a schedule's actions (gathering the weights)
            return
        listed = self.expected.popleft() if self.expected else None
        if message != listed:
            raise ProtocolError(f"rank {self.rank} did {message}, but its schedule lists "
                                f"{listed or 'nothing more'} next")

    def send(self, tensor: torch.Tensor, dst: int, kind: str = "weights") -> None:
        self.send_packed([tensor], dst, kind)

    def send_packed(self, tensors: Sequence[torch.Tensor], dst: int, kind: str) -> None:
        """One message made of `tensors` (a codec's packing, sim.pipeline.codec)."""
        self._check(Message(kind, dst, True))
        size = sum(t.numel() * t.element_size() for t in tensors)
        self.bytes_sent += size
        self.count(kind, "sent", size)
        self._send([t.detach().contiguous() for t in tensors], dst)

    def recv(self, shape: tuple[int, ...], src: int, kind: str = "weights") -> torch.Tensor:
        return self.recv_packed(FLOAT32, shape, src, kind)

    def recv_packed(self, codec: Codec, shape: tuple[int, ...], src: int, kind: str) -> torch.Tensor:
        """A message of `shape` sent packed by `codec`, decoded."""
        self._check(Message(kind, src, False))
        packed = self._recv(codec.buffers(shape, self.device), src)
        self.count(kind, "received", sum(t.numel() * t.element_size() for t in packed))
        return codec.decode(packed, shape)

    def count(self, kind: str, way: str, size: int) -> None:
        """`size` bytes of `kind` sent or received ("sent", "received")."""
        self.bytes_by_kind[way][kind] = self.bytes_by_kind[way].get(kind, 0) + size

    def _send(self, tensors: list[torch.Tensor], dst: int) -> None:
        raise NotImplementedError

    def _recv(self, buffers: list[torch.Tensor], src: int) -> list[torch.Tensor]:
        """`buffers`, filled with what `src` sent."""
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until every message sent has been received."""

    @contextlib.contextmanager
    def patience(self, timeout_s: float) -> Iterator[None]:
        """A longer timeout for waits that may be long in a healthy run (gathering all weights)."""
        yield

    def barrier(self, what: str, timeout_s: float) -> None:
        """Every rank of the run has reached this point (`what` names it in errors)."""

    def broadcast(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every rank."""
        return values

    def gather(self, obj: object) -> list | None:
        """Every rank's `obj` (small, picklable), on rank 0 only (None elsewhere)."""
        return [obj]


class InProcess(Transport):
    """One process holds every block: nothing travels, and the schedule lists no message."""

    def __init__(self, device: torch.device):
        super().__init__(0, device)

    def _send(self, tensors: list[torch.Tensor], dst: int) -> None:
        raise ProtocolError(f"one process has no rank {dst} to send to")

    def _recv(self, buffers: list[torch.Tensor], src: int) -> list[torch.Tensor]:
        raise ProtocolError(f"one process has no rank {src} to receive from")


class Distributed(Transport):
    """Point-to-point messages over torch.distributed, with bounded waits and failure diagnosis.
    `rank` is this rank's stage in its replica's pipeline; peers are named by stage too."""

    def __init__(self, rank: int, device: torch.device, store: dist.Store, timeout_s: float, max_in_flight: int = 2,
                 base: int = 0):
        super().__init__(rank, device)
        self.store = store
        self.base = base  # global rank of this replica's first stage: peers are named by stage, sent to base + stage
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.down_group = dist.new_group()  # every rank builds its transport at the same point: a collective
        # sends not yet received when an action may begin (Schedule.sends_in_flight): how far this rank runs ahead
        self.max_in_flight = max_in_flight
        # one entry per message: its sends (one per packed tensor), the tensors (alive until sent), the peer
        self.in_flight: deque[tuple[list[dist.Work], list[torch.Tensor], int]] = deque()

    def _send(self, tensors: list[torch.Tensor], dst: int) -> None:
        group = self.down_group if dst < self.rank else None
        works = [dist.isend(tensor, self.base + dst, group=group) for tensor in tensors]
        self.in_flight.append((works, tensors, dst))
        if self.expected is None:  # outside a schedule's actions (gathering the weights): the bound at once
            self._wait_in_flight()

    def begin(self, messages: Sequence[Message]) -> None:
        """An action begins once at most `max_in_flight` of this rank's sends are unreceived: the rule
        `simulate` checks schedules against (waiting inside an action could hold back a send that the
        receiver of the oldest one waits for)."""
        self._wait_in_flight()
        super().begin(messages)

    def _wait_in_flight(self) -> None:
        while len(self.in_flight) > self.max_in_flight:
            self._wait_oldest_send()

    def _recv(self, buffers: list[torch.Tensor], src: int) -> list[torch.Tensor]:
        group = self.down_group if src > self.rank else None
        for buffer in buffers:
            self.wait(dist.irecv(buffer, self.base + src, group=group), src, "receiving from")
        return buffers

    def flush(self) -> None:
        while self.in_flight:
            self._wait_oldest_send()

    def _wait_oldest_send(self) -> None:
        works, _, dst = self.in_flight.popleft()
        for work in works:
            self.wait(work, dst, "sending to")

    def wait(self, work: dist.Work, peer: int | None, doing: str, who: str | None = None) -> None:
        """Wait for `work` up to the timeout: with `peer`, a stage of this replica, or with the ranks
        `who` names (a group's)."""
        began = time.perf_counter()
        try:
            work.wait(self.timeout)
        except Exception as error:  # a dropped connection or a timeout: diagnose, never hang
            raise self.diagnose(peer, doing, error, who) from None
        finally:
            self.wait_seconds += time.perf_counter() - began

    @contextlib.contextmanager
    def patience(self, timeout_s: float) -> Iterator[None]:
        usual, self.timeout = self.timeout, datetime.timedelta(seconds=timeout_s)
        try:
            yield
        finally:
            self.timeout = usual

    def collective(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
        """Run a collective (barrier, broadcast, gather); a broken peer becomes a PeerFailure."""
        try:
            return call(*args)
        except RuntimeError as error:
            raise self.diagnose(None, f"in {what} with", error) from None

    def barrier(self, what: str, timeout_s: float) -> None:
        self.collective(what, setup_barrier, timeout_s)

    def broadcast(self, values: list[int]) -> list[int]:
        return self.collective("broadcast", broadcast_from_first, values, self.device)

    def gather(self, obj: object) -> list | None:
        return self.collective("gathering results", gather_to_first, obj)

    def diagnose(self, peer: int | None, doing: str, error: Exception, who: str | None = None) -> PeerFailure:
        reason = first_failure(self.store)
        if reason is None:  # the peer could not say why (killed, or stuck): name it ourselves
            detail = str(error).splitlines()[0][:200]
            who = who or ("a peer" if peer is None else f"rank {self.base + peer}")
            reason = record_failure(self.store, f"{who} stopped answering (rank {self.base + self.rank} was {doing} "
                                    f"it: {detail})")
        return PeerFailure(f"rank {self.base + self.rank} stops because {reason}")


def send_weights(transport: Transport, blocks, dst: int) -> None:
    """Send every tensor of `blocks`' state dicts to rank `dst`, in state-dict order."""
    for block in blocks:
        for tensor in block.state_dict().values():
            transport.send(tensor.to(transport.device), dst)
    transport.flush()


def receive_weights(transport: Transport, blocks, src: int) -> None:
    """Fill `blocks` (built identically on this rank) with the tensors `src` sends."""
    with torch.no_grad():
        for block in blocks:
            for tensor in block.state_dict().values():
                tensor.copy_(transport.recv(tuple(tensor.shape), src))


def gather_to_first(obj: object) -> list | None:
    """Every rank's `obj` (small, picklable), on rank 0 only."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_first(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's `values` on every rank."""
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def setup_barrier(timeout_s: float) -> None:
    """All ranks are built and ready; on gloo, a rank that never arrives is named."""
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
    else:
        dist.barrier()
