"""Convolution, pooling and patch embedding: ops on feature maps, in 1-D, 2-D and 3-D."""


from typing import Literal, Optional, Union

from ..shapes import Shape, ShapeError
from .registry import NonNeg, Op, Pos, check_divides, op, prod, spatial_out

IntOrList = Union[int, list[int]]
PosOrList = Union[Pos, list[Pos]]  # a size >= 1 for every spatial dim, or one per dim
NonNegOrList = Union[NonNeg, list[NonNeg]]  # a padding >= 0


def per_dim(value, ndim: int, what: str) -> tuple[int, ...]:
    """An int for every spatial dim, or a list with one value per dim (a 1x11 band kernel)."""
    if isinstance(value, int):
        return (value,) * ndim
    if len(value) != ndim:
        raise ShapeError(f"{what} {value} has {len(value)} values but the input has {ndim} spatial dim(s)")
    return tuple(value)


def _show(t) -> str:
    return str(t[0]) if len(set(t)) == 1 else "x".join(map(str, t))


def _out_grid(x: Shape, kernel, stride, padding, dilation=1) -> tuple[int, ...]:
    k, s, p, d = (per_dim(v, x.ndim, w) for v, w in ((kernel, "kernel"), (stride, "stride"), (padding, "padding"),
                                                    (dilation, "dilation")))
    grid = tuple(spatial_out(*args) for args in zip(x.spatial, k, s, p, d))
    if any(g < 1 for g in grid):
        raise ShapeError(
            f"kernel {_show(k)} with stride {_show(s)} and padding {_show(p)} does not fit the input size "
            f"{'x'.join(map(str, x.spatial))}",
            "the input is too small at this point: lower the stride or raise the input size",
        )
    return grid


