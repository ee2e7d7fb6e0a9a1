"""Modules of the heads-as-maps fold (composer/ops/head_maps.py)."""

from __future__ import annotations

from torch import nn


class HeadsToBatch(nn.Module):
    """(B, heads, N, d) on a grid -> (B * heads, d, *grid)."""

    takes_grid = True

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x, grid):
        b, h, _, d = x.shape
        return x.transpose(-2, -1).reshape(b * h, d, *grid)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"


class BatchToHeads(nn.Module):
    """(B * heads, d, *grid) -> (B, heads, prod(grid), d); the heads lie on the maps' grid."""

    takes_grid = True

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def out_grid(self, grid):
        return tuple(grid)

    def forward(self, x, grid=None):
        n, d = x.shape[:2]
        return x.reshape(n // self.heads, self.heads, d, -1).transpose(-2, -1)

    def extra_repr(self) -> str:
        return f"heads={self.heads}"
