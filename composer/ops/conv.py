"""Convolution, pooling and patch embedding: ops on feature maps, in 1-D, 2-D and 3-D."""

from __future__ import annotations

from typing import Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import Op, check_divides, op, prod, spatial_out


def _out_grid(x: Shape, kernel: int, stride: int, padding: int, dilation: int = 1) -> tuple[int, ...]:
    grid = tuple(spatial_out(s, kernel, stride, padding, dilation) for s in x.spatial)
    if any(g < 1 for g in grid):
        raise ShapeError(
            f"kernel {kernel} with stride {stride} and padding {padding} does not fit the input size "
            f"{'x'.join(map(str, x.spatial))}",
            "the input is too small at this point: lower the stride or raise the input size",
        )
    return grid


@op("conv", category="conv", layout="map")
class Conv(Op):
    """Convolution over the spatial dims (`Conv1d/2d/3d` by the input's rank).

    `out` output channels; `padding` defaults to `dilation * (kernel - 1) // 2` ("same" at stride 1).
    Weights: timm's default (PyTorch's kaiming-uniform)."""

    out: int
    kernel: int = 1
    stride: int = 1
    padding: Optional[int] = None
    dilation: int = 1
    groups: int = 1
    bias: bool = True

    @property
    def pad(self) -> int:
        return self.dilation * (self.kernel - 1) // 2 if self.padding is None else self.padding

    def infer(self, x: Shape) -> Shape:
        check_divides(f"conv groups ({self.groups}) must divide the input channels", x.channels, self.groups)
        check_divides(f"conv groups ({self.groups}) must divide the output channels", self.out, self.groups)
        return Shape(self.out, _out_grid(x, self.kernel, self.stride, self.pad, self.dilation), "map")

    def params(self, x, y):
        return self.out * (x.channels // self.groups) * self.kernel ** x.ndim + (self.out if self.bias else 0)

    def macs(self, x, y):
        return prod(y.spatial) * self.out * (x.channels // self.groups) * self.kernel ** x.ndim

    def build(self, x, y):
        from torch import nn

        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[x.ndim - 1]
        return cls(x.channels, self.out, self.kernel, self.stride, self.pad, self.dilation, self.groups, self.bias)


@op("pool", category="pool", layout="map")
class Pool(Op):
    """Average or max pooling over a window (`kernel`, `stride` defaulting to `kernel`).

    `count_include_pad=false` averages over the real pixels only (PoolFormer's pooling)."""

    kernel: int
    stride: Optional[int] = None
    padding: int = 0
    mode: Literal["avg", "max"] = "avg"
    count_include_pad: bool = True

    def infer(self, x: Shape) -> Shape:
        return x.with_(spatial=_out_grid(x, self.kernel, self.stride or self.kernel, self.padding))

    def build(self, x, y):
        from torch import nn

        stride = self.stride or self.kernel
        if self.mode == "max":
            return (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[x.ndim - 1](self.kernel, stride, self.padding)
        cls = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[x.ndim - 1]
        return cls(self.kernel, stride, self.padding, count_include_pad=self.count_include_pad)


@op("patch_embed", category="embed", layout="map")
class PatchEmbed(Op):
    """Patch embedding: a `patch`-sized convolution with stride `stride` (default `patch`), then an
    optional norm. Overlapping when `stride < patch` (PVT v2: patch 7, stride 4, padding 3).
    Submodules: `proj`, `norm`."""

    out: int
    patch: int
    stride: Optional[int] = None
    padding: int = 0
    bias: bool = True
    norm: Optional[Op] = None

    def _conv(self) -> Conv:
        return Conv(out=self.out, kernel=self.patch, stride=self.stride or self.patch, padding=self.padding, bias=self.bias)

    def infer(self, x: Shape) -> Shape:
        stride = self.stride or self.patch
        if self.padding == 0 and any(s % stride for s in x.spatial):
            raise ShapeError(
                f"patch size {stride} does not divide the input size {'x'.join(map(str, x.spatial))}",
                f"use an input size that is a multiple of {stride}",
            )
        return self._conv().infer(x)

    def params(self, x, y):
        return self._conv().params(x, y) + (self.norm.params(y, y) if self.norm else 0)

    def macs(self, x, y):
        return self._conv().macs(x, y)

    def build(self, x, y):
        from ..modules import Stack

        return Stack(proj=self._conv().build(x, y), norm=self.norm.build(y, y) if self.norm else None)