@op("conv", category="conv", layout="map")
class Conv(Op):
    """Convolution over the spatial dims (`Conv1d/2d/3d` by the input's rank).

    `out` output channels; `kernel`, `stride`, `padding` and `dilation` are an int or one value per
    spatial dim (`kernel = [1, 11]`); `padding` defaults to `dilation * (kernel - 1) // 2` for an
    odd kernel ("same" at stride 1) and to 0 for an even one (a patchify conv: kernel 4, stride 4).
    `padding="same"` is TensorFlow's SAME: the output is ceil(size / stride) and the padding
    `max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)` is split with the extra pixel
    at the end (bottom/right), as timm's `Conv2dSame` (MaxViT-tf, EfficientNet-tf); where that is
    symmetric it is a plain padded conv. Weights: PyTorch's default (kaiming-uniform), as timm
    leaves most convs; `init="kaiming_out"` draws them from kaiming-normal with fan-out and ReLU
    gain, bias zero (ResNet's and torchvision's convention)."""

    out: Pos
    kernel: PosOrList = 1
    stride: PosOrList = 1
    padding: Optional[Union[NonNegOrList, Literal["same"]]] = None
    dilation: PosOrList = 1
    groups: Pos = 1
    bias: bool = True
    init: Literal["default", "kaiming_out"] = "default"

    def same_pad(self, x: Shape) -> tuple[tuple[int, int], ...]:
        """TF-SAME padding (before, after) per spatial dim for input `x`."""
        k, s, d = (per_dim(v, x.ndim, w) for v, w in ((self.kernel, "kernel"), (self.stride, "stride"),
                                                     (self.dilation, "dilation")))
        pads = []
        for g, ki, si, di in zip(x.spatial, k, s, d):
            total = max((-(-g // si) - 1) * si + di * (ki - 1) + 1 - g, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)

    def pad(self, ndim: int) -> tuple[int, ...]:
        if self.padding == "same":
            raise ShapeError("padding 'same' depends on the input size")  # callers use same_pad
        if self.padding is not None:
            return per_dim(self.padding, ndim, "padding")
        k, d = per_dim(self.kernel, ndim, "kernel"), per_dim(self.dilation, ndim, "dilation")
        return tuple(di * (ki - 1) // 2 if ki % 2 else 0 for ki, di in zip(k, d))

    def infer(self, x: Shape) -> Shape:
        check_divides(f"conv groups ({self.groups}) must divide the input channels", x.channels, self.groups)
        check_divides(f"conv groups ({self.groups}) must divide the output channels", self.out, self.groups)
        if self.padding == "same":
            s = per_dim(self.stride, x.ndim, "stride")
            return Shape(self.out, tuple(-(-g // si) for g, si in zip(x.spatial, s)), "map")
        return Shape(self.out, _out_grid(x, self.kernel, self.stride, self.pad(x.ndim), self.dilation), "map")

    def _taps(self, ndim: int) -> int:
        return prod(per_dim(self.kernel, ndim, "kernel"))

    def params(self, x, y):
        return self.out * (x.channels // self.groups) * self._taps(x.ndim) + (self.out if self.bias else 0)

    def macs(self, x, y):
        return prod(y.spatial) * self.out * (x.channels // self.groups) * self._taps(x.ndim)

    def build(self, x, y):
        from torch import nn

        n = x.ndim
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
        pad = self.pad(n) if self.padding != "same" else None
        if pad is None and all(a == b for a, b in self.same_pad(x)):  # symmetric: a plain padded conv
            pad = tuple(a for a, _ in self.same_pad(x))
        if pad is None:
            from ..layers.conv import same_conv

            cls = same_conv(n)
            pad = 0
        elif n == 2 and self.groups == 1 and not any(pad) and \
                set(per_dim(self.kernel, n, "kernel") + per_dim(self.stride, n, "stride")) == {1}:
            from ..layers.conv import PointwiseConv2d as cls  # runs channels-last input as a linear
        conv = cls(x.channels, self.out, per_dim(self.kernel, n, "kernel"), per_dim(self.stride, n, "stride"),
                   pad, per_dim(self.dilation, n, "dilation"), self.groups, self.bias)
        if self.init == "kaiming_out":
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        return conv


@op("conv_transpose", category="conv", layout="map")
class ConvTranspose(Op):
    """Transposed convolution (`ConvTranspose1d/2d/3d`): upsampling by `stride`, each output size
    (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1; `kernel`
    defaults to `stride`, so `conv_transpose(c, stride = 4)` is a 4x upsampling without overlap
    (EdgeViT's local propagation uses a depthwise one: `groups = channels`). PyTorch's default init."""

    out: Pos
    stride: PosOrList = 2
    kernel: Optional[PosOrList] = None
    padding: NonNegOrList = 0
    output_padding: NonNegOrList = 0
    dilation: PosOrList = 1
    groups: Pos = 1
    bias: bool = True

    def _dims(self, n: int):
        k = per_dim(self.kernel if self.kernel is not None else self.stride, n, "kernel")
        return k, *(per_dim(v, n, w) for v, w in ((self.stride, "stride"), (self.padding, "padding"),
                                                  (self.output_padding, "output_padding"),
                                                  (self.dilation, "dilation")))

    def infer(self, x: Shape) -> Shape:
        check_divides(f"conv_transpose groups ({self.groups}) must divide the input channels", x.channels, self.groups)
        check_divides(f"conv_transpose groups ({self.groups}) must divide the output channels", self.out, self.groups)
        k, s, p, op_, d = self._dims(x.ndim)
        if any(o >= max(si, di) for o, si, di in zip(op_, s, d)):
            raise ShapeError(f"output_padding {_show(op_)} must be smaller than the stride or the dilation")
        grid = tuple((g - 1) * si - 2 * pi + di * (ki - 1) + oi + 1 for g, ki, si, pi, oi, di in zip(x.spatial, k, s, p, op_, d))
        if any(g < 1 for g in grid):
            raise ShapeError(f"conv_transpose padding {_show(p)} leaves no output for input size "
                             f"{'x'.join(map(str, x.spatial))}")
        return Shape(self.out, grid, "map")

    def params(self, x, y):
        taps = prod(self._dims(x.ndim)[0])
        return x.channels * (self.out // self.groups) * taps + (self.out if self.bias else 0)

    def macs(self, x, y):
        """Every input position scatters into kernel^d outputs of out/groups channels."""
        return prod(x.spatial) * x.channels * (self.out // self.groups) * prod(self._dims(x.ndim)[0])

    def build(self, x, y):
        from torch import nn

        k, s, p, op_, d = self._dims(x.ndim)
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[x.ndim - 1]
        return cls(x.channels, self.out, k, s, p, op_, self.groups, self.bias, d)


@op("pool", category="pool", layout="map")
class Pool(Op):
    """Average or max pooling over a window (`kernel`, `stride` defaulting to `kernel`).

    `count_include_pad=false` averages over the real pixels only (PoolFormer's pooling)."""

    kernel: Pos
    stride: Optional[Pos] = None
    padding: NonNeg = 0
    mode: Literal["avg", "max"] = "avg"
    count_include_pad: bool = True

    def infer(self, x: Shape) -> Shape:
        if self.padding > self.kernel // 2:  # PyTorch's pooling layers refuse it
            raise ShapeError(f"pool padding {self.padding} is more than half the kernel {self.kernel}",
                             f"a kernel of {self.kernel} takes a padding of at most {self.kernel // 2}")
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

    out: Pos
    patch: Pos
    stride: Optional[Pos] = None
    padding: NonNeg = 0
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
        from ..layers.core import Stack

        return Stack(proj=self._conv().build(x, y), norm=self.norm.build(y, y) if self.norm else None)
