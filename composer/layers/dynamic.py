"""The torch side of composer/ops/dynamic.py: learned tokens, dynamic ReLU and parameter-free
attention from grid tokens to prefix tokens. Inputs are token tensors (B, N, C)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedTokens(nn.Module):
    def __init__(self, count: int, dim: int, std: float = 0.02):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(count, dim))
        nn.init.normal_(self.tokens, std=std)

    def forward(self, x):
        return self.tokens.unsqueeze(0).repeat(x.shape[0], 1, 1)  # a copy, not a view of the parameter


class DynamicReLU(nn.Module):
    """(B, N, C) features and (B, pieces, C) coefficients -> (B, N, C): max_k(((c_k - 0.5) * scale +
    offset_k) * x); `given = False`: both in one sequence (B, pieces + N, C), coefficients first."""

    def __init__(self, pieces: int, scale: float, offsets: list[float], given: bool = False):
        super().__init__()
        self.pieces, self.scale, self.given = pieces, scale, given
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.float32).view(1, pieces, 1), persistent=False)

    def forward(self, x, coeffs=None):
        coef, feat = (coeffs, x) if self.given else (x[:, : self.pieces], x[:, self.pieces:])
        slopes = (coef - 0.5) * self.scale + self.offsets.to(coef.dtype)  # (B, pieces, C)
        out = feat * slopes[:, :1]
        for k in range(1, self.pieces):
            out = torch.maximum(out, feat * slopes[:, k: k + 1])
        return out

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}, scale={self.scale}"


class Attend(nn.Module):
    """(B, P + N, C) -> (B, N, C): the N grid tokens attend to the P prefix tokens, no projections.
    P follows the grid at run time (a prefix may hold a whole map's tokens: P = all but N)."""

    takes_grid = True

    def __init__(self, heads: int, prefix: int, split: bool, scale=None):
        super().__init__()
        self.heads, self.prefix, self.split, self.scale = heads, prefix, split, scale

    def forward(self, x, grid=None):
        b, n, c = x.shape
        h = self.heads
        prefix = self.prefix if grid is None else n - math.prod(grid)
        pre, q = x[:, :prefix], x[:, prefix:]
        if self.split:
            k, v = pre[:, : prefix // 2], pre[:, prefix // 2:]
        else:
            k = v = pre
        q, k, v = (t.reshape(b, t.shape[1], h, c // h).transpose(1, 2) for t in (q, k, v))
        scale = self.scale if self.scale is not None else (c // h) ** -0.5
        # the explicit product: the key sets are small (a few tokens, or a map attended by a few tokens)
        attn = ((q * scale) @ k.transpose(-2, -1)).softmax(-1)
        return (attn @ v).transpose(1, 2).reshape(b, -1, c)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, prefix={self.prefix}, split={self.split}"
