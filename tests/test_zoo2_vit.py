"""Zoo II pyramid vision transformers (MODELS.md rows 20, 21, 24, 26, 29, 34): the BUILT model's
parameter count against the official code's own count, and a forward pass of every model.

The expected figures are those of shared/MODELS.md, i.e. the official implementations run
unmodified (whai362/PVT, microsoft/CvT, AFeng-x/SMT, OliverRensu/Shunted-Transformer,
sail-sg/iFormer, huawei-noah/Efficient-AI-Backbones cmt_pytorch). The larger variants' figures were
counted the same way (the official model files, sum of numel) and are written here too.
"""

import pytest
import torch

import composer
from composer.layers.attention.positions import LearnedTable
from helpers import attention_piece, n_params, split_heads

# (model, img_size, the official code's count): every row is exact
ROWS = [
    ("pvt_v1_tiny", 224, 13_229_288),  # row 20
    ("cvt_13", 224, 19_997_480),  # row 21
    ("smt_t", 224, 11_506_536),  # row 24
    ("shunted_t", 224, 11_553_576),  # row 26
    ("cmt_ti", 160, 9_492_426),  # row 29 (160 px; one position bias per stage, `learned_bias(tie = i)`)
    ("iformer_s", 224, 19_866_344),  # row 34: MODELS.md 19,866,000 (+-1k), the official code counts 19,866,344
]

# the larger standard variants: (model, img_size, official count)
VARIANTS = [
    ("pvt_v1_small", 224, 24_485_864),
    ("pvt_v1_medium", 224, 44_208_104),
    ("pvt_v1_large", 224, 61_369_320),
    ("cvt_21", 224, 31_622_696),
    ("smt_s", 224, 22_550_952),
    ("smt_b", 224, 32_037_352),
    ("smt_l", 224, 80_589_544),
    ("shunted_s", 224, 22_401_256),
    ("shunted_b", 224, 39_614_376),
    ("cmt_xs", 192, 15_247_208),
    ("cmt_s", 224, 26_256_160),
    ("cmt_b", 256, 45_715_076),
    ("iformer_b", 224, 47_866_216),
    ("iformer_l", 224, 86_637_096),
]


def _built_count(name, size):
    return n_params(composer.build(name, img_size=size, device="meta"))


@pytest.mark.parametrize("name,size,official", [pytest.param(*r, id=r[0]) for r in ROWS])
def test_smallest_variant_count(name, size, official):
    count = _built_count(name, size)
    assert count == official, (count, official)
    assert composer.load(name, img_size=size).params == count  # the torch-free rule agrees


@pytest.mark.parametrize("name,size,official", [pytest.param(*v, id=v[0]) for v in VARIANTS])
def test_larger_variant_count(name, size, official):
    assert _built_count(name, size) == official


def test_every_model_cites_paper_and_official_code():
    from composer.api import zoo_index

    zoo = zoo_index()
    for name in [r[0] for r in ROWS] + [v[0] for v in VARIANTS]:
        assert name in zoo, name
        model = composer.load(name)  # the plan carries the reference and the paper
        assert model.reference.startswith("official:") and model.paper, name


def test_cmt_refuses_other_input_sizes():
    with pytest.raises(composer.ComposerError) as exc:
        composer.load("cmt_ti", img_size=224)
    span = exc.value.diagnostics[0].span
    assert span is not None and str(span.file).endswith("cmt.arch")
    assert "fixed" in exc.value.render()
    assert composer.load("cmt_s").input.spatial == (224, 224)


def _forward_size(name):
    """64 px where the model allows it (every family here but CMT, whose position bias fixes the size)."""
    return None if name.startswith("cmt") else 64


@pytest.mark.parametrize("name", [r[0] for r in ROWS] + [v[0] for v in VARIANTS])
def test_runs_forward(name):
    size = _forward_size(name)
    model = composer.build(name, num_classes=3, **({"img_size": size} if size else {})).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, *model.plan.input.spatial))
    assert y.shape == (1, 3) and torch.isfinite(y).all()


