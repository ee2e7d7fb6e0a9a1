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

from __future__ import annotations

from typing import ClassVar

from ..shapes import Shape, ShapeError
from .registry import Op, op


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
    block; every spatial size must be a multiple of `size`."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    size: int = 2
    batch_fold: ClassVar[str] = "open"

    def infer(self, x: Shape) -> Shape:
        _check_size("patches_to_batch", self.size)
        if not x.spatial:
            raise ShapeError("patches_to_batch needs a map with a spatial grid")
        if any(s % self.size for s in x.spatial):
            raise ShapeError(f"patch size {self.size} does not divide the feature size "
                             f"{'x'.join(map(str, x.spatial))}",
                             f"choose an input size whose feature size here is a multiple of {self.size}")
        return Shape(x.channels, tuple(s // self.size for s in x.spatial), "tokens")

    def build(self, x, y):
        from ..layers.patches import PatchesToBatch as Module

        return Module(self.size, x.spatial)


@op("batch_to_patches", category="layout", layout="tokens")
class BatchToPatches(Op):
    """Fold `size`^d token sequences stacked along the batch, (B * size^d, N, C) with N tokens on
    the patch grid, back into a map (B, C, *grid * size): the inverse of
    `patches_to_batch(size)`, which must open it earlier in the same block."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    size: int = 2
    batch_fold: ClassVar[str] = "close"

    def infer(self, x: Shape) -> Shape:
        _check_size("batch_to_patches", self.size)
        if x.extra:
            raise ShapeError(f"batch_to_patches cannot fold {x.extra} class token(s) into a map")
        if not x.spatial:
            raise ShapeError("batch_to_patches needs tokens on a grid")
        return Shape(x.channels, tuple(s * self.size for s in x.spatial), "map")

    def build(self, x, y):
        from ..layers.patches import BatchToPatches as Module

        return Module(self.size, x.spatial)
