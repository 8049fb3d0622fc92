"""laminar's one cost model: what a block costs and how fast a schedule runs on K devices. Pure
arithmetic on block shapes and measured times; what measures this machine is `sim.cost.measure`.

`estimated_block_costs` is an analytic estimate that needs no measurement: "auto" placement
balances it (sim.run.plan), so every rank computes the same placement. `BlockTimes` and `LinkSpeed`
(measured by `sim.cost.measure`) go into the formulas below, which turn them into images/s for the
placement the run would use.

Per batch of B images (2B views): `local[l]` is block l's forward pass plus its local update,
`forward[l]` and `backward[l]` its share of an end-to-end backprop step, `data` the views on
rank 0, `activation_bytes[l]` the size of block l's output. A rank's step time is the sum over its
blocks (plus the data on rank 0, plus sending its output); then:

- local SSL, pipelined over K ranks: no rank waits for another's backward, so the pipeline runs
  at the pace of its slowest rank: B / max_r(step_r);
- local SSL with exact top-down feedback: each batch climbs to the top and its feedback comes
  back before the next: B / (sum of all steps + the messages on the way up and down);
- BP-SSL pipelined with m micro-batches (GPipe and 1F1B alike, flushed every batch): with the
  forward and backward times of one micro-batch (measured at that size: small micro-batches use
  the hardware less well than 1/m of a batch would), the pipeline fills and drains:
  B / ((m + K - 1) * max_r(forward_r + backward_r + messages_r)).
- R data-parallel replicas (sim.replicas) of any of these: R times the images of one replica, each
  rank's step longer by the ring all-reduce of its blocks' gradients, 2 (R - 1) messages of 1/R of
  them, counted without overlap (the runtime overlaps it with the stage's next blocks: a bound).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from layers.encoder import MAXPOOL, describe_encoder

# A least-squares fit of measured local-step times per block on a 2-core x86 CPU (1 thread,
# batch 32, widths 1/16 to 1/2): element-wise work is memory-bound and weighs hundreds of MACs per
# element there; within about 30 % per block. On GPUs the balance differs: give an explicit
# sim.placement when the estimate splits badly (launch.show_schedule prints the placement).
ELEMENTWISE_WEIGHT = 400.0
HEAD_WEIGHT = 1.7


HeadMatrix = tuple[int, int]  # one weight matrix of a block's heads: (parameters, passes over it per step)


def estimated_block_costs(width: float, in_channels: int, input_size: int,
                          head_matrices: Sequence[Sequence[HeadMatrix]]) -> list[float]:
    """Relative cost of one training step of each block, in multiply-accumulate equivalents per view.

    Convolution forward and weight gradient (2x the forward MACs), the heads' matrices (Plan.head_matrices:
    forward, gradient of the matrix and of its output: 3x, at HEAD_WEIGHT) and the element-wise work on
    the activity (ReLU, max-pool, pooling: ELEMENTWISE_WEIGHT per element of the pre-pool map).
    """
    costs = []
    for report, matrices in zip(describe_encoder(width, in_channels, input_size), head_matrices):
        c, h, _ = report.output_shape
        side = h * (2 if MAXPOOL[report.index] else 1)  # the conv runs before the max-pool
        heads = sum(3 * params for params, _ in matrices)
        costs.append(2 * report.macs_per_image + HEAD_WEIGHT * heads + ELEMENTWISE_WEIGHT * c * side * side)
    return costs


@dataclass(frozen=True)
class StepWork:
    """The arithmetic and memory traffic of one training step of a method, its floor's ingredients."""
    conv_flops: float  # convolutions: forward, weight gradient and, end to end, input gradient
    head_flops: float  # B matrices or projections: forward and weight gradient (contexts are detached)
    optimizer_bytes: float  # AdamW: reads weight, gradient and two moments, writes three (float32)

    @property
    def flops(self) -> float:
        return self.conv_flops + self.head_flops

    def floor_seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        """The step's time if every FLOP ran at `flops_per_s` and the optimiser at `bytes_per_s`."""
        return self.flops / flops_per_s + self.optimizer_bytes / bytes_per_s


