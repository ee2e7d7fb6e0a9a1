"""The projection pieces of the attention module (q, k, v in; the output projection), and the
modules of the key sources that are not ops of their own (the tokens themselves; `reduce`)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..core import ChannelLinear, bn_class
from .groups import conv_cls, to_map, to_tokens
from .module import Piece


class FusedQKV(Piece):
    """One linear `qkv` to q, k and v; `given`: the queries are given, not projected, packed after
    the tokens in the input's channels (the deprecated `query = given`), and `qkv` gives k and v."""

    rank = 10

    def __init__(self, cin, dim, bias=True, given=False):
        self.cin, self.dim, self.has_bias, self.given = cin, dim, bias, given

    def install(self, m):
        m.qkv = ChannelLinear(self.cin, (2 if self.given else 3) * self.dim, self.has_bias)

    def project(self, m, x, run):
        if self.given:
            x, q = x.split(self.dim, dim=-1)
            k, v = m.qkv(x).split(self.dim, dim=-1)
            return q, k, v
        return m.qkv(x).split(self.dim, dim=-1)


class NamedQKV(FusedQKV):
    """`qkv` to k and v; the queries are the first tensor given by name (`q = NAME`), tokens or a
    map (`is_map`) on the tokens' grid, or on one window's (`shared`: the same queries for every
    window of an image)."""

    def __init__(self, cin, dim, bias=True, is_map=False, shared=False):
        super().__init__(cin, dim, bias, given=True)
        self.is_map, self.shared = is_map, shared

    def enter(self, m, x, run):
        q = run.tensors[0]
        if self.is_map:  # (B, C, *grid) -> (B, N, C), before any regrouping of the tokens
            q = to_tokens(q)
        if self.shared:  # kept apart from the tensors the windows regroup
            run.shared_queries, run.tensors = q, []
        else:
            run.tensors = [q]
        return x

    def leave(self, m, y, run):
        return y

    def project(self, m, x, run):
        k, v = m.qkv(x).split(self.dim, dim=-1)
        if not self.shared:
            return run.tensors[0], k, v
        q = run.shared_queries  # (B, N, C) -> every window of its image: (B * nW, N, C)
        n = x.shape[0] // q.shape[0]
        return q[:, None].expand(-1, n, -1, -1).reshape(-1, *q.shape[1:]), k, v


def register_source(m, source, name):
    """Install a key source's module on `m`: as the submodule `name`, or with `name = None` its
    children and own parameters flat (reduce: `sr`/`pool`, `norm`; deformable: `rpe_table`)."""
    if name is not None:
        m.add_module(name, source)
        return
    for child_name, child in source.named_children():
        m.add_module(child_name, child)
    for param_name, param in source.named_parameters(recurse=False):
        m.register_parameter(param_name, param)


class SourcedQKV(Piece):
    """Linears `q` and `kv`; k and v from a key source (`reduce`, `deformable`, ... : (B, C, *grid)
    -> (B, M, C) tokens, maybe with a score bias), or, with `extra = True`, from the tokens, the
    source's keys and values being extra keys under the same softmax (`run.extra`, heads split)."""

    rank = 10

    def __init__(self, cin, dim, bias, source, name=None, query=False, extra=False):
        self.cin, self.dim, self.has_bias = cin, dim, bias
        self.source, self.name, self.query, self.is_extra = source, name, query, extra

    def install(self, m):
        m.q = ChannelLinear(self.cin, self.dim, self.has_bias)
        m.kv = ChannelLinear(self.cin, 2 * self.dim, self.has_bias)
        register_source(m, self.source, self.name)
        if self.name is not None:
            self.source = None  # read from the module (so that copies and moves of it are seen)

    def _source(self, m):
        return self.source if self.source is not None else getattr(m, self.name)

    def project(self, m, x, run):
        q = m.q(x)
        if self.is_extra:
            k, v = m.kv(x).split(self.dim, dim=-1)
            return q, k, v
        source = self._source(m)
        if self.query:
            src = source(to_map(x, run.grid), to_map(q, run.grid))
        else:
            src = source(to_map(x, run.grid))
        if isinstance(src, tuple):  # a source with a score bias (B, heads, N, M)
            src, run.kv_bias = src
        k, v = m.kv(src).split(self.dim, dim=-1)
        return q, k, v

    def extra(self, m, x, run):
        if self.is_extra:
            k, v = m.kv(self._source(m)(to_map(x, run.grid))).split(self.dim, dim=-1)
            run.extra = (m.split_heads(k), m.split_heads(v))

    covers_prepended = True

    def bias(self, m, run):
        return run.kv_bias


