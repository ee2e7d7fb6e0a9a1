"""Weight porting from timm: same logits after `from_timm`, classifier and in_chans adaptation,
features_only parity, splits and ignores declared as data, and the `composer port` command."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import yaml  # noqa: E402

import composer  # noqa: E402
from composer.cli import main  # noqa: E402
from composer.diagnostics import ComposerError  # noqa: E402
from composer.port import from_timm, mapping_path, read_mapping  # noqa: E402
from helpers import perturb  # noqa: E402

FAMILIES = ["vit_ti", "swin_t", "convnext_atto", "pvt_v2_b0", "poolformer_s12", "caformer_s18", "convformer_s18"]
TOL = 1e-4


def _ref_name(name: str) -> str:
    return composer.load(name).reference.split(":", 1)[1]


_CACHE: dict = {}


def reference(name: str, **kwargs):
    """The timm reference (eval, seeded, perturbed) and its state dict, made once per session."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        torch.manual_seed(0)
        ref = timm.create_model(_ref_name(name), pretrained=False, **kwargs).eval()
        perturb(ref)
        _CACHE[key] = ref, {k: v.clone() for k, v in ref.state_dict().items()}
    return _CACHE[key]


def _x(batch=2, chans=3):
    return torch.randn(batch, chans, 224, 224, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", FAMILIES)
def test_same_logits_after_port(name):
    ref, state = reference(name)
    model = composer.build(name, seed=None).eval()
    report = from_timm(model, state)
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert report.loaded == len(state) and not report.skipped
    x = _x()
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff < TOL, f"{name}: max |logit diff| {diff:.2e}"


def test_every_family_with_a_timm_reference_declares_a_mapping():
    from composer.api import zoo_index

    for name, path in zoo_index().items():
        ref = composer.load(name).reference
        if ref and ref.startswith("timm:") and path.stem in {"swin", "vit", "convnext", "pvt_v2", "metaformer"}:
            assert path.with_name(path.stem + ".port.yaml").is_file(), name


def test_per_model_sections_do_not_collide():
    path = composer.build("poolformer_s12", device="meta", seed=None)
    pool = read_mapping(mapping_path(path), ("poolformer_s12",))
    ca = read_mapping(mapping_path(path), ("caformer_s18",))
    key = "stages.0.blocks.0.layer_scale1.scale"
    assert pool.our_to_ref(key) == key  # PoolFormer's layer scale keeps timm's name
    assert ca.our_to_ref(key) == "stages.0.blocks.0.res_scale1.scale"


@pytest.mark.parametrize("name", ["vit_ti", "convnext_atto"])
def test_other_num_classes_skips_the_classifier(name):
    ref, state = reference(name)
    model = composer.build(name, num_classes=10, seed=None).eval()
    report = from_timm(model, state)
    assert report.ok and len(report.skipped) == 2
    assert all("classifier" in why for _, why in report.skipped)
    assert model.get_classifier().weight.shape[0] == 10
    torch.manual_seed(0)
    ref10 = timm.create_model(_ref_name(name), pretrained=False, num_classes=10).eval()
    cls = {k for k, v in ref10.state_dict().items() if v.shape != state[k].shape}
    ref10.load_state_dict({k: v for k, v in state.items() if k not in cls}, strict=False)
    x = _x(batch=1)
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
        theirs = ref10.forward_head(ref10.forward_features(x), pre_logits=True)
        assert model(x).shape == (1, 10)
    assert (ours - theirs).abs().max().item() < TOL


def test_in_chans_adapts_the_input_conv():
    from timm.models import adapt_input_conv

    ref, state = reference("convnext_atto")
    for chans in (1, 5):
        model = composer.build("convnext_atto", in_chans=chans, seed=None).eval()
        report = from_timm(model, state)
        assert report.ok and [a[0] for a in report.adapted] == ["stem.patch_embed.proj.weight"]
        expect = adapt_input_conv(chans, state["stem.0.weight"])
        assert torch.equal(model.state_dict()["stem.patch_embed.proj.weight"], expect)


def _feature_reference(name, state):
    """timm's features_only model carrying the same weights (its top-level names join with '_')."""
    torch.manual_seed(0)
    feat = timm.create_model(_ref_name(name), pretrained=False, features_only=True).eval()
    norm = {re.sub(r"[._]", "", k): v for k, v in state.items()}
    feat.load_state_dict({k: norm[re.sub(r"[._]", "", k)] for k in feat.state_dict()})
    return feat


@pytest.mark.parametrize("name", ["convnext_atto", "swin_t", "pvt_v2_b0"])
def test_features_only_parity(name):
    _, state = reference(name)
    feat = _feature_reference(name, state)
    model = composer.build(name, features_only=True, seed=None).eval()
    report = from_timm(model, state)
    assert report.ok and report.skipped and all("the model has none" in why for _, why in report.skipped)
    assert [f["num_chs"] for f in model.feature_info] == feat.feature_info.channels()
    assert [f["reduction"] for f in model.feature_info] == feat.feature_info.reduction()
    x = _x(batch=1)
    with torch.no_grad():
        ours, theirs = model(x), feat(x)
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        if t.shape != o.shape:  # timm's swin gives NHWC maps
            t = t.permute(0, 3, 1, 2)
        assert o.shape == t.shape and (o - t).abs().max().item() < TOL


def test_split_and_ignore_are_declarative():
    """A checkpoint with a fused q|kv tensor and an extra buffer ports through a mapping that says so."""
    ref, state = reference("pvt_v2_b0")
    fused = {}
    for k, v in state.items():
        m = re.match(r"(.*\.attn\.)(q|kv)\.(weight|bias)$", k)
        if m and m.group(2) == "q":
            fused[f"{m.group(1)}qkv.{m.group(3)}"] = torch.cat([v, state[f"{m.group(1)}kv.{m.group(3)}"]])
        elif not m:
            fused[k] = v
    fused["extra.num_batches_tracked"] = torch.tensor(3)
    data = yaml.safe_load(mapping_path(composer.build("pvt_v2_b0", device="meta", seed=None)).read_text())
    model = composer.build("pvt_v2_b0", seed=None).eval()
    with pytest.raises(ComposerError, match="missing"):
        from_timm(model, fused, data)
    data["split"] = [{"from": r"\.qkv\.", "into": [".q.", ".kv."], "sizes": [1, 2], "dim": 0}]
    data["ignore"] = [r"^extra\."]
    report = from_timm(model, fused, data)
    assert report.ok and len(report.split) == 32 and report.ignored == ["extra.num_batches_tracked"]
    x = _x(batch=1)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < TOL


def test_bad_mapping_is_a_located_error():
    model = composer.build("pvt_v2_b0", device="meta", seed=None)
    with pytest.raises(ComposerError, match="ours: REGEX"):
        from_timm(model, {}, {"source": "timm", "rules": [["a", "b"]]})
    with pytest.raises(ComposerError, match="unsupported source"):
        from_timm(model, {}, {"source": "hub"})


def test_cli_round_trip(tmp_path, capsys):
    from safetensors.torch import load_file

    ref, state = reference("convnext_atto")
    ckpt = tmp_path / "atto.pth"
    torch.save({"state_dict": state, "epoch": 3}, ckpt)
    out = tmp_path / "out" / "atto.safetensors"
    status = main(["port", "convnext_atto", str(ckpt), "-o", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "24 reshaped" in text and "ok: every tensor is accounted for" in text and f"wrote {out}" in text
    assert "outputs compared on a random input [2, 3, 224, 224]: largest difference" in text  # timm's own model
    model = composer.build("convnext_atto", seed=None).eval()
    model.load_state_dict(load_file(out))
    x = _x(batch=1)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() < TOL
    assert sorted(p.name for p in out.parent.iterdir()) == ["atto.safetensors"]

    # a safetensors checkpoint, --from named explicitly, another head size
    from safetensors.torch import save_file

    st = tmp_path / "atto.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    out10 = tmp_path / "atto10.safetensors"
    status = main(["port", "convnext_atto", "--from", "timm:convnext_atto", str(st), "--num-classes", "10",
                   "-o", str(out10)])
    text = capsys.readouterr().out
    assert status == 0 and "skipped (2)" in text and load_file(out10)["head.classifier.weight"].shape == (10, 320)


def test_cli_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    _, state = reference("convnext_atto")
    ckpt = tmp_path / "atto.pth"
    torch.save({k: v for k, v in state.items() if k != "stages.1.downsample.1.weight"}, ckpt)
    out = tmp_path / "atto.safetensors"
    status = main(["port", "convnext_atto", str(ckpt), "-o", str(out)])
    cap = capsys.readouterr()
    assert status == 2 and "not written" in cap.err
    assert "stages.1.downsample.conv.weight" in cap.out and "NOT OK" in cap.out
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["atto.pth"]
    assert main(["port", "convnext_atto", str(ckpt), "--from", "hub:x", "-o", str(out)]) == 2
    assert main(["port", "convnext_atto", str(tmp_path / "nope.pth"), "-o", str(out)]) == 2
    assert not out.exists()
