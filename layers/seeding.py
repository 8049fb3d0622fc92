"""Seeds keyed by (seed, block, step, ...): randomness that does not depend on who runs the work.

A random draw inside block 3 at step 17 comes from the same generator whether the block runs in
a process of its own or shares one with the other five.
"""
from __future__ import annotations

import torch

_MASK = (1 << 64) - 1


def _mix(value: int) -> int:
    # splitmix64 finaliser: nearby keys give unrelated seeds.
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def keyed_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key and their order."""
    state = 0
    for key in keys:
        state = _mix(state ^ (key & _MASK))
    return state >> 1


def keyed_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from `keys`, e.g. keyed_generator(seed, block, step)."""
    return torch.Generator().manual_seed(keyed_seed(*keys))


# Stream tags, so that e.g. data order and block initialisation never share a seed.
STREAM_INIT, STREAM_ORDER, STREAM_VIEWS, STREAM_NEGATIVES, STREAM_PROBE, STREAM_VALIDATION = 1, 2, 3, 4, 5, 6
STREAM_CODEC = 7  # the stochastic rounding and spikes of message codecs (sim.pipeline.codec)
