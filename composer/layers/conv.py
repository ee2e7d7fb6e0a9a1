"""Convolutions with TensorFlow's SAME padding (the `conv` op's `padding="same"` where the padding
is asymmetric): the input is zero-padded by `max((ceil(size / stride) - 1) * stride +
dilation * (kernel - 1) + 1 - size, 0)` per spatial dim, the extra pixel at the end, then
convolved unpadded. The padding is computed from the input's size on every call, so the module
works at any resolution; its parameters are those of the plain `nn.ConvNd`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _same_pads(size, kernel, stride, dilation) -> list[int]:
    """`F.pad`'s argument (last dim first) for TF-SAME padding."""
    pads = []
    for g, k, s, d in zip(size, kernel, stride, dilation):
        total = max((-(-g // s) - 1) * s + d * (k - 1) + 1 - g, 0)
        pads.append((total // 2, total - total // 2))
    return [p for pair in reversed(pads) for p in pair]


class _SamePad:
    def forward(self, x):
        x = F.pad(x, _same_pads(x.shape[2:], self.kernel_size, self.stride, self.dilation))
        return super().forward(x)


class SameConv1d(_SamePad, nn.Conv1d):
    """`nn.Conv1d` with TF-SAME padding."""


class SameConv2d(_SamePad, nn.Conv2d):
    """`nn.Conv2d` with TF-SAME padding."""


class SameConv3d(_SamePad, nn.Conv3d):
    """`nn.Conv3d` with TF-SAME padding."""


def same_conv(ndim: int) -> type:
    return (SameConv1d, SameConv2d, SameConv3d)[ndim - 1]


class PointwiseConv2d(nn.Conv2d):
    """`nn.Conv2d` with a 1x1 kernel (stride 1, no padding, one group). On an input whose channels
    are its last axis in memory (a channels-last map: tokens folded into a map by `to_map`, or a
    model converted to `torch.channels_last`) it runs as the linear map it is, over that axis: the
    CPU's convolution copies such an input to channels-first and its output back (1.2-1.5x slower)."""

    def forward(self, x):
        if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.movedim(1, -1), self.weight.flatten(1), self.bias).movedim(-1, 1)
        return super().forward(x)
