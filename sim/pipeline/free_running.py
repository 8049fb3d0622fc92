"""Free-running blocks (`sim.schedule = "async"`): no grid, no step barrier. The semantics, as a
deterministic event-driven simulation on a virtual clock; pure arithmetic, no torch.

Each block group runs as fast as it can. Group 0 builds the views of batch 0, 1, 2, ... in turn; every
other group takes its next input from the mailbox of the link below it. Each group, each time it
takes a batch (`F`): runs it through its blocks, the blocks with a lateral context learn, the output
goes into the mailbox of the group above; the top group sends the top block's context of the batch
down to every group that waits for feedback. A waiting group applies each context that has arrived
before its next `F` (`U`: the update of that batch, with its own stashed weights or its eligibility
trace; a group that waits for input applies them as they come, which learns the same), and forgets
(`X`) the batches the top group never saw (dropped on the way up): their context will never come,
since the top group takes batches in the order they were made.

Mailboxes hold at most `depth` messages. `newest`: the sender never waits; a full mailbox drops its
oldest message; the receiver takes the newest and drops the rest (so only `depth` = 1 matters for
what is learned). `fifo`: the receiver takes the oldest; a sender whose mailbox is full waits until
the receiver takes one. A group with an empty mailbox waits for the next message (it never learns
twice from the same batch). A group's `F` lasts the sum of its blocks' time per batch (`seconds`,
from the cost model) divided by their speed (`sim.block_speed`), times exp(jitter * N(0, 1)) drawn
from (seed, group, batch); `U` and `X` take no time (the time of an update is in the `F` of its
batch). Ties go to the lower group; a message that arrives at t is there for a take at t.

Checkpoints (train.checkpoint_every) cut the run into stretches (`segments`) that each end with every
mailbox empty and every update settled, so a resumed run repeats an uninterrupted one.

Each event records ages: an `F`'s input age is how many newer batches the group below had already
sent when this one was taken (an output its sender holds back for want of room is not sent yet; 0:
the freshest there was; with `fifo`, the queue ahead); a `U`'s context age is how many batches the
group forwarded between this batch's `F` and the update (the feedback delay, in the group's own
steps). With equal speeds, no jitter and depth 1, every group takes every batch exactly one tick after
the group below, and feedback arrives K - 1 - g steps after a batch's forward: the pipelined schedule
with delayed feedback (sim.pipeline.schedule).
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

ASYNC = "async"  # the sim.schedule of free-running blocks
MAILBOX_POLICIES = ("newest", "fifo")


@dataclass(frozen=True)
class FreeRunning:
    groups: tuple[tuple[int, ...], ...]  # blocks of each group, bottom to top
    block_seconds: tuple[float, ...]  # per block: time per batch at speed 1 (any unit)
    block_speed: tuple[float, ...]  # per block: 1 = as the cost model says, 0.25 = 4x slower
    waits_for_feedback: tuple[bool, ...]  # per group: holds blocks that learn from the top block's context
    depth: int = 1  # messages a mailbox holds
    policy: str = "newest"  # one of MAILBOX_POLICIES
    jitter: float = 0.0  # sd of the log of each F's duration
    seed: int = 0

    def __post_init__(self) -> None:
        blocks = len(self.block_seconds)
        if len(self.block_speed) != blocks:
            raise ValueError(f"sim.block_speed has {len(self.block_speed)} values; give one per block ({blocks}), "
                             "e.g. [1, 1, 1, 0.25, 1, 1] for a block 3 four times slower")
        if not all(math.isfinite(s) and s > 0 for s in self.block_speed):
            raise ValueError(f"sim.block_speed = {list(self.block_speed)}: every speed must be a number > 0")
        if self.depth < 1:
            raise ValueError(f"sim.mailbox_depth = {self.depth}: a mailbox holds at least 1 message")
        if self.policy not in MAILBOX_POLICIES:
            raise ValueError(f"sim.mailbox = {self.policy!r} is not one of {', '.join(MAILBOX_POLICIES)}")
        if not (math.isfinite(self.jitter) and self.jitter >= 0):
            raise ValueError(f"sim.speed_jitter = {self.jitter}: give a number >= 0 (0: no jitter)")
        if self.waits_for_feedback and self.waits_for_feedback[-1]:
            raise ValueError("the top group holds the top block: its feedback is immediate")

    def duration(self, group: int, batch: int) -> float:
        """Virtual time of group `group`'s F of batch `batch`."""
        base = sum(self.block_seconds[b] / self.block_speed[b] for b in self.groups[group])
        if not self.jitter:
            return base
        return base * math.exp(self.jitter * random.Random(f"{self.seed}/{group}/{batch}").gauss(0.0, 1.0))


