"""Stages: the blocks one process owns, and how a batch goes through them.

`LocalStage` runs local rules: every block takes a detached input, so no gradient crosses blocks.
A block whose context is lateral learns as soon as its own forward pass is done; a block that
learns from the top block's context keeps its pooled activity (and graph) until that context,
the top-down feedback message, arrives through `apply_feedback`. `EndToEndStage` runs the BP-SSL
baselines: one loss at the top, the gradient through every block, all blocks in one process.

Both report what each update did as `UpdateRecord`s; at steps the log asks about (`observe`)
they also measure the norm of the weight change and keep the gradient of the block's own loss.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from layers.block import Block
from layers.learning_rate import LearningRate
from layers.rules.rule import LossStats
from layers.seeding import STREAM_NEGATIVES, keyed_generator
from sim.pipeline.codec import MessageCodecs
from sim.record.activity import ZeroCounter

# step -> (measure the update's norm, keep the local gradient)
Observer = Callable[[int], tuple[bool, bool]]


class NonFiniteLoss(RuntimeError):
    """A block's loss became NaN or infinite: training stops, naming the block and the step."""


@dataclass
class UpdateRecord:
    block: int
    step: int
    stats: LossStats | None  # None for blocks without a loss of their own (lower blocks of BP-SSL)
    update_norm: float | None = None  # Frobenius norm of the conv weight change, when observed
    gradient: torch.Tensor | None = None  # gradient of the block's own loss on its conv weight, when observed
    feedback_norm: float | None = None  # norm of the top-down context used, if any


def negatives_generator(block: Block, seed: int, step: int, replica: int = 0) -> torch.Generator | None:
    """Random negatives of `block` at `step`, keyed by (seed, block, step) and the replica beyond the
    first: independent of placement."""
    if block.settings.negatives != "random":
        return None
    return keyed_generator(seed, STREAM_NEGATIVES, block.index, step, *([replica] if replica else []))


class Averager(Protocol):
    """Averages a block's gradients over the replicas (sim.pipeline.replicas.GradientAverager)."""

    def start(self, block: Block) -> None: ...

    def finish(self, block: Block) -> None: ...


def _never(step: int) -> tuple[bool, bool]:
    return False, False


