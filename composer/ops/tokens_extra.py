"""Token-axis ops for multi-stream models (CrossViT): slicing a token sequence. Concatenating
sequences is the `parallel tokens { ... }` merge; attention in which only the first tokens ask is
`attention(..., query = first(n))`.

Shapes of a slice: a token sequence is `extra` prefix (class) tokens followed by the tokens of a
grid. A slice that runs to the end and starts within the prefix keeps the grid (and the prefix
tokens it covers); any other slice is a plain sequence: a 1-D grid of `count` tokens.
"""


from typing import Optional

from ..shapes import Shape, ShapeError
from .registry import NonNeg, Op, Pos, op


def _slice(x: Shape, start: int, count: Optional[int], what: str) -> Shape:
    n = x.tokens
    end = n if count is None else start + count
    if start < 0 or end > n or end <= start:
        raise ShapeError(f"{what}: tokens [{start}, {end}) are not within the {n} tokens of {x}",
                         "`start` counts from 0 and `count` must be at least 1")
    if end == n and start <= x.extra:
        return x.with_(extra=x.extra - start)
    return Shape(x.channels, (end - start,), "tokens")


@op("prefix_tokens", category="layout", layout="tokens")
class PrefixTokens(Op):
    """The prefix (class, distillation, register) tokens alone, as a plain sequence; an error when
    the tokens have none. With `grid_tokens`, the two parts of a sequence by what they are, not by
    index: a composite written for one class token refuses a sequence without one."""

    def infer(self, x: Shape) -> Shape:
        if not x.extra:
            raise ShapeError(f"prefix_tokens: the tokens {x} have no prefix (class) tokens",
                             "add class_token() before, or take the grid alone with grid_tokens")
        return Shape(x.channels, (x.extra,), "tokens")

    def build(self, x, y):
        from ..layers.tokens_extra import SelectTokens as Module

        return Module(0, x.extra)


@op("grid_tokens", category="layout", layout="tokens")
class GridTokens(Op):
    """The tokens of the grid, the prefix (class) tokens dropped: the grid as it is at run time."""

    def infer(self, x: Shape) -> Shape:
        if not x.spatial:
            raise ShapeError(f"grid_tokens: the tokens {x} lie on no grid")
        return x.with_(extra=0)

    def build(self, x, y):
        from ..layers.tokens_extra import SelectTokens as Module

        return Module(x.extra, None)


@op("select_tokens", category="layout", layout="tokens")
class SelectTokens(Op):
    """Keep `count` tokens from index `start` (`count=none`: to the end). `select_tokens(0, 1)` is
    the class token alone, `select_tokens(1)` drops one class token and keeps the grid."""

    start: NonNeg = 0
    count: Optional[Pos] = None

    def infer(self, x: Shape) -> Shape:
        return _slice(x, self.start, self.count, "select_tokens")

    def build(self, x, y):
        from ..layers.tokens_extra import SelectTokens as Module

        # to the end: the grid's tokens at run time, however many there are
        return Module(self.start, None if self.count is None else y.tokens)
