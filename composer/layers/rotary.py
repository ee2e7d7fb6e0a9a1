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

    def tables(self, grid: tuple, device):
        """(C, S), each (prefix + N, d): `rotate(x) = x * C + swap(x) * S`, swap(x) exchanging the two
        channels of every pair; the prefix rows are C = 1, S = 0 (prefix tokens stay as they are)."""
        key = (grid, device)
        hit = self._cache.get(key)
        if hit is None:
            theta = (self.coordinates(grid, device)[:, :, None] * self.bands(device)).flatten(1)  # (N, d/2)
            cos, sin = theta.cos(), theta.sin()
            if self.half:  # pair j is (j, j + d/2)
                c, s = torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)
            else:  # pair j is (2j, 2j + 1)
                c, s = torch.stack([cos, cos], -1).flatten(1), torch.stack([-sin, sin], -1).flatten(1)
            if self.prefix:
                c = torch.cat([c.new_ones(self.prefix, self.width), c])
                s = torch.cat([s.new_zeros(self.prefix, self.width), s])
            hit = self._cache[key] = (c, s)
        return hit

    def swap(self, x):
        if self.half:
            return x.roll(self.width // 2, dims=-1)  # [b, a] for x = [a, b]
        return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (b, a) in every pair (a, b)

    def forward(self, x, grid=None):
        n = x.shape[-2] - self.prefix
        grid = tuple(grid) if grid is not None else self.grid
        if self.axes == 1:
            grid = (n,)
        elif math.prod(grid) != n:
            raise RuntimeError(f"rotary: {n} grid tokens do not lie on the grid {grid}")
        c, s = self.tables(grid, x.device)
        return (x * c + self.swap(x) * s).to(x.dtype)

    def extra_repr(self) -> str:
        ref = f", reference={list(self.reference)}" if self.reference else ""
        return (f"axes={self.axes}, base={self.base:g}, pairs={'halves' if self.half else 'interleaved'}"
                f"{', xy' if self.xy else ''}{', offset=%g' % self.offset if self.offset else ''}{ref}"
                f"{f', {self.prefix} prefix tokens unrotated' if self.prefix else ''}")
