"""The score pieces of the attention module: cosine scores, random-feature linear attention
(FAVOR+), learned key/value tokens and agent attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..core import trunc_normal_
from . import tables
from .groups import conv_cls, to_map, to_tokens
from .module import Piece


class Cosine(Piece):
    """Cosine scores (TransNeXt): l2-normalised q and k (extra and learned keys included), q scaled
    by a softplus temperature per head (`temperature`, initialised to `init`), an optional learned
    `query_embedding` added to the unit queries, and with `length_scale` by log(keys per query) (the
    buffer `seq_length_scale`; per query where a piece counts them, as a masked neighbourhood).
    The product itself is then unscaled."""

    rank = 40

    def __init__(self, heads, head_dim, init, query_embedding=False, length_scale=False, keys=0):
        self.heads, self.head_dim, self.init = heads, head_dim, init
        self.query_embedding, self.length_scale, self.key_count = query_embedding, length_scale, keys

    def install(self, m):
        m.temperature = nn.Parameter(torch.full((self.heads, 1, 1), math.log(math.expm1(self.init))))
        if self.query_embedding:
            m.query_embedding = nn.Parameter(trunc_normal_(torch.empty(self.heads, 1, self.head_dim), 0.02))
        length = None
        if self.length_scale:
            counting = [p for p in m.pieces if hasattr(p, "key_counts")]
            if counting:  # per-query counts of a partition's own keys, and their most
                counts, own = counting[0].key_counts()
                length = torch.as_tensor((counts + (self.key_count - own)).float().log()[:, None])  # (N, 1)
            else:
                length = torch.as_tensor(math.log(self.key_count))
        m.register_buffer("seq_length_scale", length, persistent=False)
        m.scale = m.qk_scale = 1.0

    def prepare(self, m, q, k, run):
        q = F.normalize(q, dim=-1)
        if self.query_embedding:
            q = q + m.query_embedding
        q = q * F.softplus(m.temperature)
        if m.seq_length_scale is not None:
            q = q * m.seq_length_scale
        run.unit_keys = True  # learned keys are normalised too
        if run.extra is not None:
            run.extra = (F.normalize(run.extra[0], dim=-1), run.extra[1])
        return q, F.normalize(k, dim=-1)


class KvTokens(Piece):
    """`count` learned key/value tokens `kv_tokens` (2, count, C), prepended to every query's keys
    and values (normalised keys under cosine scores)."""

    rank = 50

    def __init__(self, count, std, dim):
        self.count, self.std, self.dim = count, std, dim

    def install(self, m):
        m.kv_tokens = nn.Parameter(trunc_normal_(torch.empty(2, self.count, self.dim), self.std))

    def keys(self, m, k, v, run):
        n, h, d = self.count, m.heads, m.head_dim
        t = m.kv_tokens.view(2, n, h, d).transpose(1, 2)  # (2, heads, n, d)
        if run.unit_keys:
            t = torch.stack([F.normalize(t[0], dim=-1), t[1]])
        shape = (1, h) + (1,) * (k.dim() - 4) + (n, d)
        tk, tv = (s.view(shape).expand(*k.shape[:-2], n, d) for s in t)
        run.prepended += n
        return torch.cat([tk, k], -2), torch.cat([tv, v], -2)


class Performer(Piece):
    """FAVOR+ linear attention: phi(q) (phi(K)^T V) / (phi(q) . sum_j phi(k_j) + eps) per head, with
    `features` frozen orthogonal random features `w` scaled by sqrt(features)."""

    rank = 60

    def __init__(self, features, eps, head_dim):
        self.features, self.eps, self.head_dim = features, eps, head_dim

    def install(self, m):
        w = nn.init.orthogonal_(torch.empty(self.features, self.head_dim)) * math.sqrt(self.features)
        m.w = nn.Parameter(w, requires_grad=False)

    def core(self, m, q, k, v, run):
        q, k, v = m.split_heads(q), m.split_heads(k), m.split_heads(v)
        f = self.features

        def phi(t):
            return torch.exp(t @ m.w.t() - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(f)

        qp, kp = phi(q), phi(k)  # (B, h, N, m), (B, h, M, m)
        kv = kp.transpose(-2, -1) @ v  # (B, h, m, d)
        norm = qp @ kp.sum(2).unsqueeze(-1)  # (B, h, N, 1)
        return m.merge_heads((qp @ kv) / (norm + self.eps))


class Agents(Piece):
    """Agent attention: `count` agent tokens pooled from the queries attend to the keys (bias
    `an_bias` resized to the key grid plus per-axis tables), the queries attend to the agents (bias
    `na_bias` plus per-axis tables), and a depthwise conv `dwc` of the values is added. `group`:
    the queries' grid (a window, else the grid), `kv_grid` the keys'."""

    rank = 130

    def __init__(self, heads, dim, count, kernel, table, group, kv_grid):
        self.heads, self.dim, self.count, self.kernel, self.table = heads, dim, count, kernel, table
        self.group, self.kv_grid = tuple(group), tuple(kv_grid)
        self.side = round(count ** (1 / len(self.group)))

    def install(self, m):
        h, a, ndim, std = self.heads, self.count, len(self.group), 0.02
        m.an_bias = nn.Parameter(trunc_normal_(torch.empty(h, a, *[self.table] * ndim), std))
        m.na_bias = nn.Parameter(trunc_normal_(torch.empty(h, a, *[self.table] * ndim), std))
        names = (("ah_bias", "ha_bias"), ("aw_bias", "wa_bias"))
        for i in range(ndim):
            kshape = [self.kv_grid[j] if j == i else 1 for j in range(ndim)]
            qshape = [self.group[j] if j == i else 1 for j in range(ndim)]
            setattr(m, names[i][0], nn.Parameter(trunc_normal_(torch.empty(1, h, a, *kshape), std)))
            setattr(m, names[i][1], nn.Parameter(trunc_normal_(torch.empty(1, h, *qshape, a), std)))
        self.axes = [n for pair in names[:ndim] for n in pair]
        m.dwc = conv_cls(ndim)(self.dim, self.dim, self.kernel, 1, self.kernel // 2, groups=self.dim)

    def core(self, m, q, k, v, run):
        h, a, group = self.heads, self.count, self.group
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)[len(group) - 1]
        agents = to_tokens(pool(to_map(q, group), self.side))  # (B', a, C)
        q, k, vh, agents = m.split_heads(q), m.split_heads(k), m.split_heads(v), m.split_heads(agents)
        scale = m.qk_scale
        axes = [getattr(m, name) for name in self.axes]
        bias1 = tables.resize_table(m.an_bias, self.kv_grid) + tables.axis_tables(axes[0::2], h, a, self.kv_grid, False)
        agent_v = ((agents * scale) @ k.transpose(-2, -1) + bias1).softmax(-1) @ vh  # (B', h, a, d)
        bias2 = tables.resize_table(m.na_bias, group).transpose(-2, -1) + tables.axis_tables(
            axes[1::2], h, a, group, True)
        y = m.merge_heads(((q * scale) @ agents.transpose(-2, -1) + bias2).softmax(-1) @ agent_v)
        vmap = to_map(v, self.kv_grid)
        if self.kv_grid != group:
            vmap = F.interpolate(vmap, size=group, mode=("linear", "bilinear")[len(group) - 1])
        return y + to_tokens(m.dwc(vmap))
