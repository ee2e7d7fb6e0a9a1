"""Index tables and fixed tables of the attention parts (built once, at construction): the
neighbourhood key index, Transformer-XL's sinusoidal relative embeddings and its offset index,
the agents' bias resizing, and the continuous position bias's coordinate table. Used by the attention pieces."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core import built_on_cpu


def neighbourhood_index(grid, size: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) index of the size^d keys around every position of `grid` at spacing `dilation`, in
    row-major kernel order (as `nn.Unfold`); positions outside the grid index N (a zero token).
    Also (N, K) bool: True where the key is inside the grid."""
    ndim = len(grid)
    half = dilation * (size - 1) // 2
    pos = torch.stack(torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")).flatten(1)  # (d, N)
    offs = torch.stack(torch.meshgrid(*[torch.arange(size) * dilation - half] * ndim, indexing="ij")).flatten(1)
    at = pos[:, :, None] + offs[:, None, :]  # (d, N, K)
    inside = torch.ones(at.shape[1:], dtype=torch.bool)
    flat = torch.zeros(at.shape[1:], dtype=torch.long)
    for d, g in enumerate(grid):
        inside &= (at[d] >= 0) & (at[d] < g)
        flat = flat * g + at[d].clamp(0, g - 1)
    n = math.prod(grid)
    return torch.where(inside, flat, torch.full_like(flat, n)), inside


def sinusoid_relative(length: int, dim: int) -> torch.Tensor:
    """(2T-1, dim) sinusoidal embeddings of the offsets T-1, T-2, ..., -(T-1) (ESPnet's
    RelPositionalEncoding: sin at even, cos at odd channels, frequencies 10000^(-2i/dim))."""
    pos = torch.arange(length - 1, -length, -1, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    pe = torch.zeros(2 * length - 1, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


def relative_offset_index(length: int) -> torch.Tensor:
    """(T, T) row of the sinusoid table for query i and key j: the offset i - j sits at T-1-(i-j)."""
    i = torch.arange(length)
    return (length - 1) - (i[:, None] - i[None, :])


def resize_table(table: torch.Tensor, grid) -> torch.Tensor:
    """(heads, agents, t, ...) -> (heads, agents, prod(grid)): linear / bilinear resize (no corner
    alignment), as Agent attention's bias tables."""
    mode = ("linear", "bilinear")[len(grid) - 1]
    return F.interpolate(table, size=tuple(grid), mode=mode).flatten(2)


def axis_tables(tables, heads: int, agents: int, grid, agents_last: bool) -> torch.Tensor:
    """The sum of the per-axis bias tables of Agent attention, flattened: (1, heads, agents, N), or
    (1, heads, N, agents) with `agents_last`."""
    total = sum(tables)
    return total.reshape(1, heads, -1, agents) if agents_last else total.reshape(1, heads, agents, -1)


@torch.compiler.assume_constant_result  # torch.compile runs it once and keeps its tables as constants
@built_on_cpu
def continuous_table(grid, keys, coords="normalized") -> tuple[torch.Tensor, torch.Tensor]:
    """The continuous-bias coordinates for queries on `grid` and keys on `keys` (the key axis is the
    query axis average-pooled to the key count). `coords="normalized"` (TransNeXt): per axis
    r = (q - k) / (g - 1) * 8, then sign(r) log2(1 + |r|) / log2(8); `coords="raw"` (timm's RelPosMlp
    'cr'): r = q - k, then sign(r) ln(1 + |r|). Returns the (N * M,) index into the (U, ndim) table
    of the distinct coordinates (torch.unique's order). A function of its arguments alone (Python ints
    and a string): torch.compile calls it while tracing instead of tracing its data-dependent
    torch.unique (a graph break)."""
    axes = []
    for g, m in zip(grid, keys):
        pos = torch.arange(g, dtype=torch.float64)
        centres = F.adaptive_avg_pool1d(pos[None], m)[0]
        r = pos[:, None] - centres[None, :]  # (g, m)
        axes.append(r if coords == "raw" else r / max(g - 1, 1) * 8)
    ndim = len(grid)
    # the (query, key) pairs in row-major order of (query coords, key coords)
    rel = []
    for d, r in enumerate(axes):
        shape = [1] * (2 * ndim)
        shape[d], shape[ndim + d] = r.shape
        rel.append(r.view(shape).expand(*grid, *keys).reshape(-1))
    rel = torch.stack(rel, -1)  # (N * M, ndim)
    table, index = torch.unique(rel, return_inverse=True, dim=0)
    if coords == "raw":
        table = torch.sign(table) * torch.log1p(table.abs())
    else:
        table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return index, table.float()
