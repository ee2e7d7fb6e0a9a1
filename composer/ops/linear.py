"""Per-token linear maps, scales, pooling to a vector and the classifier head."""


from typing import Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import NonNeg, NonNegFloat, Op, Pos, op, prod


@op("linear", category="linear")
class Linear(Op):
    """A linear map over the channels of every token or pixel (a 1x1 conv on maps, applied channels-last).

    Init: trunc-normal(std 0.02) weight, zero bias (timm's ViT/Swin convention)."""

    out: Pos
    bias: bool = True
    init_std: NonNegFloat = 0.02

    def infer(self, x: Shape) -> Shape:
        return x.with_(channels=self.out)

    def params(self, x, y):
        return x.channels * self.out + (self.out if self.bias else 0)

    def macs(self, x, y):
        return (x.tokens if x.layout != "vector" else 1) * x.channels * self.out

    def build(self, x, y):
        from ..layers.core import ChannelLinear

        return ChannelLinear(x.channels, self.out, self.bias, channel_first=x.layout == "map", init_std=self.init_std)


@op("layer_scale", category="linear")
class LayerScale(Op):
    """Multiply every channel by a learned scale initialised to `init` (CaiT, ConvNeXt, MetaFormer).
    Parameter `scale` (channels)."""

    init: float = 1e-5

    def params(self, x, y):
        return x.channels

    def build(self, x, y):
        from ..layers.core import ChannelScale

        return ChannelScale(x.channels, self.init, channel_first=x.layout == "map")


@op("global_pool", category="pool")
class GlobalPool(Op):
    """Pool a map or token sequence to one vector: `avg` or `max` over all positions (grid tokens only),
    or `token` to take the class token at `index` (0: the first; DeiT's distillation token is 1)."""

    mode: Literal["avg", "max", "token"] = "avg"
    index: NonNeg = 0

    def infer(self, x: Shape) -> Shape:
        if x.layout == "vector":
            raise ShapeError("global_pool needs a map or tokens, but the input is already a vector")
        if self.mode == "token" and (x.layout != "tokens" or x.extra <= self.index):
            plain = x.layout == "tokens" and not x.extra and x.tokens > self.index
            raise ShapeError(f"global_pool(\"token\", index = {self.index}) needs {self.index + 1} class token(s) "
                             f"ahead of a grid, got {x}",
                             "these tokens are a plain sequence (select_tokens(0, 1) takes the class token out of "
                             "its sequence): pool it with global_pool(\"avg\")" if plain
                             else "add class_token() after the stem")
        return Shape(x.channels, (), "vector")

    def build(self, x, y):
        from ..layers.core import GlobalPool as Module

        return Module(self.mode, x.layout, x.extra, self.index)


@op("classifier", category="head", layout="vector", classifier=True)
class Classifier(Op):
    """The final linear layer to `num_classes` logits; `num_classes=0` makes it the identity
    (a feature extractor). `reset_classifier(n)` replaces it."""

    num_classes: NonNeg
    bias: bool = True
    init_std: NonNegFloat = 0.02

    def infer(self, x: Shape) -> Shape:
        if self.num_classes < 0:
            raise ShapeError(f"num_classes must be 0 or more, got {self.num_classes}")
        return x.with_(channels=self.num_classes or x.channels)

    def params(self, x, y):
        return 0 if not self.num_classes else x.channels * self.num_classes + (self.num_classes if self.bias else 0)

    def macs(self, x, y):
        return 0 if not self.num_classes else x.channels * self.num_classes

    def build(self, x, y):
        from torch import nn

        from ..layers.core import ChannelLinear

        if not self.num_classes:
            return nn.Identity()
        return ChannelLinear(x.channels, self.num_classes, self.bias, channel_first=False, init_std=self.init_std)


@op("token_linear", category="linear", layout="tokens")
class TokenLinear(Op):
    """A linear map along the token axis, shared by all channels: every output token is a learned
    sum of the N grid tokens, `y[:, n] = Σ_m W[n, m] x[:, m] + b[n]` (gMLP's spatial gating, ResMLP's
    token mixing; `token_mlp` is the two-layer form). Parameters `weight` (N, N), drawn from
    trunc-normal(`init_std`), and `bias` (N), filled with `bias_init` (gMLP: weight near 0 and
    bias 1, so that the gate starts as the identity). Sized by the grid it is built at."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    bias: bool = True
    init_std: NonNegFloat = 0.02
    bias_init: float = 0.0

    def infer(self, x: Shape) -> Shape:
        if x.extra:
            raise ShapeError("token_linear mixes grid tokens only; the input has class tokens",
                             "split them off first: grid_tokens")
        if not x.spatial:
            raise ShapeError(f"token_linear needs tokens on a grid, got {x}")
        return x

    def params(self, x, y):
        n = prod(x.spatial)
        return n * n + (n if self.bias else 0)

    def macs(self, x, y):
        return prod(x.spatial) ** 2 * x.channels

    def build(self, x, y):
        from ..layers.core import TokenLinear as Module

        return Module(prod(x.spatial), self.bias, self.init_std, self.bias_init)


@op("token_mlp", category="linear", layout="tokens")
class TokenMLP(Op):
    """An MLP along the token axis, shared by all channels (MLP-Mixer's token mixing): fc1 maps the
    N grid tokens to `hidden`, then `act`, then fc2 back to N. Submodules `fc1`, `act`, `fc2`."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    hidden: Pos
    act: Optional[Op] = None
    bias: bool = True

    def infer(self, x: Shape) -> Shape:
        if x.extra:
            raise ShapeError("token_mlp mixes grid tokens only; the input has class tokens")
        return x

    def params(self, x, y):
        n = prod(x.spatial)
        return 2 * n * self.hidden + (self.hidden + n if self.bias else 0)

    def macs(self, x, y):
        return 2 * prod(x.spatial) * self.hidden * x.channels

    def build(self, x, y):
        from torch import nn

        from ..layers.core import ChannelLinear, TokenMixing

        n = prod(x.spatial)
        act = self.act.build(Shape(self.hidden), Shape(self.hidden)) if self.act else nn.GELU()
        return TokenMixing(ChannelLinear(n, self.hidden, self.bias), act, ChannelLinear(self.hidden, n, self.bias))
