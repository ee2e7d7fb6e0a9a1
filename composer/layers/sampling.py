"""The torch side of `composer.ops.sampling` and `composer.ops.unfold_tokens`: a deformable
convolution and the deformable key source, both in plain PyTorch (`F.grid_sample`, no compiled
extension), and the unfold of a map into tokens of patches. 1-D maps are sampled as 2-D maps of
height 1; 3-D maps with the 5-D form of `grid_sample`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .core import ChannelLayerNorm, trunc_normal_


def _conv_cls(ndim: int):
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]


def _grid_sample(x: torch.Tensor, pos: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Sample `x` (N, C, *S) at `pos` (N, *P, d), normalised coordinates in dim order (not
    grid_sample's reversed x, y order); returns (N, C, *P). `P` may have any rank: it is folded to
    the rank grid_sample needs."""
    n, c = x.shape[:2]
    d = x.ndim - 2
    points = pos.shape[1:-1]
    flat = pos.reshape(n, -1, d)
    if d == 1:  # a 1-D map is a 2-D map of height 1, sampled on its only row
        x = x.unsqueeze(2)
        grid = torch.stack([flat[..., 0], torch.zeros_like(flat[..., 0])], -1).unsqueeze(1)
    elif d == 2:
        grid = flat.flip(-1).unsqueeze(1)
    else:
        grid = flat.flip(-1).unsqueeze(1).unsqueeze(1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners)
    return out.reshape(n, c, *points)


