"""Zoo I acceptance over every parity row's smallest variant: with `num_classes=10` on both sides,
the model ported from the reference gives the reference's logits; `features_only` gives the
reference's feature channels and reductions (and values, where both expose the same points)."""

import pytest
import torch

import composer
from composer.port import from_timm, from_torchvision
from helpers import perturb

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

# the smallest variant of every row of shared/MODELS.md 1-19, at the reference resolution
ROWS = {
    "vit_ti": 224, "deit_ti_distilled": 224, "mixer_s16": 224, "resnet50": 224, "mobilenetv2_100": 224,
    "pvt_v2_b0": 224, "swin_t": 224, "mobilevit_xxs": 256, "crossvit_tiny": 240, "convnext_atto": 224,
    "inception_next_t": 224, "gcvit_xxt": 224, "efficientvit_m0": 224, "poolformer_s12": 224,
    "maxvit_t": 224, "fastvit_t8": 256, "repvgg_a0": 224, "twins_pcpvt_small": 224, "shufflenet_v2_x1_0": 224,
}


def _reference(name, **kwargs):
    source, ref = composer.load(name).reference.split(":", 1)
    torch.manual_seed(0)
    if source == "timm":
        return source, timm.create_model(ref, pretrained=False, **kwargs).eval()
    return source, torchvision.models.get_model(ref, weights=None, **kwargs).eval()


def test_every_row_is_listed():
    assert len(ROWS) == 19


@pytest.mark.parametrize("name", ROWS)
def test_ten_classes_ported_gives_reference_logits(name):
    source, ref = _reference(name, num_classes=10)
    perturb(ref)
    ours = composer.build(name, num_classes=10).eval()
    port = from_timm if source == "timm" else from_torchvision
    report = port(ours, ref.state_dict())
    assert report.ok
    x = torch.randn(1, 3, ROWS[name], ROWS[name])
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == b.shape == (1, 10)
    assert (a - b).abs().max().item() < 1e-4


# our stage indices -> the reference's feature indices, where the two expose the same points (the
# reference also reports its stem, or per-block features for the plain transformers)
FEATURES = {
    "resnet50": ((0, 1, 2, 3), (1, 2, 3, 4)),
    "mobilenetv2_100": ((0, 1, 2, 4, 6), (0, 1, 2, 3, 4)),
    "pvt_v2_b0": ((0, 1, 2, 3), (0, 1, 2, 3)),
    "swin_t": ((0, 1, 2, 3), (0, 1, 2, 3)),
    "mobilevit_xxs": ((0, 1, 2, 3), (0, 1, 2, 3)),  # the reference's last point follows its final conv
    "convnext_atto": ((0, 1, 2, 3), (0, 1, 2, 3)),
    "inception_next_t": ((0, 1, 2, 3), (0, 1, 2, 3)),
    "gcvit_xxt": ((0, 1, 2, 3), (0, 1, 2, 3)),
    "efficientvit_m0": ((0, 1, 2), (0, 1, 2)),
    "poolformer_s12": ((0, 1, 2, 3), (0, 1, 2, 3)),
    "maxvit_t": ((0, 1, 2, 3), (1, 2, 3, 4)),
    "fastvit_t8": ((0, 1, 2, 3), (0, 1, 2, 3)),
    "repvgg_a0": ((0, 1, 2, 3), (1, 2, 3, 4)),
    "twins_pcpvt_small": ((0, 1, 2, 3), (0, 1, 2, 3)),
    # plain transformers: every block is a feature point (`features = "blocks"`), as in timm
    "vit_ti": ((0, 5, 11), (0, 5, 11)),
    "deit_ti_distilled": ((2, 11), (2, 11)),
    "mixer_s16": ((0, 7), (0, 7)),
}


@pytest.mark.parametrize("name", FEATURES)
def test_features_match_reference(name):
    ours_idx, ref_idx = FEATURES[name]
    _, ref = _reference(name)
    perturb(ref)
    with torch.device("meta"):
        info = timm.create_model(composer.load(name).reference.split(":")[1], features_only=True).feature_info
    full = composer.build(name).eval()
    assert from_timm(full, ref.state_dict()).ok
    feats = composer.build(name, features_only=True, out_indices=ours_idx).eval()
    feats.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
    assert [f["num_chs"] for f in feats.feature_info] == [info[i]["num_chs"] for i in ref_idx]
    x = torch.randn(1, 3, ROWS[name], ROWS[name])
    with torch.no_grad():
        ours = feats(x)
        theirs = ref.forward_intermediates(x, indices=list(ref_idx), intermediates_only=True)
    for a, b in zip(ours, theirs):
        if b.ndim == 4 and b.shape[1] != a.shape[1]:  # NHWC features (Swin)
            b = b.permute(0, 3, 1, 2)
        assert a.shape == b.shape
        # float32 round-off grows with the features' magnitude (maxvit's reach ~1e2): relative 1e-5
        assert (a - b).abs().max().item() < 1e-4 + 1e-5 * b.abs().max().item()
    assert [f["reduction"] for f in feats.feature_info] == [info[i]["reduction"] for i in ref_idx]


def test_crossvit_features_match_reference():
    """CrossViT's features are its two branches after the last block (named outputs s0, s1), as
    maps without the class token: timm's features_only gives the same two."""
    _, ref = _reference("crossvit_tiny")
    perturb(ref)
    ref_feats = timm.create_model("crossvit_tiny_240", features_only=True).eval()
    ref_feats.model.load_state_dict({k: v for k, v in ref.state_dict().items()
                                     if not k.startswith(("norm.", "head."))})  # it has no norms and heads
    full = composer.build("crossvit_tiny").eval()
    assert from_timm(full, ref.state_dict()).ok
    feats = composer.build("crossvit_tiny", features_only=True).eval()
    feats.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("head.")})
    theirs_info = ref_feats.feature_info.get_dicts()
    assert [(f["num_chs"], f["reduction"]) for f in feats.feature_info] == \
        [(f["num_chs"], f["reduction"]) for f in theirs_info] == [(96, 12), (192, 17)]
    x = torch.randn(1, 3, 240, 240)
    with torch.no_grad():
        ours, theirs = feats(x), ref_feats(x)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4
