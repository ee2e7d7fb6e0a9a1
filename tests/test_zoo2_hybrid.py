"""Zoo II, mobile and hybrid families: EMO, CloFormer, CeiT, Conformer (CNN + ViT), MSG-Transformer.

Row parameter counts are shared/MODELS.md's figures (rows 36, 38, 39, 46, 48). The exact official
counts in the comments come from instantiating the official code (pinned commits in
shared/research/catalog_b.md) and summing `numel` over its parameters:
  EMO-1M 1,361,168 · CloFormer-XXS 4,166,728 · CeiT-T 6,356,904 · Conformer-Ti 23,524,704 ·
  MSG-T 25,086,116.
CeiT and Conformer match those exactly. EMO, CloFormer and MSG-Transformer need attention features
the language lacks (see each blueprint's header); for them a second test checks that our count is
the official one plus exactly the parameters of the stand-in, computed by hand below, so that
everything else in the blueprint is verified to be exact.
"""

import pytest
import torch

import composer
from helpers import n_params


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# row: (target, MODELS.md params, why it differs or None)
ROWS = {
    36: ("emo_1m", 1_361_000,
         "EW-MHSA projects only q and k and has no output projection; the attention op always "
         "projects v and the output (+2*C*(C+1) per attention block)"),
    38: ("cloformer_xxs", 4_167_000,
         "the global branch's attention works at a width below the input's and has no output "
         "projection; the attention op cannot say that (stand-in: 1x1 conv to the width + attention)"),
    39: ("ceit_t", 6_357_000, None),
    46: ("conformer_ti", 23_525_000, None),
    # within 1% but only the messenger-free skeleton: messenger tokens are not expressible yet
    48: ("msg_transformer_t", 25_086_000, None),
}

# every model of the families, with the input size its forward test uses (None: the default 224)
MODELS = {
    "emo_1m": None,        # grid(7) windows need a multiple of 7 in stages 3-4
    "emo_2m": None,
    "emo_5m": None,
    "cloformer_xxs": 64,
    "cloformer_xs": 64,
    "cloformer_s": 64,
    "ceit_t": 64,
    "ceit_s": 64,
    "ceit_b": 64,
    "conformer_ti": 64,
    "conformer_s": 64,
    "conformer_b": 64,
    "msg_transformer_t": 112,   # stage 4 is 4x4: one 4x4 window
    "msg_transformer_s": 112,
}


def _check_forward(model):
    plan = model.plan
    with torch.no_grad():
        y = model.eval()(torch.randn(1, plan.input.channels, *plan.input.spatial))
    assert y.shape == (1, 5) and torch.isfinite(y).all()


@pytest.mark.parametrize("row", sorted(ROWS))
def test_row_params_within_one_percent(row, request):
    target, expected, why = ROWS[row]
    if why:
        request.applymarker(pytest.mark.xfail(strict=True, reason=why))
    model = composer.build(target)
    n = n_params(model)
    assert abs(n - expected) <= 0.01 * expected, (n, expected)


def _emo_standin(depths, dims):
    # attention blocks: every block but the first of stages 3 and 4; the stand-in adds a v
    # projection (C*C + C) and an output projection (C*C + C)
    return sum((depths[i] - 1) * 2 * dims[i] * (dims[i] + 1) for i in (2, 3))


def _cloformer_standin(dims, depths, heads, splits):
    # ours: conv C->g (C*g + g) + attention over g (q g*g+g, kv 2g*g+2g, proj g*g+g);
    # official: q C*g + g, kv 2*C*g + 2*g (g = global heads x head dim)
    total = 0
    for c, d, h, s in zip(dims, depths, heads, splits):
        g = s[1] * (c // h)
        total += d * ((c * g + g + 4 * g * g + 4 * g) - (3 * c * g + 3 * g))
    return total


def test_standins_account_for_every_difference():
    """Our count = the official count + the stand-in's parameters, computed by hand."""
    emo = composer.load("emo_1m").params
    assert emo == 1_361_168 + _emo_standin([2, 2, 8, 3], [32, 48, 80, 168])
    emo5 = composer.load("emo_5m").params
    assert emo5 == 5_108_848 + _emo_standin([3, 3, 9, 3], [48, 72, 160, 288])
    clo = composer.load("cloformer_xxs").params
    assert clo == 4_166_728 + _cloformer_standin([32, 64, 128, 256], [2, 2, 6, 2], [4, 4, 8, 16],
                                                 [[3, 1], [2, 2], [4, 4], [4, 12]])
    clo_s = composer.load("cloformer_s").params
    assert clo_s == 12_345_576 + _cloformer_standin([64, 128, 224, 448], [2, 2, 6, 2], [4, 8, 14, 28],
                                                    [[3, 1], [4, 4], [7, 7], [7, 21]])
    # MSG-T without messengers: msg_tokens (16 windows x 64) and two biases per head per block
    msg = composer.load("msg_transformer_t").params
    assert msg == 25_086_116 - 16 * 64 - 2 * (2 * 2 + 4 * 4 + 12 * 8 + 4 * 16)
    # the larger exact variants, against the official code's counts
    assert composer.load("ceit_s").params == 24_204_840
    assert composer.load("conformer_s").params == 37_673_424
    assert composer.load("conformer_b").params == 83_289_136


def test_exact_rows_match_official_code():
    assert composer.load("ceit_t").params == 6_356_904
    assert composer.load("conformer_ti").params == 23_524_704


@pytest.mark.parametrize("target", sorted(MODELS))
def test_forward(target):
    size = MODELS[target]
    kwargs = {"img_size": size} if size else {}
    model = composer.build(target, num_classes=5, **kwargs)
    assert n_params(model) == model.plan.params
    _check_forward(model)


def test_conformer_streams_and_heads():
    """Two heads whose logits are summed; the CNN map ends at 7x7, the tokens at 1 + 14x14."""
    plan = composer.load("conformer_ti")
    assert plan.stages[-1].y.spatial == (7, 7)
    keys = set(composer.build("conformer_ti", img_size=64).state_dict())
    assert any(k.endswith("conv_cls_head.weight") for k in keys)
    assert any(k.endswith("trans_cls_head.weight") for k in keys)


def test_ceit_layer_tokens():
    """LCA sees one class token per block: the per-layer embedding has `depth` rows."""
    model = composer.build("ceit_t", img_size=64)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    layer = [s for k, s in shapes.items() if "pos_layer_embed" in k]
    assert layer and layer[0][-2:] == (12, 192)
