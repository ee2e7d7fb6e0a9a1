"""The module of `rotary` (composer/ops/rotary.py): rotary position embeddings on heads
(B, heads, N, d) or tokens (B, N, d), the angles computed for the grid seen at run time."""

from __future__ import annotations

import math

import torch
from torch import nn


class Rotary(nn.Module):
    takes_grid = True

    def __init__(self, width: int, axes: int, base: float, half: bool, xy: bool, offset: float,
                 reference, prefix: int, grid):
        super().__init__()
        self.width, self.axes, self.base, self.half, self.xy = width, axes, base, half, xy
        self.offset, self.prefix = offset, prefix
        self.reference = tuple(reference) if reference is not None else None
        self.grid = tuple(grid)  # the build grid: used when called without one
        self._cache: dict = {}

    def bands(self, device) -> torch.Tensor:
        n = self.width // (2 * self.axes)  # frequencies per axis
        return 1.0 / (self.base ** (torch.arange(n, device=device, dtype=torch.float32) / n))

    def coordinates(self, grid: tuple, device) -> torch.Tensor:
        """(N, axes): each grid token's position along every axis (axes = 1: its flat index)."""
        sizes = (math.prod(grid),) if self.axes == 1 else tuple(grid)
        ts = [torch.arange(s, device=device, dtype=torch.float32) + self.offset for s in sizes]
        if self.reference is not None:
            ts = [t / s * r for t, s, r in zip(ts, sizes, self.reference)]
        if len(ts) == 1:
            return ts[0][:, None]
        coords = torch.stack(torch.meshgrid(*ts, indexing="ij"), dim=-1).reshape(-1, len(ts))
        if self.xy:  # columns before rows
            coords = coords[:, [1, 0, *range(2, len(ts))]]
        return coords

    def angles(self, grid: tuple, device):
        key = (grid, device)
        hit = self._cache.get(key)
        if hit is None:
            theta = (self.coordinates(grid, device)[:, :, None] * self.bands(device)).flatten(1)  # (N, d/2)
            hit = self._cache[key] = (theta.cos(), theta.sin())
        return hit

    def rotate(self, x, cos, sin):
        if self.half:
            a, b = x.chunk(2, dim=-1)
            return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    def forward(self, x, grid=None):
        p = self.prefix
        n = x.shape[-2] - p
        grid = tuple(grid) if grid is not None else self.grid
        if self.axes == 1:
            grid = (n,)
        elif math.prod(grid) != n:
            raise RuntimeError(f"rotary: {n} grid tokens do not lie on the grid {grid}")
        cos, sin = self.angles(grid, x.device)
        body = x[..., p:, :] if p else x
        out = self.rotate(body, cos, sin).to(x.dtype)
        return torch.cat([x[..., :p, :], out], dim=-2) if p else out

    def extra_repr(self) -> str:
        ref = f", reference={list(self.reference)}" if self.reference else ""
        return (f"axes={self.axes}, base={self.base:g}, pairs={'halves' if self.half else 'interleaved'}"
                f"{', xy' if self.xy else ''}{', offset=%g' % self.offset if self.offset else ''}{ref}"
                f"{f', {self.prefix} prefix tokens unrotated' if self.prefix else ''}")
