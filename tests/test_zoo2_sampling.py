"""Zoo II families that use the sampling and clustering ops: T2T-ViT, LITv2, DAT, GLNet.

For each smallest variant the BUILT model's parameter count (torch, sum of numel) must be within
1% of the official code's count (shared/MODELS.md, written here), and the model must run forward
(at a small resolution where the model allows it)."""

from __future__ import annotations

import pytest
import torch

import composer

# (target, official count from MODELS.md, resolution of the count, small resolution for the forward)
CASES = [
    ("blueprints/t2t_vit.arch:t2t_vit_7", 4_310_222, 224, 64),   # row 22 (Performer T2T layers: exact)
    ("blueprints/litv2.arch:litv2_s", 27_844_000, 224, 64),      # row 28
    ("blueprints/dat.arch:dat_t", 28_319_138, 224, 112),         # row 54 (official code @797f187: exact)
    ("blueprints/glnet.arch:glnet_4g", 27_002_000, 224, 64),     # row 52
]


@pytest.mark.parametrize("target, official, res, small", CASES, ids=[c[0].split(":")[1] for c in CASES])
def test_param_count_and_forward(target, official, res, small):
    model = composer.build(target, img_size=res)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - official) <= 0.01 * official, f"{target}: {count:,} vs official {official:,}"
    del model
    model = composer.build(target, img_size=small, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, small, small))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_exact_counts_where_everything_is_expressed():
    """LITv2, DAT and GLNet are complete: their counts are the official ones to the parameter (LITv2-S,
    LITv2-M; DAT-T/S/B, counted from the official code at commit 797f187) or to the official thousand
    (GLNet)."""
    assert composer.load("blueprints/litv2.arch:litv2_s").params == 27_844_000
    assert composer.load("blueprints/litv2.arch:litv2_m").params == 48_830_368
    assert round(composer.load("blueprints/glnet.arch:glnet_4g").params, -3) == 27_002_000
    # T2T-ViT-7 with its Performer T2T layers (frozen random features counted, as the official code)
    assert composer.load("blueprints/t2t_vit.arch:t2t_vit_7").params == 4_310_222
    # DAT with its deformable attentions' relative-position tables (12 x 27 x 27 and 24 x 13 x 13 in DAT-T)
    assert composer.load("blueprints/dat.arch:dat_t").params == 28_319_138
    assert composer.load("blueprints/dat.arch:dat_s").params == 49_700_402
    assert composer.load("blueprints/dat.arch:dat_b").params == 87_881_632


def test_deformable_merging_starts_as_a_plain_conv():
    """LITv2's deformable token merging is zero-initialised: a fresh model's merging layers read the
    regular 2x2 grid."""
    model = composer.build("blueprints/litv2.arch:litv2_s", img_size=64, num_classes=10)
    merges = [m for n, m in model.named_modules() if n.endswith("conv_offset") and "downsample" in n]
    assert len(merges) == 3
    assert all(float(p.detach().abs().max()) == 0 for m in merges for p in m.parameters())


def test_t2t_position_embedding_is_the_fixed_sinusoid_table():
    # T2T-ViT's get_sinusoid_encoding: angle(t, j) = t / 10000 ** (2 * (j // 2) / d), sin on even
    # channels, cos on odd ones, over the 197 tokens; a parameter with requires_grad=False
    import math

    model = composer.build("blueprints/t2t_vit.arch:t2t_vit_7", device="meta")
    pos = [p for n, p in model.named_parameters() if n.endswith("pos")]
    assert len(pos) == 1 and tuple(pos[0].shape) == (1, 197, 256) and not pos[0].requires_grad
    built = composer.build("blueprints/t2t_vit.arch:t2t_vit_7", num_classes=0)
    table = next(p for n, p in built.named_parameters() if n.endswith("pos"))[0]
    for t, j in [(0, 0), (0, 1), (1, 0), (1, 1), (5, 10), (196, 255), (100, 37)]:
        angle = t / 10000 ** (2 * (j // 2) / 256)
        expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        assert table[t, j].item() == pytest.approx(expected, abs=1e-6)
    frozen = sum(p.numel() for p in built.parameters() if not p.requires_grad)
    assert frozen == 197 * 256 + 2 * 32 * 64  # the table, and the two Performer layers' random features