@dataclass(frozen=True)
class Event:
    group: int
    kind: str  # "F" take and learn from a batch, "U" its top-down update, "X" forget a batch never fed back
    batch: int
    begin: float
    end: float
    age: int = 0  # F: input age (newer batches already sent below); U: context age (own F's in between)

    def __str__(self) -> str:
        return f"{self.kind}{self.batch}"


class _Group:
    """One group's state in the simulation."""

    def __init__(self, index: int, waits: bool):
        self.index, self.waits = index, waits
        self.free_at = 0.0
        self.mailbox: list[tuple[int, float]] = []  # (batch, arrival) from the group below
        self.blocked: tuple[int, float] | None = None  # fifo: the output waiting for room above
        self.feedback: list[tuple[int, float]] = []  # (batch, arrival) from the top group
        self.pending: dict[int, int] = {}  # batch -> how many F's this group had done before it
        self.forwards = 0
        self.sent: list[float] = []  # when each F's output was made, in order
        self.position: dict[int, int] = {}  # batch -> which of this group's F's made it
        self.last_taken = -1


def timeline(setup: FreeRunning, start: int, stop: int) -> list[Event]:
    """Every event of batches start..stop-1, in an order that respects causality (the order the
    one-process engine executes them in)."""
    groups = [_Group(g, setup.waits_for_feedback[g]) for g in range(len(setup.groups))]
    top, events = len(groups) - 1, []
    next_batch = start
    while True:
        candidates = []
        for group in groups:
            when = _ready_at(group, next_batch, stop)
            if when is not None:
                candidates.append((when, group.index))
        if not candidates:
            break
        now, index = min(candidates)
        group = groups[index]
        events += _apply_feedback(group, now)
        if group.index == 0 and next_batch < stop:
            batch, age = next_batch, 0
            next_batch += 1
        elif group.index > 0 and group.mailbox and group.last_taken < stop - 1:
            batch, age = _take(group, groups[index - 1], now, setup.policy)
        else:
            continue  # only feedback was due
        end = now + setup.duration(group.index, batch)
        events.append(Event(group.index, "F", batch, now, end, age))
        group.last_taken = batch
        if group.waits:
            group.pending[batch] = group.forwards
        group.forwards += 1
        group.position[batch] = len(group.sent)
        group.sent.append(end)
        group.free_at = end
        if group.index < top:
            _send(group, groups[index + 1], batch, end, setup)
        else:
            for waiting in groups:
                if waiting.waits:
                    waiting.feedback.append((batch, end))
    return events


def _ready_at(group: _Group, next_batch: int, stop: int) -> float | None:
    """When `group` can next do something (an F, or an update once it has forwarded everything)."""
    if group.blocked is not None:
        return None  # fifo: waits for room above
    if group.index == 0 and next_batch < stop:
        return group.free_at
    if group.index > 0 and group.mailbox and group.last_taken < stop - 1:
        return max(group.free_at, min(arrival for _, arrival in group.mailbox))
    if group.pending and group.feedback:  # forwarded all it will: settles the updates as contexts come
        return max(group.free_at, group.feedback[0][1])
    return None


def _apply_feedback(group: _Group, now: float) -> list[Event]:
    """U (or X) for every context that has arrived by `now`, oldest batch first."""
    events = []
    while group.feedback and group.feedback[0][1] <= now:
        batch, _ = group.feedback.pop(0)
        for lost in sorted(b for b in group.pending if b < batch):
            del group.pending[lost]
            events.append(Event(group.index, "X", lost, now, now))
        forwarded_before = group.pending.pop(batch)
        events.append(Event(group.index, "U", batch, now, now, group.forwards - forwarded_before - 1))
    return events


