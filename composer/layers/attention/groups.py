"""Grouping tokens for attention: windows and grid groups (partition and back), the padded grid,
Swin's shifted-window mask, and the map/token views the attention pieces share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core import conv_class as conv_cls  # noqa: F401  (the attention pieces' name)


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head, *tail)


def _perm(ndim: int, mode: str) -> list[int]:
    # the grid is viewed as (count, size) per dim for windows and (size, count) for grid groups;
    # the permutation brings the group-count axes first and the in-group axes after them
    counts = [1 + 2 * d + (mode == "grid") for d in range(ndim)]
    members = [1 + 2 * d + (mode != "grid") for d in range(ndim)]
    return [0, *counts, *members, 2 * ndim + 1]


def _sizes(grid, size) -> tuple:
    return tuple(size) if isinstance(size, (tuple, list)) else (size,) * len(grid)


def _split(grid, size, mode):
    return [s for g, w in zip(grid, _sizes(grid, size)) for s in ((g // w, w) if mode == "window" else (w, g // w))]


def padded_grid(grid, size: int) -> tuple:
    """`grid` padded at the end of every dim up to a multiple of the window `size`."""
    return tuple(-(-g // size) * size for g in grid)


def partition_windows(x: torch.Tensor, grid, size, mode: str = "window") -> torch.Tensor:
    """(B, *grid, C) -> (B * groups, size**ndim, C). `window`: contiguous size^d windows (Swin);
    `grid`: each group holds the size^d tokens at stride grid/size (MaxViT grid attention)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, *_split(grid, size, mode), c).permute(*_perm(len(grid), mode))
    return x.reshape(-1, math.prod(_sizes(grid, size)), c)


def unpartition_windows(x: torch.Tensor, grid, size, b, mode: str = "window") -> torch.Tensor:
    """The inverse of `partition_windows`: (B * groups, size**ndim, C) -> (B, prod(grid), C)."""
    c, ndim = x.shape[-1], len(grid)
    split = _split(grid, size, mode)
    perm = _perm(ndim, mode)
    x = x.reshape(b, *[split[p - 1] for p in perm[1:-1]], c)
    x = x.permute(*sorted(range(len(perm)), key=perm.__getitem__))
    return x.reshape(b, -1, c)


def shift_mask(grid, window, shift) -> torch.Tensor:
    """-100 where a query and a key came from different regions of the rolled image (Swin)."""
    labels = torch.zeros(grid, dtype=torch.long)
    slices = [(slice(0, -window), slice(-window, -shift), slice(-shift, None))] * len(grid)
    count = 0
    for region in _product(slices):
        labels[region] = count
        count += 1
    windows = partition_windows(labels[None, ..., None], grid, window).squeeze(-1)  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


def crop(x: torch.Tensor, grid) -> torch.Tensor:
    """(B, *padded, C) -> (B, *grid, C): the first `grid` positions of every dim. Traced with
    symbolic sizes (torch.export with dynamic height and width), gathered with `index_select`: a
    slice's strides would make the tracer guess whether anything was padded (a guard true only at
    the example's size)."""
    if all(type(g) is int for g in grid):
        return x[(slice(None), *[slice(0, g) for g in grid])]
    for d, g in enumerate(grid):
        x = x.index_select(d + 1, torch.arange(g, device=x.device))
    return x


def to_map(t: torch.Tensor, grid) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def to_tokens(m: torch.Tensor) -> torch.Tensor:
    return m.flatten(2).transpose(1, 2)


def roll(x: torch.Tensor, shift: int) -> torch.Tensor:
    """(B, *grid, C) rolled by `shift` along every grid dim."""
    nd = x.dim() - 2
    return torch.roll(x, [shift] * nd, dims=list(range(1, nd + 1)))


def pad_to(x: torch.Tensor, grid, padded) -> torch.Tensor:
    """(B, *grid, C) -> (B, *padded, C): zero tokens at the end of every dim."""
    return F.pad(x, [0, 0] + [a for g, p in zip(grid[::-1], padded[::-1]) for a in (0, p - g)])
