"""The partition pieces of the attention module: which keys a query sees (windows or grid groups,
a gathered neighbourhood, routed regions)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core import trunc_normal_
from . import tables
from .groups import crop, pad_to, padded_grid, partition_windows, roll, shift_mask, unpartition_windows
from .module import Piece


class Windows(Piece):
    """Attention inside groups of `size`^ndim tokens: contiguous windows (`mode = "window"`,
    Swin), optionally `shift`ed with the mask `attn_mask` (a buffer), or grid groups (`mode =
    "grid"`, MaxViT). `padded`: the grid the groups tile at the build size (zero tokens at the end
    of every dim); at another grid, windows pad up to a multiple of the window (the mask made once
    per grid). `pad_first`: a padding the blueprint asks for is made before the roll (the official
    Swin's order), one made for another input size after it (timm's). `messengers`: one prefix token
    per window joins its window (first, as a query and a key)."""

    rank = 120

    def __init__(self, grid, mode, size, shift=0, padded=None, pad_first=False, messengers=False):
        self.grid, self.mode, self.size, self.shift = tuple(grid), mode, size, shift
        self.padded = tuple(padded) if padded is not None else self.grid
        self.pad_first, self.messengers = pad_first, messengers

    def install(self, m):
        mask = shift_mask(self.padded, self.size, self.shift)[:, None] if self.mode == "window" and self.shift else None
        m.register_buffer("attn_mask", mask, persistent=False)  # (nW, 1, N, N)

    def _windows(self, m, grid):
        """(the grid the windows tile, the shifted windows' mask) for tokens on `grid`."""
        symbolic = not all(type(g) is int for g in grid)  # traced by torch.export with dynamic sizes
        if not symbolic and grid == self.grid:  # `grid` itself when nothing is padded (tested by identity)
            return (grid if self.padded == self.grid else self.padded), m.attn_mask
        if self.mode != "window":
            return grid, None
        padded = padded_grid(grid, self.size)
        if not symbolic and padded == grid:
            padded = grid
        if not self.shift:
            return padded, None
        if symbolic:  # made in the traced program, for whatever size it gets
            return padded, shift_mask(padded, self.size, self.shift)[:, None].to(m.attn_mask)
        cache = m.__dict__.setdefault("_masks", {})
        mask = cache.get(padded)
        if mask is None or mask.device != m.attn_mask.device:
            mask = cache[padded] = shift_mask(padded, self.size, self.shift)[:, None].to(m.attn_mask)
        return padded, mask

    def enter(self, m, x, run):
        run.padded, run.mask = self._windows(m, run.grid)
        if self.messengers:
            run.messengers, x = x[:, :m.extra], x[:, m.extra:]
        x = self._group(x, run)
        run.tensors = [self._group(t, run) for t in run.tensors]  # given queries: the same windows
        if self.messengers:
            x = torch.cat([run.messengers.reshape(-1, 1, run.messengers.shape[-1]), x], 1)  # (B * nW, 1 + N, C)
        return x

    def _group(self, x, run):
        grid = run.grid
        x = x.reshape(run.b, *grid, x.shape[-1])
        if self.shift and not self.pad_first:
            x = roll(x, -self.shift)
        if run.padded is not grid:
            x = pad_to(x, grid, run.padded)
        if self.shift and self.pad_first:
            x = roll(x, -self.shift)
        return partition_windows(x, run.padded, self.size, self.mode)

    def bias(self, m, run):
        return run.mask

    def leave(self, m, y, run):
        b, grid, padded, c = run.b, run.grid, run.padded, y.shape[-1]
        if self.messengers:
            msg, y = y[:, 0].reshape(b, -1, c), y[:, 1:]
        y = unpartition_windows(y, padded, self.size, b, self.mode)
        if self.shift and self.pad_first:
            y = roll(y.view(b, *padded, c), self.shift).reshape(b, -1, c)
        if padded is not grid:
            y = crop(y.view(b, *padded, c), grid).reshape(b, -1, c)
        if self.shift and not self.pad_first:
            y = roll(y.view(b, *grid, c), self.shift).reshape(b, -1, c)
        if self.messengers:
            y = torch.cat([msg, y], 1)
        return y


class Neighbourhood(Piece):
    """Each query attends to the `size`^ndim keys around it at spacing `dilation` (the buffer
    `neighbour_index`; keys outside the grid are a zero token, or masked with `mask`); `bias`: a
    bias per head and offset `relative_pos_bias_local`; `tokens`: query-conditioned neighbour
    weights added after the softmax (`learnable_tokens`, `learnable_bias`). Extra keys (`run.extra`)
    share the softmax, with their own bias (a piece's `extra_bias`)."""

    rank = 100

    def __init__(self, grid, size, dilation=1, mask=False, bias=False, tokens=False, heads=1, head_dim=1):
        self.grid, self.size, self.dilation, self.mask = tuple(grid), size, dilation, mask
        self.local_bias, self.tokens, self.heads, self.head_dim = bias, tokens, heads, head_dim

    def key_counts(self):
        """(per-query key counts (N,), keys gathered per query)."""
        index, inside = tables.neighbourhood_index(self.grid, self.size, self.dilation)
        return (inside.sum(-1) if self.mask else torch.full((index.shape[0],), index.shape[1])), index.shape[1]

    def install(self, m):
        index, inside = tables.neighbourhood_index(self.grid, self.size, self.dilation)
        m.register_buffer("neighbour_index", index, persistent=False)
        mask = torch.where(inside, 0.0, float("-inf"))[:, None] if self.mask else None  # (N, 1, K)
        m.register_buffer("neighbour_mask", mask, persistent=False)
        k, h = self.size ** len(self.grid), self.heads
        if self.local_bias:
            m.relative_pos_bias_local = nn.Parameter(trunc_normal_(torch.empty(h, k), 0.0004))
        if self.tokens:
            m.learnable_tokens = nn.Parameter(trunc_normal_(torch.empty(h, self.head_dim, k), 0.02))
            m.learnable_bias = nn.Parameter(torch.zeros(h, 1, k))

    def prepare(self, m, q, k, run):
        if self.tokens:
            run.q_unit = F.normalize(q, dim=-1)  # before any other change of q
        return q, k

    def core(self, m, q, k, v, run):
        q, k, v = m.split_heads(q), m.split_heads(k), m.split_heads(v)
        q, k = m.prepare(q, k, run)
        b, h, n, d = k.shape
        idx = m.neighbour_index
        count = idx.shape[1]
        zero = k.new_zeros(b, h, 1, d)
        k = torch.cat([k, zero], 2)[:, :, idx.view(-1)].view(b, h, n, count, d)
        v = torch.cat([v, zero], 2)[:, :, idx.view(-1)].view(b, h, n, count, d)
        bias = m.neighbour_mask
        if self.local_bias:
            lb = m.relative_pos_bias_local.view(h, 1, 1, count)
            bias = lb if bias is None else bias + lb
        run.gathered = True
        k, v = m.more_keys(k, v, run)
        bias = m.score_bias(run, bias)
        logits = m.scores(q.unsqueeze(3), k, bias)  # (B, h, N, 1, K)
        extra = run.extra
        if extra is None:
            a = logits.softmax(-1)
        else:  # the extra keys: one set for every query, one softmax with the neighbours
            terms = [p.extra_bias(m, run) for p in m.extra_biases]
            pooled = m.scores(q, extra[0], terms[0] if terms else None)  # (B, h, N, P)
            a = torch.cat([logits, pooled.unsqueeze(3)], -1).softmax(-1)
            a, a_pooled = a.split([logits.shape[-1], pooled.shape[-1]], -1)
        if self.tokens:  # query-conditioned neighbour weights, added after the softmax
            dyn = (run.q_unit @ m.learnable_tokens + m.learnable_bias).unsqueeze(3)  # (B, h, N, 1, K)
            a = a + F.pad(dyn, (run.prepended, 0))
        y = (a @ v).squeeze(3)  # (B, h, N, d)
        if extra is not None:
            y = y + a_pooled.squeeze(3) @ extra[1]
        return m.merge_heads(y)


class Routed(Piece):
    """Bi-level routing (BiFormer): the grid cut into `regions`^ndim regions, each region's queries
    attend to the tokens of the `topk` regions most like it (region means, no gradient)."""

    rank = 100

    def __init__(self, grid, regions, topk):
        self.grid, self.regions, self.topk = tuple(grid), regions, topk
        self.region = tuple(g // regions for g in self.grid)

    def core(self, m, q, k, v, run):
        b, region, c = q.shape[0], self.region, m.heads * m.head_dim
        if m.prepares:  # per-head changes of q and k first (cosine scores, ...)
            q, k = (m.merge_heads(t) for t in m.prepare(m.split_heads(q), m.split_heads(k), run))
        q, k, v = (partition_windows(t.view(b, *self.grid, -1), self.grid, region).view(
            b, -1, math.prod(region), c) for t in (q, k, v))  # (B, R, w, C)
        with torch.no_grad():  # region affinity, no gradient (BiFormer detaches)
            affinity = q.mean(2) @ k.mean(2).transpose(-2, -1)  # (B, R, R)
            index = affinity.topk(self.topk, dim=-1).indices  # (B, R, topk)
        batch = torch.arange(b, device=q.device)[:, None, None]
        r, w = q.shape[1], q.shape[2]
        k, v = (t[batch, index].reshape(b * r, self.topk * w, -1) for t in (k, v))  # (B*R, topk*w, C)
        q = m.split_heads(q.reshape(b * r, w, -1))
        k, v = m.split_heads(k), m.split_heads(v)
        k, v = m.more_keys(k, v, run)
        y = m.attend(q, k, v, None)  # (B*R, h, w, d)
        return unpartition_windows(m.merge_heads(y), self.grid, region, b)  # (B, N, C)
