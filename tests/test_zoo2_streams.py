"""Two-stream rows of Zoo II: Mobile-Former (row 32) and ViT-Adapter (row 33), and the ops they
added: `learned_tokens`, `dynamic_relu`, `attend` (composer/ops/dynamic.py) and
`deformable_attention`, `per_level`, `select_level` (composer/ops/deform_attn.py), `level_embed`
(composer/ops/level_embed.py).

Parameter counts are the official code's own (`sum(p.numel())` of AAboys/MobileFormer's
`mobile_former_26m`/`_52m`/`_508m` and czczup/ViT-Adapter's `ViTAdapter` backbone with the tiny/small
detection configs, measured by running that code). The ops are compared with straightforward
implementations written here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import composer
from composer.ops import OPS
from composer.shapes import Shape, ShapeError

MF = "blueprints/mobile_former.arch"
VA = "blueprints/vit_adapter.arch"

# (target, official count): every count is exact
COUNTS = [
    (f"{MF}:mobile_former_26m", 3_232_788),   # MODELS.md row 32
    (f"{MF}:mobile_former_52m", 3_469_092),   # official code, group_num 1
    (f"{MF}:mobile_former_508m", 13_976_976),  # official code (README: 14.0M)
    # ViT-Adapter: exact (the level embedding, 3 x dim; the class token's unused position row, dim;
    # the 2x2 stride-2 transposed conv of the pyramid, as the reference has them)
    (f"{VA}:vit_adapter_t", 7_966_640),       # MODELS.md row 33
    (f"{VA}:vit_adapter_s", 27_503_888),      # official code, DeiT-S
]


@pytest.mark.parametrize("target, official", COUNTS, ids=[c[0].split(":")[1] for c in COUNTS])
def test_built_parameter_count_within_one_percent(target, official):
    model = composer.build(target)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - official) <= 0.01 * official, (n, official)
    assert composer.load(target).params == n


def test_exact_counts_where_the_forms_match():
    for target, official in COUNTS:
        assert composer.load(target).params == official, target


def test_mobile_former_forward_small():
    model = composer.build(f"{MF}:mobile_former_26m", num_classes=10, img_size=64).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_vit_adapter_forward_small_and_pyramid():
    model = composer.build(f"{VA}:vit_adapter_t", img_size=64).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 192)
    feats = composer.build(f"{VA}:vit_adapter_t", img_size=64, features_only=True).eval()
    with torch.no_grad():
        maps = feats(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(192, 16, 16), (192, 8, 8), (192, 4, 4), (192, 2, 2)]
    assert [f["reduction"] for f in feats.feature_info] == [4, 8, 16, 32]


def test_vit_adapter_level_embedding_is_added_per_level():
    # the reference: c2 + level_embed[0], c3 + level_embed[1], c4 + level_embed[2], then joined.
    # With the level projections zeroed, the joined sequence c is the level embedding alone: at 64 px
    # 8x8 tokens of row 0, 4x4 of row 1, 2x2 of row 2
    model = composer.build(f"{VA}:vit_adapter_t", img_size=64).eval()
    embed = model.stem.level_embed.embed
    assert tuple(embed.shape) == (3, 192)
    with torch.no_grad():
        embed.normal_()
        for fc in (model.stem.fc2, model.stem.fc3, model.stem.fc4):
            fc.weight.zero_()
            fc.bias.zero_()
    seen = {}
    hook = model.stem.level_embed.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    hook.remove()
    expected = torch.cat([embed[0].expand(64, 192), embed[1].expand(16, 192), embed[2].expand(4, 192)])
    assert seen["out"].shape == (2, 84, 192)
    assert torch.equal(seen["inp"], torch.zeros(2, 84, 192))
    torch.testing.assert_close(seen["out"], expected.expand(2, -1, -1))
    # the op alone: x + row l on level l (levels 2, 0.5, 1 of a 4x2 grid: 8x4, 2x1, 4x2 tokens)
    op = OPS["level_embed"](levels=[2, 0.5, 1], std=0.5)
    x = Shape(5, (4, 2), "tokens", 34)
    assert op.infer(x) == x and op.params(x, x) == 15
    m = op.build(x, x)
    t = torch.randn(3, 42, 5)
    rows = torch.cat([m.embed[0].expand(32, 5), m.embed[1].expand(2, 5), m.embed[2].expand(8, 5)])
    torch.testing.assert_close(m(t), t + rows)
    with pytest.raises(ShapeError):
        op.infer(Shape(5, (4, 2), "tokens", 33))


# ----------------------------------------------------------------------------- dynamic.py

def test_learned_tokens_ignore_the_input_values():
    op = OPS["learned_tokens"](dim=5, count=[1, 3], std=1.0)
    x = Shape(3, (4, 4), "map")
    y = op.infer(x)
    assert y == Shape(5, (1, 3), "tokens") and op.params(x, y) == 15
    m = op.build(x, y)
    a, b = m(torch.randn(2, 3, 4, 4)), m(torch.zeros(2, 3, 4, 4))
    assert a.shape == (2, 3, 5) and torch.equal(a, b) and torch.equal(a[0], m.tokens)


def test_dynamic_relu_is_max_of_two_slopes():
    op = OPS["dynamic_relu"](pieces=2, scale=2.0)
    x = Shape(6, (3, 4), "tokens", 2)
    assert op.infer(x) == Shape(6, (3, 4), "tokens")
    m = op.build(x, op.infer(x))
    coef = torch.rand(2, 2, 6)
    feat = torch.randn(2, 12, 6)
    out = m(torch.cat([coef, feat], 1))
    # Mobile-Former's DyReLU: a1 = (c1 - 0.5) * 2 + 1, a2 = (c2 - 0.5) * 2, y = max(x a1, x a2)
    a1 = (coef[:, :1] - 0.5) * 2 + 1
    a2 = (coef[:, 1:] - 0.5) * 2
    expected = torch.where(feat * a1 > feat * a2, feat * a1, feat * a2)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ShapeError):
        op.infer(Shape(6, (3, 4), "tokens", 1))


@pytest.mark.parametrize("split", [False, True])
def test_attend_is_softmax_attention_without_projections(split):
    heads, c, prefix, n = 2, 8, 6, 5
    op = OPS["attend"](heads=heads, values="split" if split else "same")
    x = Shape(c, (n,), "tokens", prefix)
    assert op.infer(x) == Shape(c, (n,), "tokens") and op.params(x, x) == 0
    m = op.build(x, op.infer(x))
    t = torch.randn(2, prefix + n, c)
    out = m(t)
    q = t[:, prefix:]
    k, v = (t[:, : prefix // 2], t[:, prefix // 2: prefix]) if split else (t[:, :prefix], t[:, :prefix])
    d = c // heads
    parts = []
    for h in range(heads):
        qh, kh, vh = q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d], v[..., h * d:(h + 1) * d]
        parts.append(torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), -1) @ vh)
    torch.testing.assert_close(out, torch.cat(parts, -1))


# ----------------------------------------------------------------------------- deform_attn.py

def _bilinear(img, x, y):
    """img (C, H, W); x, y pixel coordinates (align_corners=False: centre of pixel j at j); zeros outside."""
    c, h, w = img.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(c)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def _reference_msda(m, t, value_grids, query_grids):
    """Deformable DETR's multi-scale deformable attention, one query, head, level and point at a time."""
    heads, points, levels = m.heads, m.points, len(value_grids)
    nv = sum(h * w for h, w in value_grids)
    value = m.value_proj(t[:, :nv])
    q = t[:, nv:]
    b, nq, _ = q.shape
    d = value.shape[-1] // heads
    refs = [((j + 0.5) / w, (i + 0.5) / h) for h, w in query_grids for i in range(h) for j in range(w)]
    offsets = m.sampling_offsets(q).view(b, nq, heads, levels, points, 2)
    weights = m.attention_weights(q).view(b, nq, heads, levels * points).softmax(-1).view(b, nq, heads, levels, points)
    out = torch.zeros(b, nq, heads * d)
    for bi in range(b):
        for qi in range(nq):
            for h in range(heads):
                start = 0
                acc = torch.zeros(d)
                for lv, (gh, gw) in enumerate(value_grids):
                    img = value[bi, start:start + gh * gw, h * d:(h + 1) * d].T.reshape(d, gh, gw)
                    start += gh * gw
                    for p in range(points):
                        lx = refs[qi][0] + offsets[bi, qi, h, lv, p, 0] / gw
                        ly = refs[qi][1] + offsets[bi, qi, h, lv, p, 1] / gh
                        acc += weights[bi, qi, h, lv, p] * _bilinear(img, float(lx) * gw - 0.5, float(ly) * gh - 0.5)
                out[bi, qi, h * d:(h + 1) * d] = acc
    return m.output_proj(out)


