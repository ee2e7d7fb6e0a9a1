"""The position pieces of the attention module: relative-position tables, a learned dense bias,
Transformer-XL's relative positions, the continuous position bias and LePE."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core import ChannelLinear, tie_owner, trunc_normal_
from ..positions import relative_index
from . import tables
from .groups import conv_cls, to_map, to_tokens
from .module import Piece


class RelativeTable(Piece):
    """A learned bias per head and relative offset inside a group of `size`^ndim tokens:
    `relative_position_bias_table` ((2w-1)^ndim, heads), or (heads, 2w-1, ...) read at the
    key-minus-query offset with `as_map` (TF MaxViT), initialised with `std`, and the non-persistent buffer
    `relative_position_index`; `messengers`: two more scalars per head `rel_pos_msg` for the
    window's messenger token (its row, then its column)."""

    rank = 70

    def __init__(self, heads, size, ndim, std=0.02, as_map=False, messengers=False):
        self.heads, self.size, self.ndim, self.std = heads, size, ndim, std
        self.as_map, self.messengers = as_map, messengers

    def install(self, m):
        h, w, ndim = self.heads, self.size, self.ndim
        index = relative_index((w,) * ndim, 0, 0, False)
        if self.as_map:
            m.relative_position_bias_table = nn.Parameter(nn.init.normal_(torch.empty(h, *[2 * w - 1] * ndim), std=self.std))
            index = index.t().contiguous()
        else:
            m.relative_position_bias_table = nn.Parameter(trunc_normal_(torch.empty((2 * w - 1) ** ndim, h), self.std))
        m.register_buffer("relative_position_index", index, persistent=False)
        if self.messengers:
            m.rel_pos_msg = nn.Parameter(trunc_normal_(torch.empty(h, 2, 1, 1), 0.02))

    def bias(self, m, run):
        n = m.relative_position_index.shape[0]
        if self.as_map:
            table = m.relative_position_bias_table.flatten(1)[:, m.relative_position_index.view(-1)]
            bias = table.view(-1, n, n)  # (heads, N, N)
        else:
            table = m.relative_position_bias_table[m.relative_position_index.view(-1)]
            bias = table.view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
        if self.messengers:  # the messenger first: its row, then its column
            h, k = m.rel_pos_msg.shape[0], bias.shape[-1]
            bias = torch.cat([m.rel_pos_msg[:, 0].expand(h, k, 1), bias], -1)
            bias = torch.cat([m.rel_pos_msg[:, 1].expand(h, 1, k + 1), bias], -2)
        return bias


class LearnedTable(Piece):
    """A dense learned bias `relative_pos` (heads, queries, keys) over every key (CMT); `tie`: one
    table for every attention built under the same key (the state_dict holds it once)."""

    rank = 80
    covers_prepended = True

    def __init__(self, heads, queries, keys, std, tie=None):
        self.shape, self.std, self.tie = (heads, queries, keys), std, tie

    def install(self, m):
        owner = tie_owner(self.tie, m)
        if owner is m:
            m.relative_pos = nn.Parameter(nn.init.normal_(torch.empty(*self.shape), std=self.std))
        else:  # a plain attribute: not registered, so the table is stored once
            m.__dict__["_bias_owner"] = owner

    def table(self, m):
        """The table `m` reads: its own, or the tied owner's."""
        return m.__dict__.get("_bias_owner", m).relative_pos

    def bias(self, m, run):
        table = self.table(m)
        return table.unsqueeze(2) if run.gathered else table


