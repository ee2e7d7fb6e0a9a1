"""Weight porting from timm for the families ported in "Zoo I": ResNet, MobileNetV2, DeiT (with the
distilled models' `join` of two token tensors), MLP-Mixer, Twins and InceptionNeXt. After
`from_timm`, the logits equal timm's (float32, eval, batch 1 at 224) with every tensor accounted for."""

from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import composer  # noqa: E402
from composer.diagnostics import ComposerError  # noqa: E402
from composer.port import from_timm, mapping_path, read_mapping  # noqa: E402
from helpers import perturb  # noqa: E402

TOL = 1e-4
# our name -> timm's (written out, so that a wrong `reference` in a blueprint shows too)
MODELS = {
    "resnet18": "resnet18",
    "mobilenetv2_100": "mobilenetv2_100",
    "deit_ti": "deit_tiny_patch16_224",
    "deit_ti_distilled": "deit_tiny_distilled_patch16_224",
    "mixer_s16": "mixer_s16_224",
    "twins_pcpvt_small": "twins_pcpvt_small",
    "twins_svt_small": "twins_svt_small",
    "inception_next_t": "inception_next_tiny",
}


def _reference(name: str):
    torch.manual_seed(0)
    ref = timm.create_model(MODELS[name], pretrained=False).eval()
    perturb(ref)
    return ref, {k: v.clone() for k, v in ref.state_dict().items()}


def _x(batch=1):
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(MODELS))
def test_same_logits_after_port(name):
    assert composer.load(name).reference == f"timm:{MODELS[name]}"
    ref, state = _reference(name)
    model = composer.build(name, seed=None).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    report = from_timm(model, state)
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert not report.skipped and not report.ignored
    # every reference tensor feeds exactly one of ours (the distilled tokens: two feed one)
    assert report.loaded + len(report.joined) == len(state) == len(model.state_dict()) + len(report.joined)
    x = _x()
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff < TOL, f"{name}: max |logit diff| {diff:.2e}"


def test_distilled_tokens_are_joined_in_order():
    _, state = _reference("deit_ti_distilled")
    model = composer.build("deit_ti_distilled", seed=None)
    report = from_timm(model, state)
    assert report.joined == [("stem.class_token.token", ["cls_token", "dist_token"])]
    token = model.state_dict()["stem.class_token.token"]
    assert token.shape == (1, 2, 192)
    assert torch.equal(token[:, 0], state["cls_token"][:, 0]) and torch.equal(token[:, 1], state["dist_token"][:, 0])
    assert "1 joined" in report.render() and "stem.class_token.token <- cls_token + dist_token" in report.render()


def test_resnet50_counts_and_keys():
    """The full-size ResNet: the same parameter count as timm's and a complete port (no forward)."""
    ref = timm.create_model("resnet50", pretrained=False)
    model = composer.build("resnet50", seed=None)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters()) == 25_557_032
    report = from_timm(model, ref.state_dict())
    assert report.ok and report.loaded == len(ref.state_dict()) == 320
    assert ("stages.1.blocks.0.conv.weight", "layer2.0.downsample.0.weight") in report.matched
    assert ("stages.3.blocks.0.batchnorm.running_var", "layer4.0.downsample.1.running_var") in report.matched


def test_num_classes_10_keeps_the_features():
    ref, state = _reference("resnet18")
    model = composer.build("resnet18", num_classes=10, seed=None).eval()
    report = from_timm(model, state)
    assert report.ok and sorted(k for k, _ in report.skipped) == ["head.fc.bias", "head.fc.weight"]
    x = _x()
    with torch.no_grad():
        assert model(x).shape == (1, 10)
        assert (model.forward_features(x) - ref.forward_features(x)).abs().max().item() < TOL


def test_distilled_num_classes_10_skips_both_classifiers():
    _, state = _reference("deit_ti_distilled")
    model = composer.build("deit_ti_distilled", num_classes=10, seed=None)
    report = from_timm(model, state)
    assert report.ok and len(report.joined) == 1
    assert sorted(k for k, _ in report.skipped) == ["head.head.bias", "head.head.weight",
                                                    "head.head_dist.bias", "head.head_dist.weight"]


def test_join_rule_from_data():
    """A join declared in a mapping dict: per-block q, k, v tensors joined into a fused qkv, the text
    around the match must agree, an incomplete group is left alone, and bad declarations are errors."""
    qkv = {f"b.{i}.{p}.weight": torch.full((2, 3), float(10 * i + j)) for i in range(2)
           for j, p in enumerate("qkv")}
    qkv["b.1.q.bias"] = torch.zeros(2)                    # no k/v partner: not joined
    from composer.port import _join_source
    mapping = read_mapping({"join": [{"from": [r"\.q\.", r"\.k\.", r"\.v\."], "into": ".qkv.", "dim": 0}]})
    out, parts = _join_source(qkv, mapping.joins)
    assert sorted(out) == ["b.0.qkv.weight", "b.1.q.bias", "b.1.qkv.weight"]
    assert out["b.1.qkv.weight"].shape == (6, 3) and out["b.1.qkv.weight"][:, 0].tolist() == [10, 10, 11, 11, 12, 12]
    assert parts["b.0.qkv.weight"] == ["b.0.q.weight", "b.0.k.weight", "b.0.v.weight"]
    for bad in ({"from": r"\.q\.", "into": ".qkv."}, {"from": [r"\.q\."], "into": ".qkv."},
                {"from": [r"\.q\.", r"\.k\."], "into": ".qkv.", "sizes": [1, 1]},
                {"from": [r"\.q\.", "("], "into": ".qkv."}):
        with pytest.raises(ComposerError):
            read_mapping({"join": [bad]})
    with pytest.raises(ComposerError, match="cannot concatenate"):
        _join_source({"a.q": torch.zeros(2, 3), "a.k": torch.zeros(4, 5)},
                     read_mapping({"join": [{"from": [r"\.q$", r"\.k$"], "into": ".qk", "dim": 1}]}).joins)


def test_unused_joined_parts_are_reported_by_their_own_names():
    import yaml

    _, state = _reference("deit_ti_distilled")
    model = composer.build("deit_ti", seed=None)
    data = yaml.safe_load(mapping_path(model).read_text())
    data["join"] = data["models"][0]["join"]             # joined, but no rule of ours asks for the result
    del data["models"]
    report = from_timm(model, state, data, strict=False)
    assert {"cls_token", "dist_token"} <= set(report.unexpected) and "cls_dist_tokens" not in report.unexpected
    assert ("stem.class_token.token", "cls_token") in report.missing
