"""Token-axis ops for multi-stream models (CrossViT): slicing a token sequence and attention in
which only the first tokens ask. Concatenating sequences is the `parallel tokens { ... }` merge.

Shapes of a slice: a token sequence is `extra` prefix (class) tokens followed by the tokens of a
grid. A slice that runs to the end and starts within the prefix keeps the grid (and the prefix
tokens it covers); any other slice is a plain sequence: a 1-D grid of `count` tokens.
"""

from __future__ import annotations

from typing import Optional

from ..shapes import Shape, ShapeError
from .registry import Op, op


def _slice(x: Shape, start: int, count: Optional[int], what: str) -> Shape:
    n = x.tokens
    end = n if count is None else start + count
    if start < 0 or end > n or end <= start:
        raise ShapeError(f"{what}: tokens [{start}, {end}) are not within the {n} tokens of {x}",
                         "`start` counts from 0 and `count` must be at least 1")
    if end == n and start <= x.extra:
        return x.with_(extra=x.extra - start)
    return Shape(x.channels, (end - start,), "tokens")


@op("select_tokens", category="layout", layout="tokens")
class SelectTokens(Op):
    """Keep `count` tokens from index `start` (`count=none`: to the end). `select_tokens(0, 1)` is
    the class token alone, `select_tokens(1)` drops one class token and keeps the grid."""

    start: int = 0
    count: Optional[int] = None

    def infer(self, x: Shape) -> Shape:
        return _slice(x, self.start, self.count, "select_tokens")

    def build(self, x, y):
        from ..layers.tokens_extra import SelectTokens as Module

        return Module(self.start, y.tokens)


@op("query_attention", category="attention", layout="tokens")
class QueryAttention(Op):
    """Multi-head attention in which only the first `queries` tokens are queries; keys and values
    come from all tokens. The output is those `queries` tokens (a 1-D sequence), `out` channels.
    CrossViT's cross-attention is `query_attention(heads)`: a class token, projected to the other
    branch's width and put in front of that branch's patch tokens, attends to all of them.
    Separate linears `q`, `k`, `v` (bias `qkv_bias`), output `proj`; `scale` defaults to
    head_dim^-0.5; scores by plain matmuls and softmax. Linear weights trunc-normal(0.02), biases
    zero."""

    heads: int
    queries: int = 1
    qkv_bias: bool = True
    proj_bias: bool = True
    out: Optional[int] = None
    scale: Optional[float] = None

    def infer(self, x: Shape) -> Shape:
        if self.heads <= 0 or x.channels % self.heads:
            raise ShapeError(f"{self.heads} heads do not divide the {x.channels} channels",
                             "the channel count must be a multiple of the number of heads")
        _slice(x, 0, self.queries, "query_attention queries")
        return Shape(self.out or x.channels, (self.queries,), "tokens")

    def params(self, x, y):
        c = x.channels
        return 3 * c * c + (3 * c if self.qkv_bias else 0) + c * y.channels + (y.channels if self.proj_bias else 0)

    def macs(self, x, y):
        c, n, m = x.channels, x.tokens, self.queries
        return m * c * c + 2 * n * c * c + 2 * m * n * c + m * c * y.channels

    def build(self, x, y):
        from ..layers.tokens_extra import QueryAttention as Module

        return Module(x.channels, y.channels, self.heads, self.queries, self.qkv_bias, self.proj_bias, self.scale)
