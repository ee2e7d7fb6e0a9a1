"""The builder stage: `composer.builder.build_module(plan)` and `composer.build(...)` -> a ComposedModel.

Small hand-written blueprints: the programs the builder compiles, forward passes checked against
the same computation written out with torch.nn.functional from the built model's own weights,
drop path, seeds, state_dict names and the timm-style API (classifier, features, pre-logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import composer
from composer.builder import ComposedModel, Sequence, build_module
from composer.program import Call, GridCall, Load, Parallel, Residual, Save, Shared, ToMap, ToTokens
from helpers import n_params, perturb, write

RESNETISH = """
model m(num_classes = 5) {
    input image(3, 16)
    stem { conv(8, 3, stride = 2) as conv; batchnorm as norm; relu }
    stage { block unit(8) }
    stage { downsample conv(16, 2, stride = 2); block { residual { pos_embed } } }
    head { global_pool("avg"); layernorm as norm; classifier(num_classes) }
}
block unit(dim) { residual { conv(dim, 3) as conv; batchnorm as norm1 }; relu }
"""


def built(tmp_path, text: str, **kw) -> ComposedModel:
    return composer.build(write(tmp_path, text), **kw)


def close(a, b) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


# --- programs ------------------------------------------------------------------------------------


def test_program_of_a_residual_block_and_a_layout_change(tmp_path):
    m = built(tmp_path, RESNETISH)
    assert m.stem.program == [Call("conv"), Call("norm"), Call("relu")]
    (res, relu) = m.stages[0].blocks[0].program
    assert type(res) is Residual and res.shortcut == [] and res.body == [Call("conv"), Call("norm1")]
    assert relu == Call("relu")
    # stage 1: the block's residual needs tokens, so the conversion comes before it
    to_tokens, res2 = m.stages[1].blocks[0].program
    assert type(to_tokens) is ToTokens and type(res2) is Residual and res2.body == [GridCall("pos_embed")]
    assert m.stages[1].downsample.program == [Call("conv")]
    assert m.head.program == [Call("global_pool"), Call("norm"), Call("classifier")]


def test_program_of_a_parallel_split_is_a_tuple(tmp_path):
    m = built(tmp_path, """
model m {
    input image(8, 8)
    stem parallel concat(split = [2, 6]) { conv(4, 1) as a; { conv(2, 3) as b; relu } }
}
""")
    (par,) = m.stem.program
    assert type(par) is Parallel and par.merge == "concat"
    assert par.split == (2, 6) and type(par.split) is tuple
    assert par.branches == [[Call("a")], [Call("b"), Call("relu")]]
    assert par.axes == (1, 1)  # maps: channels at axis 1 in and out


def test_composite_is_a_call_of_a_nested_sequence(tmp_path):
    m = built(tmp_path, """
model m {
    input image(4, 8)
    stem { conv(8, 3) as a; mix(8) }
}
mixer mix(dim) { linear(dim) as fc; gelu }
""")
    assert m.stem.program == [Call("a"), Call("mix")]
    assert type(m.stem.mix) is Sequence and m.stem.mix.call == "mix"
    assert m.stem.mix.program == [Call("fc"), Call("gelu")]
    assert isinstance(m.stem.mix.fc, torch.nn.Linear) and m.stem.mix.fc.weight.shape == (8, 8)


def test_tokens_and_back_to_map(tmp_path):
    m = built(tmp_path, """
model m {
    input image(3, 4)
    stem { conv(4, 3) as a; pos_embed; conv(2, 1) as back }
}
""").eval()
    assert m.stem.program == [Call("a"), ToTokens(), GridCall("pos_embed"), ToMap(), Call("back")]
    x = torch.randn(2, 3, 4, 4)
    s = m.stem
    t = F.conv2d(x, s.a.weight, s.a.bias, padding=1)                     # (2, 4, 4, 4)
    t = t.flatten(2).transpose(1, 2) + s.pos_embed.pos                   # (2, 16, 4) tokens
    t = t.transpose(1, 2).reshape(2, 4, 4, 4)                            # back to the 4x4 grid
    want = F.conv2d(t, s.back.weight, s.back.bias)
    assert close(m(x), want)


def test_save_from_and_reuse_programs(tmp_path):
    m = built(tmp_path, """
