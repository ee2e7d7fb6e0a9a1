"""Pixel (un)shuffle in any rank, channel shuffle and resizing to a fixed size."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class PixelShuffle(nn.Module):
    """(B, C*f^d, *S) -> (B, C, *S*f); `nn.PixelShuffle`'s element order in 2-D, any rank."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        f, d = self.factor, x.ndim - 2
        b, c, grid = x.shape[0], x.shape[1] // f ** d, x.shape[2:]
        x = x.reshape(b, c, *([f] * d), *grid)
        # (B, C, f_1..f_d, S_1..S_d) -> (B, C, S_1, f_1, ..., S_d, f_d)
        order = [0, 1] + [i for a in range(d) for i in (2 + d + a, 2 + a)]
        return x.permute(order).reshape(b, c, *(s * f for s in grid))

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class PixelUnshuffle(nn.Module):
    """(B, C, *S) -> (B, C*f^d, *S/f), the inverse of `PixelShuffle`."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        f, d = self.factor, x.ndim - 2
        b, c, grid = x.shape[0], x.shape[1], x.shape[2:]
        split = [n for s in grid for n in (s // f, f)]
        x = x.reshape(b, c, *split)  # (B, C, S_1/f, f, ..., S_d/f, f)
        order = [0, 1] + [3 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)]
        return x.permute(order).reshape(b, c * f ** d, *(s // f for s in grid))

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        # (B, g, C/g, ...) -> (B, C/g, g, ...) -> (B, C, ...): one copy, as few calls as torchvision's
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class Resize(nn.Module):
    """(B, C, *S) -> (B, C, *size) with `F.interpolate`, whatever S is (the `resize` op); an input
    that already has the size passes unchanged (as timm's CrossViT scales its branches' images)."""

    def __init__(self, size, mode: str, align_corners: bool | None = None):
        super().__init__()
        self.size, self.mode, self.align_corners = tuple(size), mode, align_corners

    def forward(self, x):
        if tuple(x.shape[2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"
