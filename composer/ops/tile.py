"""Tiling a feature map: repeat the whole map side by side. No parameters, no MACs."""


from ..shapes import Shape, ShapeError
from .registry import Op, Pos, op


@op("tile", category="resample", layout="map")
class Tile(Op):
    """Repeat the whole map `times` times along every spatial dim (`Tensor.repeat`): (C, *S) ->
    (C, *S * times), the copy at tile (a, b) equal to the input. With a 1x1 input it broadcasts a
    per-channel vector over a grid; with a w x w input and w-wide windows every window sees the
    same map (GC-ViT's global query tokens, shared by all windows)."""

    times: Pos = 2

    def infer(self, x: Shape) -> Shape:
        if self.times < 1:
            raise ShapeError(f"tile times must be 1 or more, got {self.times}")
        if not x.spatial:
            raise ShapeError("tile needs a map with a spatial grid")
        return x.with_(spatial=tuple(s * self.times for s in x.spatial))

    def build(self, x, y):
        from ..layers.tile import Tile as Module

        return Module(self.times)
