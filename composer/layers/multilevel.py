"""The module behind `multilevel_attention` (see composer/ops/multilevel.py).

Parameters: `qkv`, `proj` (linears), `relative_position_bias_table` ((2w-1)^2, heads),
`relative_position_bias_table_to_neighbors` (1, heads, w^2, ring) when there is a ring,
`pool` (Linear(w^2, 1)) and `relative_position_bias_table_to_windows` (heads, (w+k-1)^2) when there
is a pooled level. Index tables and the padding mask are buffers built once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import partition_windows, unpartition_windows
from .core import built_on_cpu, trunc_normal_


def _relative_index(q, k):
    """(q^2, k^2) index into a (q + k - 1)^2 table: offset (qi - ki, qj - kj), shifted to >= 0."""
    cq = torch.stack(torch.meshgrid(torch.arange(q), torch.arange(q), indexing="ij")).flatten(1)
    ck = torch.stack(torch.meshgrid(torch.arange(k), torch.arange(k), indexing="ij")).flatten(1)
    rel = cq[:, :, None] - ck[:, None, :] + (k - 1)
    return rel[0] * (q + k - 1) + rel[1]


class MultilevelAttention(nn.Module):
    def __init__(self, dim, heads, grid, window, expand, pooled, qkv_bias=True):
        super().__init__()
        self.heads, self.grid, self.w, self.e, self.k = heads, tuple(grid), window, expand, pooled
        self.scale = (dim // heads) ** -0.5
        w = window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(w, w), persistent=False)
        if expand:
            e = expand
            self.register_buffer("ring_index", _ring_index(w, e), persistent=False)
            ring = self.ring_index.numel()
            self.relative_position_bias_table_to_neighbors = nn.Parameter(torch.zeros(1, heads, w * w, ring))
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=0.02)
        if pooled:
            self.pool = nn.Linear(w * w, 1)
            nn.init.constant_(self.pool.weight, 1.0 / (w * w))
            nn.init.zeros_(self.pool.bias)
            self.relative_position_bias_table_to_windows = nn.Parameter(torch.zeros(heads, (w + pooled - 1) ** 2))
            trunc_normal_(self.relative_position_bias_table_to_windows, std=0.02)
            self.register_buffer("pooled_index", _relative_index(w, pooled), persistent=False)
            nh, nw = self.grid[0] // w, self.grid[1] // w
            ones = torch.ones(1, 1, nh, nw)
            valid = F.unfold(ones, pooled, padding=pooled // 2)  # (1, k*k, nW)
            self.register_buffer("pooled_mask", (valid[0].t() == 0).float() * -100.0, persistent=False)  # (nW, k*k)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        trunc_normal_(self.qkv.weight, std=0.02)
        trunc_normal_(self.proj.weight, std=0.02)
        if qkv_bias:
            nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def _split(self, t):  # (B', N, C) -> (B', heads, N, d)
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x):
        b, _, c = x.shape
        (h, wd), w, e, k = self.grid, self.w, self.e, self.k
        xm = x.reshape(b, h, wd, c)
        q, kk, v = self.qkv(xm).chunk(3, dim=-1)  # each (B, H, W, C)

        def windows(t):  # (B, H, W, C) -> (B * nW, w * w, C), windows row-major
            return partition_windows(t, self.grid, w)

        qw = windows(q)
        keys, values = [windows(kk)], [windows(v)]
        if e:
            rolled_k, rolled_v = [], []
            for sh in ((-e, -e), (-e, e), (e, -e), (e, e)):
                rolled_k.append(windows(torch.roll(kk, sh, dims=(1, 2))))
                rolled_v.append(windows(torch.roll(v, sh, dims=(1, 2))))
            keys.append(torch.cat(rolled_k, 1)[:, self.ring_index])
            values.append(torch.cat(rolled_v, 1)[:, self.ring_index])
        nwin = (h // w) * (wd // w)
        if k:
            # one token per window: a learned linear map over its w*w positions, per channel
            pooled = self.pool(windows(xm).transpose(1, 2)).squeeze(-1)  # (B * nW, C)
            pooled = pooled.reshape(b, h // w, wd // w, c)
            _, pk, pv = self.qkv(pooled).chunk(3, dim=-1)
            for t, out in ((pk, keys), (pv, values)):
                u = F.unfold(t.permute(0, 3, 1, 2), k, padding=k // 2)  # (B, C * k*k, nW)
                out.append(u.reshape(b, c, k * k, nwin).permute(0, 3, 2, 1).reshape(b * nwin, k * k, c))
        key, value = torch.cat(keys, 1), torch.cat(values, 1)
        qh, kh, vh = self._split(qw), self._split(key), self._split(value)
        bias = []
        area = w * w
        table = self.relative_position_bias_table[self.relative_position_index.flatten()]
        bias.append(table.reshape(area, area, -1).permute(2, 0, 1).unsqueeze(0).expand(nwin, -1, -1, -1))
        if e:
            bias.append(self.relative_position_bias_table_to_neighbors.expand(nwin, -1, -1, -1))
        if k:
            pb = self.relative_position_bias_table_to_windows[:, self.pooled_index.flatten()].reshape(-1, area, k * k)
            bias.append(pb.unsqueeze(0) + self.pooled_mask[:, None, None, :])
        bias = torch.cat(bias, -1)  # (nW, heads, area, keys)
        bias = bias.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * nwin, self.heads, area, -1)
        attn = (qh * self.scale) @ kh.transpose(-2, -1) + bias.to(qh.dtype)  # explicit: MACs seen by the counter
        out = attn.softmax(-1) @ vh
        out = self.proj(out.transpose(1, 2).reshape(b * nwin, area, c))
        return unpartition_windows(out, self.grid, w, b)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, window={self.w}, expand={self.e}, pooled={self.k}"


@built_on_cpu
def _ring_index(w: int, e: int):
    """The positions of the four shifted copies of a w x w window that fall outside it (the ring of
    width e around the window), flattened."""
    masks = []
    for rows, cols in ((slice(None, -e), slice(None, -e)), (slice(None, -e), slice(e, None)),
                       (slice(e, None), slice(None, -e)), (slice(e, None), slice(e, None))):
        m = torch.ones(w, w)
        m[rows, cols] = 0
        masks.append(m.flatten())
    return torch.cat(masks).nonzero().flatten()
