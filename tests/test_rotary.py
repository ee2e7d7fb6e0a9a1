"""Rotary position embeddings (issue 14): the `rotary` op against the rotary equation written out
here (RoFormer's 1-D form, the 2-D axial form: half of the frequencies on the rows, half on the
columns) and against timm's RotaryEmbeddingCat / apply_rot_embed_cat; `rotary_attention`
(blueprints/lib/rotary_mixers.arch) against timm's EvaAttention with the same weights; the
rope_vit family (blueprints/rope_vit.arch) against timm's vit_base_patch16_rope_reg1_gap_256:
parameter count, and logits after porting at 256x256 and at another size."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, apply_rot_embed_cat
from timm.models.eva import EvaAttention

import composer
from composer.diagnostics import ComposerError
from composer.ops import OPS
from composer.port import from_timm
from composer.shapes import Shape, ShapeError
from helpers import n_params, perturb, write

GEN = torch.Generator().manual_seed(0)


def rotary(grid, width, prefix=0, heads=2, **kw):
    """The module of rotary(**kw) for heads (B, heads, prefix + prod(grid), width) on `grid`."""
    x = Shape(width, tuple(grid), "heads", prefix, heads=heads)
    op = OPS["rotary"](**kw)
    return op.build(x, op.infer(x))


def heads(grid, width, prefix=0, batch=2, h=2):
    return torch.randn(batch, h, prefix + math.prod(grid), width, generator=GEN, dtype=torch.float64).float()


def rotate_pairs(x, first, second, angle):
    """The rotation of each pair (x[first[j]], x[second[j]]) by angle[..., j], as a complex product:
    (a + ib) e^{iφ} (RoFormer, eq. 13-15)."""
    z = torch.complex(x[..., first].double(), x[..., second].double()) * torch.polar(torch.ones_like(angle), angle)
    out = x.double().clone()
    out[..., first], out[..., second] = z.real, z.imag
    return out.float()


def test_one_axis_is_roformer():
    """RoFormer: token m, pair i (channels 2i, 2i+1) rotated by m θ_i, θ_i = 10000^(-2i/d)."""
    d, grid = 16, (3, 5)
    x = heads(grid, d)
    theta = 10000.0 ** (-2 * torch.arange(d // 2, dtype=torch.float64) / d)
    m = torch.arange(15, dtype=torch.float64)  # the flattened token index
    expected = rotate_pairs(x, list(range(0, d, 2)), list(range(1, d, 2)), m[:, None] * theta)
    got = rotary(grid, d, axes=1)(x, torch.Size(grid))
    assert (got - expected).abs().max() < 1e-5


def test_one_axis_scores_depend_on_offset_only():
    """The point of the rotation: (R_m q)·(R_n k) = q·R_{n-m} k, the same for every m at a given offset."""
    d = 8
    q, k = torch.randn(d, generator=GEN), torch.randn(d, generator=GEN)
    mod = rotary((40,), d, axes=1, heads=1)
    rq = mod(q.expand(1, 1, 40, d).contiguous(), torch.Size([40]))[0, 0]
    rk = mod(k.expand(1, 1, 40, d).contiguous(), torch.Size([40]))[0, 0]
    dots = torch.stack([rq[m] @ rk[m + 3] for m in range(30)])
    assert (dots - dots[0]).abs().max() < 1e-4
    assert (rq[0] @ rk[5] - dots[0]).abs() > 1e-3  # another offset, another score


@pytest.mark.parametrize("pairs", ["interleaved", "halves"])
def test_two_axes_is_axial(pairs):
    """2-D axial: d/4 frequencies θ_j = base^(-j / (d/4)); the first d/4 pairs rotate by the row r,
    the next d/4 by the column c. `interleaved`: pair j is channels (2j, 2j+1); `halves`: (j, j + d/2)."""
    d, grid, base = 16, (3, 4), 100.0
    x = heads(grid, d, prefix=1)
    theta = base ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    r, c = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    angle = torch.cat([r.reshape(-1, 1).double() * theta, c.reshape(-1, 1).double() * theta], dim=-1)  # (N, d/2)
    if pairs == "interleaved":
        first, second = list(range(0, d, 2)), list(range(1, d, 2))
    else:
        first, second = list(range(d // 2)), list(range(d // 2, d))
    expected = x.clone()
    expected[:, :, 1:] = rotate_pairs(x[:, :, 1:], first, second, angle)  # the prefix token stays
    got = rotary(grid, d, prefix=1, axes=2, base=base, pairs=pairs)(x, torch.Size(grid))
    assert torch.equal(got[:, :, :1], x[:, :, :1])
    assert (got - expected).abs().max() < 1e-5


def test_reference_grid_scales_coordinates():
    """With reference [8, 8], a 4x16 grid's coordinates are r * 8/4 and c * 8/16: the same as
    rotating with those coordinates written out (equation), and different from no reference."""
    d, grid = 8, (4, 16)
    x = heads(grid, d)
    theta = 10000.0 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    r, c = torch.meshgrid(torch.arange(4.0) * 2, torch.arange(16.0) * 0.5, indexing="ij")
    angle = torch.cat([r.reshape(-1, 1).double() * theta, c.reshape(-1, 1).double() * theta], dim=-1)
    expected = rotate_pairs(x, list(range(0, d, 2)), list(range(1, d, 2)), angle)
    mod = rotary(grid, d, axes=2, reference=[8, 8])
    assert (mod(x, torch.Size(grid)) - expected).abs().max() < 1e-5
    assert (rotary(grid, d, axes=2)(x, torch.Size(grid)) - expected).abs().max() > 1e-2


def test_runtime_grid_not_build_grid():
    """Built for 4x4, the module rotates by the grid it is given at run time (cached per grid)."""
    d = 8
    built = rotary((4, 4), d, axes=2)
    fresh = rotary((3, 5), d, axes=2)
    x = heads((3, 5), d)
    assert torch.equal(built(x, torch.Size((3, 5))), fresh(x, torch.Size((3, 5))))
    assert torch.equal(built(x, torch.Size((3, 5))), built(x, torch.Size((3, 5))))  # from the cache
    assert not torch.equal(built(x, torch.Size((5, 3))), fresh(x, torch.Size((3, 5))))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(rotate_half=True),
    dict(ref_feat_shape=(16, 16)),
    dict(ref_feat_shape=(7, 9), temperature=100.0, grid_offset=0.5),
    dict(grid_indexing="xy", rotate_half=True),
])
@pytest.mark.parametrize("grid", [(16, 16), (6, 10)])
def test_equals_timm_rotary_embedding_cat(kw, grid):
    """timm's RotaryEmbeddingCat (index grid, in_pixels=False: EVA's and the SBB RoPE ViTs')
    applied with apply_rot_embed_cat on the grid tokens, the prefix tokens left alone."""
    d, prefix = 32, 2
    ref = RotaryEmbeddingCat(d, in_pixels=False, **kw)
    ours = rotary((16, 16), d, prefix=prefix, axes=2, base=kw.get("temperature", 10000.0),
                  pairs="halves" if kw.get("rotate_half") else "interleaved",
                  indexing=kw.get("grid_indexing", "ij"), offset=kw.get("grid_offset", 0.0),
                  reference=list(kw["ref_feat_shape"]) if "ref_feat_shape" in kw else None)
    x = heads(grid, d, prefix=prefix)
    emb = ref.get_embed(shape=list(grid))
    expected = torch.cat([x[:, :, :prefix], apply_rot_embed_cat(x[:, :, prefix:], emb,
                                                                half=kw.get("rotate_half", False))], dim=2)
    assert (ours(x, torch.Size(grid)) - expected).abs().max() < 1e-5


def _mixer(tmp_path, call, grid=(4, 6), dim=64, name="m.arch"):
    text = f"""import "lib/rotary_mixers"
