"""The torch modules behind the generic ops, and the containers the builder assembles.

Only `build` imports this module: the check path never loads torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    # timm's convention: the cut is at +-2 in absolute value, so for std 0.02 it is a plain normal
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0) if std > 0 else nn.init.zeros_(t)


class ChannelLinear(nn.Linear):
    """Linear over channels; on a map (channel_first) it runs channels-last and permutes back."""

    def __init__(self, cin, cout, bias=True, channel_first=False, init_std=0.02):
        super().__init__(cin, cout, bias)
        self.channel_first = channel_first
        trunc_normal_(self.weight, init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        if self.channel_first:
            return F.linear(x.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)
        return F.linear(x, self.weight, self.bias)


class ChannelLayerNorm(nn.LayerNorm):
    def __init__(self, channels, eps=1e-5, affine=True, bias=True, channel_first=False):
        super().__init__(channels, eps, elementwise_affine=affine, bias=bias)
        self.channel_first = channel_first

    def forward(self, x):
        if self.channel_first:
            return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ChannelRMSNorm(nn.RMSNorm):
    def __init__(self, channels, eps=1e-6, channel_first=False):
        super().__init__(channels, eps)
        self.channel_first = channel_first

    def forward(self, x):
        if self.channel_first:
            return super().forward(x.movedim(1, -1)).movedim(-1, 1)
        return super().forward(x)


class ChannelScale(nn.Module):
    def __init__(self, channels, init=1e-5, channel_first=False):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), float(init)))
        self.channel_first = channel_first

    def forward(self, x):
        if self.channel_first:
            return x * self.scale.view(-1, *([1] * (x.ndim - 2)))
        return x * self.scale


class StarReLU(nn.Module):
    def __init__(self, scale=1.0, bias=0.0, learnable=True):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(scale)]), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor([float(bias)]), requires_grad=learnable)

    def forward(self, x):
        return self.scale * F.relu(x) ** 2 + self.bias


class SquaredReLU(nn.Module):
    def forward(self, x):
        return F.relu(x) ** 2


class ToTokens(nn.Module):
    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class ToMap(nn.Module):
    def __init__(self, grid):
        super().__init__()
        self.grid = tuple(grid)

    def forward(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.grid)


class GlobalPool(nn.Module):
    def __init__(self, mode, layout, extra):
        super().__init__()
        self.mode, self.layout, self.extra = mode, layout, extra

    def forward(self, x):
        if self.mode == "token":
            return x[:, 0]
        if self.layout == "tokens":
            x = x[:, self.extra :]
            return x.mean(1) if self.mode == "avg" else x.amax(1)
        x = x.flatten(2)
        return x.mean(2) if self.mode == "avg" else x.amax(2)


class PrefixTokens(nn.Module):
    def __init__(self, count, channels, std):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, count, channels))
        if std > 0:
            nn.init.normal_(self.token, std=std)

    def forward(self, x):
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class PosEmbed(nn.Module):
    def __init__(self, tokens, channels, std, skip):
        super().__init__()
        self.pos = nn.Parameter(trunc_normal_(torch.empty(1, tokens, channels), std))
        self.skip = skip

    def forward(self, x):
        if self.skip:
            return torch.cat([x[:, : self.skip], x[:, self.skip :] + self.pos], dim=1)
        return x + self.pos


class PatchMerging(nn.Module):
    def __init__(self, grid, norm, cin, cout):
        super().__init__()
        self.grid = tuple(grid)
        self.norm = norm if norm is not None else nn.Identity()
        self.reduction = ChannelLinear(cin, cout, bias=False)

    def forward(self, x):
        b, _, c = x.shape
        if len(self.grid) == 1:
            x = x.reshape(b, self.grid[0] // 2, 2 * c)
        else:
            h, w = self.grid
            # concatenation order (0,0), (1,0), (0,1), (1,1): the row offset changes fastest, as in Swin
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h * w // 4, 4 * c)
        return self.reduction(self.norm(x))


def _relative_index(window: int, ndim: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * ndim, indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1  # (ndim, N, N), each in [0, 2w-2]
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for d in range(ndim):
        index = index * (2 * window - 1) + rel[d]
    return index


def _shift_mask(grid, window, shift) -> torch.Tensor:
    """-100 where a query and a key came from different regions of the rolled image (Swin)."""
    labels = torch.zeros(grid, dtype=torch.long)
    slices = [(slice(0, -window), slice(-window, -shift), slice(-shift, None))] * len(grid)
    count = 0
    for region in _product(slices):
        labels[region] = count
        count += 1
    windows = _partition(labels[None, ..., None], grid, window).squeeze(-1)  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, -100.0, 0.0)


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head, *tail)


def _partition(x: torch.Tensor, grid, window) -> torch.Tensor:
    """(B, *grid, C) -> (B * nW, window**ndim, C)."""
    b, c = x.shape[0], x.shape[-1]
    if len(grid) == 1:
        return x.reshape(b * grid[0] // window, window, c)
    h, w = grid
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _unpartition(x: torch.Tensor, grid, window, b) -> torch.Tensor:
    c = x.shape[-1]
    if len(grid) == 1:
        return x.reshape(b, grid[0], c)
    h, w = grid
    x = x.reshape(b, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)


class Attention(nn.Module):
    def __init__(self, dim, out, heads, grid, qkv_bias, proj_bias, window, shift, relative_bias, reduce, kv_norm):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.grid, self.window, self.shift, self.reduce = tuple(grid), window, shift, reduce
        ndim = len(self.grid)
        if reduce:  # keys and values from their own projection (PVT): q and kv
            self.q = ChannelLinear(dim, dim, qkv_bias)
            self.kv = ChannelLinear(dim, 2 * dim, qkv_bias)
            if reduce > 1:
                conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
                self.sr = conv(dim, dim, reduce, reduce)
            self.norm = kv_norm if kv_norm is not None else nn.Identity()
        else:
            self.qkv = ChannelLinear(dim, 3 * dim, qkv_bias)
        self.proj = ChannelLinear(dim, out, proj_bias)
        mask = None
        if relative_bias:
            self.relative_position_bias_table = nn.Parameter(
                trunc_normal_(torch.empty((2 * window - 1) ** ndim, heads), 0.02)
            )
            self.register_buffer("relative_position_index", _relative_index(window, ndim), persistent=False)
        if window and shift:
            mask = _shift_mask(self.grid, window, shift)[:, None]  # (nW, 1, N, N)
        self.register_buffer("attn_mask", mask, persistent=False)

    def _bias(self):
        bias = None
        if hasattr(self, "relative_position_bias_table"):
            n = self.relative_position_index.shape[0]
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = table.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
        if self.attn_mask is not None:
            bias = self.attn_mask if bias is None else bias + self.attn_mask  # (nW, heads, N, N)
        return bias

    def _heads(self, t, b, n):
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, n, c = x.shape
        if self.window:
            x = x.view(b, *self.grid, c)
            if self.shift:
                x = torch.roll(x, [-self.shift] * len(self.grid), dims=list(range(1, len(self.grid) + 1)))
            x = _partition(x, self.grid, self.window)
        bw, nw = x.shape[0], x.shape[1]
        if hasattr(self, "qkv"):
            qkv = self.qkv(x).reshape(bw, nw, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q = self._heads(self.q(x), bw, nw)
            src = x
            if self.reduce > 1:
                src = self.sr(x.transpose(1, 2).reshape(bw, c, *self.grid)).flatten(2).transpose(1, 2)
            src = self.norm(src)
            m = src.shape[1]
            k, v = self.kv(src).reshape(bw, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._bias()
        if bias is not None and self.attn_mask is not None:
            nwin = self.attn_mask.shape[0]
            q, k, v = (t.view(b, nwin, self.heads, nw, self.head_dim) for t in (q, k, v))
            bias = bias.view(nwin, self.heads, nw, nw) if bias.dim() == 4 else bias
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        y = y.reshape(bw, self.heads, nw, self.head_dim).transpose(1, 2).reshape(bw, nw, c)
        y = self.proj(y)
        if self.window:
            y = _unpartition(y, self.grid, self.window, b)
            if self.shift:
                y = y.view(b, *self.grid, -1)
                y = torch.roll(y, [self.shift] * len(self.grid), dims=list(range(1, len(self.grid) + 1)))
                y = y.reshape(b, n, -1)
        return y


class Stack(nn.Module):
    """Named submodules run in order (a fixed-structure op such as patch_embed's conv and norm)."""

    def __init__(self, **mods):
        super().__init__()
        for name, mod in mods.items():
            if mod is not None:
                self.add_module(name, mod)

    def forward(self, x):
        for mod in self._modules.values():
            x = mod(x)
        return x