def step_work(width: float, in_channels: int, input_size: int, rows: int,
              head_matrices: Sequence[Sequence[HeadMatrix]], end_to_end: bool) -> StepWork:
    """FLOPs of one step on `rows` views (2B); the element-wise work (ReLU, pooling, the loss) is
    left out: it is memory traffic, small beside these at full width. `head_matrices`: per block, each
    matrix of its heads (Plan.head_matrices) with its passes: 2 for B (forward and weight gradient:
    the context is detached), 3 for a projection and for a low-rank B's outer factor (their input
    takes a gradient too)."""
    reports = describe_encoder(width, in_channels, input_size)
    conv = 0.0
    for report in reports:  # forward and weight gradient; the input gradient only end to end, not into the image
        passes = 3 if end_to_end and report.index > 0 else 2
        conv += passes * 2 * report.macs_per_image * rows
    matrices = [matrix for block in head_matrices for matrix in block]
    heads = sum(passes * 2 * rows * params for params, passes in matrices)
    params = sum(r.conv_params for r in reports) + sum(params for params, _ in matrices)
    return StepWork(conv, heads, 7 * 4 * params)


def block_operations(width: float, in_channels: int, input_size: int, rows: int,
                     head_matrices: Sequence[Sequence[HeadMatrix]], end_to_end: bool,
                     reruns_forward: Sequence[bool]) -> list[dict[str, float]]:
    """Per block, the multiply-accumulates of one step on `rows` views (2B), dense, as step_work
    counts them: `forward` (the convolution and the heads), `update` (the weight gradients, and the
    block run again on its kept input where `reruns_forward`: an eligibility trace) and `backward` (the
    input gradient: end to end only, not into the image), and `convolution`, the forward convolution's
    share (what event-driven hardware scales by its input's non-zero fraction). Element-wise work is
    left out."""
    operations = []
    for report, matrices in zip(describe_encoder(width, in_channels, input_size), head_matrices):
        conv = report.macs_per_image * rows
        heads = sum(rows * params for params, _ in matrices)
        head_updates = sum((passes - 1) * rows * params for params, passes in matrices)
        rerun = conv if reruns_forward[report.index] else 0.0
        operations.append({"forward": conv + heads, "update": conv + head_updates + rerun,
                           "backward": conv if end_to_end and report.index > 0 else 0.0, "convolution": conv})
    return operations


def held_memory(width: float, in_channels: int, input_size: int, rows: int, blocks: Sequence[int],
                head_params: Sequence[int], all_at_once: bool, *, pending: int = 1,
                trace_dims: Sequence[int] | None = None) -> dict[str, int]:
    """Bytes that `blocks` hold during a step on `rows` views: `optimizer_state`, their weights,
    gradients and AdamW's two moments (16 bytes per parameter), and `activity`, what a block keeps
    for its backward pass: its input (for the weight gradient), its ReLU output (computed in place
    of the convolution's) and, after a max-pool, the pooled map and its indices (float32, int64).
    `all_at_once`: every block's activity is kept together (backprop; blocks that wait for top-down
    feedback); else a block frees its own after its update, and the largest counts. Temporaries of
    the backward pass (gradients of those maps, patches) come on top.

    Blocks that wait for delayed feedback keep `pending` batches at once (their delay + 1): with
    stashed weights, each batch's activity and `stashed_weights`, a copy of the block's convolution
    per batch beyond the first; with `trace_dims` (sim.stash = false), only each batch's input and its
    pooled activity, trace_dims[block] floats a row, and no weights."""
    reports = describe_encoder(width, in_channels, input_size)
    params, kept, stashed = 0, [], 0
    for index in blocks:
        report = reports[index]
        c, side, _ = report.output_shape
        c_in, side_in = (in_channels, input_size) if index == 0 else reports[index - 1].output_shape[:2]
        before_pool = side * 2 if MAXPOOL[index] else side
        params += report.conv_params + head_params[index]
        activity = rows * (c_in * side_in**2 + c * before_pool**2) * 4
        if MAXPOOL[index]:
            activity += rows * c * side**2 * (4 + 8)
        if trace_dims is not None:  # an eligibility trace: the input and the pooled activity
            activity = rows * (c_in * side_in**2 + trace_dims[index]) * 4
        else:
            stashed += (pending - 1) * report.conv_params * 4
        kept.append(pending * activity)
    return {"optimizer_state": 16 * params, "activity": sum(kept) if all_at_once else max(kept),
            "stashed_weights": stashed}


