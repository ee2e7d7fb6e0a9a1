"""The `rearrange` op: einops-style patterns over a map, checked against the same moves written by
hand with torch.permute / reshape (no einops), its shape rule, and its located errors."""

from __future__ import annotations

import pytest
import torch

import composer
from composer.ops import OPS
from composer.shapes import Shape, ShapeError, TensorRef
from helpers import write


def _run(pattern, t, sizes=()):
    op = OPS["rearrange"](pattern=pattern, sizes=[list(s) for s in sizes])
    x = Shape(t.shape[1], tuple(t.shape[2:]))
    y = op.infer(x)
    out = op.build(x, y)(t)
    assert tuple(out.shape) == (t.shape[0], y.channels, *y.spatial)
    assert op.params(x, y) == 0 and op.macs(x, y) == 0
    return out


CASES = [
    # pattern, input shape (B first), sizes, the same by hand
    ("c t f -> (c f) t", (2, 3, 5, 4), (), lambda t: t.permute(0, 1, 3, 2).reshape(2, 12, 5)),
    ("f t -> 1 t f", (2, 80, 7), (), lambda t: t.permute(0, 2, 1).unsqueeze(1)),
    ("c l -> 1 l c", (2, 7, 96), (), lambda t: t.transpose(1, 2)[:, None]),
    ("c h w -> c w h", (2, 3, 4, 5), (), lambda t: t.transpose(2, 3)),
    ("c h w -> c (h w)", (2, 3, 4, 5), (), lambda t: t.flatten(2)),
    ("c (n p) v -> (c p) n v", (2, 3, 12, 2), [("p", 4)],
     lambda t: t.reshape(2, 3, 3, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, 12, 3, 2)),
    ("(g c) l -> c l g", (2, 6, 5), [("g", 2)], lambda t: t.reshape(2, 2, 3, 5).permute(0, 2, 3, 1)),
    ("c l 1 -> c l", (2, 4, 6, 1), (), lambda t: t[..., 0]),
    ("() l -> l 1", (2, 1, 6), (), lambda t: t.reshape(2, 6, 1)),
    ("c d h w -> (d c) h w", (2, 2, 3, 4, 5), (), lambda t: t.transpose(1, 2).reshape(2, 6, 4, 5)),
    ("c (h a) (w b) -> (c a b) h w", (2, 3, 4, 6), [("a", 2), ("b", 2)],   # = pixel_unshuffle(2)
     lambda t: torch.nn.functional.pixel_unshuffle(t, 2)),
]


