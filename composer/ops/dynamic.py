"""Ops for a second, conditioning stream: a learned token set that starts such a stream, an
activation whose per-sample coefficients come from it, and parameter-free attention between the
two parts of a joined sequence.

The two streams meet the way CrossViT's do: `parallel tokens { a; b }` joins them along the token
axis, so the tokens of `a` become prefix tokens ahead of the grid of `b` (same channels; a map is
flattened). The ops here read such a joined sequence: the prefix carries the conditioning tokens
(coefficients, keys, values), the grid the features, and the output is the grid alone. Every
projection is an ordinary `linear` in the blueprint, so the ops themselves have no weights
(except `learned_tokens`). Mobile-Former (Chen et al., CVPR 2022) is written with them:
`blueprints/mobile_former.arch`.
"""


from typing import Literal, Optional, Union

from ..shapes import Shape, ShapeError
from .registry import NonNegFloat, Op, Pos, PosFloat, Tensor, op, prod


def _grid_of(x: Shape, what: str) -> None:
    if x.layout != "tokens":
        raise ShapeError(f"{what} needs tokens, got a {x.layout} {x}")


@op("learned_tokens", category="embed")
class LearnedTokens(Op):
    """A learned set of tokens that replaces the input: parameter `tokens` of shape (count, `dim`),
    the same for every sample of the batch (only the batch size of the input is used). `count` is
    an int (a sequence of tokens) or one size per dim (tokens on a grid, e.g. `[1, 6]`). It starts
    a second stream: `from input; learned_tokens(128, 6); save z` (DETR's object queries,
    Perceiver's latents, Mobile-Former's global tokens). Init: normal(0, `std`) (`nn.Embedding`'s
    default is std 1)."""

    dim: Pos
    count: Union[Pos, list[Pos]]
    std: NonNegFloat = 0.02

    def grid(self) -> tuple[int, ...]:
        return tuple(self.count) if isinstance(self.count, list) else (self.count,)

    def infer(self, x: Shape) -> Shape:
        if self.dim <= 0:
            raise ShapeError(f"learned_tokens dim must be positive, got {self.dim}")
        if not self.grid() or any(g <= 0 for g in self.grid()):
            raise ShapeError(f"learned_tokens count must be positive, got {self.count}")
        return Shape(self.dim, self.grid(), "tokens")

    def params(self, x, y):
        return self.dim * prod(self.grid())

    def build(self, x, y):
        from ..layers.dynamic import LearnedTokens as Module

        return Module(prod(self.grid()), self.dim, self.std)