@dataclass
class BlockTimes:
    local: list[float]  # seconds per batch: forward + local update, per block
    forward: list[float]  # end-to-end backprop: forward, per block
    backward: list[float]  # end-to-end backprop: backward with input gradients, per block
    data: float  # building one batch's views
    activation_bytes: list[int]  # one batch's output of each block
    feedback_bytes: int  # the top block's pooled activity for one batch
    gradient_bytes: list[int]  # each block's parameters: what replicas average


@dataclass(frozen=True)
class LinkSpeed:
    """A link between two processes, as measured by `measure_link`."""
    latency: float
    bandwidth: float

    def seconds(self, size: int) -> float:
        return self.latency + size / self.bandwidth


def _rank_sums(values: Sequence[float], groups: Sequence[Sequence[int]]) -> list[float]:
    return [sum(values[b] for b in group) for group in groups]


def all_reduce_seconds(link: LinkSpeed, size: int, replicas: int) -> float:
    """A ring all-reduce of `size` bytes over `replicas` ranks: 2 (R - 1) messages of size / R."""
    return 2 * (replicas - 1) * link.seconds(size // replicas) if replicas > 1 else 0.0


def _averaging(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, replicas: int) -> list[float]:
    """Per rank, the all-reduce of its blocks' gradients (one bucket per block), counted as if it did
    not overlap the rank's compute: an upper bound."""
    return [sum(all_reduce_seconds(link, times.gradient_bytes[b], replicas) for b in group) for group in groups]


def local_pipelined(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, batch: int,
                    feedback: bool = False, replicas: int = 1) -> float:
    """Images/s of local SSL pipelined over len(groups) ranks (delayed feedback: `feedback`), in each
    of `replicas` data-parallel replicas, each of them on `batch` images a step."""
    steps = [s + a for s, a in zip(_rank_sums(times.local, groups), _averaging(times, groups, link, replicas))]
    steps[0] += times.data
    for rank, group in enumerate(groups[:-1]):
        steps[rank] += link.seconds(times.activation_bytes[group[-1]])
    if feedback and len(groups) > 1:
        steps[-1] += (len(groups) - 1) * link.seconds(times.feedback_bytes)
    return replicas * batch / max(steps)


def local_exact_feedback(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, batch: int,
                         replicas: int = 1) -> float:
    """Images/s of local SSL with exact top-down feedback: no overlap between ranks."""
    total = times.data + sum(times.local) + sum(_averaging(times, groups, link, replicas))
    total += sum(link.seconds(times.activation_bytes[g[-1]]) for g in groups[:-1])
    total += link.seconds(times.feedback_bytes) if len(groups) > 1 else 0.0
    return replicas * batch / total


def backprop_pipelined(times: BlockTimes, groups: Sequence[Sequence[int]], link: LinkSpeed, batch: int,
                       microbatches: int = 1, replicas: int = 1) -> float:
    """Images/s of BP-SSL over len(groups) ranks with `microbatches` micro-batches per batch, from
    `times` measured on one micro-batch (K = 1, m = 1: plain single-process backprop); with
    `replicas` (K = 1 only), each replica on `batch` images a step."""
    work = [f + b for f, b in zip(_rank_sums(times.forward, groups), _rank_sums(times.backward, groups))]
    for rank, group in enumerate(groups[:-1]):  # an activation up and a gradient down per micro-batch
        work[rank] += 2 * link.seconds(times.activation_bytes[group[-1]])
    averaging = max(_averaging(times, groups, link, replicas))
    return replicas * batch / ((microbatches + len(groups) - 1) * max(work) + times.data + averaging)