class RelativeXL(Piece):
    """Transformer-XL / Conformer relative positions over the token index:
    ((q + u) k^T + (q + v') P_{i-j}^T) * scale, with P the sinusoid table through `linear_pos`;
    parameters `pos_bias_u`, `pos_bias_v`, buffers `pos_table` and `pos_index` at the build length
    (made for another length when the input has one, once per length)."""

    rank = 90
    covers_prepended = True

    def __init__(self, dim, heads, tokens):
        self.dim, self.heads, self.tokens = dim, heads, tokens

    def install(self, m):
        d = self.dim // self.heads
        m.linear_pos = ChannelLinear(self.dim, self.dim, bias=False)
        m.pos_bias_u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.heads, d)))
        m.pos_bias_v = nn.Parameter(nn.init.xavier_uniform_(torch.empty(self.heads, d)))
        m.register_buffer("pos_table", tables.sinusoid_relative(self.tokens, self.dim), persistent=False)
        m.register_buffer("pos_index", tables.relative_offset_index(self.tokens), persistent=False)

    def tables_for(self, m, length):
        """(sinusoid table (2T-1, C), offset index (T, T)) for T = `length` tokens."""
        dev = m.pos_table.device
        if type(length) is not int:  # traced with a symbolic length: made in the program
            return tables.sinusoid_relative(length, self.dim).to(dev), tables.relative_offset_index(length).to(dev)
        if length == m.pos_index.shape[0]:
            return m.pos_table, m.pos_index
        cache = m.__dict__.setdefault("_xl", {})
        made = cache.get(length)
        if made is None or made[0].device != dev:
            with torch.device(dev):
                made = cache[length] = (tables.sinusoid_relative(length, self.dim), tables.relative_offset_index(length))
        return made

    def prepare(self, m, q, k, run):
        table, index = self.tables_for(m, q.shape[2])
        p = m.linear_pos(table).view(-1, m.heads, m.head_dim).transpose(0, 1)  # (h, 2T-1, d)
        pos = (q + m.pos_bias_v[:, None]) @ p.transpose(-2, -1)  # (B, h, T, 2T-1)
        run.xl_bias = pos.gather(-1, index.expand(*pos.shape[:2], -1, -1)) * m.qk_scale
        return q + m.pos_bias_u[:, None], k

    def bias(self, m, run):
        return run.xl_bias


class ContinuousBias(Piece):
    """A bias MLP over the relative coordinates of a group's queries and `key_grid` keys
    (`cpb_fc1`, ReLU, dropout, `cpb_fc2`; buffers `cpb_table` of the distinct coordinates and
    `cpb_index`). Over gathered keys (a neighbourhood) it is the bias of the extra keys instead."""

    rank = 110

    def __init__(self, heads, hidden, group, key_grid, coords, drop):
        self.heads, self.hidden, self.group, self.key_grid = heads, hidden, tuple(group), tuple(key_grid)
        self.coords, self.drop = coords, drop

    def install(self, m):
        m.cpb_fc1 = ChannelLinear(len(self.group), self.hidden)
        m.cpb_act = nn.ReLU()
        m.cpb_drop = nn.Dropout(self.drop) if self.drop else nn.Identity()
        m.cpb_fc2 = ChannelLinear(self.hidden, self.heads)
        index, table = tables.continuous_table(self.group, self.key_grid, self.coords)
        m.register_buffer("cpb_index", index, persistent=False)
        m.register_buffer("cpb_table", table, persistent=False)

    def table(self, m):
        """(heads, N, M): the MLP over the distinct coordinates, gathered."""
        b = m.cpb_fc2(m.cpb_drop(m.cpb_act(m.cpb_fc1(m.cpb_table))))  # (U, heads)
        return b.t()[:, m.cpb_index].view(-1, math.prod(self.group), math.prod(self.key_grid))

    def bias(self, m, run):
        return None if run.gathered else self.table(m)

    def extra_bias(self, m, run):
        return self.table(m)


class LePE(Piece):
    """LePE: a depthwise conv `lepe` over the values (per group: `group`, else the tokens' grid) or
    over the input (`source = "input"`), added to the attention's output."""

    rank = 20

    def __init__(self, dim, ndim, kernel, source="v", group=None):
        self.dim, self.ndim, self.kernel, self.source = dim, ndim, kernel, source
        self.group = tuple(group) if group is not None else None

    def install(self, m):
        k = self.kernel
        m.lepe = conv_cls(self.ndim)(self.dim, self.dim, k, 1, k // 2, groups=self.dim)

    def finish(self, m, y, run):
        if self.source == "input":
            return y + to_tokens(m.lepe(to_map(run.x, run.grid)))
        return y + to_tokens(m.lepe(to_map(run.v, self.group or run.grid)))
