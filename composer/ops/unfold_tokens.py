"""Unfold a map into overlapping patches, one token per patch (im2col as a tokenizer)."""


from typing import Optional

from ..shapes import Shape, ShapeError
from .registry import NonNeg, Op, Pos, op, spatial_out


@op("unfold", category="layout", layout="map")
class Unfold(Op):
    """Cut a map (B, C, *grid) into `kernel`-sized patches every `stride` pixels (after `padding`
    zeros on every side) and make each patch one token of C * kernel^d channels, ordered
    (channel, kernel offsets row-major) as `nn.Unfold`: tokens (B, prod(out grid), C * kernel^d)
    on the output grid `(size + 2 * padding - kernel) // stride + 1`. T2T-ViT's soft split is
    `unfold(7, stride = 4, padding = 2)` then `unfold(3, stride = 2, padding = 1)`: overlapping
    patches, so neighbouring tokens share pixels. `stride` defaults to `kernel` (non-overlapping).
    No parameters and no MACs (a copy)."""

    kernel: Pos
    stride: Optional[Pos] = None
    padding: NonNeg = 0

    def infer(self, x: Shape) -> Shape:
        if not x.spatial:
            raise ShapeError("unfold needs a map with a spatial grid")
        stride = self.stride or self.kernel
        if self.kernel < 1 or stride < 1 or self.padding < 0:
            raise ShapeError("unfold kernel and stride must be positive and padding not negative")
        grid = tuple(spatial_out(s, self.kernel, stride, self.padding) for s in x.spatial)
        if any(g < 1 for g in grid):
            raise ShapeError(f"unfold kernel {self.kernel} with padding {self.padding} does not fit the input size "
                             f"{'x'.join(map(str, x.spatial))}", "lower the kernel or raise the input size")
        return Shape(x.channels * self.kernel ** x.ndim, grid, "tokens")

    def build(self, x, y):
        from ..layers.sampling import UnfoldTokens

        return UnfoldTokens(self.kernel, self.stride or self.kernel, self.padding)
