"""The synthetic image sets: class-structured gratings drawn from a seed, so tests, quick runs and
benchmarks need no files. `sim.data.datasets` registers them as "synthetic", "synthetic_gray" and
"synthetic_96"."""

from __future__ import annotations

import math

import torch

_SYNTHETIC = {"ssl": (5000, 0), "train": (5000, 0), "test": (1000, 1)}  # split: (images, seed)


def make_synthetic(split: str, channels: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic class-structured images: uint8 (N, channels, size, size), int64 (N,) labels.

    Class k is a grating at k * 18 degrees with its own frequency (2 + 0.5 k cycles per image)
    and, in colour, its own tint; a random phase, contrast, a bright or dark blob at a random place
    and pixel noise (the same in every channel) vary within a class. Orientation and frequency
    survive crops, flips and colour jitter well enough for a learned encoder; the phase jitter
    spans half a period only, so the class means stay distinct gratings and even a linear
    classifier on raw pixels beats chance.
    """
    n, seed = _SYNTHETIC[split]
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10  # balanced; row i has class i % 10
    centres = (torch.arange(size) + 0.5) / size  # pixel centres in (0, 1)
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # (S, S) each
    angle = (labels * math.pi / 10)[:, None, None]  # (N, 1, 1)
    freq = (2.0 + 0.5 * labels)[:, None, None]
    phase = torch.rand(n, 1, 1, generator=g) * math.pi
    contrast = 0.2 + 0.15 * torch.rand(n, 1, 1, generator=g)
    along = x * torch.cos(angle) + y * torch.sin(angle)  # (N, S, S) distance along the wave
    img = 0.5 + contrast * torch.cos(2 * math.pi * freq * along + phase)  # (N, S, S)
    spot = torch.rand(n, 2, 1, 1, generator=g)  # blob centre (y, x)
    sign = torch.where(torch.rand(n, 1, 1, generator=g) < 0.5, -1.0, 1.0)
    blob = torch.exp(-((y - spot[:, 0]) ** 2 + (x - spot[:, 1]) ** 2) / (2 * 0.08**2))  # (N, S, S)
    img += 0.25 * sign * blob + 0.04 * torch.randn(img.shape, generator=g)  # noise shared by channels
    img = img.unsqueeze(1)  # (N, 1, S, S)
    if channels == 3:  # tint: three cosines a third of a turn apart, so hue differs per class
        turn = labels[:, None] / 10 + torch.arange(3) / 3  # (N, 3)
        img = img + 0.12 * torch.cos(2 * math.pi * turn)[:, :, None, None]  # (N, 3, S, S)
    # In place from here on: at 3 channels these full passes are most of the time.
    return img.clamp_(0, 1).mul_(255).round_().to(torch.uint8), labels.to(torch.int64)
