"""The torch module behind the `attention` op (see composer/ops/attention.py for the parts).

Submodules and their state_dict names:
  `qkv`                           one linear to q, k, v (the default);
  `q`, `kv`                       separate linears when keys/values are reduced (`kv = reduce(...)`);
  `sr` / `pool`, `norm`           the reduction (strided conv, or average pool) and its norm (PVT);
  `conv_q`, `conv_k`, `conv_v`    CvT's convolutional projection, each `.conv` (depthwise, no bias)
                                  and `.bn`, followed by the linears `q`, `k`, `v`;
  `relative_position_bias_table`  the relative bias (window or grid groups), with the non-persistent
                                  buffer `relative_position_index`; (heads, 2w-1, ...) for
                                  `relative_bias_map`;
  `lepe`                          LePE's depthwise conv on V (added to the attention output);
  `proj`                          the output projection.
Masks and index tables are buffers, built once at construction.

`CascadedAttention`, the module behind the `cascaded_attention` op (EfficientViT-M's cascaded group
attention over a map: `qkvs.<i>`, `dws.<i>`, `attention_biases`), is at the end of this file.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .core import ChannelLinear, trunc_normal_


def _product(lists):
    if not lists:
        yield ()
        return
    for head in lists[0]:
        for tail in _product(lists[1:]):
            yield (head, *tail)


def _relative_index(window: int, ndim: int) -> torch.Tensor:
    """(N, N) index into a ((2w-1)^ndim)-row table for every pair of positions of a w^ndim group."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * ndim, indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1  # (ndim, N, N), each in [0, 2w-2]
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for d in range(ndim):
        index = index * (2 * window - 1) + rel[d]
    return index


def _perm(ndim: int, mode: str) -> list[int]:
    # the grid is viewed as (count, size) per dim for windows and (size, count) for grid groups;
    # the permutation brings the group-count axes first and the in-group axes after them
    counts = [1 + 2 * d + (mode == "grid") for d in range(ndim)]
    members = [1 + 2 * d + (mode != "grid") for d in range(ndim)]
    return [0, *counts, *members, 2 * ndim + 1]


