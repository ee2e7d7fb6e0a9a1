"""Multi-level token sequences at run time (issue 13: "ViT-Adapter at a non-square size"): the
deformable attention's levels, reference points and normalisers, the level embedding, the per-level
conv and the level selection follow the grid the sequence lies on, and ViT-Adapter's position
embedding is interpolated to the grid it gets (the reference's `_get_pos_embed`), so vit_adapter_t
built at 224 gives features at non-square sizes with the shapes inferred there. The reference's
formulas (czczup/ViT-Adapter, adapter_modules.py: `get_reference_points`, `deform_inputs`) are
written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import composer
from composer.ops import OPS
from composer.shapes import Shape
from composer.sizes import admits, replan

VA = "vit_adapter_t"


def _official_reference_points(spatial_shapes):
    """ViT-Adapter's get_reference_points: every level's cell centres, (x, y) in [0, 1]."""
    refs = []
    for h, w in spatial_shapes:
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32),
                                      torch.linspace(0.5, w - 0.5, w, dtype=torch.float32), indexing="ij")
        refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
    return torch.cat(refs, 0)


def _official_deform_inputs(h, w):
    """ViT-Adapter's deform_inputs for an image h x w: (spatial shapes, reference points) of the
    injector (values: c2, c3, c4; queries: the ViT tokens) and of the extractor (the reverse)."""
    levels = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    vit = [(h // 16, w // 16)]
    return (levels, _official_reference_points(vit)), (vit, _official_reference_points(levels))


@pytest.mark.parametrize("size", [(512, 384), (224, 320)])
def test_vit_adapter_features_at_non_square_sizes(size):
    plan = composer.load(VA)
    assert admits(plan, size) is None
    model = composer.build(VA, features_only=True).eval()  # built at 224
    attn = {}
    for path in ("stages.0.blocks.0.attn", "stages.0.blocks.4.attn"):  # the injector's, an extractor's
        module = model.get_submodule(path)
        module.register_forward_pre_hook(lambda m, args, path=path: attn.__setitem__(path, args[1]))
    with torch.no_grad():
        feats = model(torch.randn(1, 3, *size))
    other = replan(plan, size)
    assert [tuple(f.shape[1:]) for f in feats] == [(y.channels, *y.spatial) for y in
                                                   (other.saved[n] for n in plan.outputs)]
    # the deformable attentions saw the runtime grid and made the reference's geometry for it
    (inj_shapes, inj_refs), (ext_shapes, ext_refs) = _official_deform_inputs(*size)
    for path, stride, shapes, refs in (("stages.0.blocks.0.attn", 16, inj_shapes, inj_refs),
                                       ("stages.0.blocks.4.attn", 32, ext_shapes, ext_refs)):
        module, grid = model.get_submodule(path), attn[path]
        assert tuple(grid) == (size[0] // stride, size[1] // stride)  # the grid of the last (query) level
        value_grids, n_values, reference, normalizer = module.geometry(grid, torch.device("cpu"))
        assert value_grids == shapes and n_values == sum(a * b for a, b in shapes)
        torch.testing.assert_close(reference, refs, atol=1e-6, rtol=0)
        assert normalizer.tolist() == [[float(w), float(h)] for h, w in shapes]  # (W, H), as offset_normalizer


def test_vit_adapter_position_embedding_is_interpolated_as_the_reference():
    model = composer.build(VA).eval()
    pe = model.stem.pos_embed
    table = pe.pos  # (1, 14 * 14, C): the class row is the separate `unused` token
    expected = F.interpolate(table.reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(32, 24), mode="bicubic",
                             align_corners=False).reshape(1, -1, 32 * 24).permute(0, 2, 1)
    with torch.no_grad():
        torch.testing.assert_close(pe.table((32, 24)), expected)
        assert pe.table((14, 14)) is table  # the build grid: the table itself
    # other models keep timm's semantics: refused without dynamic_img_size, antialiased with it
    assert "dynamic_img_size" in admits(composer.load("vit_ti"), (256, 256))


def test_deformable_attention_at_another_grid_equals_the_module_built_there():
    torch.manual_seed(0)
    c, heads = 8, 2
    op = OPS["deformable_attention"](heads=heads, points=3, values=[2, 1, 0.5], queries=[1])

    def shape(grid):  # the three value levels ahead of the query grid
        return Shape(c, grid, "tokens", sum(int(grid[0] * s) * int(grid[1] * s) for s in (2, 1, 0.5)))

    small, big = shape((2, 2)), shape((6, 4))
    built = op.build(small, op.infer(small))
    direct = op.build(big, op.infer(big))
    with torch.no_grad():
        for p in built.parameters():
            p.normal_(0, 0.5)
    direct.load_state_dict(built.state_dict())
    x = torch.randn(2, big.tokens, c)
    with torch.no_grad():
        torch.testing.assert_close(built(x, (6, 4)), direct(x), atol=0, rtol=0)
        assert built(x[:, : small.tokens], (2, 2)).shape == (2, 4, c)


def test_level_ops_follow_the_runtime_grid():
    torch.manual_seed(0)
    c = 4
    levels = [4, 2, 1]
    built = Shape(c, (1, 1), "tokens", 16 + 4)
    grid = (3, 2)  # levels 12x8, 6x4, 3x2
    sides = [(12, 8), (6, 4), (3, 2)]
    t = torch.randn(2, sum(a * b for a, b in sides), c)
    parts = t.split([a * b for a, b in sides], 1)
    # level_embed: row l on every token of level l (the reference's c2 + level_embed[0], ...)
    le = OPS["level_embed"](levels=levels).build(built, built)
    rows = torch.cat([le.embed[i].expand(a * b, c) for i, (a, b) in enumerate(sides)])
    torch.testing.assert_close(le(t, grid), t + rows)
    # per_level: the same depthwise conv on every level folded into its map (the reference's DWConv)
    pl_op = OPS["per_level"](op=OPS["conv"](out=c, kernel=3, groups=c), levels=levels)
    pl = pl_op.build(built, built)
    assert pl_op.runtime_grid(built)
    expected = torch.cat([pl.op(p.transpose(1, 2).reshape(2, c, a, b)).flatten(2).transpose(1, 2)
                          for p, (a, b) in zip(parts, sides)], 1)
    torch.testing.assert_close(pl(t, grid), expected)
    # select_level: the level's tokens, on the level's grid
    for i, (part, side) in enumerate(zip(parts, sides)):
        op = OPS["select_level"](index=i, levels=levels)
        m = op.build(built, op.infer(built))
        assert torch.equal(m(t, grid), part) and tuple(m.out_grid(grid)) == side
    # a strided op changes the grid: tied to the build grid (MSG-Transformer's downsampling)
    strided = OPS["per_level"](op=OPS["conv"](out=c, kernel=3, stride=2), levels=[0.5, 1])
    assert not strided.runtime_grid(Shape(c, (4, 4), "tokens", 4))
