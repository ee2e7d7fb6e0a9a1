"""Modules of the attention primitives (composer/ops/heads.py): heads (B, h, N, d), scores (B, h, N, M)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SplitHeads(nn.Module):
    def __init__(self, heads: int, widths: list[int], part: int, order: str):
        super().__init__()
        self.heads, self.widths, self.part, self.order = heads, list(widths), part, order
        self.width = widths[part]
        self.start = sum(widths[:part]) * (heads if order == "parts" else 1)

    def forward(self, x):
        if self.heads == 1:  # either order: the part's channels, as one head (a view)
            return x[..., self.start:self.start + self.width].unsqueeze(1)
        b, n, _ = x.shape
        h, w = self.heads, self.width
        if self.order == "parts":  # [part 0 of every head | part 1 of every head | ...]
            return x[..., self.start:self.start + h * w].reshape(b, n, h, w).transpose(1, 2)
        return x.reshape(b, n, h, -1)[..., self.start:self.start + w].transpose(1, 2)  # [head 0: parts | ...]

    def extra_repr(self) -> str:
        return f"heads={self.heads}, part={self.part} of widths {self.widths}, order={self.order}"


class MergeHeads(nn.Module):
    def __init__(self, order: str):
        super().__init__()
        self.order = order

    def forward(self, x):
        b, h, n, d = x.shape
        if h == 1:  # either order (a view)
            return x.squeeze(1)
        if self.order == "heads":
            return x.transpose(1, 2).reshape(b, n, h * d)
        return x.permute(0, 2, 3, 1).reshape(b, n, d * h)


def _grouped(t, group: int):
    """Keys or values with fewer heads serve `group` query heads each."""
    return t.repeat_interleave(group, dim=1) if group > 1 else t


class Scores(nn.Module):
    takes_grid = True

    def __init__(self, scale: float, over_channels: bool, group: int):
        super().__init__()
        self.scale, self.over_channels, self.group = scale, over_channels, group

    def forward(self, q, k, grids=None):
        k = _grouped(k, self.group)
        if self.over_channels:
            s = q.transpose(-2, -1) @ k
            return s * self.scale if self.scale != 1.0 else s
        return (q * self.scale) @ k.transpose(-2, -1)

    @staticmethod
    def out_grid(grids):
        return grids[0], grids[1]  # scores lie on the queries' grid by the keys' grid

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}" + (", over channels" if self.over_channels else "") + \
            (f", {self.group} query heads per key head" if self.group > 1 else "")


class WeightedSum(nn.Module):
    takes_grid = True

    def __init__(self, over_channels: bool, group: int):
        super().__init__()
        self.over_channels, self.group = over_channels, group

    def forward(self, a, v, grids=None):
        v = _grouped(v, self.group)
        if self.over_channels:
            return (a @ v.transpose(-2, -1)).transpose(-2, -1)
        return a @ v

    def out_grid(self, grids):
        pair = grids[0]  # the scores' (query grid, key grid)
        return grids[1] if self.over_channels else (pair[0] if isinstance(pair, tuple) else pair)


class Softmax(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        d = self.dim
        if d == "positions":  # every position of a map (B, C, *grid)
            return x.flatten(2).softmax(-1).view_as(x)
        if d != -1 and d != x.dim() - 1 and x.numel() >= 1024 and all(n == 1 for n in x.shape[d + 1:]):
            # over the tokens of one-channel tokens (B, N, 1): as rows, the CPU's fast last-axis kernel
            # (below 1024 values the two transposes cost more than they save)
            return x.transpose(d, -1).softmax(-1).transpose(d, -1)
        return x.softmax(d)


class WeightedPool(nn.Module):
    """Σ_n w_n x_n over the tokens, as a (B, C, 1, ..., 1) map."""

    def __init__(self, tokens: bool, weight_tokens: bool, ndim: int, rows: bool = False):
        super().__init__()
        self.tokens, self.weight_tokens, self.ndim, self.rows = tokens, weight_tokens, ndim, rows

    def forward(self, x, w):
        if self.rows:  # maps, along the last axis: (B, C, ..., N) -> (B, C, ..., 1)
            return (x * w).sum(-1, keepdim=True)
        # a product and a sum over the tokens: a batched matrix-vector product (bmm) is several
        # times slower on the CPU for these shapes (C x N by N x 1)
        if self.tokens:  # x (B, N, C), w as (B, N, 1)
            pooled = (x * (w if self.weight_tokens else w.flatten(2).transpose(1, 2))).sum(1)
        else:  # x (B, C, N), w as (B, 1, N)
            pooled = (x.flatten(2) * (w.transpose(1, 2) if self.weight_tokens else w.flatten(2))).sum(2)
        return pooled.view(*pooled.shape, *([1] * self.ndim))


class NormalizeSum(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x / (x.sum(-1, keepdim=True) + self.eps)


class L2Norm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x):
        return nn.functional.normalize(x, dim=self.dim, eps=self.eps)


class MixHeads(nn.Module):
    """A linear over the heads axis (dim 1), as timm's talking heads apply it (`proj_l`, `proj_w`)."""

    def __init__(self, heads_in: int, heads_out: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads_out, heads_in))
        self.bias = nn.Parameter(torch.zeros(heads_out)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default init
        if self.bias is not None:
            bound = 1 / math.sqrt(heads_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return nn.functional.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)


class AddBias(nn.Module):
    def __init__(self, channels: int, heads: int, channel_first: bool, init: float):
        super().__init__()
        self.heads, self.channel_first = heads, channel_first
        self.bias = nn.Parameter(torch.full((channels * (heads or 1),), float(init)))

    def forward(self, x):
        if self.heads:
            return x + self.bias.view(self.heads, 1, -1)
        if self.channel_first:
            return x + self.bias.view(-1, *([1] * (x.ndim - 2)))
        return x + self.bias


class HeadScale(nn.Module):
    def __init__(self, heads: int, init: float, log: bool, max_value: float | None):
        super().__init__()
        self.log = log
        self.max_log = math.log(max_value) if (log and max_value is not None) else None
        self.max_value = max_value if not log else None
        value = math.log(init) if log else init
        self.scale = nn.Parameter(torch.full((heads, 1, 1), float(value)))

    def forward(self, x):
        s = self.scale
        if self.log:
            s = (s.clamp(max=self.max_log) if self.max_log is not None else s).exp()
        elif self.max_value is not None:
            s = s.clamp(max=self.max_value)
        return x * s


class Blend(nn.Module):
    """(1 - σ(g)) x + σ(g) other, a gate g per head (dim 1)."""

    def __init__(self, heads: int, init: float):
        super().__init__()
        self.gate = nn.Parameter(torch.full((heads,), float(init)))

    def forward(self, x, other):
        g = torch.sigmoid(self.gate.view(1, -1, 1, 1))
        return (1.0 - g) * x + g * other