def deform_sample(x: torch.Tensor, offset: torch.Tensor, kernel, stride, padding, dilation,
                  offset_groups: int) -> torch.Tensor:
    """The sampled taps of a deformable convolution: x (B, C, *S) read at
    `o * stride - padding + k * dilation + offset` for every output position o and tap k, with
    offsets (B, offset_groups * taps * d, *O); returns (B, C, taps, prod(O))."""
    b, c = x.shape[:2]
    size = x.shape[2:]
    d = len(size)
    out = offset.shape[2:]
    taps = math.prod(kernel)
    kw = dict(dtype=x.dtype, device=x.device)
    tap = torch.stack(torch.meshgrid(*[torch.arange(k, **kw) * dl for k, dl in zip(kernel, dilation)],
                                     indexing="ij"), -1).reshape(taps, *[1] * d, d)
    where = torch.stack(torch.meshgrid(*[torch.arange(o, **kw) * s - p for o, s, p in zip(out, stride, padding)],
                                       indexing="ij"), -1)  # (*O, d)
    off = offset.reshape(b * offset_groups, taps, d, *out).movedim(2, -1)  # (B*og, taps, *O, d)
    pos = tap + where + off  # pixel coordinates
    extent = torch.tensor(size, **kw)
    pos = (2 * pos + 1) / extent - 1  # normalised for align_corners=False: -1 and 1 are the outer edges
    cols = _grid_sample(x.reshape(b * offset_groups, c // offset_groups, *size), pos, align_corners=False)
    return cols.reshape(b, c, taps, -1)


class DeformConv(nn.Module):
    """Deformable convolution in 1-D, 2-D or 3-D; see `composer.ops.sampling.DeformConv`."""

    def __init__(self, cin, cout, kernel, stride, padding, dilation, groups, offset_groups, bias, conv_offset):
        super().__init__()
        self.kernel, self.stride, self.padding, self.dilation = tuple(kernel), tuple(stride), tuple(padding), \
            tuple(dilation)
        self.groups, self.offset_groups = groups, offset_groups
        self.weight = nn.Parameter(torch.empty(cout, cin // groups, *self.kernel))
        self.bias = nn.Parameter(torch.empty(cout)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.ConvNd's default
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        self.conv_offset = conv_offset
        nn.init.zeros_(conv_offset.weight)
        nn.init.zeros_(conv_offset.bias)

    def forward(self, x):
        offset = self.conv_offset(x)
        b, out = x.shape[0], offset.shape[2:]
        cols = deform_sample(x, offset, self.kernel, self.stride, self.padding, self.dilation, self.offset_groups)
        g, cout = self.groups, self.weight.shape[0]
        y = self.weight.reshape(g, cout // g, -1) @ cols.reshape(b, g, -1, cols.shape[-1])  # (B, g, cout/g, L)
        y = y.reshape(b, cout, *out)
        if self.bias is not None:
            y = y + self.bias.view(-1, *[1] * len(out))
        return y

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, kernel={self.kernel}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"offset_groups={self.offset_groups}")


def _centres(size, **kw) -> torch.Tensor:
    """(*size, d): the normalised cell centres `(i + 0.5) / n * 2 - 1` of a grid."""
    return torch.stack(torch.meshgrid(*[(torch.arange(n, **kw) + 0.5) / n * 2 - 1 for n in size], indexing="ij"), -1)


class DeformableKeys(nn.Module):
    """The `deformable` key source: (x (B, C, *S), q (B, C, *S)) -> sampled tokens (B, M, C); with
    `bias = (heads, table size, std)` -> (tokens, score bias (B, heads, prod(S), M)), the
    relative-position table `rpe_table` read at the query-minus-sample displacement."""

    def __init__(self, dim, ndim, groups, kernel, stride, factor, bias=None):
        super().__init__()
        if bias is not None:
            heads, table, std = bias
            self.rpe_table = nn.Parameter(trunc_normal_(torch.empty(heads, *table), std))
        else:
            self.rpe_table = None
        cg = dim // groups
        self.groups, self.factor = groups, float(factor)
        conv = _conv_cls(ndim)
        self.conv_offset = nn.Sequential(
            conv(cg, cg, kernel, stride, kernel // 2, groups=cg),
            ChannelLayerNorm(cg, channel_first=True),
            nn.GELU(),
            conv(cg, ndim, 1, bias=False),
        )

    def forward(self, x, q):
        b, c = x.shape[:2]
        size = x.shape[2:]
        g = self.groups
        off = self.conv_offset(q.reshape(b * g, c // g, *size))  # (B*g, d, *K)
        grid = off.shape[2:]
        kw = dict(dtype=x.dtype, device=x.device)
        if self.factor > 0:
            rng = torch.tensor([self.factor / k for k in grid], **kw).view(1, -1, *[1] * len(grid))
            off = off.tanh() * rng
        pos = _centres(grid, **kw) + off.movedim(1, -1)  # (B*g, *K, d): offsets from the cell centres
        sampled = _grid_sample(x.reshape(b * g, c // g, *size), pos, align_corners=True)  # (B*g, C/g, *K)
        tokens = sampled.reshape(b, c, -1).transpose(1, 2)
        if self.rpe_table is None:
            return tokens
        d, h = len(size), self.rpe_table.shape[0]
        disp = (_centres(size, **kw).reshape(1, -1, 1, d) - pos.reshape(b * g, 1, -1, d)) * 0.5  # (B*g, N, M, d)
        table = self.rpe_table.reshape(1, g, h // g, *self.rpe_table.shape[1:]).expand(b, -1, -1, *[-1] * d)
        bias = _grid_sample(table.reshape(b * g, h // g, *self.rpe_table.shape[1:]), disp, align_corners=True)
        return tokens, bias.reshape(b, h, disp.shape[1], disp.shape[2])


class UnfoldTokens(nn.Module):
    """(B, C, *S) -> (B, prod(O), C * k^d): every `kernel`-sized patch (stride, zero padding) as one
    token, channels ordered (c, k_1, ..., k_d) as `nn.Unfold`."""

    def __init__(self, kernel: int, stride: int, padding: int):
        super().__init__()
        self.kernel, self.stride, self.padding = kernel, stride, padding

    def forward(self, x):
        d = x.ndim - 2
        if self.padding:
            x = F.pad(x, [self.padding] * (2 * d))
        if d == 2:
            t = F.unfold(x, self.kernel, stride=self.stride)  # (B, C*k*k, L)
            return t.transpose(1, 2)
        for i in range(d):
            x = x.unfold(2 + i, self.kernel, self.stride)  # (B, C, *O, k, ..., k)
        b, c = x.shape[:2]
        order = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
        return x.permute(order).reshape(b, -1, c * self.kernel ** d)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"
