"""Fixed sin-cos and conditional (depthwise-conv) position encodings."""

from __future__ import annotations

import torch
from torch import nn


def sincos_table(grid, channels: int, temperature: float = 10000.0) -> torch.Tensor:
    """(prod(grid), channels): sin of every axis, then cos of every axis (timm's build_sincos2d_pos_embed)."""
    d = len(grid)
    bands = channels // (2 * d)
    omega = 1.0 / (temperature ** (torch.arange(bands, dtype=torch.float64) / bands))
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in grid], indexing="ij"))
    pos = coords.flatten(1).T[:, :, None] * omega  # (N, d, bands)
    return torch.stack([pos.sin(), pos.cos()], dim=1).flatten(1).float()  # (N, 2 * d * bands)


class SinusoidalPos(nn.Module):
    def __init__(self, grid, channels: int, temperature: float = 10000.0, skip: int = 0):
        super().__init__()
        self.register_buffer("pos", sincos_table(tuple(grid), channels, temperature)[None], persistent=False)
        self.skip = skip

    def forward(self, x):
        if self.skip:
            return torch.cat([x[:, : self.skip], x[:, self.skip :] + self.pos.to(x.dtype)], dim=1)
        return x + self.pos.to(x.dtype)


class FourierFeatures(nn.Module):
    """(B, channels, *grid) or (B, N, channels): sin/cos features of the positions of the grid it
    gets (cached per grid)."""

    takes_grid = True

    def __init__(self, channels, ndim, temperature, normalize, scale, eps, channel_first, grid):
        super().__init__()
        self.channels, self.ndim, self.temperature = channels, ndim, temperature
        self.normalize, self.scale, self.eps, self.channel_first = normalize, scale, eps, channel_first
        self.grid, self._cache = tuple(grid), {}

    def table(self, grid, like) -> torch.Tensor:
        key = (tuple(int(g) for g in grid), like.device, like.dtype)
        found = self._cache.get(key)
        if found is None:
            per = self.channels // self.ndim
            j = torch.arange(per, dtype=torch.float32)
            freq = self.temperature ** (2 * torch.div(j, 2, rounding_mode="floor") / per)
            axes = []
            for a, g in enumerate(key[0]):
                p = torch.arange(1, g + 1, dtype=torch.float32)
                if self.normalize:
                    p = p / (g + self.eps) * self.scale
                angle = p[:, None] / freq  # (g, per)
                f = torch.where(j.long() % 2 == 0, angle.sin(), angle.cos())
                shape = [1] * self.ndim + [per]
                shape[a] = g
                axes.append(f.view(shape).expand(*key[0], per))
            found = self._cache[key] = torch.cat(axes, -1).to(like.device, like.dtype)  # (*grid, channels)
        return found

    def forward(self, x, grid=None):
        grid = tuple(x.shape[2:]) if self.channel_first else (self.grid if grid is None else grid)
        t = self.table(grid, x)
        if self.channel_first:
            return t.movedim(-1, 0).unsqueeze(0).expand(x.shape[0], *t.movedim(-1, 0).shape)
        return t.reshape(1, -1, self.channels).expand(x.shape[0], -1, -1)


class ConvPos(nn.Module):
    """`x + proj(x)` with `proj` a depthwise conv; on tokens the grid (given at run time) is folded,
    the prefix passes."""

    takes_grid = True

    def __init__(self, channels: int, kernel: int, grid, skip: int = 0, tokens: bool = True):
        super().__init__()
        self.grid, self.skip, self.tokens = tuple(grid), skip, tokens
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(self.grid) - 1]
        self.proj = conv(channels, channels, kernel, 1, kernel // 2, groups=channels, bias=True)

    def forward(self, x, grid=None):
        if not self.tokens:
            return x + self.proj(x)
        prefix, body = x[:, : self.skip], x[:, self.skip :]
        b, n, c = body.shape
        fmap = body.transpose(1, 2).reshape(b, c, *(self.grid if grid is None else grid))
        body = body + self.proj(fmap).flatten(2).transpose(1, 2)
        return torch.cat([prefix, body], dim=1) if self.skip else body
