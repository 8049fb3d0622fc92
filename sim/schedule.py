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

SCHEDULES = ("sequential", "pipelined")
FEEDBACK_MODES = ("exact", "delayed")


@dataclass(frozen=True)
class Action:
    kind: str  # "F", "U", "W" or "C"
    step: int

    def __str__(self) -> str:
        return f"{self.kind}{self.step}"


@dataclass(frozen=True)
class Schedule:
    name: str  # sequential | pipelined
    feedback: str  # exact | delayed
    waits_for_feedback: tuple[bool, ...]  # per rank: holds blocks that learn from the top block's context
    checkpoint_every: int = 0  # 0: a checkpoint only at the end
    align_every: int = 0  # steps between diagnostic back-propagations (G actions); 0: none

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"sim.schedule = {self.name!r} is not one of {', '.join(SCHEDULES)}")
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"sim.feedback = {self.feedback!r} is not one of {', '.join(FEEDBACK_MODES)}")
        if self.name == "sequential" and self.feedback == "delayed":
            raise ValueError("sim.feedback = 'delayed' needs sim.schedule = 'pipelined': a sequential "
                             "schedule has every batch's feedback before the next batch")
        if self.waits_for_feedback and self.waits_for_feedback[-1]:
            raise ValueError("the top rank holds the top block: its feedback is immediate")

    @property
    def world_size(self) -> int:
        return len(self.waits_for_feedback)

    def delay(self, rank: int) -> int:
        """Batches rank `rank` forwards between a batch's forward and that batch's update."""
        if not self.waits_for_feedback[rank] or self.feedback == "exact":
            return 0
        return self.world_size - 1 - rank

    def sends_token(self) -> bool:
        """Sequential schedules gate rank 0 on the top rank: a token, unless feedback does it."""
        return self.name == "sequential" and self.world_size > 1 and not self.waits_for_feedback[0]

    def aligns(self, step: int) -> bool:
        return self.align_every > 0 and step % self.align_every == 0

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
            elif gradients and self.aligns(step):
                yield Action("G", step)
            if rank == 0 and self.sends_token():
                yield Action("W", step)
            done = step + 1
            if done == stop or (self.checkpoint_every and done % self.checkpoint_every == 0):
                for waiting in pending:
                    yield from update(waiting)
                pending.clear()
                yield Action("C", done)


def simulate(schedule: Schedule, steps: int) -> list[list[tuple[int, Action]]]:
    """Start tick of every action of every rank, with unit-time F, U and G actions and zero-time W
    and C: F(r, t) needs F(r-1, t); U(r, t) and W(r, t) need F(top, t); G(r, t) needs G(r+1, t),
    or F(top, t) just below the top."""
    top = schedule.world_size - 1
    queues = [list(schedule.actions(r, 0, steps)) for r in range(schedule.world_size)]
    finished: dict[tuple[int, str, int], int] = {}  # (rank, kind, step) -> end tick
    timeline: list[list[tuple[int, Action]]] = [[] for _ in queues]
    clock, cursor = [0] * len(queues), [0] * len(queues)
    while any(c < len(q) for c, q in zip(cursor, queues)):
        progressed = False
        for rank, queue in enumerate(queues):
            while cursor[rank] < len(queue):
                action = queue[cursor[rank]]
                need = _dependency(action, rank, top)
                if need is not None and need not in finished:
                    break
                begin = max(clock[rank], finished.get(need, 0))
                end = begin + (1 if action.kind in "FUG" else 0)
                finished[(rank, action.kind, action.step)] = end
                clock[rank] = end
                timeline[rank].append((begin, action))
                cursor[rank] += 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule deadlocks: no rank can make progress")
    return timeline


def _dependency(action: Action, rank: int, top: int) -> tuple[int, str, int] | None:
    """The action of another rank that `action` waits for, if any."""
    if action.kind == "F" and rank > 0:
        return rank - 1, "F", action.step
    if action.kind in "UW" or (action.kind == "G" and rank == top - 1):
        return top, "F", action.step
    if action.kind == "G":
        return rank + 1, "G", action.step
    return None


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
