"""Position encodings that do not depend on a fixed learned table: a fixed sin-cos embedding and a
conditional (convolutional) one."""


from ..shapes import Shape, ShapeError
from .registry import NonNegFloat, Op, Pos, PosFloat, op, prod


@op("sinusoidal_pos", category="embed", layout="tokens")
class SinusoidalPos(Op):
    """A fixed sin-cos position embedding added to the grid tokens (class tokens are left alone).

    For d spatial dims the C channels are d * 2 bands of `C / (2d)` frequencies
    `1 / temperature^(i / (C / 2d))`: first sin of every axis, then cos of every axis, axes in
    order (timm's `build_sincos2d_pos_embed`, generalised to 1-D and 3-D). No parameters: a
    non-persistent buffer built once for the input grid."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    temperature: PosFloat = 10000.0

    def infer(self, x: Shape) -> Shape:
        if not x.spatial:
            raise ShapeError("sinusoidal_pos needs tokens on a grid")
        band = 2 * x.ndim
        if x.channels % band:
            raise ShapeError(
                f"sinusoidal_pos needs channels divisible by {band} (sin and cos for {x.ndim} axes), got {x.channels}",
                f"use a multiple of {band} channels",
            )
        return x

    def buffer_elements(self, x, y):
        return prod(x.spatial) * x.channels  # pos: (1, N, C)

    def build(self, x, y):
        from ..layers.embed import SinusoidalPos as Module

        return Module(x.spatial, x.channels, self.temperature, x.extra)


@op("fourier_features", category="embed")
class FourierFeatures(Op):
    """The Fourier features of the grid positions, in place of the input's values (the output has
    `channels` channels on the input's grid; add it to the tokens with `parallel add`, usually after
    a projection). Per axis, `channels / d` channels: the position p = 1 .. G along the axis
    (`normalize`: p / (G + eps) · `scale`), divided by `temperature^(2 ⌊j / 2⌋ / (channels / d))` and
    passed through sin for even j and cos for odd j (sin and cos of one frequency side by side);
    the first axis's channels first (XCiT's Fourier position encoding). No parameters; made for the
    grid seen at run time. Prefix (class) tokens have no position: add the features before them."""

    channels: Pos
    temperature: PosFloat = 10000.0
    normalize: bool = True
    scale: float = 6.283185307179586
    eps: NonNegFloat = 1e-6

    def infer(self, x: Shape) -> Shape:
        if x.layout not in ("map", "tokens") or not x.spatial or x.extra:
            raise ShapeError(f"fourier_features needs a map or tokens on a grid without prefix tokens, got {x}",
                             "add the features before the class token")
        if self.channels <= 0 or self.channels % (2 * x.ndim):
            raise ShapeError(f"fourier_features: {self.channels} channels are not a positive multiple of "
                             f"{2 * x.ndim} (sin and cos for each of {x.ndim} axes)")
        return x.with_(channels=self.channels)

    def build(self, x, y):
        from ..layers.embed import FourierFeatures as Module

        return Module(self.channels, x.ndim, self.temperature, self.normalize, self.scale, self.eps,
                      x.layout == "map", tuple(x.spatial))


@op("conv_pos", category="embed")
class ConvPos(Op):
    """Conditional position encoding: `x + dwconv(x)`, a depthwise `kernel`-sized convolution with
    bias over the token grid (CPVT's position encoding generator, also used by Twins). On tokens the
    class tokens pass through unchanged; maps are convolved directly. Submodule: `proj`."""


    kernel: Pos = 3

    def infer(self, x: Shape) -> Shape:
        if x.layout == "vector" or not x.spatial:
            raise ShapeError("conv_pos needs a map or tokens on a grid")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ShapeError(f"conv_pos needs an odd kernel (to keep the grid), got {self.kernel}")
        return x

    def params(self, x, y):
        return x.channels * self.kernel ** x.ndim + x.channels

    def macs(self, x, y):
        return prod(x.spatial) * x.channels * self.kernel ** x.ndim

    def build(self, x, y):
        from ..layers.embed import ConvPos as Module

        return Module(x.channels, self.kernel, x.spatial, x.extra, tokens=x.layout == "tokens")