def _take(group: _Group, below: _Group, now: float, policy: str) -> tuple[int, int]:
    """The batch `group` takes from its mailbox at `now`, and its input age."""
    arrived = [m for m in group.mailbox if m[1] <= now]
    taken = arrived[-1] if policy == "newest" else arrived[0]
    sent_by_now = bisect.bisect_right(below.sent, now)
    if below.blocked is not None and below.blocked[1] <= now:
        sent_by_now -= 1  # made, but held by its sender until there is room: not sent
    group.mailbox = [m for m in group.mailbox if m[0] > taken[0]]  # newest: the older ones are dropped
    if below.blocked is not None:  # fifo: there is room now (the output arrives once it is made)
        batch, made = below.blocked
        group.mailbox.append((batch, max(made, now)))
        below.free_at, below.blocked = max(below.free_at, now), None
    return taken[0], sent_by_now - below.position[taken[0]] - 1


def _send(group: _Group, above: _Group, batch: int, end: float, setup: FreeRunning) -> None:
    """`newest` drops older messages when the receiver takes (`_take`), which has the same effect as a
    full mailbox dropping its oldest; `fifo` holds the output until there is room above."""
    if setup.policy == "fifo" and len(above.mailbox) >= setup.depth:
        group.blocked = (batch, end)
    else:
        above.mailbox.append((batch, end))


def segments(start: int, stop: int, checkpoint_every: int) -> list[tuple[int, int]]:
    """The stretches of batches between checkpoints. A checkpoint is a consistent cut: every group
    takes the stretch's batches, every waiting update is settled, the mailboxes are empty; then the next
    stretch starts from the saved weights, as a resumed run does."""
    ends = [b for b in range(start + 1, stop) if checkpoint_every and b % checkpoint_every == 0] + [stop]
    return list(zip([start, *ends[:-1]], ends))


def segmented_timeline(setup: FreeRunning, start: int, stop: int, checkpoint_every: int) -> list[Event]:
    """`timeline` stretch by stretch (`segments`), the virtual clock running on across the cuts."""
    events: list[Event] = []
    for first, end in segments(start, stop, checkpoint_every):
        offset = events[-1].end if events else 0.0
        events += [dataclasses.replace(e, begin=e.begin + offset, end=e.end + offset)
                   for e in timeline(setup, first, end)]
    return events


@functools.cache  # pure: the plan asks it once per block
def most_pending(setup: FreeRunning, batches: int = 200) -> tuple[int, ...]:
    """Per group, the most batches it holds at once over a simulated run of `batches`: a waiting group
    keeps each forwarded batch until its context comes or it is forgotten; the others hold one."""
    held, most = [0] * len(setup.groups), [1] * len(setup.groups)
    for event in timeline(setup, 0, batches):
        if setup.waits_for_feedback[event.group]:
            held[event.group] += 1 if event.kind == "F" else -1
            most[event.group] = max(most[event.group], held[event.group])
    return tuple(most)


def lockstep_duration(setup: FreeRunning, start: int, stop: int) -> float:
    """Virtual time of the same batches in the pipelined schedule (every group waits for the slowest
    at every tick), the comparison for a straggler."""
    groups = len(setup.groups)
    ticks = stop - start + groups - 1
    total = 0.0
    for tick in range(ticks):
        busy = [setup.duration(g, start + tick - g) for g in range(groups) if 0 <= tick - g < stop - start]
        total += max(busy)
    return total


