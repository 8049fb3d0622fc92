"""The paper's VGG-6 encoder, cut into six blocks that can each live in their own process.

Block l is one 3x3 convolution (stride 1, padding 1, with bias), a ReLU and, for blocks 1, 3, 4
and 5, a 2x2 max-pool. No normalisation layers: a block's output depends on its input alone, so
blocks can run on different batches at the same time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Full-width channels and max-pools of the paper's encoder (method.md, section 3).
CHANNELS = (128, 256, 256, 512, 1024, 1024)
MAXPOOL = (False, True, False, True, True, True)
# Side of each block's pooled grid for 2D pooling and for the linear probe (same in every dataset).
GRID = (8, 4, 4, 4, 2, 2)
NUM_BLOCKS = len(CHANNELS)


def block_channels(width: float) -> tuple[int, ...]:
    """Output channels of each block for a width multiplier (1.0 = the paper)."""
    if width <= 0:
        raise ValueError(f"model.width must be positive, got {width}")
    return tuple(max(1, round(c * width)) for c in CHANNELS)


def map_sizes(input_size: int) -> tuple[int, ...]:
    """Side of each block's output map for square inputs of side `input_size`."""
    sizes, side = [], input_size
    for pooled in MAXPOOL:
        side = side // 2 if pooled else side
        if side < 1:
            raise ValueError(f"input of {input_size} px is too small for the {NUM_BLOCKS} blocks of VGG-6")
        sizes.append(side)
    return tuple(sizes)


# On CPUs, oneDNN computes the weight gradient of a 3x3 convolution on small maps at about half
# the speed of one matrix product over the input's 3x3 patches (im2col): at full width, blocks 4
# and 5 (8x8 and 4x4 maps) took 0.71 and 0.52 s of a 7 s step on one thread, against 0.52 and 0.25
# s as a product. Larger maps stay with oneDNN, which is faster there.
PATCH_GRADIENT_MAX_PIXELS = 64


class _Conv3x3(torch.autograd.Function):
    """conv3x3 (stride 1, padding 1, with bias) whose weight gradient is one matrix product:
    dW = dY (C_out, N*H*W) @ patches (N*H*W, C_in*9). The same function as F.conv2d; its
    gradient differs from oneDNN's by float32 rounding only (a test compares them)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=1)  # (N, C_out, H, W)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # end to end only: a local block's input is detached
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=1)
        c_out, c_in = weight.shape[:2]
        patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, c_in * 9)  # (N*H*W, C_in*9)
        rows = grad.flatten(2).transpose(1, 2).reshape(-1, c_out)  # (N*H*W, C_out)
        return grad_x, (rows.t() @ patches).view_as(weight), grad.sum(dim=(0, 2, 3))


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1), with _Conv3x3's weight gradient where it is faster."""
    if x.device.type == "cpu" and x.shape[-1] * x.shape[-2] <= PATCH_GRADIENT_MAX_PIXELS and torch.is_grad_enabled():
        return _Conv3x3.apply(x, weight, bias)
    return F.conv2d(x, weight, bias, padding=1)


class ConvBlock(nn.Module):
    """conv3x3 -> ReLU -> optional 2x2 max-pool, computed as conv3x3 -> max-pool -> ReLU: the two commute
    exactly (the same output and the same gradients, bit for bit), and so the ReLU and its backward pass run
    on the pooled map, a quarter of the size: one full-size gradient fewer in each step's backward."""

    def __init__(self, in_channels: int, out_channels: int, maxpool: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2) if maxpool else nn.Identity()

    def forward(self, x: torch.Tensor, stash_weights: bool = False) -> torch.Tensor:
        """With `stash_weights`, the graph holds a copy of this batch's weights: the weights may
        then be updated in place (by other batches' updates) before this batch's backward pass,
        which still differentiates the function that produced its output."""
        # ReLU in place: neither the convolution's gradient nor the max-pool's needs the map it overwrites
        return F.relu(self.pool(self.preactivation(x, stash_weights)), inplace=True)  # (N, C_out, H', W')

    def preactivation(self, x: torch.Tensor, stash_weights: bool = False) -> torch.Tensor:
        """The convolution's output, before the ReLU: (N, C_out, H, W)."""
        weight, bias = self.conv.weight, self.conv.bias
        if stash_weights:
            weight, bias = weight.clone(), bias.clone()
        return conv3x3(x, weight, bias)


def build_conv_block(index: int, width: float, in_channels: int) -> ConvBlock:
    """Block `index` of VGG-6; `in_channels` is the image's channel count (1 or 3) for block 0."""
    channels = block_channels(width)
    c_in = in_channels if index == 0 else channels[index - 1]
    return ConvBlock(c_in, channels[index], MAXPOOL[index])


@dataclass(frozen=True)
class BlockReport:
    index: int
    output_shape: tuple[int, int, int]  # (C, H, W) for one image
    conv_params: int
    macs_per_image: int  # multiply-accumulates of the convolution, one image, forward


def describe_encoder(width: float, in_channels: int, input_size: int) -> list[BlockReport]:
    """Output shape, parameter count and forward cost of every block, without building it."""
    channels, sizes = block_channels(width), map_sizes(input_size)
    reports, c_in, side_in = [], in_channels, input_size
    for index, (c_out, side) in enumerate(zip(channels, sizes)):
        params = c_out * c_in * 9 + c_out
        macs = c_out * c_in * 9 * side_in * side_in  # the conv runs before the max-pool
        reports.append(BlockReport(index, (c_out, side, side), params, macs))
        c_in, side_in = c_out, side
    return reports
