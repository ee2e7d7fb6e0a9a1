"""Window attention whose keys come from several levels of granularity around each window.

This is an op, not a key source (`KeySource`) of the `attention` op: a key source gives ONE set of
key/value tokens that every query of the attention sees, and `attention` refuses a key source
together with a window partition. Multi-level keys are a different set per window (the window, a
ring of neighbouring tokens, pooled tokens of the nearby windows), each part with its own position
bias and with masked padding. What `attention` would need to host it as a part: (1) a key source
that returns key/value tokens per partition group, (B * groups, M, C), aligned with the window
partition; (2) position biases per key segment (the relative table of the window, a dense learned
bias for the ring, a relative table between the window and the pooled grid); (3) an additive key
mask from the source (-100 on padded pooled positions).
"""


from typing import Literal

from ..shapes import Shape, ShapeError
from .registry import NonNeg, Op, Pos, op, prod


@op("multilevel_attention", category="attention", layout="tokens")
class MultilevelAttention(Op):
    """Window attention with multi-level keys (focal self-attention, Yang et al., NeurIPS 2021):
    the queries of every `window` x `window` window attend, in one softmax, to
      level 0  the keys of their own window (w^2, Swin's relative-position table
               `relative_position_bias_table`, (2w-1)^2 x heads);
      ring     the `expand` tokens around the window, taken from the four diagonally rolled copies
               of the key map (cyclic: the borders wrap around, unmasked) minus the window itself:
               4 (w^2 - (w - expand)^2) keys (132 for w 7, expand 3), with a dense learned bias
               `relative_position_bias_table_to_neighbors` (1, heads, w^2, ring);
      level 1  `pooled` x `pooled` coarse tokens around the window: the input is pooled per
               window to one token by a learned linear map over the w^2 positions (`pool`,
               Linear(w^2, 1), initialised to the mean), projected by the same `qkv` linear, and
               the `pooled`-neighbourhood of the window's pooled token is taken (zero padding,
               masked with -100), with a relative table `relative_position_bias_table_to_windows`
               (heads, (w + pooled - 1)^2). `pooled = 0` drops this level.
    A window covering the whole (smaller) grid shrinks to it and drops the ring, as the reference.
    One `qkv` linear (C -> 3C, bias `qkv_bias`) for all levels, output projection `proj`; scale
    head_dim^-0.5; trunc-normal(0.02) weights and tables. 2-D grids whose sides the window divides.
    MACs: the qkv linear over the tokens and the pooled tokens, the pooling, q k^T and attn v over
    all keys, and proj."""

    grid_bound = True  # its module is built for one grid (composer.sizes refuses others)

    heads: Pos
    window: Pos = 7
    expand: NonNeg = 3
    pooled: NonNeg = 0
    qkv_bias: bool = True
    pool: Literal["fc"] = "fc"

    def geometry(self, x: Shape) -> tuple[int, int, int]:
        """(window, expand, pooled kernel) for the input grid."""
        w, e = self.window, self.expand
        if min(x.spatial) <= w:
            w, e = min(x.spatial), 0
        k = 2 * (self.pooled // 2) + 1 if self.pooled else 0
        return w, e, k

    def keys(self, x: Shape) -> tuple[int, int, int]:
        """(window keys, ring keys, pooled keys) per window."""
        w, e, k = self.geometry(x)
        return w * w, 4 * (w * w - (w - e) ** 2) if e else 0, k * k

    def infer(self, x: Shape) -> Shape:
        if x.ndim != 2 or x.extra:
            raise ShapeError("multilevel_attention needs tokens on a 2-D grid without class tokens")
        if self.heads <= 0 or x.channels % self.heads:
            raise ShapeError(f"{self.heads} heads do not divide the {x.channels} channels",
                             "the channel count must be a multiple of the number of heads")
        if self.window <= 0 or self.expand < 0 or self.pooled < 0:
            raise ShapeError("multilevel_attention window must be positive, expand and pooled not negative")
        w, e, _ = self.geometry(x)
        for g in x.spatial:
            if g % w:
                raise ShapeError(f"window {w} does not divide feature size {g}",
                                 f"choose an input size so that the grid ({'x'.join(map(str, x.spatial))}) is a multiple of {w}")
        if e >= w:
            raise ShapeError(f"multilevel_attention expand {e} must be smaller than the window {w}")
        return x

    def params(self, x, y):
        c, h = x.channels, self.heads
        w, e, k = self.geometry(x)
        n = 3 * c * c + (3 * c if self.qkv_bias else 0) + c * c + c + (2 * w - 1) ** 2 * h
        _, ring, _ = self.keys(x)
        n += h * w * w * ring
        if k:
            n += h * (w + k - 1) ** 2 + w * w + 1
        return n

    def macs(self, x, y):
        c = x.channels
        w, e, k = self.geometry(x)
        n = prod(x.spatial)
        windows = n // (w * w)
        total = n * 3 * c * c + n * c * c + 2 * n * sum(self.keys(x)) * c
        if k:
            total += windows * (w * w * c + 3 * c * c)
        return total

    def buffer_elements(self, x, y):
        """relative_position_index (w^2, w^2), ring_index (w^2 x ring keys), pooled_index (w^2, k^2)
        and pooled_mask (windows, k^2)."""
        w, _, k = self.geometry(x)
        _, ring, pooled = self.keys(x)
        return w ** 4 + w * w * ring + (w * w * pooled + prod(x.spatial) // (w * w) * pooled if k else 0)

    def build(self, x, y):
        from ..layers.multilevel import MultilevelAttention as Module

        w, e, k = self.geometry(x)
        return Module(x.channels, self.heads, x.spatial, w, e, k, self.qkv_bias)
