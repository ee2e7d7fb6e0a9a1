"""The torch side of composer/ops/deform_attn.py: multi-scale deformable attention in plain PyTorch
(`F.grid_sample`, no compiled extension), the per-level wrapper and the level selection. Inputs are
tokens (B, N, C). Every module follows the grid it gets at run time (`takes_grid`: the grid of the
sequence's last level): the level grids are that grid times each level's scale, given as exact
ratios (numerator, denominator), so a model built at one size runs at every size whose levels are
whole (the reference's spatial shapes, level start index and reference points are computed from
the actual feature sizes in each forward pass, ViT-Adapter's `deform_inputs`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def level_grids(grid, ratios) -> list[tuple]:
    """The grid of every level at run time: the sequence's grid times each scale num / den."""
    return [tuple(g * num // den for g in grid) for num, den in ratios]


def _same(grid, built) -> bool:
    """Whether the runtime grid is the build grid (None: the module was called without one)."""
    return grid is None or tuple(grid) == built


def _centres(grids, device=None) -> torch.Tensor:
    """(sum of level sizes, 2): every cell's centre in its own level, (x, y) in [0, 1]."""
    refs = []
    for h, w in grids:
        ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h,
                                (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w, indexing="ij")
        refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return torch.cat(refs, 0)


class DeformableAttention(nn.Module):
    """(B, Nv + Nq, C) -> (B, Nq, C): the query tokens read the value levels at learned offsets.
    `value_ratios`, `query_ratios`: each level's scale relative to `grid` (the grid of the last query
    level) as (num, den); at another grid the levels, reference points and normalisers are made for
    it (at the build grid, the buffers made once)."""

    takes_grid = True

    def __init__(self, dim: int, value_dim: int, heads: int, points: int, value_grids, query_grids,
                 grid=(), value_ratios=(), query_ratios=()):
        super().__init__()
        self.heads, self.points = heads, points
        self.grid = tuple(grid)
        self.value_ratios, self.query_ratios = tuple(value_ratios), tuple(query_ratios)
        self.value_grids = [tuple(g) for g in value_grids]
        self.levels = len(self.value_grids)
        self.n_values = sum(h * w for h, w in self.value_grids)
        self.sampling_offsets = nn.Linear(dim, heads * self.levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * self.levels * points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.register_buffer("reference", _centres(query_grids), persistent=False)
        self.register_buffer("normalizer", torch.tensor([[w, h] for h, w in self.value_grids], dtype=torch.float32),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        init = torch.stack([thetas.cos(), thetas.sin()], -1)
        init = init / init.abs().max(-1, keepdim=True)[0]
        init = init.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        init = init * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(init.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def geometry(self, grid, device):
        """(value level grids, number of value tokens, reference points, normalisers) at `grid`."""
        if _same(grid, self.grid):
            return self.value_grids, self.n_values, self.reference, self.normalizer
        vals = level_grids(grid, self.value_ratios)
        refs = _centres(level_grids(grid, self.query_ratios), device)
        norm = torch.tensor([[w, h] for h, w in vals], dtype=torch.float32, device=device)
        return vals, sum(h * w for h, w in vals), refs, norm

    def forward(self, x, grid=None):
        b = x.shape[0]
        m, lv, p = self.heads, self.levels, self.points
        value_grids, n_values, reference, normalizer = self.geometry(grid, x.device)
        value = self.value_proj(x[:, :n_values])
        q = x[:, n_values:]
        nq = q.shape[1]
        d = value.shape[-1] // m
        offsets = self.sampling_offsets(q).view(b, nq, m, lv, p, 2)
        weights = self.attention_weights(q).view(b, nq, m, lv * p).softmax(-1).view(b, nq, m, lv, p)
        loc = reference.view(1, nq, 1, 1, 1, 2) + offsets / normalizer.view(1, 1, 1, lv, 1, 2)
        grids = 2 * loc - 1
        sampled = []
        start = 0
        for level, (h, w) in enumerate(value_grids):
            v = value[:, start: start + h * w].transpose(1, 2).reshape(b * m, d, h, w)
            start += h * w
            g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*heads, Nq, P, 2)
            sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
        stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (B*heads, d, Nq, L*P)
        w_ = weights.transpose(1, 2).reshape(b * m, 1, nq, lv * p)
        out = (stacked * w_).sum(-1).view(b, m * d, nq).transpose(1, 2)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, points={self.points}, value_levels={self.value_grids}"


class PerLevel(nn.Module):
    """Fold each level of a multi-level token sequence into a map, run `op`, flatten back, join.
    `ratios` and `grid` (the last level's grid at the build size) let it follow the grid it gets at
    run time when the op keeps the grid (the builder passes the grid only then)."""

    takes_grid = True

    def __init__(self, op: nn.Module, grids, ratios=(), grid=()):
        super().__init__()
        self.op = op
        self.grids = [tuple(g) for g in grids]
        self.ratios, self.grid = tuple(ratios), tuple(grid)

    def forward(self, x, grid=None):
        b, _, c = x.shape
        outs, start = [], 0
        for g in self.grids if _same(grid, self.grid) else level_grids(grid, self.ratios):
            n = math.prod(g)
            part = x[:, start: start + n].transpose(1, 2).reshape(b, c, *g)
            outs.append(self.op(part).flatten(2).transpose(1, 2))
            start += n
        return torch.cat(outs, 1)


class SelectLevel(nn.Module):
    """(B, N, C) -> the tokens of level `index` of a multi-level sequence, which lie on that level's
    grid (`out_grid`); the level sizes follow the grid at run time (`ratios`, as `PerLevel`)."""

    takes_grid = True

    def __init__(self, index: int, ratios, grid):
        super().__init__()
        self.index, self.ratios, self.grid = index, tuple(ratios), tuple(grid)

    def out_grid(self, grid):
        return level_grids(self.grid if grid is None else grid, self.ratios[self.index: self.index + 1])[0]

    def forward(self, x, grid=None):
        sizes = [math.prod(g) for g in level_grids(self.grid if grid is None else grid, self.ratios)]
        start = sum(sizes[: self.index])
        return x[:, start: start + sizes[self.index]]

    def extra_repr(self) -> str:
        return f"index={self.index}, levels={len(self.ratios)}"
