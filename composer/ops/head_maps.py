"""Heads as maps: every head of a heads tensor moved into the batch as a map of its own
(`heads_to_batch`) and back (`batch_to_heads`), so that any map op written between them (a
conv, a pool, a norm) runs on every head alike with the weights the heads share: pooling or
striding q, k or v per head (MViT's pooling attention: a depthwise conv shared by the heads).

How the shapes read. As with `windows_to_batch`, shapes leave the batch out: between the pair
the shape is one head's map (d, *grid) and the lowering carries the batch factor (the number of
heads: it multiplies the MACs of the ops inside). The closer puts the heads back on the grid
its input map has, which may be another grid than the opener's (a strided conv pools).
"""


from typing import ClassVar

from ..shapes import Shape, ShapeError
from .registry import Op, op


@op("heads_to_batch", category="layout", layout="heads")
class HeadsToBatch(Op):
    """Every head of a heads tensor (B, heads, N, d) on a grid as a map of its own, stacked along
    the batch: (B * heads, d, *grid), image-major (row b · heads + h is head h of image b). Any
    map op between it and `batch_to_heads` (a conv, a pool, a norm) then runs on every head
    alike, with weights the heads share. The shape shown is one head's map (d, *grid). Must be
    closed by `batch_to_heads` in the same body; no prefix (class) tokens."""

    batch_fold: ClassVar[str] = "open"

    def fold_factor(self, x: Shape) -> int:
        """How many maps one image gives (the batch factor the lowering carries)."""
        return x.heads

    def infer(self, x: Shape) -> Shape:
        if x.layout != "heads" or not x.spatial:
            raise ShapeError(f"heads_to_batch needs heads on a spatial grid, got {x.layout} {x}",
                             "split the channels into heads with split_heads(heads) first")
        if x.extra:
            raise ShapeError(f"heads_to_batch cannot fold {x.extra} prefix token(s) into a map",
                             "leave the class tokens out of the pooled part")
        return Shape(x.channels, x.spatial, "map")

    def build(self, x, y):
        from ..layers.head_maps import HeadsToBatch as Module

        return Module(x.heads)


@op("batch_to_heads", category="layout", layout="map")
class BatchToHeads(Op):
    """Maps stacked along the batch, (B * heads, d, *grid), back into a heads tensor (B, heads,
    prod(grid), d), tokens row-major over the maps' grid (which may differ from the grid
    `heads_to_batch` folded: a strided op between them pools). The inverse of `heads_to_batch`,
    which must open it earlier in the same body."""

    batch_fold: ClassVar[str] = "close"
    opener: ClassVar[str] = "heads_to_batch"  # the op whose fold it closes

    def closes(self, opener) -> str | None:
        """None when this closes `opener`; else why not."""
        if opener.name != "heads_to_batch":
            return f"the innermost open fold is {opener.describe()}"
        return None

    def closed(self, y: Shape, opened: Shape) -> Shape:
        """The heads once the lowering knows the tensor its opener folded (`opened`)."""
        return y.with_(heads=opened.heads)

    def infer(self, x: Shape) -> Shape:
        if x.layout != "map" or not x.spatial:
            raise ShapeError(f"batch_to_heads needs a map with a spatial grid, got {x.layout} {x}")
        return Shape(x.channels, x.spatial, "heads", heads=1)  # the heads: set when the fold closes

    def build(self, x, y):
        from ..layers.head_maps import BatchToHeads as Module

        return Module(y.heads)
