"""Unfold a map into per-offset patch sequences along the batch, and fold them back (any rank).

Both modules follow the grid they get at run time (`takes_grid`): the unfold reads the map's own
grid and tells the patch grid it puts the tokens on (`out_grid`), as a `PatchGrid` that remembers
the map's grid, so the fold puts the map back on it (resizing it back under `fit="interpolate"`).
Under `fit="fixed"` the builder calls them without a grid and they keep the one they were built for.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


class PatchGrid(tuple):
    """The grid of the patch sequences (one token per patch), with `source`: the map's grid."""

    source: tuple = ()

    def __new__(cls, grid, source):
        out = super().__new__(cls, grid)
        out.source = tuple(source)
        return out


def _patch_grid(grid, size: int, fit: str) -> tuple:
    if fit == "interpolate":
        return tuple(-(-s // size) for s in grid)
    return tuple(s // size for s in grid)


class PatchesToBatch(nn.Module):
    """(B, C, *S) -> (B * p^d, prod(S / p), C); sequence index b * p^d + offset, offset row-major
    inside the patch, tokens row-major over the patch grid. Under `fit="interpolate"` a map whose
    sizes are not multiples of p is first resized up to the next multiples."""

    takes_grid = True

    def __init__(self, size: int, grid, fit: str = "divide"):
        super().__init__()
        self.size, self.grid, self.fit = size, tuple(grid), fit

    def out_grid(self, grid):
        return PatchGrid(_patch_grid(grid, self.size, self.fit), grid)

    def forward(self, x, grid=None):
        p, d = self.size, x.ndim - 2
        if self.fit == "interpolate":
            to = _patch_grid(x.shape[2:], p, self.fit)
            if any(n * p != s for n, s in zip(to, x.shape[2:])):
                x = F.interpolate(x, size=[n * p for n in to], mode=_MODES[d], align_corners=False)
        b, c = x.shape[:2]
        split = [n for s in x.shape[2:] for n in (s // p, p)]
        x = x.reshape(b, c, *split)  # (B, C, n_1, p, ..., n_d, p)
        order = [0] + [3 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)] + [1]
        return x.permute(order).reshape(b * p ** d, -1, c)

    def extra_repr(self) -> str:
        return f"size={self.size}" + (f", fit={self.fit}" if self.fit != "divide" else "")


class BatchToPatches(nn.Module):
    """(B * p^d, prod(n), C) with n the patch grid -> (B, C, *n * p), the inverse of `PatchesToBatch`;
    under `fit="interpolate"` resized back to the grid the map was unfolded from."""

    takes_grid = True

    def __init__(self, size: int, grid, fit: str = "divide", out=None):
        super().__init__()
        self.size, self.grid, self.fit = size, tuple(grid), fit  # the patch grid
        self.out = tuple(out) if out is not None else tuple(n * size for n in self.grid)

    def forward(self, x, grid=None):
        grid, source = (self.grid, self.out) if grid is None else (grid, getattr(grid, "source", None))
        p, d, c = self.size, len(grid), x.shape[-1]
        x = x.reshape(-1, *([p] * d), *grid, c)  # (B, p_1..p_d, n_1..n_d, C)
        order = [0, 2 * d + 1] + [i for a in range(d) for i in (1 + d + a, 1 + a)]
        x = x.permute(order).reshape(x.shape[0], c, *(n * p for n in grid))
        if self.fit == "interpolate" and source and tuple(source) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=list(source), mode=_MODES[d], align_corners=False)
        return x

    def extra_repr(self) -> str:
        return f"size={self.size}" + (f", fit={self.fit}" if self.fit != "divide" else "")
