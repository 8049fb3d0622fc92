"""Mailboxes of free-running ranks (sim.schedule = "async" on K processes): messages that carry the
batch they came from, received in the background while the rank computes.

A message is a header (int64: batch, the sender's forward count when it made it) and a payload (the
tensors a codec packed it into, sim.pipeline.codec), all sent non-blocking on one tag per kind, so
each (sender, kind) is one ordered stream. An `Inbox` runs a thread that receives one stream as fast
as it comes (gloo and NCCL receives release the GIL) and keeps at most `depth` messages: `newest`
drops the oldest when full, `fifo` never needs to, because its sender spends a credit per message and
waits for one when it has none (`Outbox`); the receiver gives a credit back each time it takes a
message. Nothing waits without a bound: a wait of the main thread longer than sim.timeout_s (the
receiver thread's own receive: the process group's timeout), or a peer that fails, raises the
transport's PeerFailure.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch
import torch.distributed as dist

from sim.pipeline.codec import Codec
from sim.pipeline.transport import FLOAT32, Distributed

TAGS = {"activations": 10, "feedback": 11, "credit": 12, "heldout": 13}
HEADER = 2  # batch, the sender's forward count


def receive(transport: Distributed, src: int, kind: str, shape: tuple[int, ...], codec: Codec = FLOAT32, *,
            in_background: bool = False) -> tuple[int, int, torch.Tensor]:
    """The next `kind` message from stage `src`: (batch, the sender's forward count, payload decoded).
    The main thread waits up to the transport's timeout (counted in its wait_seconds, a failed peer
    named); a receiver thread in the background waits as the process group does, and hands errors on."""
    peer, tag = transport.base + src, TAGS[kind]
    group = transport.down_group if src > transport.rank else None
    header = torch.empty(HEADER, dtype=torch.int64)
    packed = codec.buffers(shape, transport.device)
    for buffer in [header, *packed]:
        work = dist.irecv(buffer, peer, group=group, tag=tag)
        if in_background:
            work.wait()
        else:
            transport.wait(work, src, f"receiving {kind} from")
    transport.count(kind, "received", sum(t.numel() * t.element_size() for t in packed))
    batch, made = header.tolist()
    return batch, made, codec.decode(packed, shape)


class Inbox:
    """The stream of `kind` messages from stage `src`, up to (and including) batch `last`."""

    def __init__(self, transport: Distributed, src: int, kind: str, shape: tuple[int, ...], last: int, *,
                 depth: int = 0, newest: bool = False, credits: bool = False, codec: Codec = FLOAT32):
        self.transport, self.src, self.kind, self.shape, self.last = transport, src, kind, shape, last
        self.codec = codec  # how the payload is packed (sim.pipeline.codec)
        self.depth, self.newest = depth, newest  # depth 0: unbounded (feedback)
        self.credits = credits  # a credit back to the sender for each message taken (fifo)
        self.messages: deque[tuple[int, int, torch.Tensor]] = deque()
        self.most = 0  # the most messages it ever held
        self.made = -1  # the sender's forward count of the newest message received, dropped or not
        self.error: BaseException | None = None
        self.done = False
        self.credits_given: list[dist.Work] = []  # fifo: one per message taken, back to the sender
        self.ready = threading.Condition()
        self.thread = threading.Thread(target=self._receive, name=f"inbox-{kind}-{src}", daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        try:
            while True:
                batch, made, payload = receive(self.transport, self.src, self.kind, self.shape, self.codec,
                                              in_background=True)
                with self.ready:
                    self.messages.append((batch, made, payload))
                    self.made = made
                    if self.newest and len(self.messages) > self.depth:
                        self.messages.popleft()
                    self.most = max(self.most, len(self.messages))
                    self.ready.notify()
                if batch >= self.last:
                    break
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which names the peer
            with self.ready:
                self.error = error
                self.ready.notify()
        finally:
            with self.ready:
                self.done = True
                self.ready.notify()

    def wait(self) -> None:
        """Until a message is there (or the stream failed, or ended without one)."""
        began = time.perf_counter()
        with self.ready:
            while not self.messages and self.error is None and not self.done:
                if not self.ready.wait(self.transport.timeout.total_seconds()):
                    self.error = TimeoutError(f"no {self.kind} message for {self.transport.timeout}")
        self.transport.wait_seconds += time.perf_counter() - began
        if self.error is not None and not self.messages:
            raise self.transport.diagnose(self.src, f"receiving {self.kind} from", self.error)

    def take(self) -> tuple[int, int, torch.Tensor]:
        """The next message, waiting for one: (batch, input age, payload). `newest` takes the newest and
        drops the rest; fifo the oldest (and gives its sender a credit back). The input age: how many
        newer messages had come when it was taken."""
        self.wait()
        with self.ready:
            batch, made, payload = self.messages.pop() if self.newest else self.messages.popleft()
            if self.newest:
                self.messages.clear()
            age = self.made - made
        if self.credits:
            credit = torch.tensor([batch, 0], dtype=torch.int64)
            self.transport.bytes_sent += credit.numel() * credit.element_size()
            self.transport.count("credit", "sent", credit.numel() * credit.element_size())
            self.credits_given.append(dist.isend(credit, self.transport.base + self.src,
                                                 group=self.transport.down_group, tag=TAGS["credit"]))
        return batch, age, payload

    def arrived(self) -> list[tuple[int, torch.Tensor]]:
        """Every message there now, oldest first, without waiting: (batch, payload)."""
        with self.ready:
            found = [(batch, payload) for batch, _, payload in self.messages]
            self.messages.clear()
            failed = self.error
        if failed is not None and not found:
            raise self.transport.diagnose(self.src, f"receiving {self.kind} from", failed)
        return found

    def close(self) -> None:
        """After the last message: the thread has ended, and the credits given have been received."""
        self.thread.join(self.transport.timeout.total_seconds())
        if self.thread.is_alive():  # never left waiting: the next stretch would receive on the same stream
            raise self.transport.diagnose(self.src, f"receiving the last {self.kind} from",
                                          TimeoutError("the stream did not end"))
        for work in self.credits_given:
            self.transport.wait(work, self.src, "giving a credit to")


class Outbox:
    """Sends of `kind` messages to stage `dst`, non-blocking; with `credits` (fifo), at most that many
    not yet taken by the receiver."""

    def __init__(self, transport: Distributed, dst: int, kind: str, credits: int | None = None):
        self.transport, self.dst, self.kind, self.credits = transport, dst, kind, credits
        self.in_flight: deque[dist.Work] = deque()
        self.sent = 0
        self.received = 0  # credits back

    def send(self, batch: int, made: int, packed: list[torch.Tensor]) -> None:
        """Batch `batch`'s message, made by this rank's `made`-th forward, as its codec packed it."""
        if self.credits is not None:
            if self.sent - self.received >= self.credits:
                self._receive_credit()
        group = self.transport.down_group if self.dst < self.transport.rank else None
        peer, tag = self.transport.base + self.dst, TAGS[self.kind]
        header = torch.tensor([batch, made], dtype=torch.int64)
        for tensor in [header, *(t.detach().contiguous() for t in packed)]:
            self.in_flight.append(dist.isend(tensor, peer, group=group, tag=tag))
            self.transport.bytes_sent += tensor.numel() * tensor.element_size()
            self.transport.count(self.kind, "sent", tensor.numel() * tensor.element_size())
        self.sent += 1
        while len(self.in_flight) > 64:  # a receiver this far behind is stuck: wait, with the timeout
            self.transport.wait(self.in_flight.popleft(), self.dst, f"sending {self.kind} to")

    def _receive_credit(self) -> None:
        credit = torch.empty(HEADER, dtype=torch.int64)
        work = dist.irecv(credit, self.transport.base + self.dst, group=self.transport.down_group,
                          tag=TAGS["credit"])
        self.transport.wait(work, self.dst, "waiting for a credit from")
        self.received += 1

    def close(self) -> None:
        """Every message received; with credits, every credit taken back."""
        if self.credits is not None:
            while self.received < self.sent:
                self._receive_credit()
        while self.in_flight:
            self.transport.wait(self.in_flight.popleft(), self.dst, f"sending {self.kind} to")
