"""Message codecs: what a block's output and the top block's context become on the wire (issue 25).

`sim.codec` codes every block's output on its way to the next block, `sim.codec_feedback` the top
block's context on its way down; the held-out and alignment passes of the log stay float32 (they
observe, they do not learn). Every block-to-block message is coded, whether its two blocks share a
process or not: in one process the encode and decode run in place, on K processes the packed tensors
travel and the receiver decodes them; the numbers are the same, so 1 and K processes give the same
weights bit for bit with any codec.

- `fp32`: as computed (nothing is packed). `fp16`, `bf16`: the cast.
- `int8`, `int4`: one scale per tensor, max |x| / 127 (or / 7), and stochastic rounding to the
  levels: floor(x / scale + u) with u uniform in [0, 1), so the decoded value is x on average;
  int4 packs two values per byte.
- `spike`: each value is one seeded Bernoulli spike with rate x / max x (values must be >= 0, as
  ReLU outputs and their pooled context are), eight per byte, plus the scale; decoded as spike x max,
  whose expectation is x.
The random draws come from (seed, block, step) (the feedback: block -1), so they do not depend on
who codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from layers.seeding import STREAM_CODEC, keyed_generator

CODECS = ("fp32", "fp16", "bf16", "int8", "int4", "spike")
_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "spike": 1}
_LEVELS = {"int8": 127, "int4": 7}
_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
FEEDBACK = -1  # the block index of the feedback's random draws


@dataclass(frozen=True)
class Codec:
    name: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"codec {self.name!r} is not one of {', '.join(CODECS)}")

    @property
    def bits(self) -> int:
        """Bits per value on the wire (the scale of int8, int4 and spike comes on top: 4 bytes a tensor)."""
        return _BITS[self.name]

    def encode(self, x: torch.Tensor, seed: int, block: int, step: int) -> list[torch.Tensor]:
        """The tensors that travel for `x` (float32), block `block`'s message of batch `step`."""
        x = x.detach()
        if self.name == "fp32":
            return [x]
        if self.name in _CASTS:
            return [x.to(_CASTS[self.name])]
        scale = x.abs().amax().float().reshape(1)
        if self.name == "spike":
            if bool((x < 0).any()):
                raise ValueError("sim.codec = 'spike' sends values >= 0 (ReLU outputs, their pooled context); this "
                                 "message has negative values: use int8 or int4")
            rate = x / scale.clamp_min(torch.finfo(torch.float32).tiny)
            return [_pack_bits(_uniform(x, seed, block, step) < rate), scale]
        levels = _LEVELS[self.name]
        step_size = (scale / levels).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.floor(x / step_size + _uniform(x, seed, block, step)).clamp_(-levels, levels)
        if self.name == "int8":
            return [q.to(torch.int8), scale]
        return [_pack_nibbles((q + 8).to(torch.uint8)), scale]

    def decode(self, packed: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 message of `shape` that `packed` carries."""
        if self.name == "fp32":
            return packed[0]
        if self.name in _CASTS:
            return packed[0].float()
        data, scale = packed
        count = math.prod(shape)
        if self.name == "spike":
            return (_unpack_bits(data, count).float() * scale).reshape(shape)
        levels = _LEVELS[self.name]
        q = data.float() if self.name == "int8" else _unpack_nibbles(data, count).float() - 8
        return (q * (scale / levels)).reshape(shape)

    def roundtrip(self, x: torch.Tensor, seed: int, block: int, step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(what the receiver decodes, what travels)."""
        packed = self.encode(x, seed, block, step)
        return self.decode(packed, tuple(x.shape)), packed

    def buffers(self, shape: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
        """Empty tensors to receive a message of `shape` into."""
        count = math.prod(shape)
        if self.name == "fp32":
            return [torch.empty(shape, device=device)]
        if self.name in _CASTS:
            return [torch.empty(shape, dtype=_CASTS[self.name], device=device)]
        scale = torch.empty(1, device=device)
        if self.name == "int8":
            return [torch.empty(shape, dtype=torch.int8, device=device), scale]
        per_byte = 2 if self.name == "int4" else 8
        return [torch.empty(-(-count // per_byte), dtype=torch.uint8, device=device), scale]

    def message_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes on the wire for one message of `shape`."""
        return sum(t.numel() * t.element_size() for t in self.buffers(shape, torch.device("meta")))


@dataclass(frozen=True)
class MessageCodecs:
    """The run's two codecs and the seed of their random draws."""
    activations: Codec = Codec()
    feedback: Codec = Codec()
    seed: int = 0

    def output(self, x: torch.Tensor, block: int, step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.activations.roundtrip(x, self.seed, block, step)

    def context(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.feedback.roundtrip(x, self.seed, FEEDBACK, step)


def _uniform(x: torch.Tensor, seed: int, block: int, step: int) -> torch.Tensor:
    """u in [0, 1) of x's shape, from (seed, block, step): the same on every process."""
    return torch.rand(x.shape, generator=keyed_generator(seed, STREAM_CODEC, block, step)).to(x.device)


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack_bits(spikes: torch.Tensor) -> torch.Tensor:
    flat = spikes.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    return (flat.reshape(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(data: torch.Tensor, count: int) -> torch.Tensor:
    return ((data.unsqueeze(1) & _BIT_WEIGHTS.to(data.device)) > 0).flatten()[:count]


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    flat = values.flatten()
    flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
    pairs = flat.reshape(-1, 2)
    return pairs[:, 0] * 16 + pairs[:, 1]


def _unpack_nibbles(data: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([data // 16, data % 16], dim=1).flatten()[:count]