class LocalStage:
    """`stash_weights`: blocks awaiting feedback keep a copy of the weights their forward pass
    used, so that updates of other batches applied meanwhile (delayed feedback) do not invalidate
    the graph; the update is then the gradient at the weights that produced the activity.

    `trace` (sim.stash = false): blocks awaiting feedback keep no weights and no graph, only the
    batch's input x and their pooled activity (an eligibility trace). When the feedback arrives, the
    update is computed with the block's current weights: the loss's error at the kept pooled activity,
    with the current heads, back-propagated through the block run again on x with its current
    weights, which gives rho'(a) and x of the three-factor form gamma * (B c) * rho'(a) * x. With no
    delay the weights are those of the forward pass and the update equals the stashed one, bit for bit.

    `codecs` (sim.codec, sim.codec_feedback): every block's output and the top block's context become
    what the receiver decodes, here as on K processes (`packed_output`, `packed_context`: what travels).

    `feedback_delay` d: the delay line of a stage that holds the top block. Its waiting blocks apply
    the update of batch s, with the top block's context of batch s, just before they forward batch
    s + d + 1 (or at `apply_pending`, before a checkpoint), as blocks on lower ranks do when their
    schedule delays feedback by d (sim.pipeline.schedule); 0: at once."""

    def __init__(self, blocks: Sequence[Block], seed: int, stash_weights: bool = False, observe: Observer = _never,
                 learning_rate: LearningRate | None = None, averager: Averager | None = None, replica: int = 0,
                 feedback_delay: int = 0, trace: bool = False, codecs: MessageCodecs = MessageCodecs()):
        self.blocks, self.seed, self.stash_weights, self.observe = list(blocks), seed, stash_weights, observe
        self.trace, self.codecs = trace, codecs
        self.packed_output: list[torch.Tensor] = []  # the last block's output as it travels (sim.codec)
        self.packed_context: list[torch.Tensor] = []  # the top block's context as it travels (sim.codec_feedback)
        self.zeros = ZeroCounter()  # how sparse each block's input is
        self.learning_rate = learning_rate  # None: each optimiser keeps the rate it was built with
        self.averager, self.replica = averager, replica  # None: one replica, nothing to average
        # step -> blocks awaiting feedback: (block, pooled activity (its graph, or with `trace` none), the input
        # with `trace`, else None)
        self.pending: dict[int, list[tuple[Block, torch.Tensor, torch.Tensor | None]]] = {}
        self.averaging: list[_Update] = []  # updates whose gradients are being averaged over the replicas
        self.updates: list[UpdateRecord] = []  # updates since the runtime last read them
        self.top_context: torch.Tensor | None = None  # the top block's pooled activity, if held here
        self.feedback_delay = feedback_delay
        self.delay_line: dict[int, torch.Tensor] = {}  # step -> the top block's context, until it is due

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Run batch `step` through this stage's blocks, learning where the signal is local;
        returns the last block's output, detached, for the next stage. With replicas, the updates
        this starts are applied at the stage's next call (or `settle`): their gradients are averaged
        over the replicas while the output travels on."""
        self.settle()
        self._apply_delayed(before=step - self.feedback_delay)
        for block in self.blocks:
            self.zeros.observe(block.index, block.rule.block_input(x))  # what its convolution sees
            traced = self.trace and block.needs_top_context
            with torch.no_grad() if traced else contextlib.nullcontext():  # a trace keeps no graph
                # (2B, C, H, W) and (2B, D)
                out, features = block.forward_and_features(x.detach(), self.stash_weights and block.needs_top_context)
            if block.is_top and block.rule.needs_feedback:  # a context only where blocks wait for it
                self.top_context, self.packed_context = self.codecs.context(features, step)
            if block.needs_top_context:
                self.pending.setdefault(step, []).append((block, features, x.detach() if traced else None))
            elif block.has_loss:
                self._learn(block, features, None, step)
            x = out
            if not block.is_top:  # what the next block receives: the message, coded (sim.codec)
                x, self.packed_output = self.codecs.output(out, block.index, step)
        if self.top_context is not None and step in self.pending:  # the top block is here: no message
            if self.feedback_delay:
                self.delay_line[step] = self.top_context
            else:
                self._learn_with_feedback(step, self.top_context)
        return x.detach()

    def apply_feedback(self, step: int, top_context: torch.Tensor) -> None:
        """The top block's context for batch `step` has arrived: the waiting blocks learn."""
        self.settle()
        self._learn_with_feedback(step, top_context)

    def forget(self, step: int) -> None:
        """Batch `step`'s top-down context will never come (free-running blocks: the top group never saw
        the batch): its waiting blocks drop what they kept, without learning."""
        self.pending.pop(step, None)

    def apply_pending(self) -> None:
        """Before a checkpoint: every update still in the delay line, in the order of its batches."""
        self.settle()
        self._apply_delayed()

    def _apply_delayed(self, before: int | None = None) -> None:
        """The delay line's updates of the batches before `before` (all of them: None), oldest first."""
        for due in sorted(s for s in self.delay_line if before is None or s < before):
            self._learn_with_feedback(due, self.delay_line.pop(due))

    def settle(self) -> None:
        """Apply every update whose gradients are still being averaged over the replicas (before a
        checkpoint, or a pass that must see this stage's current weights)."""
        for update in self.averaging:
            self.averager.finish(update.block)
            self._step(update)
        self.averaging.clear()

    def _learn_with_feedback(self, step: int, top_context: torch.Tensor) -> None:
        for block, features, trace_input in self.pending.pop(step, []):
            self._learn(block, features, top_context, step, trace_input)

    def _learn(self, block: Block, features: torch.Tensor, top_context: torch.Tensor | None, step: int,
               trace_input: torch.Tensor | None = None) -> None:
        """Block `block` learns from batch `step`; with a `trace_input`, `features` is the kept pooled
        activity of that input, without a graph (`trace`)."""
        if trace_input is not None:
            features.requires_grad_()  # the error of the loss stops here; the block is run again below
        loss, stats = block.loss(features, top_context, negatives_generator(block, self.seed, step, self.replica))
        check_finite(stats.loss, block.index, step)
        measure, keep_gradient = self.observe(step)
        update = _Update(block, UpdateRecord(block.index, step, stats),
                         block.conv_weight.detach().clone() if measure else None)
        if measure and top_context is not None and block.needs_top_context:
            update.record.feedback_norm = top_context.norm().item()
        block.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trace_input is not None:  # rho'(a) and x with today's weights, the error from the kept activity
            block.forward_and_features(trace_input)[1].backward(features.grad)
        if keep_gradient:  # this replica's own gradient, before averaging
            update.record.gradient = block.conv_weight.grad.detach().flatten().clone()
        if self.averager is None:
            self._step(update)
        else:  # the step waits for the average, until the stage's next call
            self.averager.start(block)
            self.averaging.append(update)

    def _step(self, update: _Update) -> None:
        block, step = update.block, update.record.step
        if self.learning_rate is not None:
            self.learning_rate.apply(block.optimizer, step)  # the rate of this batch's step, applied late or not
        block.optimizer.step()
        if update.before is not None:
            update.record.update_norm = (block.conv_weight.detach() - update.before).norm().item()
        self.updates.append(update.record)


