"""Unfold a map into per-offset patch sequences along the batch, and fold them back (any rank)."""

from __future__ import annotations

from torch import nn


class PatchesToBatch(nn.Module):
    """(B, C, *S) -> (B * p^d, prod(S / p), C); sequence index b * p^d + offset, offset row-major
    inside the patch, tokens row-major over the patch grid."""

    def __init__(self, size: int, grid):
        super().__init__()
        self.size, self.grid = size, tuple(grid)

    def forward(self, x):
        p, d = self.size, x.ndim - 2
        b, c = x.shape[:2]
        split = [n for s in x.shape[2:] for n in (s // p, p)]
        x = x.reshape(b, c, *split)  # (B, C, n_1, p, ..., n_d, p)
        order = [0] + [3 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)] + [1]
        return x.permute(order).reshape(b * p ** d, -1, c)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class BatchToPatches(nn.Module):
    """(B * p^d, prod(n), C) with n the patch grid -> (B, C, *n * p), the inverse of `PatchesToBatch`."""

    def __init__(self, size: int, grid):
        super().__init__()
        self.size, self.grid = size, tuple(grid)  # the patch grid

    def forward(self, x):
        p, d, c = self.size, len(self.grid), x.shape[-1]
        x = x.reshape(-1, *([p] * d), *self.grid, c)  # (B, p_1..p_d, n_1..n_d, C)
        order = [0, 2 * d + 1] + [i for a in range(d) for i in (1 + d + a, 1 + a)]
        return x.permute(order).reshape(x.shape[0], c, *(n * p for n in self.grid))

    def extra_repr(self) -> str:
        return f"size={self.size}"
