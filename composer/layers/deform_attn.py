"""The torch side of composer/ops/deform_attn.py: multi-scale deformable attention in plain PyTorch
(`F.grid_sample`, no compiled extension) and the per-level wrapper. Inputs are tokens (B, N, C)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _centres(grids) -> torch.Tensor:
    """(sum of level sizes, 2): every cell's centre in its own level, (x, y) in [0, 1]."""
    refs = []
    for h, w in grids:
        ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float32) + 0.5) / h,
                                (torch.arange(w, dtype=torch.float32) + 0.5) / w, indexing="ij")
        refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    return torch.cat(refs, 0)


class DeformableAttention(nn.Module):
    """(B, Nv + Nq, C) -> (B, Nq, C): the query tokens read the value levels at learned offsets."""

    def __init__(self, dim: int, value_dim: int, heads: int, points: int, value_grids, query_grids):
        super().__init__()
        self.heads, self.points = heads, points
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

    def forward(self, x):
        b = x.shape[0]
        m, lv, p = self.heads, self.levels, self.points
        value = self.value_proj(x[:, : self.n_values])
        q = x[:, self.n_values:]
        nq = q.shape[1]
        d = value.shape[-1] // m
        offsets = self.sampling_offsets(q).view(b, nq, m, lv, p, 2)
        weights = self.attention_weights(q).view(b, nq, m, lv * p).softmax(-1).view(b, nq, m, lv, p)
        loc = self.reference.view(1, nq, 1, 1, 1, 2) + offsets / self.normalizer.view(1, 1, 1, lv, 1, 2)
        grids = 2 * loc - 1
        sampled = []
        start = 0
        for level, (h, w) in enumerate(self.value_grids):
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
    """Fold each level of a multi-level token sequence into a map, run `op`, flatten back, join."""

    def __init__(self, op: nn.Module, grids):
        super().__init__()
        self.op = op
        self.grids = [tuple(g) for g in grids]

    def forward(self, x):
        b, _, c = x.shape
        outs, start = [], 0
        for g in self.grids:
            n = math.prod(g)
            part = x[:, start: start + n].transpose(1, 2).reshape(b, c, *g)
            outs.append(self.op(part).flatten(2).transpose(1, 2))
            start += n
        return torch.cat(outs, 1)
