"""Resampling and channel reordering on feature maps: adaptive pooling, up-sampling, pixel
(un)shuffle and channel shuffle, in 1-D, 2-D and 3-D. None of them has parameters or MACs."""


from typing import Literal, Union

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, check_divides, op


def _grid(x: Shape) -> str:
    return "x".join(map(str, x.spatial))


@op("adaptive_pool", category="pool", layout="map")
class AdaptivePool(Op):
    """Adaptive average or max pooling to a fixed `size` along every spatial dim
    (`AdaptiveAvgPool1d/2d/3d`, `AdaptiveMaxPool1d/2d/3d`); `size=1` is a global pool that keeps
    the map layout (the squeeze of squeeze-and-excitation, pyramid pooling)."""

    size: Pos
    mode: Literal["avg", "max"] = "avg"

    def infer(self, x: Shape) -> Shape:
        if self.size < 1:
            raise ShapeError(f"adaptive_pool size must be 1 or more, got {self.size}")
        if not x.spatial:
            raise ShapeError("adaptive_pool needs a map with a spatial grid")
        return x.with_(spatial=(self.size,) * x.ndim)

    def build(self, x, y):
        from torch import nn

        if self.mode == "max":
            return (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)[x.ndim - 1](self.size)
        return (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[x.ndim - 1](self.size)


@op("upsample", category="resample", layout="map")
class Upsample(Op):
    """Up-sample every spatial dim by the integer factor `scale` (`nn.Upsample`). `mode="nearest"`
    repeats pixels; `mode="linear"` interpolates (linear, bilinear or trilinear by the input's rank,
    `align_corners=false`)."""

    scale: Pos = 2
    mode: Literal["nearest", "linear"] = "nearest"

    def infer(self, x: Shape) -> Shape:
        if self.scale < 1:
            raise ShapeError(f"upsample scale must be 1 or more, got {self.scale}")
        return x.with_(spatial=tuple(s * self.scale for s in x.spatial))

    def build(self, x, y):
        from torch import nn

        mode = ("linear", "bilinear", "trilinear")[x.ndim - 1] if self.mode == "linear" else "nearest"
        extra = {"align_corners": False} if self.mode == "linear" else {}
        return nn.Upsample(scale_factor=float(self.scale), mode=mode, **extra)


@op("resize", category="resample", layout="map")
class Resize(Op):
    """Resample a map to a fixed spatial `size` (an int for every dim, or one per dim) with
    `F.interpolate`: `mode="nearest"`, `"linear"` (linear, bilinear or trilinear by the input's
    rank), `"bicubic"` (2-D only) or `"area"`; `align_corners` as in PyTorch (false by default).
    CrossViT's branches see the image resized to 240 and 224 this way (bicubic). The output has
    `size` whatever the input's size (an input that has it passes unchanged), so the op follows
    any input grid."""

    size: Union[Pos, list[Pos]]
    mode: Literal["nearest", "linear", "bicubic", "area"] = "bicubic"
    align_corners: bool = False

    def infer(self, x: Shape) -> Shape:
        if not x.spatial:
            raise ShapeError("resize needs a map with a spatial grid")
        size = [self.size] * x.ndim if isinstance(self.size, int) else list(self.size)
        if len(size) != x.ndim or any(s < 1 for s in size):
            raise ShapeError(f"resize size {self.size} does not fit a {x.ndim}-D map of positive sizes")
        if self.mode == "bicubic" and x.ndim != 2:
            raise ShapeError("bicubic resizing needs a 2-D map", "use mode=\"linear\" for 1-D and 3-D inputs")
        return x.with_(spatial=tuple(size))

    def build(self, x, y):
        from ..layers.resample import Resize as Module

        mode = ("linear", "bilinear", "trilinear")[x.ndim - 1] if self.mode == "linear" else self.mode
        return Module(y.spatial, mode, self.align_corners if self.mode in ("linear", "bicubic") else None)


@op("pixel_shuffle", category="resample", layout="map")
class PixelShuffle(Op):
    """Depth to space: (C * f^d, *grid) -> (C, *grid * f), with d the number of spatial dims.
    Same element order as `nn.PixelShuffle` in 2-D (channel c*f*f + i*f + j goes to offset (i, j)
    of pixel group c), generalised to 1-D and 3-D."""

    factor: Pos = 2

    def infer(self, x: Shape) -> Shape:
        if self.factor < 1:
            raise ShapeError(f"pixel_shuffle factor must be 1 or more, got {self.factor}")
        block = self.factor ** x.ndim
        check_divides(f"pixel_shuffle needs channels divisible by factor^{x.ndim} = {block}", x.channels, block,
                      f"give the previous layer a multiple of {block} channels")
        return Shape(x.channels // block, tuple(s * self.factor for s in x.spatial), "map")

    def build(self, x, y):
        from ..layers.resample import PixelShuffle as Module

        return Module(self.factor)


@op("pixel_unshuffle", category="resample", layout="map")
class PixelUnshuffle(Op):
    """Space to depth, the inverse of `pixel_shuffle`: (C, *grid) -> (C * f^d, *grid / f). Every
    spatial size must be a multiple of `factor`."""

    factor: Pos = 2

    def infer(self, x: Shape) -> Shape:
        if self.factor < 1:
            raise ShapeError(f"pixel_unshuffle factor must be 1 or more, got {self.factor}")
        if any(s % self.factor for s in x.spatial):
            raise ShapeError(f"pixel_unshuffle factor {self.factor} does not divide the input size {_grid(x)}",
                             f"use an input size whose feature size here is a multiple of {self.factor}")
        return Shape(x.channels * self.factor ** x.ndim, tuple(s // self.factor for s in x.spatial), "map")

    def build(self, x, y):
        from ..layers.resample import PixelUnshuffle as Module

        return Module(self.factor)


@op("channel_shuffle", category="resample", layout="map")
class ChannelShuffle(Op):
    """Interleave the channels of `groups` groups (ShuffleNet): view the channels as
    (groups, C / groups), transpose, flatten. `groups` must divide the channels."""

    groups: Pos

    def infer(self, x: Shape) -> Shape:
        check_divides(f"channel_shuffle groups ({self.groups}) must divide the channels", x.channels, self.groups)
        return x

    def build(self, x, y):
        from ..layers.resample import ChannelShuffle as Module

        return Module(self.groups)