class ConvQKV(Piece):
    """Convolutional projection (CvT): per q, k, v a depthwise conv (k and v strided) and a batch
    norm over the map (`conv_q.conv`, `conv_q.bn`, ...), prefix tokens passed by, then linears `q`,
    `k`, `v`."""

    rank = 10

    def __init__(self, cin, dim, bias, kernel, stride, ndim):
        self.cin, self.dim, self.has_bias = cin, dim, bias
        self.kernel, self.stride, self.ndim = kernel, stride, ndim

    def install(self, m):
        c, ndim = self.cin, self.ndim
        for name, stride in (("q", 1), ("k", self.stride), ("v", self.stride)):
            conv = conv_cls(ndim)(c, c, self.kernel, stride, self.kernel // 2, groups=c, bias=False)
            bn = bn_class(ndim)(c)
            m.add_module(f"conv_{name}", nn.Sequential(OrderedDict(conv=conv, bn=bn)))
        for name in "qkv":
            m.add_module(name, ChannelLinear(c, self.dim, self.has_bias))

    def project(self, m, x, run):
        cls, img = x[:, :m.extra], x[:, m.extra:]
        grid = to_map(img, run.grid)
        q, k, v = (torch.cat([cls, to_tokens(getattr(m, f"conv_{n}")(grid))], 1) for n in "qkv")
        return m.q(q), m.k(k), m.v(v)


class FirstQKV(Piece):
    """The first `count` tokens are the queries (linears `q`, `k`, `v`); keys and values from every
    token, or from the rest (`rest`). The product is explicit, as the references'."""

    rank = 10

    def __init__(self, cin, dim, bias, count, rest=False):
        self.cin, self.dim, self.has_bias, self.count, self.rest = cin, dim, bias, count, rest

    def install(self, m):
        for name in "qkv":
            m.add_module(name, ChannelLinear(self.cin, self.dim, self.has_bias))
        m.explicit = True

    def project(self, m, x, run):
        src = x[:, self.count:] if self.rest else x
        return m.q(x[:, : self.count]), m.k(src), m.v(src)


class Output(Piece):
    """The output projection `proj` (none for `out = 0`); `value_skip`: the values are added after
    it (T2T: y = v + proj(attention))."""

    rank = 30

    def __init__(self, dim, out, bias=True, value_skip=False):
        self.dim, self.out, self.has_bias, self.value_skip = dim, out, bias, value_skip

    def install(self, m):
        m.proj = ChannelLinear(self.dim, self.out, self.has_bias) if self.out else nn.Identity()

    def output(self, m, y, run):
        if self.value_skip:
            return m.proj(y) + run.v
        return m.proj(y)


class TokensOf(nn.Module):
    """(B, C, *grid) -> (B, N, C): the default key source (keys and values from the tokens)."""

    def forward(self, x):
        return to_tokens(x)


class ReduceKeys(nn.Module):
    """The `reduce` key source: a ratio-strided conv (`sr`) or average pool (`pool`), then `norm`
    over the tokens; (B, C, *grid) -> (B, M, C). `ratio=0` only flattens and normalises."""

    def __init__(self, dim, ndim, ratio=0, mode="conv", norm=None, pointwise=False, act=None):
        super().__init__()
        if pointwise:  # a 1x1 conv with bias before the pooling (TransNeXt)
            self.sr = conv_cls(ndim)(dim, dim, 1)
        if act is not None:
            self.act = act
        if ratio:
            if mode in ("conv", "depthwise"):
                self.sr = conv_cls(ndim)(dim, dim, ratio, ratio, groups=dim if mode == "depthwise" else 1)
            else:
                self.pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[ndim - 1](ratio, ratio)
        self.norm = norm if norm is not None else nn.Identity()
        self.norm_map = isinstance(norm, nn.modules.batchnorm._BatchNorm)  # batch norm over the map (CMT)

    def forward(self, x):
        if hasattr(self, "sr"):
            x = self.sr(x)
        if hasattr(self, "act"):
            x = self.act(x)
        if hasattr(self, "pool"):
            x = self.pool(x)
        if self.norm_map:
            return to_tokens(self.norm(x))
        return self.norm(to_tokens(x))
