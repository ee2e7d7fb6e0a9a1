"""The `cluster` op (soft clustering into slots, a mixer over the slots, dispatch back).

Hypothesis checks its shape, parameter and MAC rules against the built module (maps and tokens,
1-D and 2-D, paired and learned slots, with and without an attention mixer). The numerics are
compared with GLMix's formula written here (L2-normalised logits, a softmax over the pixels to
form the slots, `nn.MultiheadAttention` among the slots, a softmax over the slots to dispatch
back), with the attention's weights copied into torch's `nn.MultiheadAttention`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from composer.ops import OPS
from composer.shapes import Shape, ShapeError
from helpers import explicit_sdpa

torch.set_num_threads(1)
BATCH = 2


@st.composite
def cases(draw):
    d = draw(st.sampled_from([1, 2]))
    heads = draw(st.sampled_from([1, 2]))
    c = heads * draw(st.sampled_from([2, 4]))
    paired = draw(st.booleans())
    layout = draw(st.sampled_from(["map", "tokens"]))
    grid = tuple(draw(st.integers(1, 7)) for _ in range(d))
    op = OPS["cluster"](slots=draw(st.integers(1, 4)),
                        mixer=draw(st.sampled_from([None, OPS["attention"](heads=heads), OPS["linear"](out=c)])),
                        init="pool" if paired else draw(st.sampled_from(["pool", "learned"])), paired=paired,
                        learnable_scale=draw(st.booleans()))
    return op, Shape(2 * c if paired else c, grid, layout)


def concrete(s: Shape):
    return (BATCH, s.channels, *s.spatial) if s.layout == "map" else (BATCH, s.tokens, s.channels)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_cluster_rules_match_module(case):
    op, x = case
    y = op.infer(x)
    torch.manual_seed(0)
    module = op.build(x, y).eval()
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(F, "scaled_dot_product_attention", explicit_sdpa)
        with FlopCounterMode(display=False) as counter:
            out = module(torch.randn(concrete(x)))
    assert tuple(out.shape) == concrete(y) and y.layout == x.layout and y.spatial == x.spatial
    assert op.params(x, y) == sum(p.numel() for p in module.parameters())
    seen = counter.get_total_flops() / 2 / BATCH
    assert op.macs(x, y) == pytest.approx(seen, rel=0.05)


def test_shape_errors():
    with pytest.raises(ShapeError, match="equal size"):
        OPS["cluster"](paired=True).infer(Shape(5, (4, 4)))
    with pytest.raises(ShapeError, match="keep the slots"):
        OPS["cluster"](mixer=OPS["linear"](out=3)).infer(Shape(4, (4, 4)))
    with pytest.raises(ShapeError, match="class token"):
        OPS["cluster"]().infer(Shape(4, (4, 4), "tokens", extra=1))
    with pytest.raises(ShapeError, match="spatial grid"):
        OPS["cluster"]().infer(Shape(4, (), "vector"))


def _glmix_reference(feats, source, mha, tau, pool):
    """GLMix's global branch on maps feats, source (B, C, H, W): slots pooled from `source`."""
    b, c, h, w = feats.shape
    f = feats.flatten(2).transpose(1, 2)                                    # (B, N, C)
    s0 = F.adaptive_avg_pool2d(source, pool).flatten(2).transpose(1, 2)      # (B, K, C)
    logits = F.normalize(s0, dim=-1) @ (tau * F.normalize(f, dim=-1)).transpose(1, 2)
    slots = logits.softmax(-1) @ f
    slots, _ = mha(slots, slots, slots, need_weights=False)
    out = logits.transpose(1, 2).softmax(-1) @ slots
    return out.transpose(1, 2).reshape(b, c, h, w)


def _randomised_with_mha(mod, c: int, heads: int):
    """Random weights for the cluster module and torch's MultiheadAttention holding its mixer's
    weights (qkv -> in_proj, proj -> out_proj)."""
    mha = nn.MultiheadAttention(c, heads, batch_first=True).double().eval()
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
        mha.in_proj_weight.copy_(mod.mixer.qkv.weight)
        mha.in_proj_bias.copy_(mod.mixer.qkv.bias)
        mha.out_proj.weight.copy_(mod.mixer.proj.weight)
        mha.out_proj.bias.copy_(mod.mixer.proj.bias)
    return mha


@pytest.mark.parametrize("layout", ["map", "tokens"])
def test_cluster_matches_glmix_formula(layout):
    c, heads, grid = 16, 2, (6, 5)
    op = OPS["cluster"](slots=3, mixer=OPS["attention"](heads=heads), paired=True)
    x = Shape(2 * c, grid, layout)
    torch.manual_seed(0)
    mod = op.build(x, op.infer(x)).double()
    mha = _randomised_with_mha(mod, c, heads)
    feats = torch.randn(2, c, *grid, dtype=torch.float64)
    source = torch.randn(2, c, *grid, dtype=torch.float64)
    ref = _glmix_reference(feats, source, mha, mod.slot_scale, 3)
    both = torch.cat([feats, source], 1)
    if layout == "map":
        out = mod(both)
    else:
        out = mod(both.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, c, *grid)
    torch.testing.assert_close(out, ref)