model m {{
    input image(3, [{8 * grid[0]}, {8 * grid[1]}])
    stem {{ patch_embed({dim}, 8); class_token() }}
    stage {{ block {{ {call} as attn }} }}
    head {{ global_pool("avg"); classifier(10) }}
}}
"""
    model = composer.build(write(tmp_path, text, name)).eval()  # a file per model: loads are cached per path
    return dict(model.named_modules())["stages.0.blocks.0.attn"], model


@pytest.mark.parametrize("grid", [(4, 6), (5, 3)])
def test_rotary_attention_equals_timm_eva_attention(tmp_path, grid):
    """`rotary_attention(qkv_bias = "qv")` against timm's EvaAttention (fused qkv, q and v biases,
    one prefix token unrotated) with the same weights and timm's rope for the grid, built at 4x6
    and run at `grid`."""
    dim, h = 64, 4
    ours, _ = _mixer(tmp_path, f'rotary_attention({dim}, {h}, qkv_bias = "qv", '
                               'rope = rotary(axes = 2, reference = [4, 6]))')
    ref = EvaAttention(dim, num_heads=h, qkv_bias=True, num_prefix_tokens=1, scale_norm=False).eval()
    with torch.no_grad():
        ours.q_bias.bias.normal_()
        ours.v_bias.bias.normal_()
        ref.qkv.weight.copy_(ours.qkv.weight)
        ref.q_bias.copy_(ours.q_bias.bias)
        ref.v_bias.copy_(ours.v_bias.bias)
        ref.proj.load_state_dict(ours.proj.state_dict())
    rope = RotaryEmbeddingCat(dim // h, in_pixels=False, ref_feat_shape=(4, 6)).get_embed(shape=list(grid))
    x = torch.randn(2, 1 + math.prod(grid), dim, generator=GEN)
    with torch.no_grad():
        expected = ref(x, rope=rope)
        got = ours(x, {" grid": torch.Size(grid)})
    assert (got - expected).abs().max() < 1e-5


def test_rotary_attention_without_rope_differs(tmp_path):
    """The rotation is not the identity inside the composite: q and k rotated change the output."""
    ours, _ = _mixer(tmp_path, "rotary_attention(64, 4)")
    plain, _ = _mixer(tmp_path, "rotary_attention(64, 4, rope = identity)", name="plain.arch")
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 25, 64, generator=GEN)
    with torch.no_grad():
        a, b = ours(x, {" grid": torch.Size((4, 6))}), plain(x, {" grid": torch.Size((4, 6))})
    assert (a - b).abs().max() > 0.01 * b.abs().max()


# ----------------------------------------------------------------------------- the family

TIMM_NAME = "vit_base_patch16_rope_reg1_gap_256"


def test_rope_vit_parameter_count_equals_timm():
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(TIMM_NAME, pretrained=False)
    assert composer.load("rope_vit_b").reference == f"timm:{TIMM_NAME}"
    assert composer.check("rope_vit_b").params == n_params(ref) == 86_425_576


@pytest.mark.parametrize("size", [(256, 256), (192, 224)])
def test_rope_vit_ported_gives_timm_logits(size):
    """A 2-block variant of both, ported: the same logits at 256x256 and at 192x224 (timm with
    dynamic_img_size: its rope rebuilt for the 12x14 grid, coordinates scaled to 16x16; ours with the
    grid seen at run time)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAME, pretrained=False, num_classes=10, depth=2,
                            dynamic_img_size=size != (256, 256)).eval()
    perturb(ref)
    with torch.no_grad():
        ref.head.weight.normal_(std=0.1)  # timm's head starts near zero: make the features show in the logits
    ours = composer.build("rope_vit_b", num_classes=10, depth=2).eval()
    assert from_timm(ours, ref.state_dict()).ok
    x = torch.randn(2, 3, *size, generator=GEN)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (2, 10)
    assert (a - b).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("op, x, words", [
    (OPS["rotary"](axes=2), Shape(8, (4, 4), "scores", heads=2, keys=((4, 4), 0)), "needs heads"),
    (OPS["rotary"](axes=2), Shape(8, (16,), "heads", heads=2), "1-D grid"),
    (OPS["rotary"](axes=2), Shape(6, (4, 4), "heads", heads=2), "divisible by 4"),
    (OPS["rotary"](axes=2, reference=[16]), Shape(8, (4, 4), "heads", heads=2), "2 positive size"),
])
def test_rotary_shape_errors(op, x, words):
    with pytest.raises(ShapeError) as info:
        op.infer(x)
    assert words in info.value.message


def test_rotary_error_is_located(tmp_path):
    text = """model m {
    input image(3, 32)
    stem patch_embed(24, 8)
    stage { block { linear(72) as qkv; q, k, v = split_heads(4); q = { from q; rotary(axes = 2) } } }
    head { global_pool("avg"); classifier(10) }
}
"""
    with pytest.raises(ComposerError) as info:
        composer.check(write(tmp_path, text))
    assert "divisible by 4" in str(info.value) and ":4:" in str(info.value)
