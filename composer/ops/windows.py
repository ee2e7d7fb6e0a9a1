"""Windowed attention as primitives: the tokens of a grid cut into non-overlapping windows moved
into the batch (`windows_to_batch`, optionally cyclically shifted, padded at run time up to a
multiple of the window) and back (`batch_to_windows`), and the score terms that need to know
where each window lies: `shifted_window_mask` (Swin's mask between the regions a cyclic shift
brings together) and `position_mlp_bias` (an MLP of the log-spaced relative coordinates of
queries and keys, Swin V2's continuous position bias).

How the shapes read. As with `patches_to_batch`, shapes leave the batch out: between the pair
the shape is that of one window, tokens on the window's grid, and the lowering carries the batch
factor (the number of windows at the build size: it multiplies the MACs of the ops inside). At
run time the opener tells the grid it puts the tokens on, a `WindowGrid` (composer/layers/
windows.py) that records the full grid, the padded grid, the window and the shift, so the score
terms and the closer compute what they need for the grid actually seen (and cache it per grid).

A score term is a module with `score_bias(grid_pair)` (composer/chains.py): the builder sums the
terms into the mask of one `scaled_dot_product_attention` call. A term with one entry per window
of an image along its first axis is repeated over the images of the batch.
"""


from typing import ClassVar, Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import NonNeg, NonNegFloat, Op, Pos, Probability, Tensor, op, prod


def window_layout(grid: tuple, size: int, shift: int) -> tuple[tuple, tuple]:
    """(window, shift) per axis for a grid seen at the build size: an axis no longer than `size`
    is one window along it, unshifted (Swin's rule)."""
    window = tuple(min(size, g) for g in grid)
    return window, tuple(0 if g <= w else shift for g, w in zip(grid, window))


def _check(name: str, size: int, shift: int) -> None:
    if size < 1:
        raise ShapeError(f"{name} size must be 1 or more, got {size}")
    if not 0 <= shift < size:
        raise ShapeError(f"{name} shift must be in [0, size), got shift {shift} for size {size}")


