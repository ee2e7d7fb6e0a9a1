"""Token-axis ops for multi-stream models (CrossViT): slicing a token sequence (and the older
`query_attention`, now `attention(..., query = first(n))`). Concatenating sequences is the `parallel tokens { ... }` merge.

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
    """Kept for older blueprints: the same as `attention(heads, query = first(queries), ...)`, which
    new blueprints should use. Only the first `queries` tokens are queries; keys and values come
    from all tokens; the output is those `queries` tokens (a 1-D sequence), `out` channels.
    Separate linears `q`, `k`, `v` (bias `qkv_bias`), output `proj`; `scale` defaults to
    head_dim^-0.5."""

    heads: int
    queries: int = 1
    qkv_bias: bool = True
    proj_bias: bool = True
    out: Optional[int] = None
    scale: Optional[float] = None

    def attention(self):
        from .attention import Attention, First

        return Attention(heads=self.heads, qkv_bias=self.qkv_bias, proj_bias=self.proj_bias, out=self.out,
                         scale=self.scale, query=First(count=self.queries))

    def infer(self, x: Shape) -> Shape:
        return self.attention().infer(x)

    def params(self, x, y):
        return self.attention().params(x, y)

    def macs(self, x, y):
        return self.attention().macs(x, y)

    def build(self, x, y):
        return self.attention().build(x, y)