@pytest.mark.parametrize("values, queries, grid", [([2, 1], [1], (2, 3)), ([2], [2, 1], (2, 2))])
def test_deformable_attention_matches_a_straightforward_implementation(values, queries, grid):
    torch.manual_seed(0)
    c, heads = 8, 2
    vg = [tuple(int(g * s) for g in grid) for s in values]
    qg = [tuple(int(g * s) for g in grid) for s in queries]
    extra = sum(h * w for h, w in vg) + sum(h * w for h, w in qg[:-1])
    x = Shape(c, grid, "tokens", extra)
    op = OPS["deformable_attention"](heads=heads, points=3, values=values, queries=queries)
    y = op.infer(x)
    assert y == Shape(c, grid, "tokens", extra - sum(h * w for h, w in vg))
    m = op.build(x, y)
    with torch.no_grad():  # move the offsets and weights away from their init, some points fall outside
        for p in m.parameters():
            p.normal_(0, 0.5)
    assert op.params(x, y) == sum(p.numel() for p in m.parameters())
    t = torch.randn(2, x.tokens, c)
    with torch.no_grad():
        torch.testing.assert_close(m(t), _reference_msda(m, t, vg, qg), atol=1e-5, rtol=1e-4)


def test_deformable_attention_init_as_deformable_detr():
    op = OPS["deformable_attention"](heads=4, points=2, values=[1])
    x = Shape(8, (2, 2), "tokens", 4)
    m = op.build(x, op.infer(x))
    bias = m.sampling_offsets.bias.view(4, 1, 2, 2)
    # head h points along (cos, sin)(2 pi h / 4) scaled to max-norm 1, times point index + 1
    torch.testing.assert_close(bias[:, 0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 0, 1], 2 * bias[:, 0, 0])
    assert not m.sampling_offsets.weight.any() and not m.attention_weights.weight.any()


