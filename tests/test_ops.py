"""Every op's rules agree with the module it builds, over random valid parameters and inputs.

For each registered op (parts and `attention` excepted: attention has its own tests) a strategy in
`STRATEGIES` draws `(op, input Shape)`. The property test builds `op.build(x, op.infer(x))`, runs it
and checks the output shape against the shape rule, the parameter count against `op.params` and,
where `FlopCounterMode` sees the op, the MACs against `op.macs` (within 5%). A registered op
without a strategy fails `test_every_op_has_a_strategy`.

The rest checks the numerics of the newer ops against their references (timm, torch) and the
re-parameterization of `rep_conv`: the fused conv equals the eval-mode training form.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from composer.ops import OPS
from composer.shapes import Shape, ShapeError, TensorRef

# attention is tested with its parts in tests/test_attention.py; the unfold pair multiplies the real batch
# (B * patch area), which the generic shape check cannot see: tests/test_crossvit_mobilevit.py covers them
EXCLUDED = {"attention", "cascaded_attention", "patches_to_batch", "batch_to_patches",  # + own test files:
            "cluster", "deform_conv", "unfold",  # tests/test_cluster.py, tests/test_sampling.py
            "window_tokens", "shuffle_window_tokens",  # tests/test_attention.py (messenger configs)
            # windows into the batch (the real batch multiplied) and the mask that reads where each
            # window lies: tests/test_windows_halo.py
            "windows_to_batch", "batch_to_windows", "halo_windows_to_batch", "shifted_window_mask",
            "heads_to_batch", "batch_to_heads"}  # heads into the batch as maps: tests/test_mvitv2.py
BATCH = 2
# ops that compute once per forward and broadcast over the batch (their rule counts one image)
SHARED_BY_THE_BATCH = {"position_scores", "position_mlp_bias"}
# ops that run their products elementwise (a product and a sum, faster than a matrix product for
# their shapes), which torch's flop counter does not see: their rule is checked against the equation
ELEMENTWISE_MACS = {"weighted_pool": lambda op, x, y: x.channels * x.tokens}


# ----------------------------------------------------------------------------- input shapes

def _ndim(dims=(1, 2)):
    return st.sampled_from(dims)


@st.composite
def grid(draw, dims=(1, 2), lo=1, hi=12, multiple=1):
    d = draw(_ndim(dims))
    hi = hi if d < 3 else min(hi, 6)
    return tuple(multiple * draw(st.integers(max(1, -(-lo // multiple)), max(1, hi // multiple))) for _ in range(d))


@st.composite
def map_shape(draw, channels=None, dims=(1, 2), lo=1, hi=12, multiple=1):
    c = draw(channels if channels is not None else st.integers(1, 16))
    return Shape(c, draw(grid(dims, lo, hi, multiple)), "map")


@st.composite
def token_shape(draw, channels=None, dims=(1, 2), extra=st.integers(0, 2), lo=1, hi=12, multiple=1):
    c = draw(channels if channels is not None else st.integers(1, 16))
    return Shape(c, draw(grid(dims, lo, hi, multiple)), "tokens", draw(extra))


@st.composite
def any_shape(draw, channels=None, dims=(1, 2, 3)):
    layout = draw(st.sampled_from(["map", "tokens", "vector"]))
    if layout == "vector":
        return Shape(draw(channels if channels is not None else st.integers(1, 16)), (), "vector")
    if layout == "map":
        return draw(map_shape(channels, dims))
    return draw(token_shape(channels, dims))


def divisor_and_multiples(max_g=4, max_m=4):
    return st.integers(1, max_g).flatmap(lambda g: st.tuples(st.just(g), st.integers(1, max_m), st.integers(1, max_m)))


def _ok(case) -> bool:
    op, x = case
    try:
        op.infer(x)
    except ShapeError:
        return False
    return True


def valid(strategy):
    return strategy.filter(_ok)


def paired(make_op, shapes):
    """(op, x) with the op drawn from `make_op(x)` for a drawn input `x`."""
    return valid(shapes.flatmap(lambda x: make_op(x).map(lambda o: (o, x))))


def fixed(name, shapes, **params):
    return paired(lambda x: st.just(OPS[name](**params)), shapes)


def kw(name, shapes, **fields):
    """(op, x): `OPS[name](**drawn fields)`, each field a strategy."""
    return paired(lambda x: st.fixed_dictionaries(fields).map(lambda f: OPS[name](**f)), shapes)


# ----------------------------------------------------------------------------- per-op strategies

@st.composite
def _conv(draw):
    g, a, b = draw(divisor_and_multiples())
    x = draw(map_shape(st.just(g * a), dims=(1, 2, 3), lo=3))
    op = OPS["conv"](out=g * b, kernel=draw(st.integers(1, 4)), stride=draw(st.integers(1, 3)),
                     padding=draw(st.none() | st.integers(0, 2)), dilation=draw(st.integers(1, 2)), groups=g,
                     bias=draw(st.booleans()))
    return op, x


@st.composite
def _conv_transpose(draw):
    g, a, b = draw(divisor_and_multiples())
    x = draw(map_shape(st.just(g * a), dims=(1, 2, 3), lo=1))
    stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    op = OPS["conv_transpose"](out=g * b, stride=stride, kernel=draw(st.none() | st.integers(1, 4)),
                               padding=draw(st.integers(0, 1)), output_padding=draw(st.integers(0, max(stride, dilation) - 1)),
                               dilation=dilation, groups=g, bias=draw(st.booleans()))
    return op, x


@st.composite
def _patch_embed(draw):
    patch = draw(st.integers(1, 4))
    stride = draw(st.none() | st.integers(1, 4))
    padding = draw(st.integers(0, 2))
    x = draw(map_shape(dims=(1, 2), lo=patch, multiple=stride or patch))
    norm = draw(st.sampled_from([None, OPS["layernorm"](), OPS["batchnorm"]()]))
    op = OPS["patch_embed"](out=draw(st.integers(1, 16)), patch=patch, stride=stride, padding=padding, norm=norm)
    return op, x


@st.composite
def _rep(draw, name):
    g, a, b = draw(divisor_and_multiples(4, 3))
    same = draw(st.booleans())
    kernel = draw(st.sampled_from([1, 3, 5]))
    fields = dict(kernel=kernel, stride=draw(st.integers(1, 2)), identity=draw(st.booleans()),
                  scale_branch=draw(st.booleans()),
                  small_kernel=draw(st.sampled_from([None] + [k for k in (1, 3) if k <= kernel])))
    if name == "rep_conv":
        fields.update(out=g * a if same else g * b, groups=g)
        c = g * a
    else:
        c = draw(st.integers(1, 12))
    x = draw(map_shape(st.just(c), dims=(1, 2, 3)))
    return OPS[name](**fields), x


def _acts():
    return st.sampled_from(["relu", "gelu", "silu", "hardswish", "star_relu"]).map(lambda n: OPS[n]())


def _gates():
    return st.sampled_from(["sigmoid", "hardsigmoid", "tanh"]).map(lambda n: OPS[n]())


SIMPLE_ACTIVATIONS = ["relu", "relu6", "gelu", "quick_gelu", "gelu_tanh", "silu", "squared_relu", "hardswish", "hardsigmoid",
                      "sigmoid", "tanh", "identity"]

STRATEGIES = {
    **{name: fixed(name, any_shape()) for name in SIMPLE_ACTIVATIONS},
    # star_relu(learnable=false) keeps its two scalars as frozen nn.Parameters, which the params rule (0)
    # leaves out: only the learnable form is drawn here until act.py counts them (or makes them buffers)
    "star_relu": kw("star_relu", any_shape(), scale=st.floats(0.5, 2), bias=st.floats(-1, 1), learnable=st.just(True)),
    "dropout": kw("dropout", any_shape(), p=st.floats(0, 0.5)),
    "scale": kw("scale", any_shape(), value=st.floats(-2, 2)),
    # conv.py
    "conv": valid(_conv()),
    "conv_transpose": valid(_conv_transpose()),
    "pool": paired(lambda x: st.builds(
        lambda k, s, p, m, c: OPS["pool"](kernel=k, stride=s, padding=min(p, k // 2), mode=m, count_include_pad=c),
        st.integers(1, 4), st.none() | st.integers(1, 3), st.integers(0, 2), st.sampled_from(["avg", "max"]),
        st.booleans()), map_shape(dims=(1, 2, 3), lo=4)),
    "patch_embed": valid(_patch_embed()),
    # norm.py
    "layernorm": kw("layernorm", any_shape(), eps=st.sampled_from([1e-5, 1e-6]), affine=st.booleans(),
                    bias=st.booleans()),
    "rmsnorm": fixed("rmsnorm", any_shape()),
    "batchnorm": fixed("batchnorm", map_shape(dims=(1, 2, 3))),
    "groupnorm": paired(lambda x: st.sampled_from([g for g in range(1, x.channels + 1) if x.channels % g == 0])
                        .map(lambda g: OPS["groupnorm"](groups=g)), map_shape(dims=(1, 2, 3))),
    "instancenorm": kw("instancenorm", map_shape(dims=(1, 2, 3), lo=2), affine=st.booleans()),
    "grn": kw("grn", st.one_of(map_shape(dims=(1, 2, 3)), token_shape(dims=(1, 2))), eps=st.just(1e-6)),
    # linear.py
    "linear": kw("linear", any_shape(), out=st.integers(1, 16), bias=st.booleans()),
    "layer_scale": kw("layer_scale", any_shape(), init=st.floats(1e-6, 1.0)),
    "global_pool": kw("global_pool", st.one_of(map_shape(dims=(1, 2, 3)), token_shape()),
                      mode=st.sampled_from(["avg", "max", "token"])),
    "classifier": kw("classifier", any_shape().map(lambda x: Shape(x.channels, (), "vector")),
                     num_classes=st.integers(0, 10), bias=st.booleans()),
    "token_linear": kw("token_linear", token_shape(extra=st.just(0)), bias=st.booleans(),
                       bias_init=st.floats(-1, 1)),
    "token_mlp": kw("token_mlp", token_shape(extra=st.just(0)), hidden=st.integers(1, 16),
                    act=st.sampled_from([None, OPS["gelu"](), OPS["relu"]()]), bias=st.booleans()),
    # tokens.py
    "to_tokens": fixed("to_tokens", map_shape(dims=(1, 2, 3))),
    "to_map": fixed("to_map", token_shape(dims=(1, 2, 3), extra=st.just(0))),
    "class_token": kw("class_token", token_shape(), count=st.integers(1, 2), std=st.sampled_from([0.0, 1e-6])),
    "pos_embed": kw("pos_embed", token_shape(), cover_extra=st.booleans()),
    "patch_merging": kw("patch_merging", token_shape(extra=st.just(0), multiple=2), out=st.integers(1, 16),
                        norm=st.sampled_from([None, OPS["layernorm"](), OPS["rmsnorm"]()])),
    # resample.py
    "adaptive_pool": kw("adaptive_pool", map_shape(dims=(1, 2, 3)), size=st.integers(1, 4),
                        mode=st.sampled_from(["avg", "max"])),
    "upsample": kw("upsample", map_shape(dims=(1, 2, 3), hi=6), scale=st.integers(1, 3),
                   mode=st.sampled_from(["nearest", "linear"])),
    "pixel_shuffle": paired(lambda x: st.sampled_from([f for f in (1, 2, 3) if x.channels % f ** x.ndim == 0])
                            .map(lambda f: OPS["pixel_shuffle"](factor=f)),
                            map_shape(st.sampled_from([1, 2, 4, 8, 9, 16]), dims=(1, 2, 3), hi=6)),
    "pixel_unshuffle": paired(lambda x: st.just(OPS["pixel_unshuffle"](factor=2)), map_shape(dims=(1, 2, 3), multiple=2)),
    "channel_shuffle": paired(lambda x: st.sampled_from([g for g in range(1, x.channels + 1) if x.channels % g == 0])
                              .map(lambda g: OPS["channel_shuffle"](groups=g)), map_shape(dims=(1, 2, 3))),
    # gating.py
    "squeeze_excite": kw("squeeze_excite", map_shape(dims=(1, 2, 3)), ratio=st.sampled_from([0.25, 0.5, 1 / 16]),
                         hidden=st.none() | st.integers(1, 8), act=_acts(), gate=_gates(),
                         divisor=st.sampled_from([1, 4, 8])),
    "glu": kw("glu", any_shape(channels=st.integers(1, 8).map(lambda c: 2 * c)),
              act=st.sampled_from(["sigmoid", "gelu", "silu"]).map(lambda n: OPS[n]())),
    # embed.py
    "sinusoidal_pos": paired(lambda x: st.just(OPS["sinusoidal_pos"](temperature=10000.0)),
                             token_shape(st.integers(1, 4).map(lambda c: 12 * c), dims=(1, 2, 3))),
    "conv_pos": kw("conv_pos", st.one_of(token_shape(dims=(1, 2, 3)), map_shape(dims=(1, 2, 3))),
                   kernel=st.sampled_from([1, 3, 5])),
    "resize": kw("resize", map_shape(dims=(1, 2), hi=6), size=st.integers(1, 8),
                 mode=st.sampled_from(["nearest", "linear", "area"])),
    # tile.py, tokens_extra.py
    "tile": kw("tile", map_shape(dims=(1, 2, 3), hi=4), times=st.integers(1, 3)),
    "select_tokens": paired(lambda x: st.integers(0, x.tokens - 1).flatmap(
        lambda s: st.tuples(st.just(s), st.none() | st.integers(1, x.tokens - s))).map(
        lambda sc: OPS["select_tokens"](start=sc[0], count=sc[1])), token_shape()),
    # reparam.py
    "rep_conv": valid(_rep("rep_conv")),
    "rep_dwconv": valid(_rep("rep_dwconv")),
    # routing.py: [router logits (E), noise scales (E, noisy), E expert outputs of C channels]
    "top_k_mixture": st.tuples(st.integers(1, 4), st.integers(1, 4), st.booleans()).flatmap(
        lambda ecn: paired(lambda x: st.builds(
            lambda k, c: OPS["top_k_mixture"](experts=ecn[0], k=k, noisy=ecn[2], combine=c),
            st.integers(1, ecn[0]), st.sampled_from(["sum", "log_exp"])),
            any_shape(channels=st.just(ecn[0] * (2 if ecn[2] else 1) + ecn[0] * ecn[1])))),
    "norm_classifier": kw("norm_classifier", st.integers(1, 16).map(lambda c: Shape(c, (), "vector")),
                          num_classes=st.integers(0, 8), heads=st.integers(1, 3), bias=st.booleans()),
}



# dynamic.py and deform_attn.py (conditioning streams, multi-level sequences; Mobile-Former, ViT-Adapter)
@st.composite
def _levels(draw, name):
    """A multi-level token sequence on a 2-D grid and a deform_attn op over it."""
    a, b = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    grid = (2 * a, 2 * b)
    scales = draw(st.lists(st.sampled_from([2, 1, 0.5]), min_size=1, max_size=3))
    n = sum(int(g * s) * int(grid[1] * s) for g, s in ((grid[0], s) for s in scales))
    c = draw(st.sampled_from([2, 4, 8]))
    if name == "deformable_attention":
        op = OPS[name](heads=draw(st.sampled_from([1, 2])), points=draw(st.integers(1, 3)), values=scales,
                       ratio=draw(st.sampled_from([1.0, 0.5])))
        return op, Shape(c, grid, "tokens", n)
    levels = scales + [1]
    if name == "per_level":
        inner = draw(st.sampled_from([OPS["conv"](out=c, kernel=3, groups=c),  # shape-keeping, or strided / wider
                                      OPS["conv"](out=2 * c, kernel=3, stride=2), OPS["conv"](out=c, kernel=1)]))
        return OPS[name](op=inner, levels=levels), Shape(c, grid, "tokens", n)
    return OPS[name](index=draw(st.integers(0, len(levels) - 1)), levels=levels), Shape(c, grid, "tokens", n)


STRATEGIES.update({
    "learned_tokens": kw("learned_tokens", any_shape(), dim=st.integers(1, 8),
                         count=st.integers(1, 4) | st.lists(st.integers(1, 3), min_size=2, max_size=2)),
    "dynamic_relu": paired(lambda x: st.just(OPS["dynamic_relu"](pieces=x.extra, scale=2.0)),
                           token_shape(extra=st.integers(1, 3))),
    "attend": paired(lambda x: st.builds(lambda h, v: OPS["attend"](heads=h, values=v),
                                         st.sampled_from([h for h in (1, 2, 4) if x.channels % h == 0]),
                                         st.sampled_from(["same", "split"])),
                     token_shape(st.sampled_from([4, 8, 12]), extra=st.integers(1, 4))),
    "deformable_attention": valid(_levels("deformable_attention")),
    "per_level": valid(_levels("per_level")),
    "select_level": valid(_levels("select_level")),
    # level_embed.py: the multi-level sequences of select_level, a learned row added per level
    "level_embed": valid(_levels("select_level")).map(
        lambda ox: (OPS["level_embed"](levels=ox[0].levels, std=0.5), ox[1])),
})

# select.py: top-k token selection (prefix kept, optional score channels / regions), early exit
@st.composite
def _topk_tokens(draw):
    region = draw(st.integers(1, 2))
    x = draw(token_shape(st.integers(2, 8), dims=(1, 2), extra=st.integers(0, 2), multiple=region))
    score = draw(st.sampled_from(["norm", "value", "class", "tensor"]))
    sc = 1 if score == "value" else draw(st.none() | st.integers(1, x.channels - 1))
    n = math.prod(g // region for g in x.spatial)
    if score == "tensor":  # by name: one channel per token or region, or one query's scores over the grid
        grid = draw(st.sampled_from([x.spatial, tuple(g // region for g in x.spatial)]))
        skip = draw(st.integers(0, 2))
        shape = draw(st.sampled_from([Shape(1, grid, "tokens", skip), Shape(1, grid, "map"),
                                      Shape(skip + math.prod(grid), (1,), "scores", heads=2, keys=(grid, skip))]))
        score, sc = TensorRef("s", "s", None, shape), None
    k = draw(st.integers(1, n) | st.sampled_from([0.25, 0.5]))
    return OPS["topk_tokens"](k=k, score=score, score_channels=sc, region=region, largest=draw(st.booleans())), x


@st.composite
def _multilevel(draw):  # multilevel.py: window attention with ring and pooled keys, 2-D grids
    w = draw(st.integers(2, 4))
    grid = (w * draw(st.integers(1, 3)), w * draw(st.integers(1, 3)))
    heads = draw(st.sampled_from([1, 2]))
    x = Shape(heads * draw(st.integers(1, 4)), grid, "tokens")
    op = OPS["multilevel_attention"](heads=heads, window=w, expand=draw(st.integers(0, w - 1)),
                                     pooled=draw(st.sampled_from([0, 1, 3])), qkv_bias=draw(st.booleans()))
    return op, x


STRATEGIES.update({
    "multilevel_attention": valid(_multilevel()),
    "topk_tokens": valid(_topk_tokens()),
    "early_exit": kw("early_exit", st.integers(1, 8).map(lambda c: Shape(2 * c, (), "vector")),
                     threshold=st.floats(0.0, 1.0)),
})


@st.composite
def _rearrange(draw):  # rearrange.py: a random split, permutation, regrouping and unit axis of a map's axes
    x = draw(map_shape(dims=(1, 2, 3), hi=6))
    dims = (x.channels, *x.spatial)
    names = ["a", "b", "c", "d"][:len(dims)]
    left, elem, sizes = list(names), list(names), []
    i = draw(st.integers(-1, len(dims) - 1))
    if i >= 0 and dims[i] % 2 == 0:  # split axis i into (name p) with p = 2
        left[i] = f"({names[i]} p)"
        elem.insert(i + 1, "p")
        sizes = [["p", 2]]
    perm = draw(st.permutations(elem))
    k = draw(st.integers(2, min(4, len(perm))))
    cuts = sorted(draw(st.sets(st.integers(1, len(perm) - 1), min_size=k - 1, max_size=k - 1)))
    groups = [perm[a:b] for a, b in zip([0] + cuts, cuts + [len(perm)])]
    right = [g[0] if len(g) == 1 else "(" + " ".join(g) + ")" for g in groups]
    if len(right) < 4 and draw(st.booleans()):
        right.insert(draw(st.integers(1, len(right))), "1")
    return OPS["rearrange"](pattern=" ".join(left) + " -> " + " ".join(right), sizes=sizes), x


STRATEGIES["rearrange"] = valid(_rearrange())
# indexed_linear.py (memory = 0 here: the generated form's once-per-forward generation MACs do not scale with the
# batch; tests/test_pathformer_ops.py checks it), member_attention.py, unused.py
STRATEGIES.update({
    "indexed_linear": paired(lambda x: st.builds(lambda o, a, k: OPS["indexed_linear"](out=o, axis=a, count=k),
                                                 st.integers(1, 6), st.integers(0, x.ndim - 1), st.integers(1, 2)),
                             map_shape(dims=(1, 2, 3), hi=6)),
    "member_attention": st.tuples(st.integers(1, 3), st.sampled_from([1, 2]), st.integers(1, 3)).flatmap(
        lambda mhc: kw("member_attention", st.one_of(map_shape(st.just(3 * mhc[0] * mhc[1] * mhc[2])),
                                                     token_shape(st.just(3 * mhc[0] * mhc[1] * mhc[2]))),
                       heads=st.just(mhc[1]), members=st.just(mhc[0]))),
    "unused": kw("unused", map_shape(dims=(1, 2)), channels=st.none() | st.integers(1, 8),
                 op=st.sampled_from([OPS["conv"](out=3), OPS["batchnorm"](), OPS["linear"](out=2)])),
})

# series.py: moving-average trend, top-k Fourier season, moments / destandardize (numerics: tests/test_series_ops.py)
STRATEGIES.update({
    "series_decomposition": paired(lambda x: st.builds(
        lambda ks, a, o: OPS["series_decomposition"](kernels=ks, axis=a, output=o),
        st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(0, x.ndim - 1),
        st.sampled_from(["trend", "residual"])), map_shape(dims=(1, 2), hi=8)),
    "fourier_season": paired(lambda x: st.builds(lambda k, a, lo: OPS["fourier_season"](k=k, axis=a, low=lo),
                                                 st.integers(1, 3), st.integers(0, x.ndim - 1), st.integers(0, 1)),
                             map_shape(dims=(1, 2), lo=4, hi=12)),
    "moments": paired(lambda x: st.builds(lambda a: OPS["moments"](axis=a), st.integers(0, x.ndim - 1)),
                      map_shape(dims=(1, 2, 3), hi=6)),
    "destandardize": fixed("destandardize", map_shape(st.integers(3, 8), dims=(1, 2))),
})


# rotary.py: rotary position embeddings (numerics against the equation and timm: tests/test_rotary.py)
STRATEGIES["rotary"] = paired(lambda x: st.builds(
    lambda a, p, r: OPS["rotary"](axes=a, pairs=p, reference=[r] * a if r else None),
    st.sampled_from([1, x.ndim]), st.sampled_from(["interleaved", "halves"]), st.sampled_from([None, 7])),
    token_shape(st.sampled_from([4, 8, 12]), dims=(1, 2)))

def _tested_ops() -> list[str]:
    return sorted(n for n, cls in OPS.items() if cls.kind == "op" and n not in EXCLUDED)  # not parts or losses


def test_every_op_has_a_strategy():
    missing = [n for n in _tested_ops() if n not in STRATEGIES]
    assert not missing, f"add a strategy to tests/test_ops.py STRATEGIES for: {', '.join(missing)}"


def concrete(s: Shape, batch: int = BATCH) -> tuple[int, ...]:
    if s.layout in ("heads", "scores"):
        return (batch, s.heads, s.tokens, s.channels)
    if s.layout == "map":
        return (batch, s.channels, *s.spatial)
    if s.layout == "tokens":
        return (batch, s.tokens, s.channels)
    return (batch, s.channels)


def _run(op, x: Shape):
    y = op.infer(x)
    torch.manual_seed(0)
    module = op.build(x, y).eval()
    inp = torch.randn(concrete(x))
    given = [getattr(op, a) for a in op.tensor_args if isinstance(getattr(op, a), TensorRef)]  # or a mode
    args = [torch.randn(concrete(t.shape)) for t in given]
    shapes = [x] + [t.shape for t in given]
    grids = tuple((torch.Size(s.spatial), torch.Size(s.keys[0])) if s.layout == "scores" else torch.Size(s.spatial)
                  for s in shapes)
    kwargs = {"grids": grids} if args and getattr(module, "takes_grid", False) else {}
    if not args and getattr(module, "takes_grid", False) and x.layout == "scores":
        args = [grids[0]]  # a score term's grid: (query grid, key grid)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = module(inp, *args, **kwargs)
    return y, module, out, counter.get_total_flops()


# heads.py: the attention primitives; q/k/v-style arguments are named tensors (TensorRef with a shape)
def _heads(heads, channels, tokens):
    return Shape(channels, (tokens,), "heads", heads=heads)


@st.composite
def _scores_case(draw):
    h, g = draw(st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]))
    d, n, m = draw(st.integers(1, 6)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    over = draw(st.sampled_from(["tokens", "channels"]))
    if over == "channels":
        m = n
    k = TensorRef("k", "k", None, _heads(g, draw(st.integers(1, 6)) if over == "channels" else d, m))
    op = OPS["scores"](k=k, over=over, scale=draw(st.none() | st.floats(0.1, 2.0)))
    return op, _heads(h, d, n)


@st.composite
def _weighted_sum_case(draw):
    h, g = draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    n, m, dv = draw(st.integers(1, 7)), draw(st.integers(1, 7)), draw(st.integers(1, 6))
    if draw(st.booleans()):  # over tokens: scores (h, n, m), v (g, m, dv)
        v = TensorRef("v", "v", None, _heads(g, dv, m))
        return OPS["weighted_sum"](v=v), Shape(m, (n,), "scores", heads=h, keys=((m,), 0))
    v = TensorRef("v", "v", None, _heads(g, dv, m))  # over channels: scores (h, dq, dv), v (g, m, dv)
    return OPS["weighted_sum"](v=v, over="channels"), Shape(dv, (n,), "scores", heads=h, keys=((dv,), 0))


def _attention_shape():
    return st.one_of(
        st.builds(_heads, st.integers(1, 4), st.integers(1, 6), st.integers(1, 7)),
        st.builds(lambda h, n, m: Shape(m, (n,), "scores", heads=h, keys=((m,), 0)),
                  st.integers(1, 4), st.integers(1, 6), st.integers(1, 7)))


@st.composite
def _weighted_pool_case(draw):
    x = draw(st.one_of(map_shape(dims=(1, 2, 3)), token_shape(dims=(1, 2))))
    layout = "tokens" if x.extra else draw(st.sampled_from(["map", "tokens"]))  # weights: a map or tokens
    w = Shape(1, x.spatial, layout, x.extra)
    if layout == "map" and x.layout == "map" and draw(st.booleans()):  # along the last axis: one vector per row
        return OPS["weighted_pool"](weights=TensorRef("w", "w", None, w), axis="last"), x
    return OPS["weighted_pool"](weights=TensorRef("w", "w", None, w)), x


@st.composite
def _split_channels_case(draw):
    widths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    x = draw(st.one_of(map_shape(st.just(sum(widths)), dims=(1, 2, 3)), token_shape(channels=st.just(sum(widths)))))
    part = draw(st.integers(0, len(widths) - 1))
    if draw(st.booleans()):
        return OPS["split_channels"](widths=widths, parts=len(widths), part=part), x
    n = len(widths)  # equal parts
    return OPS["split_channels"](parts=n, part=part), x.with_(channels=n * widths[0])


STRATEGIES.update({
    "split_heads": st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.sampled_from(["parts", "heads"]))
    .flatmap(lambda hpwo: st.integers(0, hpwo[1] - 1).map(lambda part: (
        OPS["split_heads"](heads=hpwo[0], parts=hpwo[1], part=part, order=hpwo[3]),
        Shape(hpwo[0] * hpwo[1] * hpwo[2], (3,), "tokens", 1)))),
    "merge_heads": kw("merge_heads", st.builds(_heads, st.integers(1, 4), st.integers(1, 6), st.integers(1, 7)),
                      order=st.sampled_from(["heads", "channels"])),
    "scores": _scores_case(),
    "weighted_sum": _weighted_sum_case(),
    "weighted_pool": _weighted_pool_case(),
    "softmax": st.one_of(kw("softmax", _attention_shape()),
                         kw("softmax", st.one_of(token_shape(), map_shape(dims=(1, 2, 3))), axis=st.just("tokens")),
                         kw("softmax", map_shape(dims=(1, 2, 3)), axis=st.just("last"))),
    "split_channels": _split_channels_case(),
    "normalize_sum": kw("normalize_sum", _attention_shape(), eps=st.floats(0.0, 1.0)),
    "l2norm": st.one_of(kw("l2norm", _attention_shape()),
                        kw("l2norm", st.builds(_heads, st.integers(1, 4), st.integers(1, 6), st.integers(1, 7)),
                           axis=st.just("tokens"))),
    "mix_heads": kw("mix_heads", _attention_shape(), heads=st.none() | st.integers(1, 4), bias=st.booleans()),
    "add_bias": kw("add_bias", st.one_of(_attention_shape(), token_shape(), map_shape())),
    "head_scale": kw("head_scale", _attention_shape(), init=st.floats(0.5, 4.0), log=st.booleans(),
                     max=st.none() | st.floats(1.0, 100.0)),
    "blend": st.builds(lambda h, n, m, i: (OPS["blend"](other=TensorRef("o", "o", None, Shape(
        m, (n,), "scores", heads=h, keys=((m,), 0))), init=i), Shape(m, (n,), "scores", heads=h, keys=((m,), 0))),
        st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.floats(-2.0, 2.0)),
    "position_scores": st.tuples(st.integers(1, 4), grid((1, 2), 1, 5), grid((1, 2), 1, 5)).filter(
        lambda t: len(t[1]) == len(t[2])).map(lambda t: (
            OPS["position_scores"](k=TensorRef("k", "k", None, Shape(3, t[2], "heads", heads=t[0]))),
            Shape(3, t[1], "heads", heads=t[0]))),
    "distance_bias": st.tuples(st.integers(1, 3), grid((1, 2), 1, 5)).map(lambda t: (
        OPS["distance_bias"](), Shape(math.prod(t[1]), t[1], "scores", heads=t[0], keys=(t[1], 0)))),
    "fourier_features": paired(lambda x: st.sampled_from([2, 4, 6]).map(
        lambda k: OPS["fourier_features"](channels=k * 2 * x.ndim)), st.one_of(map_shape(dims=(1, 2)),
                                                                                token_shape(extra=st.just(0)))),
    "prefix_tokens": fixed("prefix_tokens", token_shape(extra=st.integers(1, 3))),
    "grid_tokens": fixed("grid_tokens", token_shape()),
    "position_mlp_bias": st.tuples(st.integers(1, 3), grid((1, 2), 1, 4), st.integers(1, 8)).map(lambda t: (
        OPS["position_mlp_bias"](hidden=t[2]),
        Shape(math.prod(t[1]), t[1], "scores", heads=t[0], keys=(t[1], 0)))),
    # queries on one grid, keys on another of the same rank (more keys per axis unless scaled)
    "axis_relative_logits": st.tuples(st.integers(1, 3), grid((1, 2), 1, 4), st.integers(1, 4), grid((1, 2), 1, 5),
                                      st.sampled_from(["key-query", "query-key"]), st.booleans()).filter(
        lambda t: len(t[1]) == len(t[3]) and (t[5] or all(a <= b for a, b in zip(t[1], t[3])))).map(lambda t: (
            OPS["axis_relative_logits"](q=TensorRef("q", "q", None, Shape(t[2], t[1], "heads", heads=t[0])),
                                        offset=t[4], scaled=t[5]),
            Shape(math.prod(t[3]), t[1], "scores", heads=t[0], keys=(t[3], 0)))),
    "relative_position_bias": st.tuples(st.integers(1, 3), grid((1, 2), 1, 5), st.booleans()).map(lambda t: (
        OPS["relative_position_bias"](prefix=t[2]),
        Shape(math.prod(t[1]) + t[2], t[1], "scores", int(t[2]), heads=t[0], keys=(t[1], int(t[2]))))),
})


@pytest.mark.parametrize("name", [n for n in _tested_ops() if n in STRATEGIES])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_op_rules_match_module(name, data):
    op, x = data.draw(STRATEGIES[name], label="op, input")
    assert op.name == name
    y, module, out, flops = _run(op, x)
    assert tuple(out.shape) == concrete(y), f"{op.describe()} on {x}: shape rule says {y}"
    assert op.params(x, y) == sum(p.numel() for p in module.parameters()), f"{op.describe()} on {x}"
    macs = op.macs(x, y)
    seen = flops / 2 / (1 if name in SHARED_BY_THE_BATCH else BATCH)
    if name in ELEMENTWISE_MACS:
        assert seen == 0 and macs == ELEMENTWISE_MACS[name](op, x, y), f"{op.describe()} on {x}: rule {macs}"
    elif seen > 0:
        assert macs == pytest.approx(seen, rel=0.05), f"{op.describe()} on {x}: counter {seen}, rule {macs}"
    else:
        assert macs == 0, f"{op.describe()} on {x}: the counter sees no MACs, the rule {macs}"


# ----------------------------------------------------------------------------- shape errors

@pytest.mark.parametrize("op, x, words", [
    (OPS["pixel_shuffle"](factor=2), Shape(6, (4, 4)), "divisible"),
    (OPS["pixel_unshuffle"](factor=2), Shape(6, (5, 4)), "does not divide"),
    (OPS["channel_shuffle"](groups=4), Shape(6, (4, 4)), "must divide"),
    (OPS["glu"](), Shape(5, (4,), "tokens"), "in two"),
    (OPS["grn"](), Shape(5, (), "vector"), "vector"),
    (OPS["sinusoidal_pos"](), Shape(6, (4, 4), "tokens"), "divisible by 4"),
    (OPS["conv_pos"](kernel=2), Shape(6, (4, 4), "tokens"), "odd"),
    (OPS["rep_conv"](out=8, kernel=4), Shape(8, (4, 4)), "odd"),
    (OPS["rep_conv"](out=8, kernel=3, small_kernel=5), Shape(8, (4, 4)), "small_kernel"),
    (OPS["rep_conv"](out=6, kernel=3, groups=4), Shape(8, (4, 4)), "divide"),
    (OPS["squeeze_excite"](act=OPS["linear"](out=3)), Shape(8, (4, 4)), "keep the shape"),
])
def test_shape_errors(op, x, words):
    with pytest.raises(ShapeError) as info:
        op.infer(x)
    assert words in info.value.message


# ----------------------------------------------------------------------------- numerics vs references

def test_pixel_shuffle_matches_torch_and_unshuffle_inverts():
    for d, grid in ((1, (5,)), (2, (3, 4)), (3, (2, 3, 2))):
        x = torch.randn(2, 3 * 2 ** d, *grid)
        up = OPS["pixel_shuffle"](factor=2).build(Shape(3 * 2 ** d, grid), None)(x)
        down = OPS["pixel_unshuffle"](factor=2).build(Shape(3, tuple(2 * g for g in grid)), None)(up)
        assert torch.equal(down, x)
        if d == 2:
            assert torch.equal(up, nn.PixelShuffle(2)(x))
            assert torch.equal(down, nn.PixelUnshuffle(2)(up))


def test_channel_shuffle_matches_torch():
    x = torch.randn(2, 12, 3, 3)
    assert torch.equal(OPS["channel_shuffle"](groups=3).build(Shape(12, (3, 3)), None)(x), nn.ChannelShuffle(3)(x))


def test_squeeze_excite_matches_timm():
    from timm.layers.squeeze_excite import SEModule

    x = Shape(32, (5, 5))
    op = OPS["squeeze_excite"](ratio=0.25, divisor=8)
    mine = op.build(x, x)
    ref = SEModule(32, rd_ratio=0.25, rd_divisor=8)
    assert mine.fc1.out_channels == ref.fc1.out_channels == 8
    assert [k for k, _ in mine.state_dict().items()] == [k for k, _ in ref.state_dict().items()]
    ref.load_state_dict(mine.state_dict())
    t = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(mine(t), ref(t))


def test_grn_matches_timm_on_maps_and_tokens():
    from timm.layers.grn import GlobalResponseNorm

    t = torch.randn(2, 6, 4, 5)
    for layout in ("map", "tokens"):
        mine = OPS["grn"]().build(Shape(6, (4, 5), layout), None)
        ref = GlobalResponseNorm(6, channels_last=True)
        with torch.no_grad():
            for p, q in ((mine.gamma, ref.weight), (mine.beta, ref.bias)):
                p.normal_()
                q.copy_(p)
        want = ref(t.permute(0, 2, 3, 1))  # (B, H, W, C)
        if layout == "map":
            torch.testing.assert_close(mine(t), want.permute(0, 3, 1, 2))
        else:
            torch.testing.assert_close(mine(t.flatten(2).transpose(1, 2)), want.flatten(1, 2))


def test_glu_sigmoid_is_torch_glu():
    t = torch.randn(2, 8, 3)
    torch.testing.assert_close(OPS["glu"]().build(Shape(8, (3,)), Shape(4, (3,)))(t), nn.functional.glu(t, dim=1))


def test_sinusoidal_pos_matches_timm_and_skips_class_tokens():
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    x = Shape(16, (3, 5), "tokens", extra=1)
    module = OPS["sinusoidal_pos"]().build(x, x)
    assert not list(module.parameters()) and not module.state_dict()
    t = torch.randn(2, 16, 16)
    out = module(t)
    assert torch.equal(out[:, 0], t[:, 0])
    torch.testing.assert_close(out[:, 1:] - t[:, 1:], build_sincos2d_pos_embed([3, 5], 16)[None].expand(2, -1, -1))


@pytest.mark.parametrize("grid", [(4, 6), (7, 3)])
def test_fourier_features_project_to_timm_xcit_position_encoding(grid):
    """timm's PositionalEncodingFourier (XCiT) is `token_projection(fourier_features(64))`, on a map
    and on tokens, at any grid (the features are made for the grid seen)."""
    from timm.models.xcit import PositionalEncodingFourier

    ref = PositionalEncodingFourier(hidden_dim=32, dim=24).eval()
    op = OPS["fourier_features"](channels=64)
    built = Shape(5, (2, 2), "map")  # built at another grid: the module follows the one it gets
    module = op.build(built, op.infer(built))
    with torch.no_grad():
        expected = ref(2, *grid)
        feats = module(torch.randn(2, 5, *grid))
        torch.testing.assert_close(ref.token_projection(feats), expected)
        tokens = OPS["fourier_features"](channels=64).build(Shape(5, (2, 2), "tokens"), Shape(64, (2, 2), "tokens"))
        t = tokens(torch.randn(2, grid[0] * grid[1], 5), torch.Size(grid))
        torch.testing.assert_close(t.transpose(1, 2).reshape(2, 64, *grid), feats)


def test_conv_pos_is_residual_depthwise_conv_and_skips_class_tokens():
    x = Shape(4, (3, 3), "tokens", extra=1)
    module = OPS["conv_pos"](kernel=3).build(x, x)
    assert module.proj.groups == 4
    with torch.no_grad():
        module.proj.weight.zero_()
        module.proj.bias.fill_(1.0)
    t = torch.randn(2, 10, 4)
    out = module(t)
    assert torch.equal(out[:, 0], t[:, 0])
    torch.testing.assert_close(out[:, 1:], t[:, 1:] + 1)


def test_upsample_linear_is_bilinear():
    x = Shape(3, (4, 4))
    t = torch.randn(1, 3, 4, 4)
    out = OPS["upsample"](scale=2, mode="linear").build(x, None)(t)
    torch.testing.assert_close(out, nn.functional.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False))


# ----------------------------------------------------------------------------- re-parameterization

def _randomize_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0, 0.3)


REP_CASES = [
    # (op, input)
    (OPS["rep_conv"](out=8, kernel=3, scale_branch=True), Shape(8, (7, 6))),                       # RepVGG, identity
    (OPS["rep_conv"](out=8, kernel=3, scale_branch=True, identity=False), Shape(8, (7, 6))),
    (OPS["rep_conv"](out=12, kernel=3, stride=2, scale_branch=True), Shape(8, (7, 6))),          # no identity
    (OPS["rep_conv"](out=8, kernel=3, stride=2, groups=4, scale_branch=True), Shape(8, (9, 8))),
    (OPS["rep_conv"](out=8, kernel=5, groups=2, small_kernel=3, scale_branch=True), Shape(8, (6, 6))),
    (OPS["rep_conv"](out=6, kernel=3, groups=3), Shape(6, (10,))),                                 # 1-D
    (OPS["rep_conv"](out=4, kernel=3, scale_branch=True), Shape(4, (4, 3, 5))),                    # 3-D
    (OPS["rep_conv"](out=8, kernel=1, scale_branch=True), Shape(8, (5, 5))),
    (OPS["rep_dwconv"](kernel=7, small_kernel=3), Shape(6, (9, 9))),                               # large kernel
    (OPS["rep_dwconv"](kernel=3, stride=2, scale_branch=True), Shape(6, (9, 9))),
]


@pytest.mark.parametrize("op, x", REP_CASES, ids=lambda v: v.describe() if hasattr(v, "describe") else str(v))
def test_rep_conv_fuses_to_one_equal_conv(op, x):
    from composer.layers.reparam import RepConv

    torch.manual_seed(0)
    y = op.infer(x)
    module = op.build(x, y)
    assert isinstance(module, RepConv)
    assert (module.identity is not None) == op.has_identity(x)
    _randomize_bn(module)
    module.eval()
    t = torch.randn(2, x.channels, *x.spatial)
    with torch.no_grad():
        want = module(t)
        fused = module.fuse()
        got = fused(t)
    assert isinstance(fused, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and fused.bias is not None
    assert tuple(got.shape) == concrete(y)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rep_conv_submodule_names_follow_timm():
    x = Shape(8, (4, 4))
    names = set(OPS["rep_conv"](out=8, kernel=5, scale_branch=True, small_kernel=3).build(x, x).state_dict())
    assert {"conv_kxk.conv.weight", "conv_kxk.bn.running_var", "conv_1x1.conv.weight", "conv_small.conv.weight",
            "identity.weight"} <= names


def test_fuse_model_replaces_every_rep_conv_in_place():
    from composer.fuse import fuse_model
    from composer.layers.reparam import RepConv

    x = Shape(6, (8, 8))
    model = nn.Sequential(
        OPS["rep_conv"](out=6, kernel=3, scale_branch=True).build(x, x),
        nn.ReLU(),
        nn.Sequential(OPS["rep_dwconv"](kernel=5, small_kernel=3).build(x, x)),
    )
    _randomize_bn(model)
    model.eval()
    t = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        want = model(t)
        same = fuse_model(model)
        got = model(t)
    assert same is model
    assert not any(isinstance(m, RepConv) for m in model.modules())
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[2][0], nn.Conv2d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert isinstance(fuse_model(OPS["rep_conv"](out=6, kernel=3).build(x, x).eval()), nn.Conv2d)


def test_new_ops_load_from_a_blueprint(tmp_path):
    import composer

    path = tmp_path / "m.arch"
    path.write_text(
        "model m(num_classes = 5) {\n"
        "    input image(3, 16)\n"
        "    stem { rep_conv(8, 3, stride = 2, scale_branch = true); relu }\n"
        "    stages for i in 0..1 {\n"
        "        repeat 1 { rep_dwconv(3, scale_branch = true); squeeze_excite(act = silu, gate = hardsigmoid);"
        " grn; channel_shuffle(2); pixel_unshuffle(2); pixel_shuffle(2); conv_pos(3); upsample(2, \"linear\");"
        " adaptive_pool(4); glu(act = gelu) }\n"
        "    }\n"
        "    head { global_pool(\"avg\"); classifier(num_classes) }\n"
        "}\n")
    plan = composer.load(f"{path}:m")
    model = composer.build(f"{path}:m")
    assert plan.params == sum(p.numel() for p in model.parameters())
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)


def test_token_linear_equation():
    """y[:, n] = Σ_m W[n, m] x[:, m] + b[n] over the tokens of a 3x4 grid, written out; its init."""
    x = Shape(5, (3, 4), "tokens")
    op = OPS["token_linear"](init_std=0.5, bias_init=1.0)
    mod = op.build(x, op.infer(x))
    assert op.params(x, x) == 12 * 12 + 12 == sum(p.numel() for p in mod.parameters())
    assert torch.equal(mod.bias, torch.ones(12))
    t = torch.randn(2, 12, 5)
    want = torch.einsum("nm,bmc->bnc", mod.weight, t) + mod.bias[None, :, None]
    assert torch.allclose(mod(t), want, atol=1e-5)
    with pytest.raises(ShapeError, match="class tokens"):
        op.infer(Shape(5, (3, 4), "tokens", 1))
