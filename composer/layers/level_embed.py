"""The module of composer/ops/level_embed.py: a learned vector added to every token of each level."""

from __future__ import annotations

import torch
from torch import nn


class LevelEmbed(nn.Module):
    """(B, N, C) -> (B, N, C): row l of `embed` (levels, C) added to the tokens of level l."""

    def __init__(self, channels: int, sizes, std: float = 1.0):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(len(sizes), channels))
        if std > 0:
            nn.init.normal_(self.embed, std=std)
        else:
            nn.init.zeros_(self.embed)
        index = [level for level, n in enumerate(sizes) for _ in range(n)]
        self.register_buffer("level_index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x):
        return x + self.embed[self.level_index].to(x.dtype)

    def extra_repr(self) -> str:
        return f"levels={self.embed.shape[0]}, tokens={self.level_index.numel()}"