def test_deformable_attention_level_errors():
    op = OPS["deformable_attention"](heads=2, values=[2, 1, 0.5])
    with pytest.raises(ShapeError, match="tokens ahead"):
        op.infer(Shape(8, (4, 4), "tokens", 10))
    with pytest.raises(ShapeError, match="whole size"):
        op.infer(Shape(8, (3, 3), "tokens", 36 + 9))


def test_per_level_runs_one_conv_on_each_level_and_select_level_folds_back():
    torch.manual_seed(0)
    c = 4
    x = Shape(c, (2, 2), "tokens", 16 + 64)
    op = OPS["per_level"](op=OPS["conv"](out=c, kernel=3, groups=c), levels=[4, 2, 1])
    assert op.infer(x) == x and op.params(x, x) == c * 9 + c
    m = op.build(x, x)
    t = torch.randn(2, x.tokens, c)
    out = m(t)
    conv = m.op
    start = 0
    for side in (8, 4, 2):
        n = side * side
        level = t[:, start:start + n].transpose(1, 2).reshape(2, c, side, side)
        torch.testing.assert_close(out[:, start:start + n], conv(level).flatten(2).transpose(1, 2))
        sel = OPS["select_level"](index=(8, 4, 2).index(side), levels=[4, 2, 1])
        assert sel.infer(x) == Shape(c, (side, side), "tokens")
        torch.testing.assert_close(sel.build(x, sel.infer(x))(t), t[:, start:start + n])
        start += n


def test_transposed_conv_as_conv_and_pixel_shuffle():
    """The pyramid's up-sampling: ConvTranspose2d(d, d, 2, 2) equals conv(4d, 1) + pixel_shuffle(2)
    with weight[o*4 + i*2 + j, c] = W[c, o, i, j] and bias repeated (how the blueprint writes it)."""
    torch.manual_seed(0)
    d = 3
    up = torch.nn.ConvTranspose2d(d, d, 2, 2)
    x = torch.randn(1, d, 4, 5)
    w = up.weight.permute(1, 2, 3, 0).reshape(4 * d, d, 1, 1)
    y = F.pixel_shuffle(F.conv2d(x, w, up.bias.repeat_interleave(4)), 2)
    torch.testing.assert_close(y, up(x))
