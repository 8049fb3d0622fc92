"""Everything a run derives from its config before any work: the method, the dataset's geometry,
pooling kernels, placement of blocks on ranks, the schedule, the shapes of messages and, for the
BP pipeline, its micro-batching. A plan that cannot run fails here, before any process group."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from layers.block import Block
from layers.encoder import MAXPOOL, NUM_BLOCKS, block_channels, describe_encoder, map_sizes
from layers.learning_rate import LearningRate
from layers.model import build_blocks, feature_dims, pool_kernels
from layers.rules import RULES, get_rule
from layers.rules.rule import Rule
from sim.cost.model import HeadMatrix, StepWork, block_operations, estimated_block_costs, held_memory, step_work
from sim.data.datasets import DatasetInfo, dataset_info
from sim.errors import ConfigError
from sim.pipeline.codec import Codec, MessageCodecs
from sim.pipeline.free_running import ASYNC, FreeRunning, most_pending
from sim.pipeline.placement import Mesh, Placement, PlacementError, balanced_placement, check_groups, stages_of
from sim.pipeline.schedule import PIPELINE_SCHEDULES, MessageShapes, PipelineSettings, Schedule
from sim.run.config import Config, to_toml

MAX_STEPS = 10**12  # steps travel between ranks as int64; a run this long never ends anyway


@dataclass(frozen=True)
class Plan:
    config: Config
    rule: Rule  # what the config's `method` names
    info: DatasetInfo
    kernels: list[int]
    placement: Placement
    schedule: Schedule
    shapes: MessageShapes
    pipeline: PipelineSettings | None = None  # set: an end-to-end method trained by the BP pipeline engine
    free_running: FreeRunning | None = None  # set: sim.schedule = "async" (simulated in one process, or on K)

    @property
    def config_toml(self) -> str:
        return to_toml(self.config)

    @property
    def stages(self) -> int:
        """K: the processes of one replica's pipeline (one per block group)."""
        return self.placement.world_size

    @property
    def replicas(self) -> int:
        """R: data-parallel copies of the pipeline (sim.replicas)."""
        return self.config.sim.replicas

    @property
    def world_size(self) -> int:
        """Every process of the run: R replicas x K stages."""
        return self.replicas * self.stages

    @property
    def mesh(self) -> Mesh:
        return Mesh(self.replicas, self.stages)

    def total_steps(self, steps_per_epoch: int) -> int:
        steps = self.config.train.steps or round(self.config.train.epochs * steps_per_epoch)  # 0 and 0: untrained
        if steps > MAX_STEPS:
            raise ConfigError(f"train.steps = {self.config.train.steps}, train.epochs = {self.config.train.epochs} "
                              f"ask for {steps:.3g} steps, more than any run can take ({MAX_STEPS:.0e}); ask for fewer")
        return steps

    def build_blocks(self, indices: Sequence[int], device: torch.device) -> list[Block]:
        """Blocks `indices` as this run trains them: each initialised from (seed, block) alone."""
        c = self.config
        return build_blocks(self.rule, c.rule, width=c.model.width, in_channels=self.info.channels,
                            input_size=self.info.image_size, seed=c.train.seed, lr=c.optim.lr,
                            weight_decay=c.optim.weight_decay, fused_optimizer=c.optim.fused, indices=indices,
                            device=device)

    @property
    def top_stage_delay(self) -> int:
        """The delay line of the stage that holds the top block: its own waiting blocks (all of them on
        one process) apply the update of batch s before they forward batch s + d + 1 (sim.feedback_delay)."""
        return max(self.config.sim.feedback_delay, 0) if self.rule.needs_feedback else 0

    def feedback_delays(self) -> list[int]:
        """Per block, the steps between its forward pass of a batch and its update with that batch's
        top-down context; 0 for blocks that learn at once (lateral context, the top block, BP-SSL)."""
        top = self.stages - 1
        delays = []
        for rank, group in enumerate(self.placement.groups):
            for block in group:
                waits = self.rule.needs_feedback and block < NUM_BLOCKS - 1
                delays.append(0 if not waits else self.top_stage_delay if rank == top else self.schedule.delay(rank))
        return delays

    @property
    def stashes_weights(self) -> bool:
        """Whether a waiting block keeps the weights its forward pass used until its update: when any
        update comes after other updates of the same block (a delay above 0), unless sim.stash = false."""
        if self.free_running is not None:  # other batches' updates may always come in between
            return self.rule.needs_feedback and self.config.sim.stash
        return any(self.feedback_delays()) and self.config.sim.stash

    @property
    def keeps_traces(self) -> bool:
        """sim.stash = false: waiting blocks keep their input and pooled activity, learn with today's weights."""
        return self.rule.needs_feedback and not self.config.sim.stash

    @property
    def codecs(self) -> MessageCodecs:
        """What the blocks' messages become on the wire (sim.codec, sim.codec_feedback)."""
        c = self.config
        return MessageCodecs(Codec(c.sim.codec), Codec(c.sim.codec_feedback), c.train.seed)

    def learning_rate(self, total_steps: int) -> LearningRate:
        """Every block's rate at each step of a run of `total_steps` steps."""
        o = self.config.optim
        return LearningRate(o.lr, o.schedule, o.warmup_steps, total_steps, o.lr_min)

    def head_matrices(self) -> list[list[HeadMatrix]]:
        """Per block, each weight matrix of its heads with its passes per step (sim.cost.model.HeadMatrix);
        none for the identity predictor and for the blocks without a loss of their own."""
        dims = feature_dims(self.config.model.width, self.info.image_size, self.kernels)
        return _head_matrices(self.rule, self.config, dims)

    def step_work(self) -> StepWork:
        """What one training step of all six blocks computes and moves (sim.cost.model.step_work)."""
        c = self.config
        return step_work(c.model.width, self.info.channels, self.info.image_size, 2 * c.train.batch_size,
                         self.head_matrices(), self.rule.end_to_end)

    def block_operations(self) -> list[dict[str, float]]:
        """Per block, the multiply-accumulates of one step (sim.cost.model.block_operations)."""
        c, rule = self.config, self.rule
        reruns = [self.keeps_traces and b < NUM_BLOCKS - 1 for b in range(NUM_BLOCKS)]  # a trace's second forward
        return block_operations(c.model.width, self.info.channels, self.info.image_size, 2 * c.train.batch_size,
                                self.head_matrices(), rule.end_to_end, reruns)

    def held_memory(self, blocks: Sequence[int]) -> dict[str, int]:
        """What `blocks` hold during a step of this run (sim.cost.model.held_memory)."""
        c, rule = self.config, self.rule
        dims = feature_dims(c.model.width, self.info.image_size, self.kernels)
        head_params = [sum(params for params, _ in matrices) for matrices in self.head_matrices()]
        return held_memory(c.model.width, self.info.channels, self.info.image_size, 2 * c.train.batch_size, blocks,
                           head_params, rule.end_to_end or rule.needs_feedback, pending=self.pending_batches(blocks),
                           trace_dims=dims if self.keeps_traces else None)

    def pending_batches(self, blocks: Sequence[int]) -> int:
        """The most batches `blocks` keep at once while they wait for feedback: their delay + 1; free-running,
        what the simulation of their groups finds (sim.pipeline.free_running.most_pending)."""
        if self.free_running is None:
            return max(self.feedback_delays()) + 1
        groups = self.free_running.groups
        found = most_pending(self.free_running)
        return max(found[g] for g, group in enumerate(groups) if set(group) & set(blocks))

    def microbatch_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """BP pipeline: (input, output) shape of one micro-batch on `rank`, rows first."""
        rows = 2 * self.config.train.batch_size // self.pipeline.microbatches
        side = self.info.image_size
        given = (self.info.channels, side, side) if rank == 0 else self.shapes.activations[rank - 1][1:]
        made = self.shapes.feedback[1:] if rank == self.stages - 1 else self.shapes.activations[rank][1:]
        return (rows, *given), (rows, *made)

    def describe(self, steps: int, device: torch.device, images: int) -> str:
        c = self.config
        text = (f"{self.rule.name} on {self.info.name} ({images:,} images), width {c.model.width}, "
                f"batch {c.train.batch_size}, {steps:,} steps, device {device}, {torch.get_num_threads()} threads")
        if self.pipeline is not None:
            return (text + f"\nBP pipeline: {self.pipeline.schedule}, {self.pipeline.microbatches} micro-batches, "
                    f"{self.world_size} process(es), blocks per rank {self.placement}")
        if self.replicas > 1:
            text += (f"\n{self.mesh} = {self.world_size} processes: each replica takes {c.train.batch_size} of the "
                     f"step's {self.replicas * c.train.batch_size} images, gradients averaged over the replicas")
        feedback = self.feedback_text()
        if self.free_running is not None:
            setup = self.free_running
            where = "simulated in this process" if self.stages == 1 else "one group per process"
            return (text + f"\nfree-running block groups {[list(g) for g in setup.groups]} (speeds "
                    f"{list(setup.block_speed)}, {setup.policy} mailbox of depth {setup.depth}, jitter "
                    f"{setup.jitter}), {where}" + (f"; {feedback}" if feedback else ""))
        if self.stages > 1:
            per = " per replica" if self.replicas > 1 else ""
            text += (f"\n{self.stages} processes{per}, blocks per rank {self.placement}, "
                     f"schedule {self.schedule.name}")
            text += f", {feedback}" if feedback else ""
        elif feedback:
            text += f"\n{feedback}"
        return text

    def feedback_text(self) -> str:
        """How top-down feedback is timed, with each block's delay; "" for rules without feedback."""
        if not self.rule.needs_feedback:
            return ""
        if self.free_running is not None:
            return "feedback when the top group sends it (free-running: its delay is recorded, not set)"
        delay = self.config.sim.feedback_delay
        kind = (f"feedback delayed {delay} steps" if delay > 0 else "exact feedback" if delay == 0 else
                f"{self.schedule.feedback} feedback")
        return f"{kind} (delay in steps per block: {self.feedback_delays()})"

    def encoder_table(self) -> str:
        """Each block's output shape, parameters, cost, pooling and loss, as a table."""
        width, rule = self.config.model.width, self.rule
        dims = feature_dims(width, self.info.image_size, self.kernels)
        lines = ["block  output (C,H,W)    conv params   MMAC/img  pool  loss on D features from contexts"]
        for report, kernel, dim in zip(describe_encoder(width, self.info.channels, self.info.image_size),
                                       self.kernels, dims):
            has_loss = report.index == NUM_BLOCKS - 1 or not rule.end_to_end
            loss = f"D = {dim:,} ({', '.join(rule.contexts)})" if has_loss else "- (gradient from the top)"
            if rule.reads_preactivation:  # the loss reads the map before the ReLU: no pooling, no context
                c, side = report.output_shape[0], map_sizes(self.info.image_size)[report.index]
                loss, kernel = f"goodness of the conv map, {c} x {side * 2 if MAXPOOL[report.index] else side}^2", "-"
            lines.append(f"{report.index:>5}  {report.output_shape!s:<16} {report.conv_params:>11,}  "
                         f"{report.macs_per_image / 1e6:>8.1f}  {kernel:>4}  {loss}")
        return "\n".join(lines)


