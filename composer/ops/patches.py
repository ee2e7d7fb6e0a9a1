"""Patch unfolding for transformers that attend across patches (MobileViT): a map is cut into
non-overlapping `size`^d patches, and the pixels at the same offset inside every patch become one
token sequence.

How the shapes read. `patches_to_batch(size)` turns a map (B, C, *grid) into tokens
(B * size^d, N, C) with N = prod(grid / size): one sequence per offset inside a patch, each
holding one token per patch. Shapes leave the batch out, so the inferred shape is that of one
such sequence: tokens (N = the patch grid, C). Every op between the two (norms, linears,
attention, MLPs, residuals) works on it as on any token sequence; the batch factor is carried by
the lowering, not by the shape: it multiplies the MACs of the ops inside, and the pair must
close in the same block (`batch_to_patches` with the same `size`), with no `save` in between, so
that a tensor with a multiplied batch never leaks out.
"""


from typing import ClassVar, Literal

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, op

# How the pair meets a grid at run time (the input size the model gets, not the one it was built at):
# "divide": every spatial size must be a multiple of `size`; "interpolate": the map is resized
# (linear, align_corners=false) up to the next multiple of `size` and the folded map back to its own
# grid (timm's MobileViT block); "fixed": the grid the model was built for only (when `size` was
# derived from the input size, as EMO's windows are, another grid would change what it means).
Fit = Literal["divide", "interpolate", "fixed"]


def _check_size(name: str, size: int) -> None:
    if size < 1:
        raise ShapeError(f"{name} size must be 1 or more, got {size}")


@op("patches_to_batch", category="layout", layout="map")
class PatchesToBatch(Op):
    """Unfold a map (B, C, *grid) into `size`^d token sequences per image, stacked along the batch:
    (B * size^d, prod(grid / size), C). Sequence p (p = i * size + j in 2-D, the offset inside the
    patch, row-major) holds the pixel at offset p of every patch, patches in row-major order; so
    attention mixes the same position across patches (MobileViT's unfold). The shape shown is one
    sequence: tokens on the patch grid. Must be closed by `batch_to_patches(size)` in the same
    block, with the same `fit`. `fit="divide"`: every spatial size must be a multiple of `size`;
    `"interpolate"`: a map that is not is resized (linear, `align_corners=false`) up to the next
    multiple, and `batch_to_patches` resizes the folded map back to the grid it came from (timm's
    MobileViT block); `"fixed"`: as "divide", and the module runs only at the grid it was built for
    (for a `size` derived from the input size)."""

    size: Pos = 2
    fit: Fit = "divide"
    batch_fold: ClassVar[str] = "open"
    regrids: ClassVar[bool] = True  # its module tells the patch grid it puts the tokens on

    def runtime_grid(self, x: Shape) -> bool:
        return self.fit != "fixed"

    def fold_factor(self, x: Shape) -> int:
        """How many sequences one image gives (the batch factor the lowering carries)."""
        return self.size ** x.ndim

    def infer(self, x: Shape) -> Shape:
        _check_size("patches_to_batch", self.size)
        if not x.spatial:
            raise ShapeError("patches_to_batch needs a map with a spatial grid")
        if self.fit == "interpolate":
            return Shape(x.channels, tuple(-(-s // self.size) for s in x.spatial), "tokens")
        if any(s % self.size for s in x.spatial):
            raise ShapeError(f"patch size {self.size} does not divide the feature size "
                             f"{'x'.join(map(str, x.spatial))}",
                             f"choose an input size whose feature size here is a multiple of {self.size}")
        return Shape(x.channels, tuple(s // self.size for s in x.spatial), "tokens")

    def build(self, x, y):
        from ..layers.patches import PatchesToBatch as Module

        return Module(self.size, x.spatial, self.fit)


@op("batch_to_patches", category="layout", layout="tokens")
class BatchToPatches(Op):
    """Fold `size`^d token sequences stacked along the batch, (B * size^d, N, C) with N tokens on
    the patch grid, back into a map (B, C, *grid * size): the inverse of
    `patches_to_batch(size)`, which must open it earlier in the same block with the same `fit`.
    Under `fit="interpolate"` the map comes back on the grid the opener unfolded (the lowering
    gives this op's output that grid; the module resizes to it when it differs from n * size)."""

    size: Pos = 2
    fit: Fit = "divide"
    batch_fold: ClassVar[str] = "close"
    opener: ClassVar[str] = "patches_to_batch"  # the op whose fold it closes

    def runtime_grid(self, x: Shape) -> bool:
        return self.fit != "fixed"

    def closes(self, opener) -> str | None:
        """None when this closes `opener`; else why not."""
        if opener.name != "patches_to_batch" or opener.size != self.size:
            return f"the innermost open fold is {opener.describe()}"
        return None

    def closed(self, y: Shape, opened: Shape) -> Shape:
        """The output once the lowering knows the map its opener unfolded (`opened`)."""
        return y.with_(spatial=opened.spatial) if self.fit == "interpolate" else y

    def infer(self, x: Shape) -> Shape:
        _check_size("batch_to_patches", self.size)
        if x.extra:
            raise ShapeError(f"batch_to_patches cannot fold {x.extra} class token(s) into a map")
        if not x.spatial:
            raise ShapeError("batch_to_patches needs tokens on a grid")
        return Shape(x.channels, tuple(s * self.size for s in x.spatial), "map")

    def build(self, x, y):
        from ..layers.patches import BatchToPatches as Module

        return Module(self.size, x.spatial, self.fit, y.spatial)
