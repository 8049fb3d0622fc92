"""Assemble the blocks of a rule: pooling kernels checked against the input size, feature
sizes, B shapes, and a deterministic initialisation per block."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from layers.block import Block
from layers.encoder import GRID, NUM_BLOCKS, block_channels, build_conv_block, map_sizes
from layers.rules.rule import Rule, RuleSettings
from layers.seeding import STREAM_INIT, keyed_seed


class PoolingError(ValueError):
    """A pooling kernel that does not fit a block's output map."""


def grid_kernels(input_size: int) -> list[int]:
    """Kernels that pool every block to the paper's grid (8, 4, 4, 4, 2, 2), e.g. 4-4-4-2-2-1 at 32 px."""
    kernels = []
    for index, (side, grid) in enumerate(zip(map_sizes(input_size), GRID)):
        if side % grid:
            raise PoolingError(
                f"block {index}: its {side}x{side} output map (input {input_size} px) cannot be pooled "
                f"to the {grid}x{grid} grid; use inputs of 32, 64 or 96 px, or set rule.pool explicitly"
            )
        kernels.append(side // grid)
    return kernels


def pool_kernels(rule: Rule, input_size: int, explicit: Sequence[int] | None = None) -> list[int]:
    """The kernel of each block's AvgPool(k, stride k) before its loss, checked against its map.

    End-to-end rules pool only the top block, globally; `explicit` (rule.pool) overrides the
    rule's default for local rules.
    """
    sizes = map_sizes(input_size)
    if rule.end_to_end or (not explicit and rule.pooling == "global"):
        kernels = list(sizes)
    elif not explicit:
        kernels = grid_kernels(input_size)
    else:
        kernels = list(explicit)
    if len(kernels) != NUM_BLOCKS:
        raise PoolingError(f"rule.pool needs {NUM_BLOCKS} kernels, one per block; got {len(kernels)}: {kernels}")
    misfits = [f"block {index} has a {side}x{side} map and kernel {kernel}"
               for index, (side, kernel) in enumerate(zip(sizes, kernels)) if kernel < 1 or side % kernel]
    if misfits:
        suggestion = grid_kernels(input_size) if input_size in (32, 64, 96) else "a divisor of each map"
        raise PoolingError(
            f"rule.pool = {kernels} does not fit {input_size} px inputs: {'; '.join(misfits)} "
            f"(a kernel must divide its map). For {input_size} px use {suggestion}"
        )
    return kernels


def feature_dims(width: float, input_size: int, kernels: Sequence[int]) -> list[int]:
    """Size D of each block's pooled, flattened activity."""
    return [c * (side // k) ** 2 for c, side, k in zip(block_channels(width), map_sizes(input_size), kernels)]


def build_blocks(
    rule: Rule,
    settings: RuleSettings,
    *,
    width: float,
    in_channels: int,
    input_size: int,
    seed: int,
    lr: float,
    weight_decay: float,
    fused_optimizer: bool,
    indices: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> list[Block]:
    """Blocks `indices` (default: all six), each initialised from (seed, block) alone, so a block
    gets the same weights whichever process builds it; each with its AdamW (`fused_optimizer`:
    Block.make_optimizer)."""
    kernels = pool_kernels(rule, input_size, settings.pool or None)
    dims = feature_dims(width, input_size, kernels)
    top = NUM_BLOCKS - 1
    blocks = []
    for index in range(NUM_BLOCKS) if indices is None else indices:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(keyed_seed(seed, STREAM_INIT, index))
            block = Block(
                index=index,
                is_top=index == top,
                conv=build_conv_block(index, width, in_channels),
                pool_kernel=kernels[index],
                feature_dim=dims[index],
                top_feature_dim=dims[top],
                rule=rule,
                settings=settings,
                has_loss=index == top or not rule.end_to_end,
            )
        block.to(device)
        block.make_optimizer(lr, weight_decay, fused_optimizer)
        blocks.append(block)
    return blocks