class _Countdown:
    """Calls `done` once every `count` ticks: a block's parameters, each ticking when its gradient is in."""

    def __init__(self, count: int, done: Callable[[], None]):
        self.count, self.left, self.done = count, count, done

    def reset(self) -> None:
        self.left = self.count

    def tick(self, _parameter: torch.Tensor) -> None:
        self.left -= 1
        if self.left == 0:
            self.done()


@dataclass
class _Update:
    """A block's update between its backward pass and its optimiser step."""
    block: Block
    record: UpdateRecord
    before: torch.Tensor | None  # the conv weight before the step, when the update's norm is measured


class EndToEndStage:
    """BP-SSL: the top block's loss, back-propagated through all six blocks."""

    def __init__(self, blocks: Sequence[Block], seed: int, observe: Observer = _never,
                 learning_rate: LearningRate | None = None, averager: Averager | None = None, replica: int = 0):
        self.blocks, self.seed, self.observe, self.learning_rate = list(blocks), seed, observe, learning_rate
        self.averager, self.replica = averager, replica
        self.updates: list[UpdateRecord] = []
        self.started: list[Block] = []  # blocks whose gradient average is on its way, in the order started
        self.zeros = ZeroCounter()  # how sparse each block's input is
        self.countdowns: list[_Countdown] = []
        if averager is not None:  # each block's average starts as soon as the backward pass has its gradients
            for block in self.blocks:
                parameters = [p for p in block.parameters() if p.requires_grad]
                self.countdowns.append(_Countdown(len(parameters), lambda block=block: self._start(block)))
                for parameter in parameters:
                    parameter.register_post_accumulate_grad_hook(self.countdowns[-1].tick)

    def _start(self, block: Block) -> None:
        self.averager.start(block)
        self.started.append(block)

    def settle(self) -> None:
        """Nothing waits between calls: each call applies its own updates."""

    def apply_pending(self) -> None:
        """No delay line: nothing is pending."""

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        for countdown in self.countdowns:
            countdown.reset()
        for block in self.blocks:
            self.zeros.observe(block.index, x)
            x = block(x)  # (2B, C, H, W): not detached
        top = self.blocks[-1]
        loss, stats = top.loss(top.features(x), None, negatives_generator(top, self.seed, step, self.replica))
        check_finite(stats.loss, top.index, step)
        measure, _ = self.observe(step)
        before = [b.conv_weight.detach().clone() for b in self.blocks] if measure else None
        for block in self.blocks:
            block.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # with replicas, starts each block's average as its gradients are done
        if self.averager is not None:
            for block in self.blocks:
                if block not in self.started:  # a block with a parameter the loss did not reach
                    self._start(block)
            for block in self.started:
                self.averager.finish(block)
            self.started.clear()
        for block in self.blocks:
            if self.learning_rate is not None:
                self.learning_rate.apply(block.optimizer, step)
            block.optimizer.step()
        for index, block in enumerate(self.blocks):
            norm = (block.conv_weight.detach() - before[index]).norm().item() if measure else None
            self.updates.append(UpdateRecord(block.index, step, stats if block is top else None, norm))
        return x.detach()


def check_finite(loss: torch.Tensor, block: int, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLoss(
            f"block {block} at step {step}: loss is {loss.item()}; training stopped. "
            "Lower optim.lr, or check the input data for NaN or inf"
        )


def make_stage(blocks: Sequence[Block], seed: int, stash_weights: bool = False, observe: Observer = _never,
               learning_rate: LearningRate | None = None, averager: Averager | None = None,
               replica: int = 0, feedback_delay: int = 0, trace: bool = False,
               codecs: MessageCodecs = MessageCodecs()) -> LocalStage | EndToEndStage:
    if blocks[0].rule.end_to_end:
        if len(blocks) != blocks[-1].index + 1 or not blocks[-1].is_top:
            raise ValueError("end-to-end (BP-SSL) methods need all six blocks in one process")
        return EndToEndStage(blocks, seed, observe, learning_rate, averager, replica)
    return LocalStage(blocks, seed, stash_weights, observe, learning_rate, averager, replica, feedback_delay, trace,
                      codecs)