def test_shunted_attention_is_the_official_forward():
    """Shunted self-attention (sr = 2) by hand, as the official SSA.py: q = Linear(C, C); coarse keys and
    values from GELU(LN(Conv k2 s2)), fine ones from GELU(LN(Conv 1x1)); kv_i = Linear(C, C) (keys the
    first C / 2 channels); v_i += dwconv3x3(v_i as a map); half of the heads per group; proj of the
    concatenation. Our fused linears are split: q1 | q2 = q, k_i | v_i = kv_i."""
    import torch.nn.functional as F

    model = composer.build("shunted_t", num_classes=3, img_size=64)
    mixer = model.stages[2].blocks[0].token_mixer  # C = 256, 8 heads of 32, a 4x4 map, sr = 2
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    x = torch.randn(2, 256, 4, 4, generator=gen)
    b, c, h, w = x.shape
    heads, d = 8, 32
    m = mixer

    def lin(t, layer):
        return t @ layer.weight.T + layer.bias

    def ln_gelu(t, norm):
        return F.gelu(F.layer_norm(t, (c,), norm.weight, norm.bias, norm.eps))

    tokens = x.flatten(2).transpose(1, 2)
    q = torch.cat([lin(tokens, m.q1), lin(tokens, m.q2)], -1)
    x1 = ln_gelu(m.sr1(x).flatten(2).transpose(1, 2), m.norm1)
    x2 = ln_gelu(m.sr2(x).flatten(2).transpose(1, 2), m.norm2)
    outs = []
    for i, (xr, k_l, v_l, conv, side) in enumerate([(x1, m.k1, m.v1, m.local_conv1, h // 2),
                                                   (x2, m.k2, m.v2, m.local_conv2, h)]):
        k, v = lin(xr, k_l), lin(xr, v_l)
        v = v + conv(v.transpose(1, 2).reshape(b, c // 2, side, side)).flatten(2).transpose(1, 2)
        qi = split_heads(q, heads)[:, i * heads // 2:(i + 1) * heads // 2]
        attn = (qi @ split_heads(k, heads // 2).transpose(-1, -2) * d ** -0.5).softmax(-1)
        outs.append((attn @ split_heads(v, heads // 2)).transpose(1, 2).reshape(b, h * w, c // 2))
    want = lin(torch.cat(outs, -1), m.proj)  # (B, N, C) tokens
    with torch.no_grad():
        got = mixer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cvt_mlp_uses_quick_gelu():
    """The official CvT MLP activation is QuickGELU, x * sigmoid(1.702 x)."""
    model = composer.build("cvt_13", num_classes=3, img_size=64)
    act = model.stages[0].blocks[0].mlp.act
    t = torch.linspace(-4, 4, 33)
    torch.testing.assert_close(act(t), t * torch.sigmoid(1.702 * t))


def test_cmt_shares_one_position_bias_per_stage():
    # the official code holds relative_pos_a..d at the model level, one (heads, N, N / sr^2) table per
    # stage passed to every block; the state_dict must hold it once per stage, every block using it
    model = composer.build("cmt_ti", device="meta")
    keys = sorted(k for k in model.state_dict() if k.endswith("relative_pos"))
    assert keys == [f"stages.{i}.blocks.0.attn.relative_pos" for i in range(4)]
    heads, sr, grids = (1, 2, 4, 8), (8, 4, 2, 1), (40, 20, 10, 5)  # 160 px / 4, 8, 16, 32
    for i, stage in enumerate(model.stages):
        n = grids[i] ** 2
        owner = stage.blocks[0].attn.relative_pos
        assert tuple(owner.shape) == (heads[i], n, n // sr[i] ** 2)
        for block in stage.blocks:
            assert attention_piece(block.attn, LearnedTable).table(block.attn) is owner
    # keys/values: a depthwise sr x sr stride-sr conv with bias, then batch norm (official `sr`, `norm`)
    attn = model.stages[0].blocks[0].attn
    assert tuple(attn.sr.weight.shape) == (46, 1, 8, 8) and attn.sr.bias is not None
    assert isinstance(attn.norm, torch.nn.BatchNorm2d)


def test_cmt_macs_match_the_official_measurement():
    # catalog A: CMT-Ti at 160 px measured 0.639 GMACs with the official code (flop_counter)
    assert composer.load("cmt_ti").macs == pytest.approx(0.639e9, rel=2e-3)
