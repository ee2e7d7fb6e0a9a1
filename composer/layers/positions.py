"""Modules of the position terms on scores (composer/ops/positions.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .core import trunc_normal_


def _coords(grid) -> torch.Tensor:
    """(N, d) integer coordinates of the tokens of `grid`, row-major (the first axis the slowest)."""
    axes = [torch.arange(int(g)) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def relative_index(grid, q_extra: int, k_extra: int, prefix: bool) -> torch.Tensor:
    """(q_extra + N, k_extra + N) rows of a relative-position table for every query and key: the
    offset query - key, shifted to start at 0 on each axis, in mixed radix (2g - 1), the first axis
    the slowest; with `prefix`, the last three rows: prefix query, prefix key, both."""
    c = _coords(grid)
    rel = c[:, None, :] - c[None, :, :]  # (N, N, d)
    index = torch.zeros(rel.shape[:2], dtype=torch.long)
    for axis, g in enumerate(grid):
        index = index * (2 * int(g) - 1) + rel[..., axis] + int(g) - 1
    if not prefix:
        return index
    n = math.prod(2 * int(g) - 1 for g in grid) + 3
    full = torch.empty(q_extra + c.shape[0], k_extra + c.shape[0], dtype=torch.long)
    full[q_extra:, k_extra:] = index
    full[:q_extra, :] = n - 3  # a prefix query, any key
    full[:, :k_extra] = n - 2  # any query, a prefix key
    full[:q_extra, :k_extra] = n - 1  # prefix to prefix
    return full


class RelativePositionBias(nn.Module):
    """A score term: `x + table[index]` per head, the table sized by the build grid."""

    takes_grid = True

    def __init__(self, grid: tuple, heads: int, q_extra: int, k_extra: int, prefix: bool, std: float):
        super().__init__()
        self.grid = tuple(grid)
        index = relative_index(grid, q_extra, k_extra, prefix)
        rows = math.prod(2 * g - 1 for g in grid) + (3 if prefix else 0)
        self.table = nn.Parameter(trunc_normal_(torch.empty(rows, heads), std))
        self.register_buffer("index", index, persistent=False)

    def score_bias(self, grid_pair=None):
        n, m = self.index.shape
        return self.table[self.index.view(-1)].view(n, m, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x, grid=None):
        return x + self.score_bias(grid)

    def extra_repr(self) -> str:
        return f"grid={'x'.join(map(str, self.grid))}, table={tuple(self.table.shape)}"


def relative_features(q_grid, k_grid) -> torch.Tensor:
    """(N, M, d + 1): for every query and key token, the offset key - query along each axis, the
    last axis first, then its squared length."""
    q, k = _coords(q_grid), _coords(k_grid)
    off = (k[None, :, :] - q[:, None, :]).flip(-1).float()
    return torch.cat([off, (off ** 2).sum(-1, keepdim=True)], -1)


class PositionScores(nn.Module):
    """Scores from the relative positions alone: a linear (d + 1 -> heads) of `relative_features`."""

    takes_grid = True

    def __init__(self, ndim: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, ndim + 1))
        self.bias = nn.Parameter(torch.zeros(heads))
        self._local_init(ndim, heads)
        self._cache = (None, None)

    @torch.no_grad()
    def _local_init(self, ndim: int, heads: int) -> None:
        """Head h of the first k^d (k = floor(heads^(1/d))) scores -|offset - c_h|² + |c_h|²: it
        peaks at its own offset c_h of a k^d lattice around 0 (a convolution-like start); the others
        start at nn.Linear's init."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        k = int(round(heads ** (1 / ndim)))
        while k ** ndim > heads:
            k -= 1
        center = (k - 1) / 2
        for h in range(k ** ndim):
            digits = [(h // k ** j) % k for j in range(ndim)]  # digit j: axis j
            for j, dgt in enumerate(digits):
                self.weight[h, ndim - 1 - j] = 2 * (dgt - center)  # column ndim-1-j holds axis j's offset
            self.weight[h, ndim] = -1.0

    def features(self, grids, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(grids[0]), tuple(grids[1]), like.device, like.dtype)
        if self._cache[0] != key:
            self._cache = (key, relative_features(grids[0], grids[1]).to(like.device, like.dtype))
        return self._cache[1]

    def forward(self, q, k, grids=None):
        rel = self.features(grids, q)
        s = nn.functional.linear(rel, self.weight, self.bias).permute(2, 0, 1)  # (heads, N, M)
        return s.unsqueeze(0).expand(q.shape[0], -1, -1, -1)

    @staticmethod
    def out_grid(grids):
        return grids[0], grids[1]

    def extra_repr(self) -> str:
        return f"heads={self.weight.shape[0]}, features={self.weight.shape[1]}"


class DistanceBias(nn.Module):
    """A score term: `x + attention_biases[:, index]`, index the mixed-radix |offset| of every pair."""

    takes_grid = True

    def __init__(self, grid: tuple, heads: int):
        super().__init__()
        c = _coords(grid)
        rel = (c[:, None, :] - c[None, :, :]).abs()
        index = torch.zeros(rel.shape[:2], dtype=torch.long)
        for axis, g in enumerate(grid):
            index = index * int(g) + rel[..., axis]
        self.attention_biases = nn.Parameter(torch.zeros(heads, math.prod(int(g) for g in grid)))
        self.register_buffer("index", index, persistent=False)

    def score_bias(self, grid_pair=None):
        return self.attention_biases[:, self.index].unsqueeze(0)

    def forward(self, x, grid=None):
        return x + self.score_bias(grid)
