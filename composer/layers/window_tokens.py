"""Modules of the per-window prefix tokens (composer/ops/window_tokens.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .core import built_on_cpu, trunc_normal_


def _tiles(grid, period) -> torch.Tensor:
    """(windows,) the learned token of every window: its coordinates modulo `period`, row-major."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")).flatten(1)
    index = torch.zeros(coords.shape[1], dtype=torch.long)
    for d in range(len(grid)):
        index = index * period + coords[d] % period
    return index


class WindowTokens(nn.Module):
    """(B, N, C) -> (B, windows + N, C): learned tokens, one per window, ahead of the grid."""

    def __init__(self, channels, grid, period=0, std=0.02):
        super().__init__()
        count = period ** len(grid) if period else math.prod(grid)
        self.tokens = nn.Parameter(trunc_normal_(torch.empty(count, channels), std))
        self.register_buffer("tile_index", _tiles(grid, period) if period else None, persistent=False)

    def forward(self, x):
        t = self.tokens if self.tile_index is None else self.tokens[self.tile_index]
        return torch.cat([t.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x], 1)


@built_on_cpu
def shuffle_index(grid, region) -> torch.Tensor:
    """(windows * G,) source piece of every (token, channel group) piece: in each region block,
    token at block position a, group b <- token at block position b, group a."""
    ndim = len(grid)
    g = region ** ndim
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in grid], indexing="ij")).flatten(1)  # (d, W)
    flat = torch.arange(coords.shape[1])
    block = torch.zeros_like(flat)
    pos = torch.zeros_like(flat)
    for d, s in enumerate(grid):
        block = block * (s // region) + coords[d] // region
        pos = pos * region + coords[d] % region
    token = torch.empty(int(block.max()) + 1, g, dtype=torch.long)
    token[block, pos] = flat  # the window at (block, position)
    index = torch.empty(coords.shape[1] * g, dtype=torch.long)
    for a in range(g):
        for b in range(g):
            index[token[:, a] * g + b] = token[:, b] * g + a
    return index


class ShuffleWindowTokens(nn.Module):
    """Channel groups exchanged between the prefix tokens of the windows of each region block."""

    def __init__(self, grid, region):
        super().__init__()
        self.windows, self.groups = math.prod(grid), region ** len(grid)
        self.register_buffer("shuffle_index", shuffle_index(grid, region), persistent=False)

    def forward(self, x):
        if self.groups == 1:
            return x
        b, _, c = x.shape
        w = self.windows
        m = x[:, :w].reshape(b, w * self.groups, c // self.groups)[:, self.shuffle_index].reshape(b, w, c)
        return torch.cat([m, x[:, w:]], 1)
