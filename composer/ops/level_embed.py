"""`level_embed`: a learned vector per level of a multi-level token sequence (see deform_attn.py for
how such a sequence is laid out). The module is in composer/layers/level_embed.py."""


from ..shapes import Shape, ShapeError
from .deform_attn import level_grids, level_ratios
from .registry import NonNegFloat, Op, PosFloat, op, prod


@op("level_embed", category="embed", layout="tokens")
class LevelEmbed(Op):
    """Add a learned vector per level to a multi-level token sequence: every token of level l
    (scales `levels` relative to the sequence's grid, the last one 1, as in `per_level`) gets row l
    of the parameter `embed` (levels, channels), which tells the levels apart once they are joined
    (Deformable DETR's and ViT-Adapter's `level_embed`: ViT-Adapter adds it to the spatial prior's
    c2, c3 and c4 before joining them, the same as adding it after
    `parallel tokens { from c2; from c3; from c4 }` with `level_embed(levels = [4, 2, 1])`).
    Init: normal(0, `std`) (the references' `normal_`, std 1). Parameters: levels x channels; no MACs
    (an addition). The level sizes follow the grid at run time."""

    levels: list[PosFloat]
    std: NonNegFloat = 1.0

    def grids(self, x: Shape) -> list[tuple[int, ...]]:
        if x.layout != "tokens" or not x.ndim:
            raise ShapeError(f"level_embed needs tokens on a grid, got {x}")
        if not self.levels or self.levels[-1] != 1:
            raise ShapeError(f"the last level is the sequence's grid: `levels` must end with 1, got {self.levels}")
        grids = level_grids(x.spatial, self.levels, self.name)
        if sum(prod(g) for g in grids[:-1]) != x.extra:
            raise ShapeError(f"level_embed: levels {self.levels} of the {'x'.join(map(str, x.spatial))} grid give "
                             f"{sum(prod(g) for g in grids[:-1])} tokens ahead of it, but the input has {x.extra}",
                             "join the levels finest first, the sequence's grid last: `parallel tokens { ... }`")
        if self.std < 0:
            raise ShapeError(f"level_embed std must not be negative, got {self.std}")
        return grids

    def infer(self, x: Shape) -> Shape:
        self.grids(x)
        return x

    def params(self, x, y):
        return len(self.levels) * x.channels

    def build(self, x, y):
        from ..layers.level_embed import LevelEmbed as Module

        return Module(x.channels, [prod(g) for g in self.grids(x)], self.std, level_ratios(self.levels), x.spatial)