@op("windows_to_batch", category="layout", layout="tokens")
class WindowsToBatch(Op):
    """Cut the tokens of a grid (B, N, C) into non-overlapping `size`^d windows stacked along the
    batch: (B * windows, size^d, C), image-major, windows in row-major order over the window grid,
    tokens row-major inside a window. With `shift = s` the grid is first rolled by -s along every
    axis (a cyclic shift: Swin's shifted windows). A grid whose sizes are not multiples of `size`
    is padded with zeros at the end of each axis, after the shift, at run time. An axis no longer
    than `size` at the build size is one window along it, unshifted (Swin's rule); the window and
    the shift are decided there. The shape shown is one window: tokens on the window's grid.
    Must be closed by `batch_to_windows(size, shift)` in the same block."""

    size: Pos
    shift: NonNeg = 0
    batch_fold: ClassVar[str] = "open"
    regrids: ClassVar[bool] = True  # its module tells the window grid it puts the tokens on

    def layout_for(self, x: Shape) -> tuple[tuple, tuple]:
        _check(self.name, self.size, self.shift)
        if x.layout != "tokens" or not x.spatial:
            raise ShapeError(f"windows_to_batch needs tokens on a spatial grid, got {x.layout} {x}")
        if x.extra:
            raise ShapeError(f"windows_to_batch cannot cut {x.extra} prefix token(s) into windows",
                             "leave the class tokens out of the windowed part")
        return window_layout(x.spatial, self.size, self.shift)

    def fold_factor(self, x: Shape) -> int:
        """How many windows one image gives at the build size (the batch factor)."""
        window, _ = self.layout_for(x)
        return prod(-(-g // w) for g, w in zip(x.spatial, window))

    def infer(self, x: Shape) -> Shape:
        window, _ = self.layout_for(x)
        return Shape(x.channels, window, "tokens")

    def build(self, x, y):
        from ..layers.windows import WindowsToBatch as Module

        return Module(*self.layout_for(x))


@op("batch_to_windows", category="layout", layout="tokens")
class BatchToWindows(Op):
    """Put windows stacked along the batch, (B * windows, size^d, C), back on the grid they were
    cut from: the inverse of `windows_to_batch(size, shift)`, which must open it earlier in the
    same block with the same `size` and `shift`: the padding is cropped and the shift rolled back.
    The output lies on the grid the opener cut (the one seen at run time)."""

    size: Pos
    shift: NonNeg = 0
    batch_fold: ClassVar[str] = "close"
    opener: ClassVar[str] = "windows_to_batch"  # the op whose fold it closes
    regrids: ClassVar[bool] = True

    def closes(self, opener) -> str | None:
        """None when this closes `opener`; else why not."""
        if opener.name != "windows_to_batch":
            return f"it closes windows_to_batch, but the open fold is {opener.name}"
        if (opener.size, opener.shift) != (self.size, self.shift):
            return (f"windows_to_batch(size = {opener.size}, shift = {opener.shift}) is closed with "
                    f"size = {self.size}, shift = {self.shift}")
        return None

    def closed(self, y: Shape, opened: Shape) -> Shape:
        return y.with_(spatial=opened.spatial)

    def infer(self, x: Shape) -> Shape:
        _check(self.name, self.size, self.shift)
        if x.layout != "tokens" or not x.spatial or x.extra:
            raise ShapeError(f"batch_to_windows needs the tokens of a window (no prefix tokens), got {x}")
        return x

    def build(self, x, y):
        from ..layers.windows import BatchToWindows as Module

        return Module(*window_layout(y.spatial, self.size, self.shift), tuple(y.spatial))


@op("shifted_window_mask", category="attention", layout="scores")
class ShiftedWindowMask(Op):
    """A score term (add it between `scores` and `softmax`): inside windows cut from a cyclically
    shifted grid (`windows_to_batch(size, shift)`), a query and a key that come from different
    regions of the grid get `value` added (Swin's shifted-window mask; a large negative `value`
    keeps them apart). Per axis of the padded grid P, the regions are [0, P - size),
    [P - size, P - shift) and [P - shift, P); a token's region is the pair of its axes' regions.
    The mask is made for the windows seen at run time (cached per grid); unshifted windows get
    nothing added. Its first axis has one entry per window of an image."""

    value: float = -100.0
    per_head = False

    def infer(self, x: Shape) -> Shape:
        if x.keys != (x.spatial, x.extra) or x.extra or not x.spatial:
            raise ShapeError(f"shifted_window_mask needs the scores of a window's tokens with themselves, got {x}",
                             "cut the tokens with windows_to_batch(size, shift) and make scores(q, k) inside")
        return x

    def build(self, x, y):
        from ..layers.windows import ShiftedWindowMask as Module

        return Module(self.value)


@op("position_mlp_bias", category="attention", layout="scores")
class PositionMlpBias(Op):
    """A score term (add it between `scores` and `softmax`): a bias per head from an MLP of the
    relative coordinates of each query and key on their grids, `fc2(drop(relu(fc1(r))))` (fc1:
    d -> `hidden`, fc2: hidden -> heads, with biases; `drop` in training only). Per axis,
    `coords = "raw"`: r = sign(q - k) ln(1 + |q - k|) (Swin V2's log-spaced coordinates);
    `"normalized"`: with r' = (q - k) / (grid - 1) * 8, sign(r') log2(1 + |r'|) / log2(8). Keys on a
    smaller grid sit at the centres of their average-pooling cells. Made for the grids seen at run
    time (the MLP's input table cached per grid)."""

    hidden: Pos = 512
    coords: Literal["raw", "normalized"] = "raw"
    drop: Probability = 0.0
    per_head = False

    def infer(self, x: Shape) -> Shape:
        grid, extra = x.keys if x.keys else ((), 0)
        if not x.spatial or not grid or x.extra or extra or len(grid) != len(x.spatial):
            raise ShapeError(f"position_mlp_bias needs queries and keys on grids of the same rank without "
                             f"prefix tokens, got {x}")
        if self.hidden < 1 or not 0 <= self.drop < 1:
            raise ShapeError(f"position_mlp_bias needs hidden >= 1 and drop in [0, 1), got {self.hidden}, {self.drop}")
        return x

    def params(self, x, y):
        d = len(x.spatial)
        return d * self.hidden + self.hidden + self.hidden * x.heads + x.heads

    per_fold = False  # the bias MLP runs once per forward, whatever the number of windows

    def macs(self, x, y):
        from .attention import cpb_counts

        rows = prod(cpb_counts(tuple(x.spatial), tuple(x.keys[0])))
        return rows * self.hidden * (len(x.spatial) + x.heads)

    def build(self, x, y):
        from ..layers.windows import PositionMlpBias as Module

        return Module(len(x.spatial), self.hidden, x.heads, self.coords, self.drop)


@op("halo_windows_to_batch", category="layout", layout="tokens")
class HaloWindowsToBatch(Op):
    """The keys and values of blocked local attention (HaloNet): for every `block`-wide block of
    the grid of `source` (tokens, B, N, C), the block and `halo` positions around it, zeros outside
    the grid, (block + 2 halo)^d tokens row-major, stacked along the batch: (B * blocks, (block +
    2 halo)^d, C), blocks row-major (as `nn.Unfold` with kernel block + 2 halo, stride block and
    padding halo). The blocks join the windows already in the batch: it takes `source` from
    outside the innermost open `windows_to_batch` (the queries' blocks, closed by its
    `batch_to_windows`), and must give as many blocks as that gives windows. The grid must be a
    multiple of `block`."""

    source: Tensor
    block: Pos
    halo: NonNeg = 0
    input_arg = "source"
    batch_fold: ClassVar[str] = "join"
    regrids: ClassVar[bool] = True

    def fold_factor(self, x: Shape) -> int:
        return prod(g // self.block for g in x.spatial)

    def infer(self, x: Shape) -> Shape:
        if self.block < 1 or self.halo < 0:
            raise ShapeError(f"halo_windows_to_batch needs block >= 1 and halo >= 0, got {self.block}, {self.halo}")
        if not x.spatial or x.extra:
            raise ShapeError(f"halo_windows_to_batch needs tokens on a grid without prefix tokens, got {x}")
        if any(g % self.block for g in x.spatial):
            raise ShapeError(f"halo_windows_to_batch: block {self.block} does not divide the grid "
                             f"{'x'.join(map(str, x.spatial))}",
                             f"choose an input size whose grid here is a multiple of {self.block}")
        return Shape(x.channels, (self.block + 2 * self.halo,) * x.ndim, "tokens")

    def build(self, x, y):
        from ..layers.windows import HaloWindowsToBatch as Module

        return Module(self.block, self.halo, x.ndim)


@op("axis_relative_logits", category="attention", layout="scores")
class AxisRelativeLogits(Op):
    """A score term (add it between `scores` and `softmax`) that depends on the queries: per axis
    a of the grids, a learned table R_a of vectors of the queries' width, and for the query at
    position x and the key at position k, `Σ_a q · R_a[i_a(x_a, k_a)]` (relative position logits
    per axis: HaloNet's, Bello et al.'s, MViTv2's). With Q_a queries and K_a keys along the axis,
    `offset = "key-query"`: i = k - x + K - 1; `"query-key"`: i = x - k + K - 1; the queries may
    not outnumber the keys along an axis, and R_a holds 2 K_a - 1 rows. `scaled = true`: the
    positions of the coarser grid are first stretched onto the finer one, x' = x · max(K/Q, 1)
    and k' = k · max(Q/K, 1), and i = k' - x' + (Q - 1) · max(K/Q, 1) (resp. x' - k' + (K - 1) ·
    max(Q/K, 1)) truncated to an integer (MViTv2's rule for pooled queries or keys); R_a then
    holds 2 max(Q_a, K_a) - 1 rows. `q`: the queries (heads). The tables are sized by the grids at
    the build size. Tables drawn from normal(0, `std`, default: the queries' width^-0.5); for a
    2-D grid `rel_0` is the height's and `rel_1` the width's."""

    q: Tensor
    offset: Literal["key-query", "query-key"] = "key-query"
    scaled: bool = False
    std: Optional[NonNegFloat] = None
    per_head = False

    def rows(self, x: Shape) -> list[int]:
        """The rows of each axis's table."""
        return [2 * max(n, k) - 1 for n, k in zip(self.q.shape.spatial, x.keys[0])]

    def infer(self, x: Shape) -> Shape:
        q = self.q.shape
        keys = x.keys[0] if x.keys else ()
        if q.layout != "heads" or not q.spatial or not keys or len(keys) != len(q.spatial) or x.extra or x.keys[1]:
            raise ShapeError(f"axis_relative_logits needs queries (heads) and keys on grids of the same rank "
                             f"without prefix tokens, got queries {q} and scores {x}")
        if not self.scaled and any(a > b for a, b in zip(q.spatial, keys)):
            raise ShapeError(f"axis_relative_logits: queries on {q.spatial} outnumber the keys on {keys} along an axis",
                             "scaled = true stretches the coarser grid onto the finer one")
        return x

    def params(self, x, y):
        return sum(self.rows(x)) * self.q.shape.channels

    def macs(self, x, y):
        q = self.q.shape
        return q.heads * q.tokens * q.channels * sum(self.rows(x))

    def build(self, x, y):
        from ..layers.windows import AxisRelativeLogits as Module

        q = self.q.shape
        return Module(self.rows(x), q.channels, self.std if self.std is not None else q.channels ** -0.5,
                      self.offset, self.scaled)
