"""Token slicing and first-tokens-query attention (see composer/ops/tokens_extra.py)."""

from __future__ import annotations

from torch import nn

from .core import ChannelLinear


class SelectTokens(nn.Module):
    def __init__(self, start: int, count: int):
        super().__init__()
        self.start, self.count = start, count

    def forward(self, x):
        return x[:, self.start : self.start + self.count]

    def extra_repr(self) -> str:
        return f"start={self.start}, count={self.count}"


class QueryAttention(nn.Module):
    """The first `queries` tokens attend to all tokens: submodules `q`, `k`, `v`, `proj`."""

    def __init__(self, dim, out, heads, queries=1, qkv_bias=True, proj_bias=True, scale=None):
        super().__init__()
        self.heads, self.head_dim, self.queries, self.scale = heads, dim // heads, queries, scale
        self.q = ChannelLinear(dim, dim, qkv_bias)
        self.k = ChannelLinear(dim, dim, qkv_bias)
        self.v = ChannelLinear(dim, dim, qkv_bias)
        self.proj = ChannelLinear(dim, out, proj_bias)

    def _heads(self, t):
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        b, c = x.shape[0], x.shape[-1]
        q = self._heads(self.q(x[:, : self.queries]))
        k, v = self._heads(self.k(x)), self._heads(self.v(x))
        # few queries: plain matmuls (as the reference), which FLOP counters also see
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        y = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, self.queries, c))