def make_plan(config: Config, world_size: int, *, pipeline: PipelineSettings | None = None) -> Plan:
    """The run's plan for `world_size` processes (sim.replicas R x K stages); a placement that does not
    fit fails here.

    `pipeline`: an end-to-end method split over the ranks with back-propagation between them (the
    BP pipeline engine); without it end-to-end methods run in one process only."""
    rule, info = get_rule(config.method), dataset_info(config.data.name)
    coded = [key for key in ("codec", "codec_feedback") if getattr(config.sim, key) != "fp32"]
    if coded and rule.end_to_end:
        raise ConfigError(f"sim.{coded[0]} = {getattr(config.sim, coded[0])!r} codes the messages of local rules; "
                          f"{rule.name} is end-to-end backprop (its messages stay float32): leave it at 'fp32'")
    if config.sim.schedule == ASYNC:
        return _free_running_plan(config, rule, info, world_size)
    replicas = config.sim.replicas
    if pipeline is not None and replicas > 1:
        raise ConfigError(f"sim.replicas = {replicas}: the BP pipeline (launch.bp_pipeline) runs one replica; set "
                          "sim.replicas = 1, or train the method with launch.train on R processes (one per replica)")
    stages = stages_of(world_size, replicas)  # K: the processes of one replica
    if pipeline is not None:
        check_pipeline(config, rule, pipeline, stages)
    elif rule.end_to_end and stages > 1:
        if replicas > 1:
            raise ConfigError(f"{rule.name} is end-to-end backprop: it runs in one process per replica, not "
                              f"{stages}: launch {replicas} processes for sim.replicas = {replicas}")
        raise ConfigError(f"{rule.name} is end-to-end backprop: it runs in one process, not {stages} "
                          "(launch it with python -m launch.train, or pipelined with launch.bp_pipeline)")
    kernels = pool_kernels(rule, info.image_size, config.rule.pool or None)
    dims = feature_dims(config.model.width, info.image_size, kernels)
    check_fits_in_memory(config, rule, info, dims)
    placement = _placement(config, rule, info, dims, stages)
    waits = tuple(rule.needs_feedback and r < stages - 1 for r in range(stages))
    aligns = config.log.every > 0 and not rule.end_to_end  # BP-SSL's update is the BP gradient itself
    if config.sim.feedback_delay > 0 and not rule.needs_feedback:
        raise ConfigError(f"sim.feedback_delay = {config.sim.feedback_delay}: {rule.name} has no top-down feedback to "
                          "delay; use a rule with a top context (clapp_pp_dfb, clapp_pp_both), or leave it at -1")
    try:
        schedule = Schedule(config.sim.schedule, config.sim.feedback, waits, config.train.checkpoint_every,
                            config.log.every if pipeline is None else 0, config.log.align_every if aligns else 0,
                            feedback_delay=config.sim.feedback_delay)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    rows = 2 * config.train.batch_size
    channels, sizes = block_channels(config.model.width), map_sizes(info.image_size)
    activations = tuple((rows, channels[g[-1]], sizes[g[-1]], sizes[g[-1]]) for g in placement.groups)
    return Plan(config, rule, info, kernels, placement, schedule,
                MessageShapes(activations, (rows, dims[NUM_BLOCKS - 1])), pipeline)