def _split(grid, size, mode):
    return [s for g in grid for s in ((g // size, size) if mode == "window" else (size, g // size))]


def _partition(x: torch.Tensor, grid, size, mode: str = "window") -> torch.Tensor:
    """(B, *grid, C) -> (B * groups, size**ndim, C). `window`: contiguous size^d windows (Swin);
    `grid`: each group holds the size^d tokens at stride grid/size (MaxViT grid attention)."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, *_split(grid, size, mode), c).permute(*_perm(len(grid), mode))
    return x.reshape(-1, size ** len(grid), c)


def _unpartition(x: torch.Tensor, grid, size, b, mode: str = "window") -> torch.Tensor:
    """The inverse of `_partition`: (B * groups, size**ndim, C) -> (B, prod(grid), C)."""
    c, ndim = x.shape[-1], len(grid)
    split = _split(grid, size, mode)
    perm = _perm(ndim, mode)
    x = x.reshape(b, *[split[p - 1] for p in perm[1:-1]], c)
    x = x.permute(*sorted(range(len(perm)), key=perm.__getitem__))
    return x.reshape(b, -1, c)


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


def _conv_cls(ndim: int):
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]


def _to_map(t: torch.Tensor, grid) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


def _to_tokens(m: torch.Tensor) -> torch.Tensor:
    return m.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention over (B, extra + prod(grid), C) tokens; see the module docstring."""

    def __init__(self, dim, out, heads, grid, extra=0, qkv_bias=True, proj_bias=True, partition=None, size=0,
                 shift=0, padded=None, relative_bias=False, reduce=0, reduce_mode="conv", kv_norm=None, conv_proj=None,
                 lepe=0, scale=None, input_query=False):
        super().__init__()
        self.input_query = input_query  # x carries [tokens (dim), queries (dim)]: kv from `qkv`
        self.heads, self.head_dim = heads, dim // heads
        self.grid, self.extra = tuple(grid), extra
        self.partition, self.size, self.shift = partition, size, shift
        self.padded = tuple(padded) if padded is not None else self.grid  # the grid the groups tile
        self.reduce, self.scale = reduce, scale
        ndim = len(self.grid)
        self.group = (size,) * ndim if partition else self.grid  # the grid of one attention group
        if conv_proj is not None:  # CvT: depthwise conv + BN per q, k, v, then a linear each
            kernel, stride_kv = conv_proj
            self.stride_kv = stride_kv
            for name, stride in (("q", 1), ("k", stride_kv), ("v", stride_kv)):
                conv = _conv_cls(ndim)(dim, dim, kernel, stride, kernel // 2, groups=dim, bias=False)
                bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1](dim)
                self.add_module(f"conv_{name}", nn.Sequential(OrderedDict(conv=conv, bn=bn)))
            self.q = ChannelLinear(dim, dim, qkv_bias)
            self.k = ChannelLinear(dim, dim, qkv_bias)
            self.v = ChannelLinear(dim, dim, qkv_bias)
        elif reduce:  # keys and values from their own projection (PVT): q and kv
            self.q = ChannelLinear(dim, dim, qkv_bias)
            self.kv = ChannelLinear(dim, 2 * dim, qkv_bias)
            if reduce > 1:
                if reduce_mode == "conv":
                    self.sr = _conv_cls(ndim)(dim, dim, reduce, reduce)
                else:
                    self.pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[ndim - 1](reduce, reduce)
            self.norm = kv_norm if kv_norm is not None else nn.Identity()
        else:
            self.qkv = ChannelLinear(dim, (2 if input_query else 3) * dim, qkv_bias)
        if lepe:
            self.lepe = _conv_cls(ndim)(dim, dim, lepe, 1, lepe // 2, groups=dim)
        self.proj = ChannelLinear(dim, out, proj_bias)
        self.bias_map = relative_bias == "map"
        if self.bias_map:  # (heads, 2w-1, ...) read at the key-minus-query offset (TF MaxViT)
            self.relative_position_bias_table = nn.Parameter(
                nn.init.normal_(torch.empty(heads, *[2 * size - 1] * ndim), std=0.02)
            )
            self.register_buffer("relative_position_index", _relative_index(size, ndim).t().contiguous(),
                                 persistent=False)
        elif relative_bias:
            self.relative_position_bias_table = nn.Parameter(
                trunc_normal_(torch.empty((2 * size - 1) ** ndim, heads), 0.02)
            )
            self.register_buffer("relative_position_index", _relative_index(size, ndim), persistent=False)
        mask = None
        if partition == "window" and shift:
            mask = _shift_mask(self.padded, size, shift)[:, None]  # (nW, 1, N, N)
        self.register_buffer("attn_mask", mask, persistent=False)

    def _bias(self):
        bias = None
        if hasattr(self, "relative_position_bias_table"):
            n = self.relative_position_index.shape[0]
            if self.bias_map:
                table = self.relative_position_bias_table.flatten(1)[:, self.relative_position_index.view(-1)]
                bias = table.view(-1, n, n)  # (heads, N, N)
            else:
                table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
                bias = table.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
        if self.attn_mask is not None:
            bias = self.attn_mask if bias is None else bias + self.attn_mask  # (nW, heads, N, N)
        return bias

    def _heads(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _roll(self, x, shift):
        return torch.roll(x, [shift] * len(self.grid), dims=list(range(1, len(self.grid) + 1)))

    def _conv_project(self, x):
        e = self.extra
        cls, img = x[:, :e], x[:, e:]
        m = _to_map(img, self.grid)
        q, k, v = (torch.cat([cls, _to_tokens(getattr(self, f"conv_{n}")(m))], 1) for n in "qkv")
        return self._heads(self.q(q)), self._heads(self.k(k)), self._heads(self.v(v))

    def forward(self, x):
        b, n, c = x.shape
        if self.partition:
            x = x.view(b, *self.grid, c)
            if self.padded != self.grid:  # zero tokens at the end of every dim (Twins, Swin)
                x = F.pad(x, [0, 0] + [a for g, p in zip(self.grid[::-1], self.padded[::-1]) for a in (0, p - g)])
            if self.shift:
                x = self._roll(x, -self.shift)
            x = _partition(x, self.padded, self.size, self.partition)
        bw, nw = x.shape[0], x.shape[1]
        if self.input_query:
            x, q = x.split(self.heads * self.head_dim, dim=-1)
            q = self._heads(q)
            k, v = self.qkv(x).reshape(bw, nw, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        elif hasattr(self, "qkv"):
            qkv = self.qkv(x).reshape(bw, nw, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        elif hasattr(self, "conv_q"):
            q, k, v = self._conv_project(x)
        else:
            q = self._heads(self.q(x))
            src = x
            if self.reduce > 1:
                reducer = self.sr if hasattr(self, "sr") else self.pool
                src = _to_tokens(reducer(_to_map(x, self.grid)))
            src = self.norm(src)
            m = src.shape[1]
            k, v = self.kv(src).reshape(bw, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self._bias()
        if bias is not None and self.attn_mask is not None:
            nwin = self.attn_mask.shape[0]
            q, k, v = (t.view(b, nwin, self.heads, nw, self.head_dim) for t in (q, k, v))  # bias (nW, 1|heads, N, N)
        if bias is not None and not q.is_cuda:
            # an additive bias on the CPU: SDPA's float-mask path re-checks the mask every call and is
            # slower than the plain product (timm's Swin does the same)
            scale = self.head_dim ** -0.5 if self.scale is None else self.scale
            y = ((q * scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        c = self.heads * self.head_dim
        y = y.reshape(bw, self.heads, nw, self.head_dim).transpose(1, 2).reshape(bw, nw, c)
        if hasattr(self, "lepe"):  # LePE: a depthwise conv on V (per group), added to the output
            v = v.reshape(bw, self.heads, -1, self.head_dim).transpose(1, 2).reshape(bw, -1, c)
            y = y + _to_tokens(self.lepe(_to_map(v, self.group)))
        if self.partition:
            y = _unpartition(y, self.padded, self.size, b, self.partition)
            if self.shift:
                y = self._roll(y.view(b, *self.padded, c), self.shift).reshape(b, -1, c)
            if self.padded != self.grid:
                y = y.view(b, *self.padded, c)[(slice(None), *[slice(0, g) for g in self.grid])].reshape(b, n, c)
        return self.proj(y)


# ------------------------------------------------------------------------------ cascaded group attention
def _offset_index(group) -> torch.Tensor:
    """(N, N) index of the absolute offset (|d1|, |d2|, ...) between two positions of a group, in
    mixed radix (|d1| * g2 + |d2| in 2-D): the order in which the offsets first occur."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(g) for g in group], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).abs()
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for d, g in enumerate(group):
        index = index * g + rel[d]
    return index


def _conv_bn(ndim, cin, cout, kernel=1, groups=1):
    conv = _conv_cls(ndim)(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[ndim - 1](cout)
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
            self.register_buffer("attention_bias_idxs", _offset_index(self.group), persistent=False)

    def _windows(self, x):
        b, c = x.shape[:2]
        x = x.movedim(1, -1)
        if self.padded != self.grid:  # zeros at the end of every dim
            x = F.pad(x, [0, 0] + [a for g, p in zip(self.grid[::-1], self.padded[::-1]) for a in (0, p - g)])
        x = _partition(x, self.padded, self.size)  # (B * nW, N, C)
        return x.transpose(1, 2).reshape(x.shape[0], c, *self.group)

    def _unwindows(self, y, b):
        c = y.shape[1]
        y = _unpartition(y.flatten(2).transpose(1, 2), self.padded, self.size, b)  # (B, prod(padded), C)
        y = y.view(b, *self.padded, c)
        if self.padded != self.grid:
            y = y[(slice(None), *[slice(0, g) for g in self.grid])]
        return y.movedim(-1, 1).contiguous()

    def forward(self, x):
        b = x.shape[0]
        windowed = self.size and self.group != self.grid
        if windowed:
            x = self._windows(x)
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
        return self._unwindows(y, b) if windowed else y
