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


def channels_last(x):
    """(B, R, K) -> (B, K, R), contiguous. A row length K that is a multiple of 256 elements (1 KB
    of float32) is first copied into rows padded by 16: the transposing copy reads down a column
    at stride K, and at such a stride every read falls in the same cache set (a 64 x 1024 map moved
    4-5x slower than a 64 x 961 one)."""
    b, r, k = x.shape
    if k % 256 == 0 and r > 1:
        pad = x.new_empty(b, r, k + 16)[..., :k]
        pad.copy_(x)
        x = pad
    return x.transpose(1, 2).contiguous()


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
        # the channels moved last first (a view when they are last in memory, else one transposing
        # copy), then the patches gathered as runs of C channels: faster than one 6-D permuted copy
        # that reads the channels at the map's stride (channel-first tokens, a transposed view, would
        # make a following layer norm copy them: mobilevit_xxs 3-7% slower)
        x = channels_last(x.reshape(b, c, -1)).view(b, *split, c)  # (B, n_1, p, ..., n_d, p, C)
        order = [0] + [2 + 2 * a for a in range(d)] + [1 + 2 * a for a in range(d)] + [2 * d + 1]
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
        if x.stride(1) == 1 and x.transpose(1, 2).is_contiguous():  # channels first in memory (a transposed view)
            x = x.transpose(1, 2).reshape(-1, *([p] * d), c, *grid)  # (B, p_1..p_d, C, n_1..n_d)
            out = x.new_empty(x.shape[0], c, *[k for n in grid for k in (n, p)])  # (B, C, n_1, p, ..., n_d, p)
            # copied through the output's permuted view: the copy runs along the tokens, not the offsets
            out.permute([0] + [3 + 2 * a for a in range(d)] + [1] + [2 + 2 * a for a in range(d)]).copy_(x)
            x = out.view(x.shape[0], c, *(n * p for n in grid))
        else:
            x = self._from_channels_last(x, grid, p, d, c)
        if self.fit == "interpolate" and source and tuple(source) != tuple(x.shape[2:]):
            x = F.interpolate(x, size=list(source), mode=_MODES[d], align_corners=False)
        return x

    @staticmethod
    def _from_channels_last(x, grid, p, d, c):
        x = x.reshape(-1, *([p] * d), *grid, c)  # (B, p_1..p_d, n_1..n_d, C)
        # the patches put back as runs of C channels (B, n_1, p, ..., n_d, p, C), then the channels
        # moved first (one transposing copy)
        order = [0] + [i for a in range(d) for i in (1 + d + a, 1 + a)] + [2 * d + 1]
        b = x.shape[0]
        return channels_last(x.permute(order).reshape(b, -1, c)).view(b, c, *(n * p for n in grid))

    def extra_repr(self) -> str:
        return f"size={self.size}" + (f", fit={self.fit}" if self.fit != "divide" else "")
