"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021) and the per-level
application of an op, over *multi-level token sequences*.

A multi-level sequence is several grids flattened and joined along the token axis, the way
`parallel tokens { from c2; from c3; from c4 }` joins three maps: the last level is the sequence's
grid and the earlier levels are its prefix tokens. The ops here are told the levels as `scales`
relative to that grid (the last level): `[4, 2, 1]` for maps at 1/8, 1/16 and 1/32 of the input,
the grid being the 1/32 one; a scale may be fractional (`0.5`) when the level is coarser than the
grid. Every level's size (grid x scale) must be a whole number. ViT-Adapter (Chen et al., ICLR
2023) is written with them: `blueprints/vit_adapter.arch`. The modules follow the grid they get at
run time (the levels are that grid times the scales), so a model runs at every input size whose
levels are whole.
"""


from fractions import Fraction

from ..shapes import Shape, ShapeError
from .registry import NonNeg, Op, Pos, PosFloat, op, prod


def level_grids(grid: tuple[int, ...], scales: list[float], what: str) -> list[tuple[int, ...]]:
    """The grid of every level: the sequence's grid times each scale (whole, positive sizes)."""
    out = []
    for s in scales:
        g = []
        for size in grid:
            v = size * s
            if v <= 0 or abs(v - round(v)) > 1e-9:
                raise ShapeError(f"{what}: level scale {s} of the {'x'.join(map(str, grid))} grid is not a whole size",
                                 "choose an input size whose grid gives every level a whole number of tokens")
            g.append(int(round(v)))
        out.append(tuple(g))
    return out


def level_ratios(scales: list[float]) -> list[tuple[int, int]]:
    """Each scale as an exact ratio (numerator, denominator): the modules compute the level grids
    from the grid they get at run time with integer arithmetic (grid * num // den)."""
    out = []
    for s in scales:
        f = Fraction(s).limit_denominator(10 ** 6)
        out.append((f.numerator, f.denominator))
    return out


def checked_levels(x: Shape, levels: list[float], what: str) -> list[tuple[int, ...]]:
    """The level grids of the multi-level token sequence `x` (`levels` ending with 1, the earlier
    levels exactly its prefix tokens)."""
    if x.layout != "tokens" or not x.ndim:
        raise ShapeError(f"{what} needs tokens on a grid, got {x}")
    if not levels or levels[-1] != 1:
        raise ShapeError(f"the last level is the sequence's grid: `levels` must end with 1, got {levels}")
    grids = level_grids(x.spatial, levels, what)
    ahead = sum(prod(g) for g in grids[:-1])
    if ahead != x.extra:
        raise ShapeError(f"{what}: levels {levels} of the {'x'.join(map(str, x.spatial))} grid give "
                         f"{ahead} tokens ahead of it, but the input has {x.extra}")
    return grids


@op("deformable_attention", category="attention", layout="tokens")
class DeformableAttention(Op):
    """Multi-scale deformable attention (Deformable DETR's MSDeformAttn, pure PyTorch with
    `grid_sample`): every query reads `points` bilinearly sampled values per head and per value level,
    at learned offsets around its reference point, and sums them with learned softmax weights.

    The input is a joined sequence `parallel tokens { values; queries }`: first the value levels
    (grids of scales `values` relative to the sequence's grid), then the query levels (scales
    `queries`, the last of which is the grid itself, so it must end with 1). The output is the query
    tokens (the input's shape without the value tokens). A query's reference point is the centre of
    its cell in its own level, normalised to [0, 1]; sampling location = reference + offset /
    (value level width, height); values outside a level read zero (`align_corners=False`).

    Linears (Deformable DETR's names): `value_proj` (C -> C * ratio, over the value tokens),
    `sampling_offsets` (C -> heads * levels * points * 2) and `attention_weights` (C -> heads *
    levels * points, softmax over levels x points) from the queries, `output_proj` (C * ratio -> C).
    Init as the reference: offsets weight 0 and bias pointing every head in its own direction
    (cos, sin of 2 pi h / heads, scaled to max-norm 1) times point index + 1; attention weights 0;
    value and output projections Xavier-uniform with zero bias. 2-D grids. The module follows the grid
    it gets at run time: the levels, reference points and normalisers are made for it (the
    reference's `deform_inputs` from the actual feature sizes). MACs: the four linears
    (the sampling and the weighted sum are not counted, as `torch.utils.flop_counter` does not see
    `grid_sample`)."""

    heads: Pos
    points: Pos = 4
    values: list[PosFloat]
    queries: list[PosFloat] = [1.0]
    ratio: PosFloat = 1.0

    def value_dim(self, x: Shape) -> int:
        return int(x.channels * self.ratio)

    def geometry(self, x: Shape) -> tuple[list, list]:
        """(value level grids, query level grids)."""
        return level_grids(x.spatial, self.values, self.name), level_grids(x.spatial, self.queries, self.name)

    def infer(self, x: Shape) -> Shape:
        if x.layout != "tokens" or x.ndim != 2:
            raise ShapeError(f"deformable_attention needs tokens on a 2-D grid, got {x}")
        if not self.values or not self.queries:
            raise ShapeError("deformable_attention needs at least one value level and one query level")
        if self.queries[-1] != 1:
            raise ShapeError(f"the last query level is the sequence's grid: its scale must be 1, got {self.queries[-1]}")
        if self.points <= 0:
            raise ShapeError(f"deformable_attention points must be positive, got {self.points}")
        cv = self.value_dim(x)
        if self.heads <= 0 or cv <= 0 or cv % self.heads:
            raise ShapeError(f"{self.heads} heads do not divide the {cv} value channels",
                             "the channels times `ratio` must be a multiple of the number of heads")
        vals, qs = self.geometry(x)
        want = sum(prod(g) for g in vals) + sum(prod(g) for g in qs[:-1])
        if x.extra != want:
            raise ShapeError(
                f"deformable_attention: levels {self.values} (values) and {self.queries} (queries) of the "
                f"{'x'.join(map(str, x.spatial))} grid give {want} tokens ahead of it, but the input has {x.extra}",
                "join the value levels, then the query levels: `parallel tokens { values; queries }`")
        return x.with_(extra=x.extra - sum(prod(g) for g in vals))

    def _sizes(self, x: Shape) -> tuple[int, int, int, int]:
        vals, qs = self.geometry(x)
        lp = len(vals) * self.points
        return sum(prod(g) for g in vals), sum(prod(g) for g in qs), lp, self.value_dim(x)

    def params(self, x, y):
        c = x.channels
        _, _, lp, cv = self._sizes(x)
        h = self.heads
        return (c + 1) * h * lp * 2 + (c + 1) * h * lp + (c + 1) * cv + (cv + 1) * c

    def macs(self, x, y):
        c = x.channels
        nv, nq, lp, cv = self._sizes(x)
        return nq * c * self.heads * lp * 3 + nv * c * cv + nq * cv * c

    def build(self, x, y):
        from ..layers.deform_attn import DeformableAttention as Module

        vals, qs = self.geometry(x)
        return Module(x.channels, self.value_dim(x), self.heads, self.points, vals, qs, x.spatial,
                      level_ratios(self.values), level_ratios(self.queries))