def dynamics(setup: FreeRunning, events: Sequence[Event], start: int, stop: int, batch_size: int) -> dict:
    """What summary.json records of a free-running run: the setup, the virtual time against lockstep,
    and per block the batches it learned from and the distributions of its input and context ages."""
    duration = max((e.end for e in events), default=0.0)
    per_block = {}
    for g, blocks in enumerate(setup.groups):
        mine = [e for e in events if e.group == g]
        inputs = Counter(e.age for e in mine if e.kind == "F")
        contexts = Counter(e.age for e in mine if e.kind == "U")
        for block in blocks:
            per_block[str(block)] = {
                "group": g, "batches": sum(inputs.values()),
                "updates_with_feedback": sum(contexts.values()) if setup.waits_for_feedback[g] else None,
                "forgotten": sum(e.kind == "X" for e in mine),
                "input_age": {str(a): n for a, n in sorted(inputs.items())},
                "context_age": {str(a): n for a, n in sorted(contexts.items())}}
    lockstep = lockstep_duration(setup, start, stop)
    return {"engine": "simulation", "groups": [list(g) for g in setup.groups], "block_speed": list(setup.block_speed),
            "mailbox": setup.policy, "mailbox_depth": setup.depth, "speed_jitter": setup.jitter,
            "virtual_time": duration, "lockstep_virtual_time": lockstep,
            "virtual_images_per_time": (stop - start) * batch_size / duration if duration else None,
            "speedup_over_lockstep": lockstep / duration if duration else None, "blocks": per_block}


def measured_dynamics(setup: FreeRunning, ranks: Sequence[dict], start: int, stop: int, batch_size: int,
                      checkpoint_every: int = 0) -> dict:
    """summary.json's free_running for K processes: each rank's measured ages and seconds per batch
    (sim.pipeline.async_ranks), and what the simulation predicts when each group takes the seconds
    per batch its rank measured."""
    seconds = [r["seconds_per_batch"] for r in ranks]
    measured = [0.0] * len(setup.block_seconds)
    for group, blocks in enumerate(setup.groups):
        share = sum(setup.block_seconds[b] for b in blocks)
        for b in blocks:  # each block its part of its group's measured time, as the cost model splits it
            measured[b] = seconds[group] * setup.block_seconds[b] / share
    fed = FreeRunning(setup.groups, tuple(measured), (1.0,) * len(measured), setup.waits_for_feedback,
                      setup.depth, setup.policy)
    predicted = dynamics(fed, segmented_timeline(fed, start, stop, checkpoint_every), start, stop, batch_size)
    return {"engine": "processes", "groups": [list(g) for g in setup.groups], "block_speed": list(setup.block_speed),
            "mailbox": setup.policy, "mailbox_depth": setup.depth, "seconds_per_batch": seconds,
            "most_in_mailbox": [r["most_in_mailbox"] for r in ranks],
            "blocks": {b: v for r in ranks for b, v in r["blocks"].items()}, "predicted_blocks": predicted["blocks"]}


def render_timeline(setup: FreeRunning, steps: int, width: int = 100) -> str:
    """Which group works on which batch when, on the virtual clock, with each F's input age and each
    U's context age: one row per group, one column per `unit` of virtual time."""
    events = timeline(setup, 0, steps)
    end = max(e.end for e in events)
    unit = min(setup.duration(g, 0) for g in range(len(setup.groups))) / 2
    columns = min(width, math.ceil(end / unit))
    unit = end / columns
    lines = [f"virtual time per column: {unit:.3g} (a one-process step at speed 1 takes 1); F<batch> learns, "
             "'-' still busy, '.' waiting"]
    for g, blocks in enumerate(setup.groups):
        cells = ["."] * columns
        for e in events:
            if e.group == g and e.kind == "F":
                first = min(int(e.begin / unit), columns - 1)
                last = max(first, min(math.ceil(e.end / unit) - 1, columns - 1))
                for c in range(first, last + 1):
                    cells[c] = "-"
                text = f"F{e.batch}"[: last - first + 1]
                cells[first: first + len(text)] = list(text)
        lines.append(f"group {g} ({'-'.join(map(str, blocks))}) ".ljust(18) + "".join(cells))
    lines.append("ages (F: newer batches already sent below; U: own forwards between a batch and its update):")
    for g in range(len(setup.groups)):
        mine = [e for e in events if e.group == g and e.kind in "FUX"]
        shown = " ".join(f"{e}{'' if e.kind == 'X' else f'@{e.age}'}" for e in mine[:12])
        lines.append(f"  group {g}: {shown}{' ...' if len(mine) > 12 else ''}")
    lockstep = lockstep_duration(setup, 0, steps)
    lines.append(f"{steps} batches in virtual time {end:.3g}; lockstep (pipelined) would take {lockstep:.3g}: "
                 f"{lockstep / end:.2f}x")
    return "\n".join(lines)
