"""Re-parameterizable convolutions: several parallel conv+BN branches while training, one conv after
`fuse()` (RepVGG, MobileOne, the small-kernel branch of large-kernel nets)."""


from typing import Optional

from ..shapes import Shape, ShapeError
from .registry import NonNeg, NonNegFloat, Op, Pos, check_divides, op, prod, spatial_out


def _rep_check(x: Shape, out: int, kernel: int, stride: int, groups: int, small: Optional[int]) -> Shape:
    if kernel < 1 or kernel % 2 == 0:
        raise ShapeError(f"a re-parameterizable conv needs an odd kernel, got {kernel}",
                         "the branches are centred on each other, which needs odd kernels")
    if small is not None and (small < 1 or small % 2 == 0 or small > kernel):
        raise ShapeError(f"small_kernel must be odd and at most kernel ({kernel}), got {small}")
    if stride < 1:
        raise ShapeError(f"stride must be 1 or more, got {stride}")
    check_divides(f"groups ({groups}) must divide the input channels", x.channels, groups)
    check_divides(f"groups ({groups}) must divide the output channels", out, groups)
    if not x.spatial:
        raise ShapeError("a re-parameterizable conv needs a map with a spatial grid")
    return Shape(out, tuple(spatial_out(s, kernel, stride, kernel // 2) for s in x.spatial), "map")


class _Rep(Op):
    """Shared rules; subclasses declare the fields (in positional order) and say how `out` and
    `groups` follow from the input."""

    def geometry(self, x: Shape) -> tuple[int, int]:  # (out, groups)
        raise NotImplementedError

    def kernels(self) -> list[int]:
        """The kernel size of every conv branch, the main ones first."""
        return [self.kernel] * self.branches + ([1] if self.scale_branch else []) + \
            ([self.small_kernel] if self.small_kernel else [])

    def has_identity(self, x: Shape) -> bool:
        out, _ = self.geometry(x)
        return self.identity and out == x.channels and self.stride == 1

    def infer(self, x: Shape) -> Shape:
        out, groups = self.geometry(x)
        y = _rep_check(x, out, self.kernel, self.stride, groups, self.small_kernel)
        if self.branches < 0:
            raise ShapeError(f"branches must be 0 or more, got {self.branches}")
        if not self.kernels() and not self.has_identity(x):
            raise ShapeError("this re-parameterizable conv has no branch at all",
                             "with branches = 0, keep the identity branch (same channels, stride 1) or add "
                             "scale_branch / small_kernel")
        return y

    def params(self, x, y):
        out, groups = self.geometry(x)
        per = out * (x.channels // groups)
        conv = sum(per * k ** x.ndim + 2 * out for k in self.kernels())  # conv weights + BN weight and bias
        return conv + (2 * out if self.has_identity(x) else 0)

    def macs(self, x, y):
        out, groups = self.geometry(x)
        return sum(prod(y.spatial) * out * (x.channels // groups) * k ** x.ndim for k in self.kernels())

    def build(self, x, y):
        from ..layers.reparam import RepConv

        out, groups = self.geometry(x)
        return RepConv(x.channels, out, self.kernel, self.stride, groups, x.ndim, identity=self.has_identity(x),
                       scale_branch=self.scale_branch, small_kernel=self.small_kernel, branches=self.branches)


@op("rep_conv", category="conv", layout="map")
class RepConvOp(_Rep):
    """Re-parameterizable convolution, trained as a sum of parallel branches and fused into one conv.

    Training form: `conv_kxk` (a `kernel` conv without bias, then BN; with `branches` > 1 that many
    such convs, `conv_kxk.0`, `conv_kxk.1`, ... as MobileOne's over-parameterized branches; with
    `branches = 0` none, e.g. a BN-only "norm" that fuses into a conv), plus `conv_1x1` (1x1 conv + BN)
    when `scale_branch` (RepVGG's 1x1 branch, MobileOne's scale branch), plus `conv_small`
    (`small_kernel` conv + BN, the small-kernel branch of large-kernel nets) when given, plus
    `identity` (a BN of the input) when `identity` and the conv keeps channels and resolution
    (timm's RepVGG names; each conv branch has submodules `conv` and `bn`). No activation.
    `module.fuse()` returns the equivalent single conv (with bias) for eval mode;
    `composer.fuse.fuse_model(model)` (and `model.fuse()`) fuses every such module in place, then
    folds linear structures around the fused convs (see `fuse_model`). Kernels must be odd
    (padding `kernel // 2`). MACs and params count the training form (all branches)."""

    out: Pos
    kernel: Pos
    stride: Pos = 1
    groups: Pos = 1
    identity: bool = True
    scale_branch: bool = False
    small_kernel: Optional[Pos] = None
    branches: NonNeg = 1

    def geometry(self, x: Shape) -> tuple[int, int]:
        return self.out, self.groups


@op("rep_dwconv", category="conv", layout="map")
class RepDwConv(_Rep):
    """Depthwise `rep_conv`: groups and output channels equal to the input channels (MobileOne's
    depthwise stage, RepLKNet's large-kernel conv with `small_kernel`). Same branches, submodules
    and `fuse()` as `rep_conv`."""

    kernel: Pos
    stride: Pos = 1
    identity: bool = True
    scale_branch: bool = False
    small_kernel: Optional[Pos] = None
    branches: NonNeg = 1

    def geometry(self, x: Shape) -> tuple[int, int]:
        return x.channels, x.channels


@op("norm_classifier", category="head", layout="vector", classifier=True)
class NormClassifier(Op):
    """A classifier with batch norm in front: `heads` heads of batch norm (`BatchNorm1d`) then a
    linear layer to `num_classes` logits, their outputs averaged (LeViT's, EfficientViT-M's, RepViT's
    and RepNeXt's `NormLinear` head; two heads are a classifier head and a distillation head, averaged
    at inference). Submodules `heads.<i>.norm` and `heads.<i>.linear` (linear weights
    trunc-normal(`init_std`), biases zero). `num_classes=0` makes it the identity and
    `reset_classifier(n)` replaces it, as `classifier`. `model.fuse()` folds the norms and the heads
    into one `nn.Linear` (eval mode); params count the training form."""

    num_classes: NonNeg
    heads: Pos = 1
    bias: bool = True
    init_std: NonNegFloat = 0.02

    def infer(self, x: Shape) -> Shape:
        if self.num_classes < 0:
            raise ShapeError(f"num_classes must be 0 or more, got {self.num_classes}")
        if self.heads < 1:
            raise ShapeError(f"norm_classifier needs at least one head, got {self.heads}")
        return x.with_(channels=self.num_classes or x.channels)

    def params(self, x, y):
        if not self.num_classes:
            return 0
        return self.heads * (2 * x.channels + x.channels * self.num_classes + (self.num_classes if self.bias else 0))

    def macs(self, x, y):
        return 0 if not self.num_classes else self.heads * x.channels * self.num_classes

    def build(self, x, y):
        from torch import nn

        from ..layers.reparam import NormLinearHeads

        if not self.num_classes:
            return nn.Identity()
        return NormLinearHeads(x.channels, self.num_classes, self.heads, self.bias, self.init_std)