model m {
    input image(4, 8)
    stem { conv(4, 3) as a; save s; conv(4, 3) as b }
    stage { block { parallel add { from s; conv(4, 1) as c } }; block [conv(4, 1) as d]; reuse stages.0.blocks.1 }
}
""")
    assert m.stem.program == [Call("a"), Save("s"), Call("b")]
    (par,) = m.stages[0].blocks[0].program
    assert par.merge == "add" and par.split is None and par.branches == [[Load("s")], [Call("c")]]
    assert m.stages[0].blocks[2].program == [Shared("stages.0.blocks.1")]
    # the reused weights are stored once, under the path that defines them
    keys = [k for k in m.state_dict() if k.startswith("stages.")]
    assert keys == ["stages.0.blocks.0.c.weight", "stages.0.blocks.0.c.bias",
                    "stages.0.blocks.1.d.weight", "stages.0.blocks.1.d.bias"]


# --- forward passes written out by hand ---------------------------------------------------------


def test_forward_matches_functional_conv_bn_relu_residual(tmp_path):
    m = built(tmp_path, RESNETISH)
    perturb(m)  # batch-norm statistics and biases away from their identity defaults
    m.eval()
    x = torch.randn(2, 3, 16, 16)

    def bn(t, mod):
        return F.batch_norm(t, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)

    s, b0 = m.stem, m.stages[0].blocks[0]
    t = F.relu(bn(F.conv2d(x, s.conv.weight, s.conv.bias, stride=2, padding=1), s.norm))   # (2, 8, 8, 8)
    t = F.relu(t + bn(F.conv2d(t, b0.conv.weight, b0.conv.bias, padding=1), b0.norm1))      # residual, relu
    d = m.stages[1].downsample.conv
    t = F.conv2d(t, d.weight, d.bias, stride=2)                                             # (2, 16, 4, 4)
    t = t.flatten(2).transpose(1, 2)                                                        # (2, 16 tokens, 16)
    t = t + (t + m.stages[1].blocks[0].pos_embed.pos)                                       # residual on tokens
    pooled = t.mean(1)
    h = m.head
    pre = F.layer_norm(pooled, (16,), h.norm.weight, h.norm.bias, h.norm.eps)
    logits = F.linear(pre, h.classifier.weight, h.classifier.bias)
    assert close(m(x), logits)
    assert close(m.forward_head(m.forward_features(x), pre_logits=True), pre)


def test_forward_of_a_parallel_concat_with_split(tmp_path):
    m = built(tmp_path, """
model m {
    input image(8, 8)
    stem parallel concat(split = [2, 6]) { conv(4, 1) as a; { conv(2, 3) as b; relu } }
}
""").eval()
    x = torch.randn(2, 8, 8, 8)
    s = m.stem
    first = F.conv2d(x[:, :2], s.a.weight, s.a.bias)
    second = F.relu(F.conv2d(x[:, 2:], s.b.weight, s.b.bias, padding=1))
    out = m(x)
    assert out.shape == (2, 4 + 2, 8, 8)
    assert close(out, torch.cat([first, second], 1))


def test_forward_of_save_from_and_reuse(tmp_path):
    m = built(tmp_path, """