def _free_running_plan(config: Config, rule: Rule, info: DatasetInfo, world_size: int) -> Plan:
    """sim.schedule = "async": on one process, every block here and the groups of sim.placement (one
    group per block with "auto") simulated on a virtual clock; on K processes, one group per process."""
    if rule.end_to_end:
        raise ConfigError(f"{rule.name} is end-to-end backprop: its blocks cannot run free of each other; "
                          "sim.schedule = 'async' takes a local rule")
    if config.sim.replicas > 1:
        raise ConfigError("sim.schedule = 'async' runs one replica: set sim.replicas = 1")
    kernels = pool_kernels(rule, info.image_size, config.rule.pool or None)
    dims = feature_dims(config.model.width, info.image_size, kernels)
    check_fits_in_memory(config, rule, info, dims)
    costs = _block_costs(config, rule, info, dims)
    times = config.sim.block_time or costs
    if world_size > 1:
        placement = _placement(config, rule, info, dims, world_size)
        groups = [list(g) for g in placement.groups]
    else:
        if config.sim.pace_s:
            raise ConfigError(f"sim.pace_s = {config.sim.pace_s} paces real processes; one process simulates the "
                              "groups on a virtual clock: leave it at 0, or launch one process per group")
        placement = check_groups([list(range(NUM_BLOCKS))], 1)
        groups = config.sim.placement if isinstance(config.sim.placement, list) else [[b] for b in range(NUM_BLOCKS)]
    try:
        check_groups(groups, len(groups))
        setup = FreeRunning(tuple(map(tuple, groups)), tuple(t / sum(times) for t in times),
                            tuple(config.sim.block_speed or [1.0] * NUM_BLOCKS),
                            tuple(rule.needs_feedback and g < len(groups) - 1 for g in range(len(groups))),
                            config.sim.mailbox_depth, config.sim.mailbox, config.sim.speed_jitter, config.train.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    # no grid (the engines send what they send); the log's rows at the batches the first group logs
    schedule = Schedule("pipelined", "exact", (False,) * world_size, log_every=config.log.every)
    rows = 2 * config.train.batch_size
    channels, sizes = block_channels(config.model.width), map_sizes(info.image_size)
    shapes = MessageShapes(tuple((rows, channels[g[-1]], sizes[g[-1]], sizes[g[-1]]) for g in placement.groups),
                           (rows, dims[NUM_BLOCKS - 1]))
    return Plan(config, rule, info, kernels, placement, schedule, shapes, free_running=setup)


def check_pipeline(config: Config, rule: Rule, pipeline: PipelineSettings, world_size: int) -> None:
    """Everything about a BP pipeline request that can be wrong, before any process group exists."""
    if not rule.end_to_end:
        end_to_end = ", ".join(name for name, r in RULES.items() if r.end_to_end)
        raise ConfigError(f"method = {config.method!r} learns locally: the BP pipeline trains end-to-end methods "
                          f"({end_to_end}); run local methods with launch.train")
    schedule, count, batch = pipeline.schedule, pipeline.microbatches, config.train.batch_size
    if schedule not in PIPELINE_SCHEDULES:
        raise ConfigError(f"--schedule {schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}")
    if count < 1 or batch % count:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ConfigError(f"train.batch_size = {batch} is not divisible by --microbatches {count}: "
                          f"use one of {divisors}, or another batch size")
    if batch // count < 2:
        raise ConfigError(f"--microbatches {count} leaves {batch // count} image per micro-batch; each needs at "
                          f"least 2 (negatives come from other images): use at most {batch // 2}")
    if schedule == "1f1b" and count < world_size:
        raise ConfigError(f"1F1B needs at least as many micro-batches as processes: --microbatches {count} "
                          f"with {world_size} processes; use --microbatches {world_size} or more, or gpipe")
    if config.train.steps == 0 and config.train.epochs == 0:
        raise ConfigError("train.steps and train.epochs are both 0: nothing to train; give --steps N")


def check_fits_in_memory(config: Config, rule: Rule, info: DatasetInfo, dims: list[int]) -> None:
    """Refuse a model whose weights and AdamW state alone exceed this machine's memory (a width typo:
    1e3 for 1e-3), before anything is allocated. Activations come on top: this is a floor."""
    convs = sum(r.conv_params for r in describe_encoder(config.model.width, info.channels, info.image_size))
    heads = sum(params for matrices in _head_matrices(rule, config, dims) for params, _ in matrices)
    needed = 4 * 4 * (convs + heads)  # float32 weights, gradients and AdamW's two moments
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says: do not guess
        return
    if needed > memory:
        raise ConfigError(f"model.width = {config.model.width} needs about {needed / 2**30:,.0f} GiB for its weights "
                          f"and optimiser state alone; this machine has {memory / 2**30:,.0f} GiB: use a smaller width")


def _head_matrices(rule: Rule, config: Config, dims: list[int]) -> list[list[HeadMatrix]]:
    """Per block, the weight matrices of its heads, as the rule makes them (on the meta device: no memory),
    with their passes per step: the rule's (Rule.head_passes) for the first matrix of each head, 3 for the
    ones after it (their input takes a gradient); none for the blocks without a loss of their own (below the
    top of an end-to-end rule)."""
    found = []
    for i, dim in enumerate(dims):
        if i < NUM_BLOCKS - 1 and rule.end_to_end:
            found.append([])
            continue
        with torch.device("meta"):
            heads = rule.make_heads(dim, dims[-1], config.rule)
        found.append([(p.numel(), rule.head_passes if k == 0 else 3)
                      for head in heads.values() for k, p in enumerate(head.parameters())])
    return found


def _placement(config: Config, rule: Rule, info: DatasetInfo, dims: list[int], world_size: int) -> Placement:
    """The placement on the `world_size` processes of one replica."""
    groups, replicas = config.sim.placement, config.sim.replicas
    if isinstance(groups, list) and replicas > 1 and len(groups) != world_size:
        raise PlacementError(f"sim.placement has {len(groups)} groups, but {replicas * world_size} processes with "
                             f"sim.replicas = {replicas} make {world_size} per replica: launch "
                             f"{replicas * len(groups)} processes, or give {world_size} groups, or use "
                             "sim.placement = \"auto\"")
    if isinstance(groups, list):
        return check_groups(groups, world_size)
    return balanced_placement(_block_costs(config, rule, info, dims), world_size)


def _block_costs(config: Config, rule: Rule, info: DatasetInfo, dims: list[int]) -> list[float]:
    """The cost model's estimate of each block's training step (sim.cost.model.estimated_block_costs)."""
    return estimated_block_costs(config.model.width, info.channels, info.image_size,
                                 _head_matrices(rule, config, dims))