@op("dynamic_relu", category="gating", layout="tokens")
class DynamicReLU(Op):
    """Dynamic ReLU (Chen et al., ECCV 2020, "Dynamic ReLU"; the spatially shared, per-channel
    form): `y = max_k(a_k * x)` with slopes computed per sample from another stream.

    The running tensor is the features x (a grid of tokens or a map); `coeffs` names the
    coefficient sets c_1 .. c_pieces, a tensor of `pieces` tokens of x's channels (one value per
    channel each, usually from a hard sigmoid): `c = { from tokens; ...; hardsigmoid }`, then
    `dynamic_relu(2, coeffs = c)`. The slopes are `a_k = (c_k - 0.5) * scale + offsets[k]`
    (offsets default to [1, 0, 0, ...]: the identity-like start of the paper, a_1 in [0, 2] and the
    others in [-1, 1] for scale 2); the output has x's shape. The hyper-network that makes the
    coefficients (Mobile-Former: linear, ReLU, linear, hard sigmoid on the first global token,
    `dyrelu` in lib/streams.arch) is written in the blueprint. No parameters; MACs 0 (element-wise).
    Deprecated: without `coeffs`, the coefficients are read from the first `pieces` prefix tokens of
    a joined sequence `parallel tokens { coefficients; features }`."""

    pieces: Pos = 2
    scale: float = 2.0
    offsets: Optional[list[float]] = None
    coeffs: Optional[Tensor] = None

    def deprecation(self):
        if self.coeffs is None:
            return ("dynamic_relu reading its coefficients from prefix tokens of a joined sequence is deprecated",
                    "pass them by name: `c = ...` (tokens, one per piece), then dynamic_relu(coeffs = c)")
        return None

    def slopes(self) -> list[float]:
        if self.offsets is not None:
            return [float(o) for o in self.offsets]
        return [1.0] + [0.0] * (self.pieces - 1)

    def infer(self, x: Shape) -> Shape:
        _grid_of(x, "dynamic_relu")
        if self.pieces < 1:
            raise ShapeError(f"dynamic_relu pieces must be 1 or more, got {self.pieces}")
        if len(self.slopes()) != self.pieces:
            raise ShapeError(f"dynamic_relu has {self.pieces} pieces but {len(self.slopes())} offsets")
        if self.coeffs is not None:
            c = self.coeffs.shape
            if c.layout != "tokens" or c.tokens != self.pieces or c.channels != x.channels:
                raise ShapeError(f"dynamic_relu({self.pieces}) needs coefficients of {self.pieces} tokens of "
                                 f"{x.channels} channels (one per piece), got {c}")
            if x.extra or not x.ndim:
                raise ShapeError(f"dynamic_relu needs a grid of feature tokens, got {x}")
            return x
        if x.extra != self.pieces or not x.ndim:
            raise ShapeError(
                f"dynamic_relu({self.pieces}) needs {self.pieces} coefficient tokens ahead of a grid of "
                f"features, got {x}",
                "join them with `parallel tokens { coefficients; features }`")
        return x.with_(extra=0)

    def build(self, x, y):
        from ..layers.dynamic import DynamicReLU as Module

        return Module(self.pieces, self.scale, self.slopes(), given=self.coeffs is not None)


@op("attend", category="attention", layout="tokens")
class Attend(Op):
    """Deprecated: write the attention with named tensors and the primitives instead,
    `q = ...; k = ...; v = ...`, then `split_heads`, `scores(q, k)`, `softmax`, `weighted_sum(v)`,
    `merge_heads` (docs/language.md, "Writing a token mixer"; lib/streams.arch's Mobile-Former
    bridges are examples of cross-attention without projections). Kept for older files:
    parameter-free multi-head attention from the grid tokens of a joined sequence to its prefix
    tokens (`values="same"`: k = v = all prefix tokens; `values="split"`: the first half of the
    prefix are the keys, the second half the values), heads = contiguous channel groups, scores
    scaled by `scale` (default head_dim^-0.5); the output is the grid tokens. MACs: q k^T and attn v."""

    heads: Pos = 1
    values: Literal["same", "split"] = "same"
    scale: Optional[PosFloat] = None

    def deprecation(self):
        return ("attend, which reads its keys and values from prefix tokens of a joined sequence, is deprecated",
                "write the attention with named tensors: q = ...; k = ...; v = ...; then split_heads, "
                "scores(q, k), softmax, weighted_sum(v), merge_heads (docs/language.md, section 15)")

    def keys(self, x: Shape) -> int:
        return x.extra // 2 if self.values == "split" else x.extra

    def infer(self, x: Shape) -> Shape:
        _grid_of(x, "attend")
        if not x.ndim:
            raise ShapeError("attend needs grid tokens (the queries) after the prefix tokens")
        if x.extra <= 0:
            raise ShapeError(f"attend needs prefix tokens (the keys and values) ahead of the grid, got {x}",
                             "join them with `parallel tokens { keys_and_values; queries }`")
        if self.values == "split" and x.extra % 2:
            raise ShapeError(f"attend(values = \"split\") needs an even number of prefix tokens (keys, then "
                             f"values), got {x.extra}")
        if self.heads <= 0 or x.channels % self.heads:
            raise ShapeError(f"{self.heads} heads do not divide the {x.channels} channels",
                             "the channel count must be a multiple of the number of heads")
        return x.with_(extra=0)

    def macs(self, x, y):
        return 2 * prod(x.spatial) * self.keys(x) * x.channels

    def build(self, x, y):
        from ..layers.dynamic import Attend as Module

        return Module(self.heads, x.extra, self.values == "split", self.scale)
