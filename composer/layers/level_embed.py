"""The module of composer/ops/level_embed.py: a learned vector added to every token of each level."""

from __future__ import annotations

import math

import torch
from torch import nn

from .deform_attn import level_grids


class LevelEmbed(nn.Module):
    """(B, N, C) -> (B, N, C): row l of `embed` (levels, C) added to the tokens of level l. The level
    sizes follow the grid the sequence lies on at run time (`ratios`: each level's scale relative to
    it, (num, den)); at the build grid `grid` an index table made once picks the rows."""

    takes_grid = True

    def __init__(self, channels: int, sizes, std: float = 1.0, ratios=(), grid=()):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(len(sizes), channels))
        if std > 0:
            nn.init.normal_(self.embed, std=std)
        else:
            nn.init.zeros_(self.embed)
        self.ratios, self.grid = tuple(ratios), tuple(grid)
        index = [level for level, n in enumerate(sizes) for _ in range(n)]
        self.register_buffer("level_index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x, grid=None):
        if grid is None or tuple(grid) == self.grid:
            return x + self.embed[self.level_index].to(x.dtype)
        rows = [self.embed[level].expand(math.prod(g), -1) for level, g in enumerate(level_grids(grid, self.ratios))]
        return x + torch.cat(rows).to(x.dtype)

    def extra_repr(self) -> str:
        return f"levels={self.embed.shape[0]}, tokens={self.level_index.numel()}"
