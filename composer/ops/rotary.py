"""Rotary position embeddings: rotate pairs of channels of q or k by angles that grow with the
token's position, so that `q·k` depends on the offset between two tokens (Su et al., "RoFormer:
Enhanced Transformer with Rotary Position Embedding", 2021, https://arxiv.org/abs/2104.09864;
the 2-D axial form: Heo et al., "Rotary Position Embedding for Vision Transformer", ECCV 2024,
https://arxiv.org/abs/2403.13298). Nothing here depends on the input size: the angles are
computed for the grid the tokens lie on at run time.
"""


from typing import Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, PosFloat, op


@op("rotary", category="attention")
class Rotary(Op):
    """Rotate each pair of channels `(a, b)` of every head by the angle `p · θ`:
    `(a cos pθ − b sin pθ, a sin pθ + b cos pθ)`, `p` the token's position, `θ` the pair's
    frequency. Applied to q and k, `q·k` then depends on the positions' offset only.

    `axes = 1`: `p` is the token's index in the flattened grid, and the d/2 pairs have the
    frequencies `θ_j = base^(−j / (d/2))` (RoFormer). `axes = 2` (or the grid's number of axes): each
    axis of the grid has its own d / (2 · axes) pairs, `θ_j = base^(−j / (d / (2 · axes)))`, rotated
    by the token's coordinate on that axis; the pairs of the first axis (rows) come first, then the
    next (`indexing = "xy"`: columns before rows). `pairs = "interleaved"`: pair j is channels
    (2j, 2j+1); `"halves"`: channels (j, j + d/2). `offset` is added to every coordinate; with
    `reference` (a grid, one size per axis; any positive numbers) the coordinates along an axis of
    size s are scaled by reference / s, after the offset, `(p + offset) · reference / s`, so a grid
    of another size spans the same range of angles (EVA's fine-tuning at
    new sizes). Prefix (class, register) tokens are not rotated. No parameters; the angles are
    computed for the grid seen at run time (cached per grid)."""

    axes: Pos = 1
    base: PosFloat = 10000.0
    pairs: Literal["interleaved", "halves"] = "interleaved"
    indexing: Literal["ij", "xy"] = "ij"
    offset: float = 0.0
    reference: Optional[list[PosFloat]] = None

    def infer(self, x: Shape) -> Shape:
        if x.layout not in ("heads", "tokens"):
            raise ShapeError(f"rotary needs heads (or tokens), got {x.layout} {x}",
                             "rotate q and k after split_heads: q = { from q; rotary }")
        if self.axes < 1 or (self.axes > 1 and self.axes != x.ndim):
            raise ShapeError(f"rotary(axes = {self.axes}) on tokens of a {x.ndim}-D grid {x}",
                             f"axes is 1 (the token index) or the grid's number of axes ({x.ndim})")
        if x.channels % (2 * self.axes):
            raise ShapeError(f"rotary(axes = {self.axes}) needs a width per head divisible by {2 * self.axes} "
                             f"(a pair of channels per frequency, the same number per axis), got {x.channels}")
        if self.reference is not None and (len(self.reference) != self.axes or min(self.reference) <= 0):
            raise ShapeError(f"rotary: reference {self.reference} must give {self.axes} positive size(s), one per axis")
        if self.base <= 0:
            raise ShapeError(f"rotary needs a positive base, got {self.base}")
        return x

    def build(self, x, y):
        from ..layers.rotary import Rotary as Module

        return Module(x.channels, self.axes, self.base, self.pairs == "halves", self.indexing == "xy",
                      self.offset, self.reference, x.extra, x.spatial)
