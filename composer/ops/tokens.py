"""Token-sequence ops: layout changes, class tokens, position embeddings and patch merging."""


from typing import Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import NonNegFloat, Op, Pos, op, prod


@op("to_tokens", category="layout", layout="map")
class ToTokens(Op):
    """Flatten a map (B, C, *grid) into tokens (B, N, C). Inserted automatically where needed."""

    def infer(self, x: Shape) -> Shape:
        return x.with_(layout="tokens")

    def build(self, x, y):
        from ..layers.core import ToTokens as Module

        return Module()


@op("to_map", category="layout", layout="tokens")
class ToMap(Op):
    """Fold tokens (B, N, C) back into a map (B, C, *grid). Inserted automatically where needed."""

    def infer(self, x: Shape) -> Shape:
        if x.extra:
            raise ShapeError(f"cannot fold {x.extra} class token(s) into a map", "pool or drop the class tokens first")
        return x.with_(layout="map")

    def build(self, x, y):
        from ..layers.core import ToMap as Module

        return Module(x.spatial)


@op("class_token", category="embed", layout="tokens")
class ClassToken(Op):
    """Prepend `count` learned tokens (class; with 2, class and distillation). Init: zeros, or
    normal(std) when `std > 0` (timm ViT: 1e-6). Parameter `token` (1, count, channels)."""

    count: Pos = 1
    std: NonNegFloat = 1e-6

    def infer(self, x: Shape) -> Shape:
        return x.with_(extra=x.extra + self.count)

    def params(self, x, y):
        return self.count * x.channels

    def build(self, x, y):
        from ..layers.core import PrefixTokens

        return PrefixTokens(self.count, x.channels, self.std)


@op("pos_embed", category="embed", layout="tokens")
class PosEmbed(Op):
    """An absolute position embedding added to every token (class tokens included when
    `cover_extra`), parameter `pos` (1, tokens, channels). Tied to the input resolution. Init:
    `init="trunc_normal"` trunc-normal(`std`), or `init="sinusoid"` the fixed 1-D sin/cos table of
    "Attention Is All You Need" over the token index (channel 2i: sin(t / 10000^(2i/C)), 2i+1: the
    cos; T2T-ViT). `trainable=false` keeps it out of training (requires_grad off; still a parameter,
    as T2T's, so it is counted and saved). The table is sized by the build grid: a model built with
    `dynamic_img_size=True` resamples its grid part to the grid it gets (bicubic, as timm); other
    models refuse input sizes that change it, unless `resample = true`: the grid part is then
    resampled to the grid the tokens lie on at every input size, with or without dynamic_img_size
    (bicubic without antialiasing in 2-D, as ViT-Adapter's `_get_pos_embed`, `F.interpolate(...,
    mode="bicubic", align_corners=False)`; unchanged at the build grid)."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)
    resamples = True  # ... unless the model is built with dynamic_img_size

    std: NonNegFloat = 0.02
    cover_extra: bool = True
    init: Literal["trunc_normal", "sinusoid"] = "trunc_normal"
    trainable: bool = True
    resample: bool = False

    def runtime_grid(self, x: Shape) -> bool:
        return self.resample

    def admits_grid(self, built: Shape, got: Shape, dynamic: bool, outputs: tuple | None = None) -> str | None:
        return None if self.resample else super().admits_grid(built, got, dynamic, outputs)

    def params(self, x, y):
        return (x.tokens if self.cover_extra else prod(x.spatial)) * x.channels

    def build(self, x, y):
        from ..layers.core import PosEmbed as Module

        n = x.tokens if self.cover_extra else prod(x.spatial)
        return Module(n, x.channels, self.std, 0 if self.cover_extra else x.extra, self.init, self.trainable,
                      x.spatial, antialias=not self.resample)


@op("patch_merging", category="embed", layout="tokens")
class PatchMerging(Op):
    """Swin's downsampling: concatenate each 2x2 neighbourhood (4C channels), norm, then a linear map
    to `out` without bias. Submodules: `norm`, `reduction`."""

    regrids = True  # its module gives the new grid at run time

    out: Pos
    norm: Optional[Op] = None

    def infer(self, x: Shape) -> Shape:
        if x.extra:
            raise ShapeError("patch_merging cannot merge class tokens")
        if any(s % 2 for s in x.spatial):
            raise ShapeError(
                f"patch_merging needs an even grid, got {'x'.join(map(str, x.spatial))}",
                "choose an input size whose feature size is even at this stage",
            )
        return Shape(self.out, tuple(s // 2 for s in x.spatial), "tokens")

    def _merged(self, x: Shape) -> Shape:
        return Shape(x.channels * 2 ** x.ndim, tuple(s // 2 for s in x.spatial), "tokens")

    def params(self, x, y):
        m = self._merged(x)
        return (self.norm.params(m, m) if self.norm else 0) + m.channels * self.out

    def macs(self, x, y):
        return prod(y.spatial) * self._merged(x).channels * self.out

    def build(self, x, y):
        from ..layers.core import PatchMerging as Module

        m = self._merged(x)
        return Module(x.spatial, self.norm.build(m, m) if self.norm else None, m.channels, self.out)
