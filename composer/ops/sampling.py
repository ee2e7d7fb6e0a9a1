"""Ops that read a map at learned, fractional positions: the deformable convolution and the
`deformable` key source of the attention op (keys and values sampled at learned offsets).

Both sample with bilinear interpolation (`F.grid_sample`), zero outside the map, and predict
their offsets with a small convolutional network; they work on 1-D, 2-D and 3-D maps (a 1-D map is
sampled as a 2-D map of height 1). Sampling has no multiply-accumulates of its own in the MAC
rules (as `torch.utils.flop_counter`, which does not see `grid_sample` either).
"""


from typing import ClassVar, Optional

from ..shapes import Shape, ShapeError
from .attention import KeySource
from .conv import Conv, NonNegOrList, PosOrList, per_dim
from .registry import NonNegFloat, Op, Pos, check_divides, op, prod, spatial_out


@op("deform_conv", category="conv", layout="map")
class DeformConv(Op):
    """Deformable convolution (Dai et al. 2017, "Deformable Convolutional Networks"): every tap of
    the kernel reads the input at its regular position plus a learned fractional offset, by
    bilinear interpolation (zero outside the map), then the taps are weighted as in `conv`.

    The offsets come from the submodule `conv_offset`, a plain conv with the same `kernel`,
    `stride`, `padding` and `dilation` and bias, giving `offset_groups * taps * d` channels (d the
    number of spatial dims, taps = prod(kernel)); channel `(g * taps + k) * d + i` is the offset
    along dim i of tap k (row-major) for the input channels of offset group g, as
    `torchvision.ops.deform_conv2d` and mmcv's `DeformConv2dPack` lay them out. `conv_offset` is
    zero-initialised, so a fresh layer is exactly the plain convolution (LITv2's deformable token
    merging: `deform_conv(2 * dim, 2, stride = 2)`). The main weights are `weight`
    (out, in / groups, *kernel) and `bias`, PyTorch's default init. `padding` defaults as in `conv`
    (same-size for odd kernels, 0 for even ones). Computed in plain PyTorch with `grid_sample`
    and a grouped matrix product; MACs: the main and the offset convolutions."""

    out: Pos
    kernel: PosOrList
    stride: PosOrList = 1
    padding: Optional[NonNegOrList] = None
    dilation: PosOrList = 1
    groups: Pos = 1
    offset_groups: Pos = 1
    bias: bool = True

    def _conv(self) -> Conv:
        return Conv(out=self.out, kernel=self.kernel, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, groups=self.groups, bias=self.bias)

    def _offset_conv(self, x: Shape) -> Conv:
        taps = prod(per_dim(self.kernel, x.ndim, "kernel"))
        return Conv(out=self.offset_groups * taps * x.ndim, kernel=self.kernel, stride=self.stride,
                    padding=list(self._conv().pad(x.ndim)), dilation=self.dilation)

    def infer(self, x: Shape) -> Shape:
        if not 1 <= x.ndim <= 3:
            raise ShapeError("deform_conv needs a map with 1, 2 or 3 spatial dims")
        check_divides(f"deform_conv offset_groups ({self.offset_groups}) must divide the input channels",
                      x.channels, self.offset_groups)
        return self._conv().infer(x)

    def params(self, x, y):
        return self._conv().params(x, y) + self._offset_conv(x).params(x, y)

    def macs(self, x, y):
        return self._conv().macs(x, y) + self._offset_conv(x).macs(x, y)

    def build(self, x, y):
        from ..layers.sampling import DeformConv as Module

        n = x.ndim
        return Module(x.channels, self.out, per_dim(self.kernel, n, "kernel"), per_dim(self.stride, n, "stride"),
                      self._conv().pad(n), per_dim(self.dilation, n, "dilation"), self.groups, self.offset_groups,
                      self.bias, self._offset_conv(x).build(x, y))


