"""Position terms on attention scores: what the relative position of a query and a key token on
the grid adds to (or makes of) their score. Each works on the `scores` layout (B, heads, N, M) of
composer/ops/heads.py and is written as a statement in a token mixer's body:

    scores(q, k)
    relative_position_bias(prefix = true)     # + a learned bias per head and offset (a score term)
    softmax

    p = position_scores(q, k)                 # scores from the offsets alone (no q·k)
    distance_bias                             # + a learned bias per head and |offset| (a score term)
"""


from typing import Optional

from ..shapes import Shape, ShapeError
from .registry import NonNegFloat, Op, Tensor, op, prod


@op("relative_position_bias", category="attention")
class RelativePositionBias(Op):
    """Add to the scores a learned bias per head for the offset between the query and the key on
    the grid: a table of prod(2g - 1) x heads entries (g the grid's sizes; row
    `Σ (offset_i + g_i - 1) · stride_i`, the first axis the slowest, offset = query minus key), read
    at every pair of grid tokens. `prefix = true`: three more entries for the prefix (class) tokens,
    in this order: every score of a prefix query, every score of a grid query for a prefix key, and
    prefix query to prefix key. A score term (runs inside the one SDPA call of an attention chain).
    The table is sized by the grid, so the model refuses other input sizes. Init: zeros, or
    trunc-normal(`std`) when `std > 0`. Parameter `table` (entries, heads)."""

    prefix: bool = False
    std: NonNegFloat = 0.0
    grid_bound = True  # a table sized by the build grid
    per_head = False

    def entries(self, grid: tuple) -> int:
        return prod(2 * g - 1 for g in grid) + (3 if self.prefix else 0)

    def infer(self, x: Shape) -> Shape:
        if x.layout != "scores":
            raise ShapeError(f"relative_position_bias needs scores, got {x.layout} {x}", "make them with scores(q, k)")
        kgrid, kextra = x.keys
        if tuple(kgrid) != tuple(x.spatial) or not x.spatial:
            raise ShapeError(f"relative_position_bias needs queries and keys on one grid, got {x}",
                             "a relative offset needs both on the same grid (self-attention)")
        if (x.extra or kextra) and not self.prefix:
            raise ShapeError(f"relative_position_bias: the scores have prefix tokens {x}",
                             "give prefix = true for their three learned entries")
        if self.prefix and not (x.extra or kextra):
            raise ShapeError(f"relative_position_bias(prefix = true): the scores have no prefix tokens {x}")
        return x

    def params(self, x, y):
        return self.entries(x.spatial) * x.heads

    def buffer_elements(self, x, y):
        return x.tokens * x.channels  # index: (queries, keys)

    def build(self, x, y):
        from ..layers.positions import RelativePositionBias as Module

        return Module(tuple(x.spatial), x.heads, x.extra, x.keys[1], self.prefix, self.std)


@op("position_scores", category="attention", layout="heads")
class PositionScores(Op):
    """Scores made from the relative positions of the query and key tokens alone (no q·k): for every
    pair, the offset from the query to the key along each grid axis, the last axis first
    (dx, dy for a 2-D grid), and its squared length dx² + dy², mapped to one score per head by a
    learned linear (d + 1 -> heads, parameters `weight` (heads, d + 1) and `bias` (heads)).
    q and k give the heads and the grids (taken at run time); neither may hold prefix tokens. The
    output is a scores tensor as `scores(q, k)` makes, (B, heads, N, M)."""

    q: Optional[Tensor] = None
    k: Tensor
    input_arg = "q"

    def infer(self, x: Shape) -> Shape:
        k = self.k.shape
        for what, s in (("queries", x), ("keys", k)):
            if s.layout != "heads":
                raise ShapeError(f"position_scores needs {what} split into heads, got {s.layout} {s}",
                                 "split the channels into heads with split_heads(heads)")
            if s.extra:
                raise ShapeError(f"position_scores: the {what} have {s.extra} prefix token(s), which have no position",
                                 "take the prefix tokens out first, or add them after these blocks")
            if not s.spatial:
                raise ShapeError(f"position_scores needs {what} on a grid, got {s}")
        if len(k.spatial) != len(x.spatial):
            raise ShapeError(f"position_scores: queries on a {len(x.spatial)}-D grid and keys on a {len(k.spatial)}-D one")
        return Shape(k.tokens, x.spatial, "scores", 0, heads=x.heads, keys=(k.spatial, 0))

    def params(self, x, y):
        return x.heads * (x.ndim + 2)

    def macs(self, x, y):
        return x.heads * x.tokens * self.k.shape.tokens * (x.ndim + 1)

    def build(self, x, y):
        from ..layers.positions import PositionScores as Module

        return Module(x.ndim, x.heads)


@op("distance_bias", category="attention")
class DistanceBias(Op):
    """Add to the scores a learned bias per head for the absolute offset (|d1|, |d2|, ...) between
    the query and the key on the grid (LeViT's and EfficientViT's attention biases): a table of
    heads x prod(grid) entries, entry `|d1| · g2 + |d2|` in 2-D (mixed radix, the last axis the
    fastest). A score term (it runs inside the one SDPA call of an attention chain); zero-initialised;
    parameter `attention_biases` (heads, entries). Inside windows (`windows_to_batch`) the grid is
    the window's, so the model runs at every size the windows allow; on a whole grid the table is
    sized by it, and the model refuses other input sizes."""

    grid_bound = True  # a table sized by the grid it sees (a window's is the same at every input size)

    def infer(self, x: Shape) -> Shape:
        if x.layout != "scores":
            raise ShapeError(f"distance_bias needs scores, got {x.layout} {x}", "make them with scores(q, k)")
        if tuple(x.keys[0]) != tuple(x.spatial) or not x.spatial or x.extra or x.keys[1]:
            raise ShapeError(f"distance_bias needs queries and keys on one grid without prefix tokens, got {x}")
        return x

    def params(self, x, y):
        return prod(x.spatial) * x.heads

    def buffer_elements(self, x, y):
        return prod(x.spatial) ** 2  # index: (N, N)

    def build(self, x, y):
        from ..layers.positions import DistanceBias as Module

        return Module(tuple(x.spatial), x.heads)
