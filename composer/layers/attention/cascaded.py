"""The module behind the `cascaded_attention` op (EfficientViT-M's cascaded group attention)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..core import bn_class
from .groups import conv_cls, padded_grid, partition_windows, unpartition_windows

def offset_index(group) -> torch.Tensor:
    """(N, N) index of the absolute offset (|d1|, |d2|, ...) between two positions of a group, in
    mixed radix (|d1| * g2 + |d2| in 2-D): the order in which the offsets first occur."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in group], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).abs()
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for d, g in enumerate(group):
        index = index * g + rel[d]
    return index


def _conv_bn(ndim, cin, cout, kernel=1, groups=1):
    conv = conv_cls(ndim)(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    bn = bn_class(ndim)(cout)
    return nn.Sequential(OrderedDict(conv=conv, bn=bn))


class CascadedAttention(nn.Module):
    """Cascaded group attention over a map (B, C, *grid) (the `cascaded_attention` op).

    Submodules: `qkvs.<i>` (1x1 conv + BN to q, k, v of head i), `dws.<i>` (depthwise conv + BN on
    the query; absent for kernel 0), parameter `attention_biases` (heads x prod(group)) with the
    non-persistent buffer `attention_bias_idxs`. With windows the map is zero-padded to the padded
    grid, cut into windows, attended window by window, and cropped back."""

    def __init__(self, dim, heads, key_dim, kernels, grid, size=0, padded=None, offset_bias=False, scale=None):
        super().__init__()
        ndim = len(grid)
        self.heads, self.key_dim, self.val_dim = heads, key_dim, dim // heads
        self.grid, self.size = tuple(grid), size
        self.padded = tuple(padded) if padded is not None else self.grid
        self.group = (size,) * ndim if size else self.grid
        self.scale = key_dim ** -0.5 if scale is None else scale
        self.qkvs = nn.ModuleList(_conv_bn(ndim, self.val_dim, 2 * key_dim + self.val_dim) for _ in range(heads))
        self.dws = nn.ModuleList(_conv_bn(ndim, key_dim, key_dim, k, groups=key_dim) if k else nn.Identity()
                                 for k in kernels)
        if offset_bias:
            n = 1
            for g in self.group:
                n *= g
            self.attention_biases = nn.Parameter(torch.zeros(heads, n))
            self.register_buffer("attention_bias_idxs", offset_index(self.group), persistent=False)

    def _padded(self, grid):
        """The grid the windows tile for a map on `grid`: the build's, or at another grid (another
        input size) padded up to a multiple of the build's window (timm's LocalWindowAttention)."""
        if grid == self.grid:
            return self.padded
        return padded_grid(grid, self.size)

    def _windows(self, x, grid, padded):
        b, c = x.shape[:2]
        x = x.movedim(1, -1)
        if padded != grid:  # zeros at the end of every dim
            x = F.pad(x, [0, 0] + [a for g, p in zip(grid[::-1], padded[::-1]) for a in (0, p - g)])
        x = partition_windows(x, padded, self.size)  # (B * nW, N, C)
        return x.transpose(1, 2).reshape(x.shape[0], c, *self.group)

    def _unwindows(self, y, b, grid, padded):
        c = y.shape[1]
        y = unpartition_windows(y.flatten(2).transpose(1, 2), padded, self.size, b)  # (B, prod(padded), C)
        y = y.view(b, *padded, c)
        if padded != grid:
            y = y[(slice(None), *[slice(0, g) for g in grid])]
        return y.movedim(-1, 1).contiguous()

    def forward(self, x):
        b, grid = x.shape[0], tuple(x.shape[2:])  # the grid at run time (the op admits others with windows)
        windowed = self.size and self.group != grid
        if windowed:
            padded = self._padded(grid)
            x = self._windows(x, grid, padded)
        bias = None
        if hasattr(self, "attention_biases"):
            bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
        bw, spatial = x.shape[0], x.shape[2:]
        outs, feat = [], None
        for i, (chunk, qkv, dw) in enumerate(zip(x.chunk(self.heads, dim=1), self.qkvs, self.dws)):
            feat = chunk if i == 0 else feat + chunk
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q)
            # explicit matmuls: with head dims this small (and an additive bias) they beat the fused
            # CPU kernel, and they are the reference's formulation
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, d, N)
            scores = (q * self.scale).transpose(1, 2) @ k  # (B, N, N)
            if bias is not None:
                scores = scores + bias[i]
            feat = (v @ scores.softmax(-1).transpose(1, 2)).reshape(bw, self.val_dim, *spatial)
            outs.append(feat)
        y = torch.cat(outs, 1)
        return self._unwindows(y, b, grid, padded) if windowed else y
