"""Normalisation layers. Layer norm works on tokens and on maps (over channels), like timm's
`LayerNorm` and `LayerNorm2d`; batch, group and instance norm work on maps."""


from ..shapes import Shape
from .registry import NonNegFloat, Op, Pos, Probability, check_divides, op


@op("layernorm", category="norm")
class LayerNorm(Op):
    """Layer norm over the channels (the last dim of tokens, dim 1 of a map). Weight 1, bias 0;
    `bias=false` keeps the weight only (MetaFormer), `affine=false` neither."""

    eps: NonNegFloat = 1e-5
    affine: bool = True
    bias: bool = True

    def params(self, x, y):
        return (1 + self.bias) * x.channels if self.affine else 0

    def build(self, x, y):
        from ..layers.core import ChannelLayerNorm

        return ChannelLayerNorm(x.channels, self.eps, self.affine, self.bias, channel_first=x.layout == "map")


@op("rmsnorm", category="norm")
class RMSNorm(Op):
    """RMS norm over the channels (no mean subtraction, no bias)."""

    eps: NonNegFloat = 1e-6

    def params(self, x, y):
        return x.channels

    def build(self, x, y):
        from ..layers.core import ChannelRMSNorm

        return ChannelRMSNorm(x.channels, self.eps, channel_first=x.layout == "map")


@op("batchnorm", category="norm", layout="map")
class BatchNorm(Op):
    """Batch norm over the channels of a map (`BatchNorm1d/2d/3d`). `zero_init=true` starts its
    scale at zero, so a residual branch ending in it starts as the identity (the last BN of ResNet's
    blocks, timm's `zero_init_last`)."""

    eps: NonNegFloat = 1e-5
    momentum: Probability = 0.1
    zero_init: bool = False

    def params(self, x, y):
        return 2 * x.channels

    def build(self, x, y):
        from torch import nn

        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[x.ndim - 1](x.channels, self.eps, self.momentum)
        if self.zero_init:
            nn.init.zeros_(bn.weight)
        return bn


@op("groupnorm", category="norm", layout="map")
class GroupNorm(Op):
    """Group norm; `groups=1` normalises over channels and space together (PoolFormer's norm)."""

    groups: Pos = 1
    eps: NonNegFloat = 1e-5

    def infer(self, x: Shape) -> Shape:
        check_divides(f"groupnorm groups ({self.groups}) must divide the channels", x.channels, self.groups)
        return x

    def params(self, x, y):
        return 2 * x.channels

    def build(self, x, y):
        from torch import nn

        return nn.GroupNorm(self.groups, x.channels, self.eps)


@op("instancenorm", category="norm", layout="map")
class InstanceNorm(Op):
    """Instance norm, with a learned affine transform when `affine`."""

    eps: NonNegFloat = 1e-5
    affine: bool = False

    def params(self, x, y):
        return 2 * x.channels if self.affine else 0

    def build(self, x, y):
        from torch import nn

        cls = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[x.ndim - 1]
        return cls(x.channels, self.eps, affine=self.affine)