def test_unpaired_and_learned_slots():
    c, grid = 8, (4, 4)
    t = torch.randn(2, c, *grid, dtype=torch.float64)
    op = OPS["cluster"](slots=2, scale=0.5, learnable_scale=False)
    mod = op.build(Shape(c, grid), None).double()
    assert not list(mod.parameters()) and float(mod.slot_scale) == 0.5
    f = t.flatten(2).transpose(1, 2)
    s0 = F.adaptive_avg_pool2d(t, 2).flatten(2).transpose(1, 2)
    logits = F.normalize(s0, dim=-1) @ (0.5 * F.normalize(f, dim=-1)).transpose(1, 2)
    ref = logits.transpose(1, 2).softmax(-1) @ (logits.softmax(-1) @ f)
    torch.testing.assert_close(mod(t), ref.transpose(1, 2).reshape(2, c, *grid))
    learned = OPS["cluster"](slots=2, init="learned").build(Shape(c, grid), None)
    assert learned.init_slots.shape == (1, 4, c)
    assert learned(t.float()).shape == t.shape


# ----------------------------------------------------------------------------- the slot source by name

def _named_source(c, grid, layout):
    from composer.shapes import TensorRef

    return TensorRef("x", "x", None, Shape(c, grid, layout))


@pytest.mark.parametrize("layout, source_layout", [("map", "map"), ("tokens", "tokens"), ("map", "tokens")])
def test_cluster_source_by_name_matches_glmix_formula(layout, source_layout):
    """`cluster(3, attention(2), source = x)`: the features are the running tensor alone, the slots
    are pooled from `x` (either layout), GLMix's formula as above."""
    c, heads, grid = 16, 2, (6, 5)
    op = OPS["cluster"](slots=3, mixer=OPS["attention"](heads=heads), source=_named_source(c, grid, source_layout))
    assert op.deprecation() is None
    x = Shape(c, grid, layout)
    plain = OPS["cluster"](slots=3, mixer=OPS["attention"](heads=heads))
    assert op.infer(x) == x and op.params(x, x) == plain.params(x, x) and op.macs(x, x) == plain.macs(x, x)
    torch.manual_seed(0)
    mod = op.build(x, x).double()
    mha = _randomised_with_mha(mod, c, heads)
    feats = torch.randn(2, c, *grid, dtype=torch.float64)
    source = torch.randn(2, c, *grid, dtype=torch.float64)
    ref = _glmix_reference(feats, source, mha, mod.slot_scale, 3)
    tok = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
    src = source if source_layout == "map" else tok(source)
    if layout == "map":
        out = mod(feats, src)
    else:
        out = mod(tok(feats), src).transpose(1, 2).reshape(2, c, *grid)
    torch.testing.assert_close(out, ref)


def test_cluster_source_shape_errors():
    x = Shape(16, (4, 4))
    with pytest.raises(ShapeError, match="source has 8 channels, the features 16"):
        OPS["cluster"](source=_named_source(8, (4, 4), "map")).infer(x)
    with pytest.raises(ShapeError, match="on the features' grid 4x4"):
        OPS["cluster"](source=_named_source(16, (2, 2), "map")).infer(x)
    with pytest.raises(ShapeError, match="not both"):
        OPS["cluster"](paired=True, source=_named_source(16, (4, 4), "map")).infer(Shape(32, (4, 4)))
    with pytest.raises(ShapeError, match="init = \"pool\""):
        OPS["cluster"](init="learned", source=_named_source(16, (4, 4), "map")).infer(x)


GLMIX_FORMS = """
mixer packed(dim) {
    x = identity
    conv_pos(3) as pos
    layernorm as norm
    parallel concat { identity; from x }
    cluster(2, attention(2), paired = true) as mix
}
mixer named(dim) {
    x = identity
    conv_pos(3) as pos
    layernorm as norm
    cluster(2, attention(2), source = x) as mix
}
model m(mixer = packed(16)) {
    input image(3, 32)
    stem patch_embed(16, 4)
    stage { block { mixer as glmix } }
    head { global_pool("avg"); classifier(4) }
}
model m2 : m { mixer = named(16) }
"""


def test_cluster_paired_warns_and_equals_the_named_source(tmp_path):
    """The packed spelling (`parallel concat { identity; from x }`, `paired = true`) still builds,
    with a located warning naming the new one; `source = x` with the same weights gives the same
    output."""
    import composer
    from helpers import write

    path = write(tmp_path, GLMIX_FORMS)
    with pytest.warns(composer.ComposerWarning) as caught:
        old = composer.build(path + ":m").eval()
    message = str(caught[0].message)
    assert "m.arch:7:5: warning: cluster(paired = true), which reads its slot source packed" in message, message
    assert "cluster(slots, mixer, source = x)" in message
    new = composer.build(path + ":m2").eval()
    assert list(new.state_dict()) == list(old.state_dict())
    with torch.no_grad():
        for p in old.parameters():
            p.normal_(0, 0.3)
    new.load_state_dict(old.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (new(x) - old(x)).abs().max() < 1e-5


@pytest.mark.parametrize("call, message, where", [
    ("cluster(2, attention(2), source = y)", "unknown name 'y'", "4:39"),
    ("cluster(2, attention(2), source = narrow)", "cluster source has 8 channels, the features 16", "4:5"),
])
def test_cluster_source_errors_are_located(tmp_path, call, message, where):
    import composer
    from composer.diagnostics import ComposerError
    from helpers import write

    text = ("model m {\n    input image(3, 32)\n    stem { patch_embed(16, 4); narrow = conv(8, 1)\n"
            f"    {call} }}\n}}\n")
    with pytest.raises(ComposerError) as info:
        composer.check(write(tmp_path, text))
    rendered = info.value.render()
    assert message in rendered and f"m.arch:{where}:" in rendered, rendered