model m {
    input image(4, 8)
    stem { conv(4, 3) as a; save s; conv(4, 3) as b }
    stage { block { parallel add { from s; conv(4, 1) as c } }; block [conv(4, 1) as d]; reuse stages.0.blocks.1 }
}
""").eval()
    x = torch.randn(2, 4, 8, 8)
    st, blocks = m.stem, m.stages[0].blocks
    s = F.conv2d(x, st.a.weight, st.a.bias, padding=1)
    t = F.conv2d(s, st.b.weight, st.b.bias, padding=1)
    t = s + F.conv2d(t, blocks[0].c.weight, blocks[0].c.bias)       # `from s` + the running tensor's branch
    d = blocks[1].d
    t = F.conv2d(F.conv2d(t, d.weight, d.bias), d.weight, d.bias)   # d, then d again by `reuse`
    assert close(m(x), t)


# --- drop path -------------------------------------------------------------------------------------

DROPPY = """
model m(p = 0.5) {
    input image(4, 4)
    stage { block { residual { conv(4, 3) } } }
    drop_path = p
}
"""


def test_drop_path_only_in_training(tmp_path):
    path = write(tmp_path, DROPPY)
    m = composer.build(path)
    conv = m.stages[0].blocks[0].conv
    x = torch.randn(64, 4, 4, 4)
    body = F.conv2d(x, conv.weight, conv.bias, padding=1)

    m.eval()
    first, second = m(x), m(x)
    assert torch.equal(first, second) and close(first, x + body)  # eval: no drop, no rescale

    m.train()
    torch.manual_seed(0)
    out = m(x)
    # each sample is either its shortcut alone (body dropped) or shortcut + body / keep (keep = 0.5)
    dropped = [close(out[i], x[i]) for i in range(64)]
    kept = [close(out[i], x[i] + 2 * body[i]) for i in range(64)]
    assert all(a != b for a, b in zip(dropped, kept))
    assert 0 < sum(dropped) < 64  # both happen: a seeded 50% draw over 64 samples

    zero = composer.build(path, p=0.0).train()
    zc = zero.stages[0].blocks[0].conv
    assert close(zero(x), x + F.conv2d(x, zc.weight, zc.bias, padding=1))  # rate 0: training changes nothing


# --- seeds and names -----------------------------------------------------------------------------


def test_seeds_make_weights_reproducible(tmp_path):
    plan = composer.load(write(tmp_path, RESNETISH))
    a, b, c = build_module(plan, seed=0), build_module(plan, seed=0), build_module(plan, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) == list(sc)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stem.conv.weight"], sc["stem.conv.weight"])
    assert not torch.equal(sa["stages.1.blocks.0.pos_embed.pos"], sc["stages.1.blocks.0.pos_embed.pos"])


def test_building_leaves_the_global_rng_alone(tmp_path):
    plan = composer.load(write(tmp_path, RESNETISH))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_module(plan, seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_state_dict_keys_follow_the_language_names(tmp_path):
    m = built(tmp_path, RESNETISH)
    assert list(m.state_dict()) == [
        "stem.conv.weight", "stem.conv.bias",
        "stem.norm.weight", "stem.norm.bias", "stem.norm.running_mean", "stem.norm.running_var",
        "stem.norm.num_batches_tracked",
        "stages.0.blocks.0.conv.weight", "stages.0.blocks.0.conv.bias",
        "stages.0.blocks.0.norm1.weight", "stages.0.blocks.0.norm1.bias", "stages.0.blocks.0.norm1.running_mean",
        "stages.0.blocks.0.norm1.running_var", "stages.0.blocks.0.norm1.num_batches_tracked",
        "stages.1.downsample.conv.weight", "stages.1.downsample.conv.bias",
        "stages.1.blocks.0.pos_embed.pos",
        "head.norm.weight", "head.norm.bias",
        "head.classifier.weight", "head.classifier.bias",
    ]
    # hand count: conv 3x3 3->8 + bn 8 + conv 3x3 8->8 + bn 8 + conv 2x2 8->16 + pos 16x16 + ln 16 + fc 16->5
    assert n_params(m) == (9 * 3 * 8 + 8) + 16 + (9 * 8 * 8 + 8) + 16 + (4 * 8 * 16 + 16) + 16 * 16 + 32 + (16 * 5 + 5)


def test_build_and_build_module_agree(tmp_path):
    path = write(tmp_path, RESNETISH)
    a = composer.build(path, num_classes=3, seed=4)
    b = build_module(composer.load(path, num_classes=3), seed=4)
    assert a.num_classes == b.num_classes == 3
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- the timm-style API -----------------------------------------------------------------------------


def test_get_classifier_and_reset_classifier(tmp_path):
    m = built(tmp_path, RESNETISH)
    fc = m.get_classifier()
    assert fc is m.head.classifier and fc.weight.shape == (5, 16) and m.num_classes == 5
    assert m.num_features == 16
    stem_before = m.stem.conv.weight.clone()
    m.reset_classifier(3)
    assert m.num_classes == 3 and m.get_classifier().weight.shape == (3, 16)
    assert m.state_dict()["head.classifier.bias"].shape == (3,)
    assert torch.equal(m.stem.conv.weight, stem_before)  # only the classifier is replaced
    x = torch.randn(2, 3, 16, 16)
    assert m.eval()(x).shape == (2, 3)
    m.reset_classifier(0)  # no classifier: the model gives its pre-logits
    assert close(m(x), m.forward_head(m.forward_features(x), pre_logits=True))
    assert m(x).shape == (2, 16)


def test_pre_logits_leaves_only_the_classifier_out(tmp_path):
    m = built(tmp_path, RESNETISH).eval()
    x = torch.randn(2, 3, 16, 16)
    feats = m.forward_features(x)
    assert feats.shape == (2, 16, 16)  # tokens: 4x4 grid, 16 channels
    pre = m.forward_head(feats, pre_logits=True)
    n = m.head.norm
    assert close(pre, F.layer_norm(feats.mean(1), (16,), n.weight, n.bias, n.eps))
    assert close(m.forward_head(feats), m.get_classifier()(pre))


def test_features_only_shapes_match_the_plan(tmp_path):
    path = write(tmp_path, RESNETISH)
    plan = composer.load(path)
    f = composer.build(path, features_only=True).eval()
    assert not hasattr(f, "head")  # no head built for a backbone
    feats = f(torch.randn(2, 3, 16, 16))
    # stage 0: (8, 8x8) map; stage 1: 4x4 tokens of 16 channels, given back as a (16, 4x4) map
    assert [tuple(t.shape) for t in feats] == [(2, 8, 8, 8), (2, 16, 4, 4)]
    assert [(st.y.channels, st.y.spatial) for st in plan.stages] == [(8, (8, 8)), (16, (4, 4))]
    assert [fi["num_chs"] for fi in f.feature_info] == [8, 16]
    assert [fi["reduction"] for fi in f.feature_info] == [2, 4]
    last = composer.build(path, features_only=True, out_indices=(-1,)).eval()
    assert [tuple(t.shape) for t in last(torch.randn(1, 3, 16, 16))] == [(1, 16, 4, 4)]


def test_features_only_returns_named_outputs(tmp_path):
    m = built(tmp_path, """
model m {
    input image(3, 16)
    stem { conv(4, 3, stride = 2) as a; save early }
    stage { block { conv(8, 3, stride = 2) as b; save late }; block [conv(8, 1) as c] }
    outputs = ["early", "late"]
}
""", features_only=True).eval()
    x = torch.randn(2, 3, 16, 16)
    early, late = m(x)
    a, b = m.stem.a, m.stages[0].blocks[0].b
    want_early = F.conv2d(x, a.weight, a.bias, stride=2, padding=1)
    assert close(early, want_early)
    # `late` is saved before block c runs: c's output is not a feature
    assert close(late, F.conv2d(want_early, b.weight, b.bias, stride=2, padding=1))
    assert [(fi["module"], fi["num_chs"], fi["reduction"]) for fi in m.feature_info] == [
        ("early", 4, 2), ("late", 8, 4)]