@op("deformable", kind="part", category="attention part")
class Deformable(KeySource):
    """Keys and values sampled at learned offsets (DAT, Xia et al. CVPR 2022, "Vision Transformer
    with Deformable Attention"), for `attention(kv = deformable(...))`.

    The attention's projected queries (as a map) are split into `groups` channel groups; for each
    group an offset network `conv_offset` (a depthwise `kernel` conv with stride `stride` and bias,
    a layer norm over channels, GELU, and a bias-free 1x1 conv to d offsets) predicts one offset
    per point of a reference grid (the strided grid: `stride` 1 samples as many points as there are
    queries). Offsets are bounded as `tanh(o) * offset_range_factor / grid_size` in normalised
    [-1, 1] coordinates (`offset_range_factor = 0`: unbounded), added to the reference points
    (the cell centres, `(i + 0.5) / n * 2 - 1`), and the attention's (normalised) input is sampled
    there with `grid_sample` (bilinear, `align_corners=True`, as the reference), each group of
    channels at its own positions. The sampled tokens go through the attention's `kv` linear, so
    DAT's 1x1 `proj_q`, `proj_k`, `proj_v` are the attention's `q` and `kv` linears. The offset
    network is registered on the attention as `conv_offset` (indices 0-3 as in DAT).

    `bias = true` adds DAT's interpolated relative-position bias (its `use_pe` path without
    `dwc_pe`/`fixed_pe`): a table `rpe_table` (heads, 2n_1 - 1, ..., 2n_d - 1) over the query grid
    n, initialised with a truncated normal of std `bias_std` (0: zeros), registered on the
    attention. For query q (the normalised cell centre of its grid point) and sample p (its
    normalised sampling position) the table is read bilinearly (`grid_sample`, `align_corners=True`,
    zero outside) at the normalised coordinate `(q - p) / 2`, head h of offset group g from the
    table's head h, and added to the score of q and p before the softmax. The attention must have
    a multiple of `groups` heads."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    groups: Pos = 1
    offset_range_factor: NonNegFloat = 2.0
    kernel: Pos = 5
    stride: Pos = 1
    bias: bool = False
    bias_std: NonNegFloat = 0.01

    needs_query: ClassVar[bool] = True
    module_name: ClassVar[Optional[str]] = None

    def _check(self, x: Shape) -> None:
        if not 1 <= x.ndim <= 3:
            raise ShapeError("deformable keys need tokens on a 1-D, 2-D or 3-D grid")
        if self.groups <= 0 or x.channels % self.groups:
            raise ShapeError(f"deformable: {self.groups} offset groups do not divide the {x.channels} channels",
                             "the channel count must be a multiple of `groups`")
        if self.kernel < 1 or self.stride < 1:
            raise ShapeError("deformable kernel and stride must be positive")

    def grid(self, x: Shape) -> tuple[int, ...]:
        self._check(x)
        out = tuple(spatial_out(g, self.kernel, self.stride, self.kernel // 2) for g in x.spatial)
        if any(g < 1 for g in out):
            raise ShapeError(f"deformable: kernel {self.kernel} with stride {self.stride} does not fit the grid "
                             f"{'x'.join(map(str, x.spatial))}")
        return out

    def params(self, x: Shape, y: Optional[Shape] = None) -> int:
        cg, d = x.channels // self.groups, x.ndim
        return cg * self.kernel ** d + cg + 2 * cg + cg * d

    def score_bias(self) -> bool:
        return self.bias

    def bias_params(self, x: Shape, heads: int) -> int:
        if not self.bias:
            return 0
        if heads % self.groups:
            raise ShapeError(f"deformable bias: {self.groups} offset groups do not divide the {heads} heads")
        return heads * prod(2 * g - 1 for g in x.spatial)

    def macs(self, x: Shape, y: Optional[Shape] = None) -> int:
        return prod(self.grid(x)) * x.channels * (self.kernel ** x.ndim + x.ndim)

    def build(self, x: Shape, y: Optional[Shape] = None, heads: int = 0):
        from ..layers.sampling import DeformableKeys

        bias = (heads, tuple(2 * g - 1 for g in x.spatial), self.bias_std) if self.bias else None
        return DeformableKeys(x.channels, x.ndim, self.groups, self.kernel, self.stride, self.offset_range_factor,
                              bias)


__all__ = ["DeformConv", "Deformable"]
