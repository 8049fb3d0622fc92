"""Schedules as data: the ordered actions each rank performs, checkable and printable without
running anything.

Actions (one batch `step` each):
- `F` forward: receive the batch (rank 0: build its views), run it through this rank's blocks,
  let every block with a local signal learn, send the output up; the top rank also sends the top
  block's context down as feedback.
- `U` update: receive the feedback of batch `step` and let the blocks that waited for it learn.
- `W` wait: rank 0 of the sequential schedule waits until the top rank has finished the batch.
- `G` gradient (only at the log's alignment steps): receive the gradient of the top block's loss
  with respect to this rank's output and back-propagate it through this rank's blocks, for
  analysis only; nothing learns from it. It follows the batch's `F` (or its `U`, if any).
- `C` checkpoint: everything of batches < `step` is applied; save.

What each action sends and receives, in order, is data too (`Schedule.messages`): the runtime
checks every message against it (sim.pipeline.transport.Transport.begin), `simulate` matches every receive
with its send to check that no schedule deadlocks and that both ends agree on each message's
kind, and `launch.show_schedule` prints it. The kinds:
- `heldout`: the held-out images' activity, up, at the log's steps (before the batch);
- `activations`: the batch's output, up;
- `feedback`: the top block's pooled activity, from the top rank down to each rank that waits for it;
- `token`: the sequential schedule's go-ahead, from the top rank to rank 0;
- `gradient`: at alignment steps, the gradient of the top block's loss with respect to a rank's
  output, down from the rank above.

`sequential` runs one batch at a time through all ranks (the reference semantics). `pipelined`
lets rank r work on batch t - r while rank 0 works on batch t. With feedback, a rank applies the
update of batch s before it forwards batch s + delay + 1: `exact` feedback has delay 0 (identical
to sequential, at the cost of stalls); `delayed` feedback has delay K - 1 - r on rank r, the time
the batch takes to reach the top and its feedback to come back in a full pipeline. Checkpoints
flush: every pending update is applied before one is written, in every run alike, so a resumed
run repeats an uninterrupted one exactly.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

SIM_SCHEDULES = ("sequential", "pipelined")  # sim.schedule: the local engine's schedules
FEEDBACK_MODES = ("exact", "delayed")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")  # the BP pipeline's (torch.distributed.pipelining's), sim.pipeline.bp_engine


@dataclass(frozen=True)
class PipelineSettings:
    """The BP pipeline's own settings (launch.bp_pipeline's options, not config keys)."""
    schedule: str  # one of PIPELINE_SCHEDULES
    microbatches: int


@dataclass(frozen=True)
class MessageShapes:
    activations: tuple[tuple[int, ...], ...]  # [r] = shape of what rank r sends up to rank r + 1
    feedback: tuple[int, ...]  # the top block's pooled activity, (2B, D_top)


@dataclass(frozen=True)
class Action:
    kind: str  # "F", "U", "G", "W" or "C"
    step: int

    def __str__(self) -> str:
        return f"{self.kind}{self.step}"


MESSAGE_KINDS = ("heldout", "activations", "feedback", "token", "gradient")


@dataclass(frozen=True)
class Message:
    kind: str  # one of MESSAGE_KINDS
    peer: int  # the rank it goes to or comes from
    sends: bool  # True: this rank sends it to `peer`; False: receives it from `peer`

    def __str__(self) -> str:
        return f"{'send' if self.sends else 'recv'} {self.kind} {'to' if self.sends else 'from'} {self.peer}"


@dataclass(frozen=True)
class Schedule:
    name: str  # sequential | pipelined
    feedback: str  # exact | delayed
    waits_for_feedback: tuple[bool, ...]  # per rank: holds blocks that learn from the top block's context
    checkpoint_every: int = 0  # 0: a checkpoint only at the end
    log_every: int = 0  # steps whose F also carries the held-out images up (the log's activity); 0: none
    align_every: int = 0  # steps between diagnostic back-propagations (G actions); 0: none
    # sim.feedback_delay: every waiting block applies the update of batch s just before it forwards
    # batch s + d + 1, on every rank alike; -1: the delays `feedback` implies (0, or K - 1 - r on rank r)
    feedback_delay: int = -1

    def __post_init__(self) -> None:
        if self.name not in SIM_SCHEDULES:
            raise ValueError(f"sim.schedule = {self.name!r} is not one of {', '.join(SIM_SCHEDULES)}")
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"sim.feedback = {self.feedback!r} is not one of {', '.join(FEEDBACK_MODES)}")
        if self.name == "sequential" and self.feedback == "delayed":
            raise ValueError("sim.feedback = 'delayed' needs sim.schedule = 'pipelined': a sequential "
                             "schedule has every batch's feedback before the next batch")
        if self.waits_for_feedback and self.waits_for_feedback[-1]:
            raise ValueError("the top rank holds the top block: its feedback is immediate")
        if self.feedback_delay < -1:
            raise ValueError(f"sim.feedback_delay = {self.feedback_delay}: give a delay in steps >= 0 "
                             "(or -1: the delay sim.feedback implies)")
        if self.feedback_delay >= 0 and self.feedback == "delayed":
            raise ValueError(f"sim.feedback = 'delayed' and sim.feedback_delay = {self.feedback_delay} both set the "
                             "delay: keep sim.feedback = 'exact' with sim.feedback_delay, or drop sim.feedback_delay")
        if self.feedback_delay > 0 and self.name == "sequential":
            raise ValueError(f"sim.feedback_delay = {self.feedback_delay} needs sim.schedule = 'pipelined': a "
                             "sequential schedule has every batch's feedback before the next batch")
        needed = self.smallest_delay()
        if 0 < self.feedback_delay < needed:
            raise ValueError(f"sim.feedback_delay = {self.feedback_delay} is shorter than the pipeline needs on "
                             f"{self.world_size} processes: use 0 (exact feedback, with stalls) or at least {needed}")

    @property
    def world_size(self) -> int:
        return len(self.waits_for_feedback)

    def smallest_delay(self) -> int:
        """The shortest delay above 0 that no waiting rank stalls for: the steps a batch takes to reach
        the top rank and its feedback to come back, K - 1 - r, on the lowest waiting rank r."""
        return max((self.world_size - 1 - r for r, waits in enumerate(self.waits_for_feedback) if waits), default=0)

    def delay(self, rank: int) -> int:
        """Batches rank `rank` forwards between a batch's forward and that batch's update."""
        if not self.waits_for_feedback[rank]:
            return 0
        if self.feedback_delay >= 0:
            return self.feedback_delay
        return self.world_size - 1 - rank if self.feedback == "delayed" else 0

    def sends_in_flight(self, rank: int) -> int:
        """How many of rank `rank`'s sends may be unreceived when it begins an action. A receiver lags
        its sender by up to the longest feedback delay (it forwards that many batches before it takes
        a batch's feedback, and its gradient after that), so a rank keeps that many batches' sends (a
        logged and aligned batch's, the most) in flight, and 2 more: how far a rank that waits for
        nothing may run ahead of the rank above. `simulate` checks that no schedule deadlocks with it."""
        lag = max((self.delay(r) for r in range(self.world_size)), default=0)
        batch = sum(m.sends for kind in "FG" for m in self.messages(rank, Action(kind, 0)))  # step 0 logs and aligns
        return 2 + (lag + 1) * batch if lag else 2

    def sends_token(self) -> bool:
        """Sequential schedules gate rank 0 on the top rank: a token, unless feedback does it."""
        return self.name == "sequential" and self.world_size > 1 and not self.waits_for_feedback[0]

    def logs(self, step: int) -> bool:
        return self.log_every > 0 and step % self.log_every == 0

    def aligns(self, step: int) -> bool:
        return self.align_every > 0 and step % self.align_every == 0

    def messages(self, rank: int, action: Action) -> tuple[Message, ...]:
        """What `action` of rank `rank` sends and receives, in the order it does."""
        top, step = self.world_size - 1, action.step
        if action.kind == "F":
            messages = []
            if self.logs(step):  # the held-out images first, through the weights from before this batch
                messages += [Message("heldout", rank - 1, False), Message("heldout", rank + 1, True)]
            messages.append(Message("activations", rank - 1, False))
            if rank < top:
                messages.append(Message("activations", rank + 1, True))
            else:
                messages += [Message("feedback", r, True) for r, waits in enumerate(self.waits_for_feedback) if waits]
                if self.sends_token():
                    messages.append(Message("token", 0, True))
                if self.aligns(step):
                    messages.append(Message("gradient", top - 1, True))
            return tuple(m for m in messages if 0 <= m.peer < self.world_size and m.peer != rank)
        if action.kind == "U":
            return (Message("feedback", top, False),)
        if action.kind == "G":
            return (Message("gradient", rank + 1, False),) + ((Message("gradient", rank - 1, True),) if rank else ())
        if action.kind == "W":
            return (Message("token", top, False),)
        return ()

    def actions(self, rank: int, start: int, stop: int) -> Iterator[Action]:
        """Rank `rank`'s actions for batches start..stop-1, ending with a checkpoint at `stop`."""
        waits, delay = self.waits_for_feedback[rank], self.delay(rank)
        gradients = rank < self.world_size - 1  # ranks below the top back-propagate at alignment steps
        pending: list[int] = []  # batches forwarded whose update still waits for feedback

        def update(step: int) -> Iterator[Action]:
            yield Action("U", step)
            if gradients and self.aligns(step):
                yield Action("G", step)

        for step in range(start, stop):
            while waits and pending and pending[0] < step - delay:
                yield from update(pending.pop(0))
            yield Action("F", step)
            if waits:
                pending.append(step)
            if rank == 0 and self.sends_token():  # before G: the top rank sends the token first
                yield Action("W", step)
            if not waits and gradients and self.aligns(step):
                yield Action("G", step)
            done = step + 1
            if done == stop or (self.checkpoint_every and done % self.checkpoint_every == 0):
                for waiting in pending:
                    yield from update(waiting)
                pending.clear()
                yield Action("C", done)


def simulate(schedule: Schedule, steps: int) -> list[list[tuple[int, Action]]]:
    """Start tick of every action of every rank, with unit-time F, U and G actions and zero-time W
    and C. An action starts once every message it receives has been sent, by an action that has
    ended (messages on each directed pair of ranks arrive in the order they were sent), and once at
    most `sends_in_flight` of its rank's sends are unreceived, as the transport waits. Raises
    RuntimeError if the ranks deadlock, if a rank expects another kind of message than the next
    one its peer sends, or if a message is never received."""
    queues = [list(schedule.actions(r, 0, steps)) for r in range(schedule.world_size)]
    in_transit: dict[tuple[int, int], list[tuple[str, int]]] = {}  # (src, dst) -> [(kind, tick sent)]
    timeline: list[list[tuple[int, Action]]] = [[] for _ in queues]
    clock, cursor = [0] * len(queues), [0] * len(queues)
    bounds = [schedule.sends_in_flight(r) for r in range(len(queues))]
    while any(c < len(q) for c, q in zip(cursor, queues)):
        progressed = False
        for rank, queue in enumerate(queues):
            while cursor[rank] < len(queue):
                action = queue[cursor[rank]]
                messages = schedule.messages(rank, action)
                receives = [m for m in messages if not m.sends]
                if any(len(in_transit.get((m.peer, rank), [])) < sum(r.peer == m.peer for r in receives)
                       for m in receives):
                    break
                if sum(len(q) for (src, _), q in in_transit.items() if src == rank) > bounds[rank]:
                    break  # its transport waits until a peer receives
                begin = clock[rank]
                for m in receives:
                    kind, sent = in_transit[m.peer, rank].pop(0)
                    if kind != m.kind:
                        raise RuntimeError(f"rank {rank} expects {m.kind} from rank {m.peer} in {action}, "
                                           f"but the next message on that link is {kind}")
                    begin = max(begin, sent)
                end = begin + (1 if action.kind in "FUG" else 0)
                for m in messages:
                    if m.sends:
                        in_transit.setdefault((rank, m.peer), []).append((m.kind, end))
                clock[rank] = end
                timeline[rank].append((begin, action))
                cursor[rank] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks: no rank can make progress")
    left = {pair: [kind for kind, _ in q] for pair, q in in_transit.items() if q}
    if left:
        raise RuntimeError(f"messages sent but never received, by (src, dst): {left}")
    return timeline


def render_grid(schedule: Schedule, steps: int, groups: Sequence[Sequence[int]] | None = None) -> str:
    """The schedule as a rank x tick grid; '.' marks a tick in which a rank waits."""
    timeline = simulate(schedule, steps)
    ticks = max((begin + 1 for rank in timeline for begin, a in rank if a.kind in "FUG"), default=0)
    width = max(3, len(str(steps - 1)) + 2)
    header = "rank  blocks   " + "".join(f"{t:<{width}}" for t in range(ticks))
    lines = [header]
    for rank, events in enumerate(timeline):
        cells = ["."] * ticks
        for begin, action in events:
            if action.kind in "FUG":
                cells[begin] = str(action)
        blocks = "-".join(map(str, groups[rank])) if groups else ""
        lines.append(f"{rank:<5} {blocks:<8} " + "".join(f"{c:<{width}}" for c in cells))
    busy = [sum(a.kind in "FUG" for _, a in events) for events in timeline]
    lines.append(f"busy ticks per rank: {busy} of {ticks}; feedback delay per rank (steps): "
                 f"{[schedule.delay(r) for r in range(schedule.world_size)]}")
    return "\n".join(lines)


def render_messages(schedule: Schedule, steps: int) -> str:
    """The messages of each kind of action, per rank: the first action of each kind whose messages
    differ from the ones shown before (a logged or an alignment step carries more)."""
    lines = ["messages of each action, in order (the first action of each kind and message list, per rank):"]
    for rank in range(schedule.world_size):
        shown: set[tuple[str, tuple]] = set()
        for action in schedule.actions(rank, 0, steps):
            messages = schedule.messages(rank, action)
            if action.kind == "C" or (action.kind, messages) in shown:
                continue
            shown.add((action.kind, messages))
            lines.append(f"  rank {rank} {action!s:<5} " + (", ".join(map(str, messages)) or "(none)"))
    return "\n".join(lines)
