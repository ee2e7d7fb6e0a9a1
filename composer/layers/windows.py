"""Modules of the window primitives (composer/ops/windows.py): windows moved into the batch and
back, and the score terms that read the window layout of the grid seen at run time."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention.tables import continuous_table


class WindowGrid(tuple):
    """The grid of the tokens of one window (a tuple, the window's sizes), recording where the
    windows came from: `source` (the grid cut), `padded` (it padded up to multiples of the
    window) and `shift` (the cyclic shift per axis)."""

    source: tuple = ()
    padded: tuple = ()
    shift: tuple = ()

    def __new__(cls, window, source, padded, shift):
        out = super().__new__(cls, window)
        out.source, out.padded, out.shift = tuple(source), tuple(padded), tuple(shift)
        return out


def padded_to(grid, window) -> tuple:
    return tuple(-(-int(g) // w) * w for g, w in zip(grid, window))


class WindowsToBatch(nn.Module):
    """(B, N, C) on grid S -> (B * windows, prod(window), C): roll by -shift, pad the end of each
    axis with zeros to multiples of the window, cut (image-major, windows and tokens row-major)."""

    takes_grid = True

    def __init__(self, window, shift):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)

    def out_grid(self, grid):
        return WindowGrid(self.window, grid, padded_to(grid, self.window), self.shift)

    def forward(self, x, grid):
        b, _, c = x.shape
        d = len(self.window)
        x = x.reshape(b, *grid, c)
        if any(self.shift):
            x = torch.roll(x, [-s for s in self.shift], list(range(1, d + 1)))
        padded = padded_to(grid, self.window)
        if tuple(padded) != tuple(grid):
            pads = [0, 0]
            for g, p in zip(reversed(tuple(grid)), reversed(padded)):
                pads += [0, p - g]
            x = F.pad(x, pads)
        split = [n for p, w in zip(padded, self.window) for n in (p // w, w)]
        x = x.reshape(b, *split, c)  # (B, n_1, w_1, ..., n_d, w_d, C)
        order = [0] + [1 + 2 * a for a in range(d)] + [2 + 2 * a for a in range(d)] + [2 * d + 1]
        return x.permute(order).reshape(-1, math.prod(self.window), c)

    def extra_repr(self) -> str:
        return f"window={self.window}, shift={self.shift}"


class BatchToWindows(nn.Module):
    """The inverse of `WindowsToBatch`: windows back on the padded grid, cropped to the grid cut,
    rolled back by +shift; (B, N, C) on the grid cut (`out_grid`)."""

    takes_grid = True

    def __init__(self, window, shift, grid):
        super().__init__()
        self.window, self.shift, self.grid = tuple(window), tuple(shift), tuple(grid)

    def out_grid(self, grid):
        return getattr(grid, "source", None) or self.grid

    def forward(self, x, grid=None):
        source = tuple(getattr(grid, "source", None) or self.grid)
        padded = padded_to(source, self.window)
        d, c = len(self.window), x.shape[-1]
        counts = [p // w for p, w in zip(padded, self.window)]
        x = x.reshape(-1, *counts, *self.window, c)  # (B, n_1..n_d, w_1..w_d, C)
        order = [0] + [i for a in range(d) for i in (1 + a, 1 + d + a)] + [2 * d + 1]
        x = x.permute(order).reshape(x.shape[0], *padded, c)
        if tuple(padded) != source:
            x = x[(slice(None), *[slice(0, g) for g in source])]
        if any(self.shift):
            x = torch.roll(x, list(self.shift), list(range(1, d + 1)))
        return x.reshape(x.shape[0], -1, c)

    def extra_repr(self) -> str:
        return f"window={self.window}, shift={self.shift}"


def _tiled(term, x):
    """A term with one entry per window of an image along dim 0, repeated over the images of `x`."""
    n = term.shape[0]
    return term.repeat(x.shape[0] // n, *[1] * (term.ndim - 1)) if n not in (1, x.shape[0]) else term


def region_labels(padded, window, shift) -> torch.Tensor:
    """The region of every position of the padded grid, flattened row-major: per axis 0 on
    [0, P - window), 1 on [P - window, P - shift), 2 on [P - shift, P), combined in base 3."""
    label = torch.zeros((), dtype=torch.long)
    for p, w, s in zip(padded, window, shift):
        pos = torch.arange(p)
        axis = (pos >= p - w).long() + (pos >= p - s).long() if s else torch.zeros(p, dtype=torch.long)
        label = label[..., None] * 3 + axis
    return label.reshape(-1)


class ShiftedWindowMask(nn.Module):
    """`value` between a query and a key of one window from different regions of the shifted grid:
    (windows, 1, N, N) per image, for the window layout the scores' grid records."""

    takes_grid = True

    def __init__(self, value: float):
        super().__init__()
        self.value = value
        self._cache: dict = {}
        # moves with the module (`.to(device)`), so the mask is made where it is used; not saved
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    def score_bias(self, grids):
        grid = grids[0] if isinstance(grids, tuple) and grids and isinstance(grids[0], tuple) else grids
        shift = getattr(grid, "shift", None)
        if shift is None:
            raise RuntimeError("shifted_window_mask: the scores do not come from windows_to_batch windows")
        if not any(shift):
            return None
        key = (tuple(grid), grid.padded, shift, self.anchor.device)
        mask = self._cache.get(key)
        if mask is None:
            window, padded = tuple(grid), grid.padded
            d = len(window)
            labels = region_labels(padded, window, shift).reshape(padded)
            split = [n for p, w in zip(padded, window) for n in (p // w, w)]
            order = [2 * a for a in range(d)] + [2 * a + 1 for a in range(d)]
            wins = labels.reshape(split).permute(order).reshape(-1, math.prod(window))  # (nW, N)
            diff = wins[:, :, None] != wins[:, None, :]
            mask = torch.zeros(diff.shape).masked_fill_(diff, self.value)[:, None]  # (nW, 1, N, N)
            mask = mask.to(self.anchor.device)
            self._cache[key] = mask
        return mask

    def forward(self, x, grids=None):
        term = self.score_bias(grids)
        if term is None:
            return x
        return x + _tiled(term.to(x.device, x.dtype), x)

    def extra_repr(self) -> str:
        return f"value={self.value}"


class PositionMlpBias(nn.Module):
    """fc2(drop(relu(fc1(r)))) of the relative coordinates r of every query-key pair, (1, heads, N, M)."""

    takes_grid = True

    def __init__(self, ndim: int, hidden: int, heads: int, coords: str, drop: float):
        super().__init__()
        self.coords, self.heads = coords, heads
        self.fc1 = nn.Linear(ndim, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.fc2 = nn.Linear(hidden, heads)
        self._cache: dict = {}

    def score_bias(self, grids):
        qgrid, kgrid = (tuple(int(g) for g in grids[0]), tuple(int(g) for g in grids[1]))
        device = self.fc1.weight.device
        key = (qgrid, kgrid, device)
        found = self._cache.get(key)
        if found is None:
            index, table = continuous_table(qgrid, kgrid, self.coords)
            found = self._cache[key] = (index.to(device), table.to(device))
        index, table = found
        b = self.fc2(self.drop(self.act(self.fc1(table.to(self.fc1.weight.dtype)))))  # (U, heads)
        return b.t()[:, index].view(1, self.heads, math.prod(qgrid), math.prod(kgrid))

    def forward(self, x, grids=None):
        return x + self.score_bias(grids).to(x.dtype)


class HaloWindowsToBatch(nn.Module):
    """(B, N, C) on a grid -> (B * blocks, (block + 2 halo)^d, C): every block with its halo,
    zero-padded at the borders, blocks and tokens row-major."""

    takes_grid = True

    def __init__(self, block: int, halo: int, ndim: int):
        super().__init__()
        self.block, self.halo, self.win = block, halo, block + 2 * halo
        self.window = (self.win,) * ndim

    def out_grid(self, grids):
        return self.window

    def forward(self, x, grids=None):
        grid = tuple(grids[0])
        b, _, c = x.shape
        d = len(grid)
        x = x.reshape(b, *grid, c)
        if self.halo:
            x = F.pad(x, [0, 0] + [self.halo] * (2 * d))
        for a in range(d):
            x = x.unfold(1 + a, self.win, self.block)  # (B, n_1.., C, w_1..)
        order = [0] + [1 + a for a in range(d)] + [2 + d + a for a in range(d)] + [1 + d]
        return x.permute(order).reshape(-1, self.win ** d, c)

    def extra_repr(self) -> str:
        return f"block={self.block}, halo={self.halo}"


def axis_offsets(n: int, k: int, offset: str, scaled: bool) -> torch.Tensor:
    """(n, k) table rows for n queries and k keys along one axis (see `axis_relative_logits`)."""
    x, j = torch.arange(n)[:, None], torch.arange(k)[None, :]
    if not scaled:
        return j - x + k - 1 if offset == "key-query" else x - j + k - 1
    qr, kr = max(k / n, 1.0), max(n / k, 1.0)  # float32 arithmetic, truncated (MViTv2's)
    if offset == "key-query":
        dist = j * kr - x * qr
        dist += (n - 1) * qr
    else:
        dist = x * qr - j * kr
        dist += (k - 1) * kr
    return dist.long()


class AxisRelativeLogits(nn.Module):
    """Σ_a q · R_a[i_a(x_a, k_a)] for queries (B, h, Q, d) on a grid and keys on the scores' key grid."""

    takes_grid = True

    def __init__(self, rows, width: int, std: float, offset: str = "key-query", scaled: bool = False):
        super().__init__()
        self.offset, self.scaled = offset, scaled
        for a, n in enumerate(rows):
            self.register_parameter(f"rel_{a}", nn.Parameter(torch.randn(n, width) * std))
        self._cache: dict = {}

    def _index(self, qgrid, kgrid, device):
        key = (qgrid, kgrid, device)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = [axis_offsets(n, k, self.offset, self.scaled).to(device)
                                        for n, k in zip(qgrid, kgrid)]
        return found

    def score_bias(self, grids, q):
        qgrid, kgrid = (tuple(int(g) for g in grid) for grid in grids)
        b, h, _, _ = q.shape
        d = len(qgrid)
        out = 0
        for a, (index, n, k) in enumerate(zip(self._index(qgrid, kgrid, q.device), qgrid, kgrid)):
            table = getattr(self, f"rel_{a}")
            logits = (q @ table.t()).reshape(b, h, *qgrid, table.shape[0])
            shape = [1] * (2 + d) + [k]
            shape[2 + a] = n
            idx = index.view(shape).expand(b, h, *qgrid, k)
            term = logits.gather(-1, idx)  # (B, h, *Q, K_a)
            out = out + term.reshape(b, h, *qgrid, *[k if j == a else 1 for j in range(d)])
        return out.reshape(b, h, math.prod(qgrid), math.prod(kgrid))

    def forward(self, x, q, grids=None):
        return x + self.score_bias(grids[0], q)