@op("per_level", category="layout", layout="tokens")
class PerLevel(Op):
    """Apply one op to every level of a multi-level token sequence, with the same weights: each
    level (scales `levels` relative to the sequence's grid, the last one 1) is folded into a map,
    run through `op` and flattened back; the levels are joined again in order. The op may change
    the channels and the grid (a strided conv) as long as its parameters do not depend on the size
    and every level keeps its scale relative to the last, so the output is again a multi-level
    sequence with the same `levels`. ViT-Adapter's ConvFFN runs one depthwise conv over its three
    levels: `per_level(conv(48, 3, groups = 48), levels = [4, 2, 1])`; MSG-Transformer downsamples
    its patch map and its messenger map with one conv: `per_level(conv(2 * c, 3, stride = 2),
    levels = [1 / 7, 1])`. Parameters: the op's; MACs summed over the levels. The submodule is `op`.
    An op that keeps the grid (a stride-1 conv) follows the grid at run time; one that changes it is
    tied to the build grid (other input sizes are refused)."""

    op: Op
    levels: list[PosFloat]

    def grids(self, x: Shape) -> list[tuple[int, ...]]:
        return level_grids(x.spatial, self.levels, self.name)

    def runtime_grid(self, x: Shape) -> bool:
        m, out = self._outs(x)[-1]
        return out.spatial == m.spatial and self.op.runtime_grid(m)

    def _outs(self, x: Shape) -> list[tuple[Shape, Shape]]:
        """(input map, output map) of every level."""
        pairs = []
        for g in self.grids(x):
            m = Shape(x.channels, g, "map")
            pairs.append((m, self.op.infer(m)))
        return pairs

    def infer(self, x: Shape) -> Shape:
        checked_levels(x, self.levels, self.name)
        if self.op.layout not in ("map", "any"):
            raise ShapeError(f"per_level runs its op on maps, but {self.op.name} needs {self.op.layout}")
        pairs = self._outs(x)
        last = pairs[-1][1]
        if last.layout != "map" or last.ndim != x.ndim:
            raise ShapeError(f"per_level's op must give a map, but {self.op.describe()} gives {last}")
        want = level_grids(last.spatial, self.levels, self.name)
        for (m, y), g in zip(pairs, want):
            if y.spatial != g or y.channels != last.channels:
                raise ShapeError(f"per_level's op {self.op.describe()} does not keep the levels' scales: "
                                 f"{m} -> {y}, expected a {'x'.join(map(str, g))} grid")
        if len({self.op.params(m, y) for m, y in pairs}) > 1:
            raise ShapeError(f"per_level's op {self.op.describe()} has parameters that depend on the level size")
        return Shape(last.channels, last.spatial, "tokens", extra=sum(prod(y.spatial) for _, y in pairs[:-1]))

    def params(self, x, y):
        m, out = self._outs(x)[-1]
        return self.op.params(m, out)

    def macs(self, x, y):
        return sum(self.op.macs(m, out) for m, out in self._outs(x))

    def build(self, x, y):
        from ..layers.deform_attn import PerLevel as Module

        m, out = self._outs(x)[-1]
        return Module(self.op.build(m, out), self.grids(x), level_ratios(self.levels), x.spatial)


@op("select_level", category="layout", layout="tokens")
class SelectLevel(Op):
    """Take level `index` of a multi-level token sequence (scales `levels` relative to its grid, the
    last one 1) as tokens on that level's own grid, so it can be folded back into a map:
    `select_level(0, levels = [4, 2, 1])` is the finest of three levels (ViT-Adapter's c2). Follows
    the grid at run time (the level's grid is the sequence's grid times its scale)."""

    regrids = True  # its module tells the level's grid at run time

    index: NonNeg
    levels: list[PosFloat]

    def infer(self, x: Shape) -> Shape:
        grids = checked_levels(x, self.levels, self.name)
        if not 0 <= self.index < len(grids):
            raise ShapeError(f"select_level index {self.index} is not one of the {len(grids)} levels")
        return Shape(x.channels, grids[self.index], "tokens")

    def build(self, x, y):
        from ..layers.deform_attn import SelectLevel as Module

        return Module(self.index, level_ratios(self.levels), x.spatial)
