"""Everything a run derives from its config before any work: the method, the dataset's geometry,
pooling kernels, placement of blocks on ranks, the schedule and the shapes of messages."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from launch.config import Config, ConfigError, to_toml
from layers.block import Block, RuleSettings
from layers.encoder import NUM_BLOCKS, block_channels, map_sizes
from layers.methods import Method, get_method
from layers.model import build_blocks, feature_dims, pool_kernels
from sim.datasets import DatasetInfo, dataset_info
from sim.placement import (
    Placement,
    balanced_placement,
    check_groups,
    estimated_block_costs,
)
from sim.runtime import MessageShapes
from sim.schedule import Schedule


@dataclass(frozen=True)
class Plan:
    config: Config
    method: Method
    info: DatasetInfo
    rule: RuleSettings
    kernels: list[int]
    placement: Placement
    schedule: Schedule
    shapes: MessageShapes

    @property
    def config_toml(self) -> str:
        return to_toml(self.config)

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.config.train.steps > 0:
            return self.config.train.steps
        return round(self.config.train.epochs * steps_per_epoch)  # epochs = 0: an untrained encoder

    def build_blocks(self, indices: Sequence[int], device: torch.device) -> list[Block]:
        """Blocks `indices` as this run trains them: each initialised from (seed, block) alone."""
        c = self.config
        return build_blocks(self.method, c.model.width, self.info.channels, self.info.image_size, self.rule,
                            c.train.seed, c.optim.lr, c.optim.weight_decay, c.rule.pool or None, indices, device)

    def describe(self, steps: int, device: torch.device, images: int) -> str:
        c = self.config
        text = (f"{self.method.name} on {self.info.name} ({images:,} images), width {c.model.width}, "
                f"batch {c.train.batch_size}, {steps:,} steps, device {device}, {torch.get_num_threads()} threads")
        if self.placement.world_size > 1:
            delays = [self.schedule.delay(r) for r in range(self.placement.world_size)]
            text += (f"\n{self.placement.world_size} processes, blocks per rank {self.placement}, "
                     f"schedule {self.schedule.name}")
            if self.method.uses_top_context:
                text += f", {self.schedule.feedback} feedback (delay in steps per rank: {delays})"
        return text


def make_plan(config: Config, world_size: int, pipeline_backprop: bool = False) -> Plan:
    """The run's plan for `world_size` processes; a placement that does not fit fails here.

    `pipeline_backprop`: an end-to-end method split over the ranks with back-propagation between
    them (launch.bp_pipeline); without it end-to-end methods run in one process only."""
    method, info = get_method(config.method), dataset_info(config.data.name)
    if method.end_to_end and world_size > 1 and not pipeline_backprop:
        raise ConfigError(f"{method.name} is end-to-end backprop: it runs in one process, not {world_size} "
                          "(launch it with python -m launch.train)")
    kernels = pool_kernels(method, info.image_size, config.rule.pool or None)
    dims = feature_dims(config.model.width, info.image_size, kernels)
    placement = _placement(config, method, info, dims, world_size)
    waits = tuple(method.uses_top_context and not method.end_to_end and r < world_size - 1 for r in range(world_size))
    aligns = config.log.every > 0 and not method.end_to_end  # BP-SSL's update is the BP gradient itself
    schedule = Schedule(config.sim.schedule, config.sim.feedback, waits, config.train.checkpoint_every,
                        config.log.align_every if aligns else 0)
    rows = 2 * config.train.batch_size
    channels, sizes = block_channels(config.model.width), map_sizes(info.image_size)
    activations = tuple((rows, channels[g[-1]], sizes[g[-1]], sizes[g[-1]]) for g in placement.groups)
    rule = RuleSettings(config.rule.contrast, config.rule.negatives, config.rule.proj_dim, config.rule.temperature)
    return Plan(config, method, info, rule, kernels, placement, schedule,
                MessageShapes(activations, (rows, dims[NUM_BLOCKS - 1])))


def _placement(config: Config, method: Method, info: DatasetInfo, dims: list[int], world_size: int) -> Placement:
    if isinstance(config.sim.placement, list):
        return check_groups(config.sim.placement, world_size)
    contexts = [[dims[i] if s == "lateral" else dims[-1] for s in method.contexts] if not method.end_to_end else []
                for i in range(NUM_BLOCKS)]
    costs = estimated_block_costs(config.model.width, info.channels, info.image_size, dims, contexts)
    return balanced_placement(costs, world_size)
