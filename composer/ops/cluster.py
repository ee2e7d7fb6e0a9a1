"""Soft clustering: tokens are softly assigned to a few slots, the slots are mixed, and the result
is dispatched back to the tokens (GLMix, Zhu et al. NeurIPS 2024, "Revisiting the Integration of
Convolution and Attention for Vision Backbone")."""


from typing import Literal, Optional

from ..shapes import Shape, ShapeError
from .registry import Op, Pos, PosFloat, Tensor, op, prod


@op("cluster", category="attention")
class Cluster(Op):
    """Soft clustering into slots, a `mixer` over the slots, and soft dispatch back.

    With features F (N tokens of C channels; a map or tokens on a grid, the output has the input's
    layout) and initial slots S0 (K of them, C channels):
    `L = normalize(S0) @ (tau * normalize(F))^T` (K x N, rows and columns L2-normalised over
    channels, `tau` a learned scalar initialised to `scale`, default C^-0.5; `learnable_scale =
    false` keeps it fixed), slots `S = softmax_N(L) @ F` (each slot a convex mix of the tokens),
    `S = mixer(S)` (any op on tokens that keeps their shape; GLMix: `attention(heads)`, a plain
    multi-head self-attention among the slots), and the output `softmax_K(L^T) @ S` (each token a
    convex mix of the slots).

    `slots` is the side of the slot grid: K = slots^d. `init = "pool"` takes S0 by adaptive
    average pooling of the features to that grid; `init = "learned"` uses a parameter `init_slots`
    (K x C, normal(std 0.02)) shared by every input. `source = t` pools S0 from the named tensor
    `t` instead of the features (a map or tokens on the features' grid, C channels, no prefix
    tokens): GLMix pools the block's input, before its position encoding and norm, `x = identity`
    at the block's start, then `cluster(8, attention(heads), source = x)`. Parameters:
    `slot_scale` (tau), `init_slots`, the mixer's (submodule `mixer`). MACs: the three K x N x C
    products plus the mixer's. Deprecated: `paired = true` reads the slot source packed along the
    input's channels, [features (C), slot source (C)] (`parallel concat { identity; from x }`)."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    slots: Pos = 8
    mixer: Optional[Op] = None
    init: Literal["pool", "learned"] = "pool"
    paired: bool = False
    source: Optional[Tensor] = None
    scale: Optional[PosFloat] = None
    learnable_scale: bool = True

    def deprecation(self):
        if self.paired:
            return ("cluster(paired = true), which reads its slot source packed after the features along the "
                    "channels, is deprecated",
                    "pass the slot source by name: `x = identity` where it is made, then "
                    "cluster(slots, mixer, source = x) on the features alone")
        return None

    def _features(self, x: Shape) -> Shape:
        return x.with_(channels=x.channels // 2) if self.paired else x

    def _slot_shape(self, x: Shape) -> Shape:
        return Shape(self._features(x).channels, (self.slots,) * x.ndim, "tokens")

    def infer(self, x: Shape) -> Shape:
        if x.layout == "vector" or not x.spatial:
            raise ShapeError("cluster needs a map or tokens on a spatial grid")
        if x.extra:
            raise ShapeError(f"cluster cannot take {x.extra} class token(s)", "drop the class tokens first")
        if self.slots < 1:
            raise ShapeError(f"cluster needs at least 1 slot per dim, got {self.slots}")
        if self.source is not None:
            src = self.source.shape
            if self.paired:
                raise ShapeError("cluster takes its slot source either by name (source) or packed (paired = true), "
                                 "not both", "drop paired = true")
            if self.init != "pool":
                raise ShapeError("cluster pools its slots from `source`: use init = \"pool\"")
            if src.layout not in ("map", "tokens") or src.spatial != x.spatial or src.extra:
                raise ShapeError(f"cluster source must be a map or tokens on the features' grid "
                                 f"{'x'.join(map(str, x.spatial))} without prefix tokens, got {src.layout} {src}")
            if src.channels != x.channels:
                raise ShapeError(f"cluster source has {src.channels} channels, the features {x.channels}",
                                 "the slots pooled from the source are compared with the features: "
                                 "give them the same width")
        if self.paired:
            if x.channels % 2:
                raise ShapeError(f"paired cluster needs [features, slot source] channels of equal size, "
                                 f"got {x.channels}")
            if self.init != "pool":
                raise ShapeError("paired cluster pools its slots from the second half: use init = \"pool\"")
        s = self._slot_shape(x)
        if self.mixer is not None:
            if self.mixer.kind == "part":
                raise ShapeError(f"cluster mixer must be an op applied to the slot tokens, got the part "
                                 f"`{self.mixer.name}`")
            out = self.mixer.infer(s)
            if (out.channels, out.tokens) != (s.channels, s.tokens):
                raise ShapeError(f"cluster mixer must keep the slots' shape {s}, `{self.mixer.name}` gives {out}")
        return self._features(x)

    def params(self, x, y):
        s = self._slot_shape(x)
        n = 1 if self.learnable_scale else 0
        if self.init == "learned":
            n += s.tokens * s.channels
        return n + (self.mixer.params(s, self.mixer.infer(s)) if self.mixer is not None else 0)

    def macs(self, x, y):
        s = self._slot_shape(x)
        total = 3 * s.tokens * prod(x.spatial) * s.channels
        return total + (self.mixer.macs(s, self.mixer.infer(s)) if self.mixer is not None else 0)

    def build(self, x, y):
        from ..layers.cluster import SoftCluster

        s = self._slot_shape(x)
        mixer = self.mixer.build(s, self.mixer.infer(s)) if self.mixer is not None else None
        scale = self.scale if self.scale is not None else s.channels ** -0.5
        source = "paired" if self.paired else None
        if self.source is not None:
            source = self.source.shape.layout  # "map" or "tokens": the layout of the given tensor
        return SoftCluster(s.channels, self.slots, x.ndim, mixer, self.init, source, scale,
                           self.learnable_scale, tokens=x.layout == "tokens", grid=x.spatial)
