"""The networks of the theory (method.md, section 5): deep MLPs and a linear CNN.

Both return the activity of every layer, so that a local update and the BP update of the same
weight can be compared. Weights are plain parameters in `weights` (one per layer, the update the
theory is about); an optional bias is not part of the comparison.

Initialisations:
- `orthogonal`: `nn.init.orthogonal_` on the weight viewed as (out, in): an orthogonal matrix when
  square, orthonormal rows when it shrinks (semi-orthogonal), orthonormal columns when it grows;
- `default`: PyTorch's own `nn.Linear` / `nn.Conv2d` initialisation, U(-1/sqrt(fan_in), +1/sqrt(fan_in)).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("orthogonal", "default")
ACTIVATIONS = ("linear", "relu")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _init_(weight: torch.Tensor, bias: torch.Tensor | None, init: str, generator: torch.Generator) -> None:
    fan_in = weight[0].numel()
    with torch.no_grad():
        if init == "orthogonal":
            nn.init.orthogonal_(weight, generator=generator)  # flattens to (out, in) itself
        else:  # what nn.Linear and nn.Conv2d do: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ...)
            weight.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)
        if bias is not None:
            bias.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=generator)


def _activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(a) if activation == "relu" else a


class TheoryMLP(nn.Module):
    """h^l = rho(W^l h^{l-1} [+ b^l]), l = 1..L, with rho the identity or a ReLU on every layer
    (the top one included, as in the authors' MLP). `widths` are D_1..D_L."""

    def __init__(self, input_dim: int, widths: Sequence[int], activation: str = "linear",
                 init: str = "orthogonal", bias: bool = False, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("init", init, INITS)
        if not widths or min(widths) < 1 or input_dim < 1:
            raise ValueError(f"widths {list(widths)} and input_dim {input_dim} must be positive")
        self.activation, self.init = activation, init
        generator = torch.Generator().manual_seed(seed)
        dims = [input_dim, *widths]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(d_out, d_in, dtype=dtype)) for d_in, d_out in pairwise(dims))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(d, dtype=dtype)) for d in widths) if bias else None
        for l, weight in enumerate(self.weights):
            _init_(weight, None if self.biases is None else self.biases[l], init, generator)

    @property
    def widths(self) -> list[int]:
        return [w.shape[0] for w in self.weights]

    def forward(self, x: torch.Tensor, first: int = 0, detach: bool = False) -> list[torch.Tensor]:
        """x (N, D_0) -> [h^1 (N, D_1), ..., h^L (N, D_L)]. With `first` = l, x is h^l and only
        layers l+1..L run (the map from layer l to the top, used by the theorem's M). `detach`
        cuts the gradient between layers, as local learning does."""
        activities, h = [], x
        for l in range(first, len(self.weights)):
            weight, bias = self.weights[l], None if self.biases is None else self.biases[l]
            h = _activate(F.linear(h.detach() if detach else h, weight, bias), self.activation)  # (N, D_l)
            activities.append(h)
        return activities


class TheoryCNN(nn.Module):
    """Convolutions with kernel k and stride k (non-overlapping patches), no bias, no padding:
    each layer halves the map for k = 2. The paper's Fig. 4 network: 4 layers x 32 channels on
    16 px crops, maps 8, 4, 2, 1."""

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (32, 32, 32, 32), kernel: int = 2,
                 activation: str = "linear", init: str = "orthogonal", seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("init", init, INITS)
        self.activation, self.init, self.kernel = activation, init, kernel
        generator = torch.Generator().manual_seed(seed)
        dims = [in_channels, *channels]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(c_out, c_in, kernel, kernel, dtype=dtype))
            for c_in, c_out in pairwise(dims))
        for weight in self.weights:
            _init_(weight, None, init, generator)

    def map_sizes(self, input_size: int) -> list[int]:
        """Side of every layer's output map for square inputs of side `input_size`."""
        sizes, side = [], input_size
        for l in range(len(self.weights)):
            if side % self.kernel:
                raise ValueError(f"layer {l + 1} gets a {side} px map that kernel {self.kernel} does "
                                 f"not divide; use inputs of {self.kernel ** len(self.weights)} px")
            side //= self.kernel
            sizes.append(side)
        return sizes

    def forward(self, x: torch.Tensor, first: int = 0) -> list[torch.Tensor]:
        """x (N, C_0, S, S) -> [h^l (N, C_l, S / k^l, S / k^l) for l = 1..L]; with `first` = l, x
        is h^l and only layers l+1..L run."""
        activities, h = [], x
        for weight in list(self.weights)[first:]:
            h = _activate(F.conv2d(h, weight, stride=self.kernel), self.activation)  # (N, C_l, H_l, W_l)
            activities.append(h)
        return activities


def pool_features(activity: torch.Tensor, kernel: int) -> torch.Tensor:
    """What a layer's loss sees, as in `layers.block.Block.features`: an MLP activity as it is; a
    map average-pooled with kernel = stride `kernel` and flattened (C, y, x). Kernel 1 keeps the
    whole map ("2D spatial dependence" without pooling); kernel = the map side is global pooling."""
    if activity.dim() == 2:
        return activity  # (N, D)
    side = activity.shape[-1]
    if kernel < 1 or side % kernel:
        raise ValueError(f"pooling kernel {kernel} does not divide a {side} px map; use a divisor of {side}")
    return F.avg_pool2d(activity, kernel).flatten(1)  # (N, C * (side / kernel)^2)