@pytest.mark.parametrize("pattern, shape, sizes, want", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_by_hand(pattern, shape, sizes, want):
    t = torch.randn(*shape)
    assert torch.equal(_run(pattern, t, sizes), want(t))


def test_shape_rule_by_hand():
    op = OPS["rearrange"](pattern="c t f -> (c f) t")
    assert op.infer(Shape(144, (249, 19))) == Shape(144 * 19, (249,))
    assert OPS["rearrange"](pattern="c l -> 1 l c").infer(Shape(7, (96,))) == Shape(1, (96, 7))
    assert OPS["rearrange"](pattern="c (n p) v -> (c p) n v", sizes=[["p", 16]]).infer(Shape(4, (96, 7))) \
        == Shape(64, (6, 7))


def test_views_where_possible():
    t = torch.randn(2, 3, 4, 5)
    merged = _run("c h w -> c (h w)", t)               # a pure merge: one view of the input
    assert merged.data_ptr() == t.data_ptr() and merged._base is t
    swapped = _run("c h w -> c w h", t)                # a permute: a (strided) view
    assert swapped.data_ptr() == t.data_ptr() and not swapped.is_contiguous()
    same = _run("c h w -> c h w", t)
    assert same is t


@pytest.mark.parametrize("pattern, x, sizes, words", [
    ("c t f -> (c g) t", Shape(3, (4, 5)), [], "unknown axis 'g'"),
    ("c t t -> c t", Shape(3, (4, 5)), [], "appears twice on the left"),
    ("c t -> (c t) t", Shape(3, (4,)), [], "appears twice on the right"),
    ("c t f -> c t", Shape(3, (4, 5)), [], "'f' of the left side is missing"),
    ("c t -> c t", Shape(3, (4, 5)), [], "has 2 axes but the input map has 3"),
    ("c (t p) -> (c p) t", Shape(3, (10,)), [["p", 4]], "not divisible"),
    ("c (t p) -> (c p) t", Shape(3, (12,)), [["p", 4], ["t", 4]], "has size 12, but t=4 * p=4 = 16"),
    ("c 1 -> c", Shape(3, (4,)), [], "has size 4, but 1=1 = 1"),
    ("c (t p) -> (c p) t", Shape(3, (12,)), [], "cannot tell the sizes of t, p"),
    ("c t -> c t", Shape(3, (12,)), [["q", 2]], "does not have"),
    ("c t -> c t", Shape(3, (12,)), [["q"]], "pair"),
    ("c t f", Shape(3, (4, 5)), [], "exactly one '->'"),
    ("c (t (f)) -> c t f", Shape(3, (4, 5)), [], "nested"),
    ("c t) -> c t", Shape(3, (4,)), [], "without '('"),
    ("c t -> c 2 t", Shape(3, (4,)), [], "number 2"),
    ("c t -> c + t", Shape(3, (4,)), [], "unexpected '+'"),
    ("c t f -> (c t f)", Shape(3, (4, 5)), [], "the right side has 1 axes"),
    ("c t -> c t", Shape(3, (4,), "tokens"), [], "needs a map"),
    ("c -> c 1", Shape(3, (), "vector"), [], "needs a map"),
])
def test_errors(pattern, x, sizes, words):
    with pytest.raises(ShapeError) as info:
        OPS["rearrange"](pattern=pattern, sizes=sizes).infer(x)
    assert words in info.value.message, info.value.message
    assert info.value.message.startswith("rearrange")


def test_errors_carry_hints():
    with pytest.raises(ShapeError) as info:
        OPS["rearrange"](pattern="c t -> c t").infer(Shape(3, (4,), "tokens"))
    assert "to_map" in info.value.hint
    with pytest.raises(ShapeError) as info:
        OPS["rearrange"](pattern="c t -> c t").infer(Shape(3, (4, 5)))
    assert "channel axis" in info.value.hint


def test_in_a_blueprint_moves_signal_channels_and_back(tmp_path):
    path = write(tmp_path, (
        "model m {\n"
        "    input signal(7, 12)\n"
        "    stem { rearrange(\"c l -> 1 l c\") as to_grid; conv(4, [3, 1]) as conv }\n"    # (1, 12x7) -> (4, 12x7)
        "    stage { block rearrange(\"d (n p) v -> (d p) n v\", sizes = [[\"p\", 3]]) }\n"  # (12, 4x7)
        "    head { rearrange(\"c n v -> (c n) v\"); linear(5) as fc }\n"                    # (48, 7) -> (5, 7)
        "}\n"))
    plan = composer.load(f"{path}:m")
    assert str(plan.stem.y) == "(4, 12x7)" and str(plan.stages[0].y) == "(12, 4x7)"
    assert str(plan.head.y) == "(5, 7)"
    assert plan.params == (4 * 3 + 4) + (48 * 5 + 5)
    model = composer.build(f"{path}:m")
    t = torch.randn(2, 7, 12)
    with torch.no_grad():
        y = model(t)
        # by hand: the grid (B, 1, L, N), the conv, patches of 3 steps, the linear over (c n)
        g = model.stem.conv(t.transpose(1, 2)[:, None])                        # (2, 4, 12, 7)
        p = g.reshape(2, 4, 4, 3, 7).permute(0, 1, 3, 2, 4).reshape(2, 48, 7)  # (d p) n v, then (c n) v
        fc = model.head.fc
        want = torch.einsum("bcv,oc->bov", p, fc.weight) + fc.bias[None, :, None]
    assert y.shape == (2, 5, 7)
    torch.testing.assert_close(y, want)


def test_located_error_in_a_blueprint(tmp_path):
    path = write(tmp_path, (
        "model bad {\n"
        "    input signal(80, 100)\n"
        "    stem rearrange(\"c t f -> (c f) t\")\n"
        "}\n"), "bad.arch")
    with pytest.raises(composer.ComposerError) as info:
        composer.load(f"{path}:bad")
    text = info.value.render()
    assert "bad.arch:3:10" in text and "has 3 axes but the input map has 2" in text


# ----------------------------------------------------------------------------- back onto a grid: `like`

PATCHES = "c (h ph) (w pw) -> c (ph pw) (h w)"
BACK = "c (ph pw) (h w) -> c (h ph) (w pw)"
ROUND_TRIP = f"""
model m(img_size = 8) {{
    input image(3, img_size)
    stem conv(4, 3) as conv
    stage {{
        block {{
            grid = identity
            rearrange("{PATCHES}", sizes = [["ph", 2], ["pw", 2]])
            save rows
            rearrange("{BACK}", sizes = [["ph", 2], ["pw", 2]], like = grid)
        }}
    }}
    outputs = ["rows"]
}}
"""


def test_like_puts_the_map_back_on_its_grid_at_every_size(tmp_path):
    """A (4, 8x12) map laid out as (4, 4x24) (rows: the offsets inside 2x2 patches; columns: the
    patches) comes back on its grid; h and w, which the rows alone do not tell, come from `grid`,
    at the build size and at others (by hand: reshape/permute, as timm's MobileViTv2 block)."""
    path = write(tmp_path, ROUND_TRIP)
    plan = composer.load(f"{path}:m", img_size=[8, 12])
    assert str(plan.stages[0].y) == "(4, 8x12)"
    model = composer.build(f"{path}:m", img_size=[8, 12]).eval()
    features = composer.build(f"{path}:m", img_size=[8, 12], features_only=True).eval()
    features.load_state_dict(model.state_dict())
    for h, w in [(8, 12), (6, 10), (16, 4)]:
        t = torch.randn(2, 3, h, w)
        with torch.no_grad():
            x = model.stem.conv(t)
            rows = x.reshape(2, 4, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 4, 4, h * w // 4)
            assert torch.equal(features(t)[0], rows)
            assert torch.equal(model(t), x)


def test_like_shape_rule_and_errors():
    t = TensorRef("g", "g", None, Shape(4, (6, 10)))
    back = OPS["rearrange"](pattern=BACK, sizes=[["ph", 2], ["pw", 2]], like=t)
    assert back.infer(Shape(4, (4, 15))) == Shape(4, (6, 10))
    with pytest.raises(ShapeError, match="cannot tell the sizes of h, w"):
        OPS["rearrange"](pattern=BACK, sizes=[["ph", 2], ["pw", 2]]).infer(Shape(4, (4, 15)))
    with pytest.raises(ShapeError, match="has size 16, but") as info:  # 4x16 does not come from a 6x10 grid
        back.infer(Shape(4, (4, 16)))
    assert "h, w from the grid of `like`, 6x10" in str(info.value)  # h = 6 / 2, w = 10 / 2: 15, not 16
    flat = TensorRef("f", "f", None, Shape(4, (60,)))
    with pytest.raises(ShapeError, match="2 spatial axes, but like = f has a 1-D grid"):
        OPS["rearrange"](pattern=BACK, sizes=[["ph", 2], ["pw", 2]], like=flat).infer(Shape(4, (4, 15)))
    tokens = TensorRef("k", "k", None, Shape(4, (6, 10), "tokens"))  # (B, 60, 4) at run time: no grid to read
    with pytest.raises(ShapeError, match="like = k must be a map, got tokens"):
        OPS["rearrange"](pattern=BACK, sizes=[["ph", 2], ["pw", 2]], like=tokens).infer(Shape(4, (4, 15)))


# ----------------------------------------------------------------------------- split_channels

def test_split_channels_are_views_of_the_parts(tmp_path):
    path = write(tmp_path, """
model m {
    input image(3, 6)
    stem conv(7, 1) as conv
    stage {
        block {
            a, b, c = split_channels(widths = [1, 2, 4])
            from c
            parallel concat { identity; from a; from b }
        }
    }
}
""")
    model = composer.build(f"{path}:m").eval()
    t = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        x = model.stem.conv(t)
        assert torch.equal(model(t), torch.cat([x[:, 3:], x[:, :1], x[:, 1:3]], 1))
    with pytest.raises(ShapeError, match="widths is empty"):
        OPS["split_channels"](widths=[]).infer(Shape(7, (6, 6)))
    with pytest.raises(ShapeError, match="add up to 6 channels, but the input has 7"):
        OPS["split_channels"](widths=[1, 2, 3], parts=3).infer(Shape(7, (6, 6)))
    with pytest.raises(ShapeError, match="needs a map or tokens, got heads") as info:
        OPS["split_channels"](parts=2).infer(Shape(8, (6,), "heads", heads=2))
    assert "split_heads" in info.value.hint
