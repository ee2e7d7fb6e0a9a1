"""Gating: squeeze-and-excitation, global response normalisation, gated linear units and the hard
sigmoid. Shape-preserving except `glu`, which halves the channels."""


from typing import Optional

from ..shapes import Shape, ShapeError
from . import act as _act  # noqa: F401  (the default activations below must be registered first)
from .registry import NonNegFloat, OPS, Op, Pos, PosFloat, op


def make_divisible(v: float, divisor: int) -> int:
    """timm's `make_divisible(v, divisor, round_limit=0)`: the nearest multiple of `divisor`, at least `divisor`."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def _elementwise(what: str, f: Op, x: Shape) -> None:
    if f.infer(x) != x:
        raise ShapeError(f"{what} must keep the shape, but {f.describe()} changes {x} to {f.infer(x)}")


@op("squeeze_excite", category="gating", layout="map")
class SqueezeExcite(Op):
    """Squeeze-and-excitation: `x * gate(fc2(act(fc1(mean(x)))))`, the mean over all spatial positions.

    `fc1` and `fc2` are 1x1 convolutions with bias (timm's `SEModule` names) to `hidden` channels and
    back; `hidden` defaults to `channels * ratio` rounded to a multiple of `divisor` (timm's
    `make_divisible(..., round_limit=0)`; at least `divisor`). Submodules: `fc1`, `act`, `fc2`, `gate`.
    Weights: PyTorch's default conv init."""

    ratio: PosFloat = 0.25
    hidden: Optional[Pos] = None
    act: Op = OPS["relu"]()
    gate: Op = OPS["sigmoid"]()
    divisor: Pos = 1

    def width(self, x: Shape) -> int:
        if self.hidden is not None:
            return self.hidden
        return make_divisible(x.channels * self.ratio, self.divisor)

    def _inner(self, x: Shape) -> Shape:
        return Shape(self.width(x), (1,) * x.ndim, "map")

    def infer(self, x: Shape) -> Shape:
        if self.hidden is not None and self.hidden < 1:
            raise ShapeError(f"squeeze_excite hidden must be 1 or more, got {self.hidden}")
        if self.divisor < 1:
            raise ShapeError(f"squeeze_excite divisor must be 1 or more, got {self.divisor}")
        _elementwise("squeeze_excite act", self.act, self._inner(x))
        _elementwise("squeeze_excite gate", self.gate, Shape(x.channels, (1,) * x.ndim, "map"))
        return x

    def params(self, x, y):
        h, c = self.width(x), x.channels
        inner, outer = self._inner(x), Shape(c, (1,) * x.ndim, "map")
        return 2 * c * h + h + c + self.act.params(inner, inner) + self.gate.params(outer, outer)

    def macs(self, x, y):
        return 2 * x.channels * self.width(x)

    def build(self, x, y):
        from ..layers.gating import SqueezeExcite as Module

        inner, outer = self._inner(x), Shape(x.channels, (1,) * x.ndim, "map")
        return Module(x.channels, self.width(x), x.ndim, self.act.build(inner, inner),
                      self.gate.build(outer, outer))


@op("grn", category="norm")
class GRN(Op):
    """Global response normalisation (ConvNeXt V2): `x + gamma * (x * n) + beta`, where
    `n = g / (mean_c(g) + eps)` and `g` is the L2 norm of each channel over all positions (all tokens,
    class tokens included). Per-channel `gamma` and `beta`, initialised to zero (so it starts as the
    identity). Works on maps and tokens."""

    eps: NonNegFloat = 1e-6

    def infer(self, x: Shape) -> Shape:
        if x.layout == "vector":
            raise ShapeError("grn needs a map or tokens, but the input is a vector")
        return x

    def params(self, x, y):
        return 2 * x.channels

    def build(self, x, y):
        from ..layers.gating import GRN as Module

        return Module(x.channels, self.eps, channel_first=x.layout == "map")


@op("glu", category="gating")
class GLU(Op):
    """Gated linear unit over the channels: split them into halves `a` and `b` and return
    `a * act(b)`, halving the channels. `act=sigmoid()` is the GLU, `gelu()` GEGLU, `silu()` SwiGLU
    (as timm's `GluMlp`: the first half is the value, the second the gate)."""

    act: Op = OPS["sigmoid"]()

    def infer(self, x: Shape) -> Shape:
        if x.channels % 2:
            raise ShapeError(f"glu splits the channels in two, but there are {x.channels}",
                             "give the previous layer an even number of channels")
        y = x.with_(channels=x.channels // 2)
        _elementwise("glu act", self.act, y)
        return y

    def params(self, x, y):
        return self.act.params(y, y)

    def build(self, x, y):
        from ..layers.gating import GLU as Module

        return Module(self.act.build(y, y), channel_first=x.layout == "map")


@op("hardsigmoid", category="activation")
class HardSigmoid(Op):
    """relu6(x + 3) / 6 (`nn.Hardsigmoid`), the gate of MobileNetV3's squeeze-excite."""

    def build(self, x, y):
        from torch import nn

        return nn.Hardsigmoid()
