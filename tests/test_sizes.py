"""A model built once runs at every input size its architecture admits (issue 13, first part):
the tokens' grid follows the input at run time, other sizes are refused at the entry with a clear
exception, and the admitted sizes are derived from the plan. References are timm's models, built
inside the tests, at the same other sizes."""

from __future__ import annotations

import pytest
import torch

import composer
from composer.port import from_timm, from_torchvision
from composer.sizes import admits, rule_text
from helpers import REPO, perturb, write

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

SIZES = [(256, 256), (192, 320)]  # another square size and a non-square one, multiples of 32

# parity rows whose reference runs at other sizes and whose composer model now does too, with
# timm's keyword arguments for its dynamic-size form where it needs one (ours: dynamic_img_size)
DYNAMIC = {"dynamic_img_size": True}
ROWS = {
    "resnet50": {}, "mobilenetv2_100": {}, "convnext_atto": {}, "poolformer_s12": {}, "inception_next_t": {},
    "pvt_v2_b0": {}, "twins_pcpvt_small": {}, "repvgg_a0": {}, "shufflenet_v2_x1_0": {},
    "vit_ti": DYNAMIC, "deit_ti_distilled": DYNAMIC,
    "swin_t": {"strict_img_size": False},  # timm pads the windows and makes the shift mask per size
    "efficientvit_m0": {},  # windows and bias tables of the build grid, the map padded to the window
    "crossvit_tiny": {},  # each branch's image scaled (bicubic) to its build size first, as timm
}


def _pair(name, **kwargs):
    source, ref_name = composer.load(name).reference.split(":", 1)
    torch.manual_seed(0)
    if source == "timm":
        ref = timm.create_model(ref_name, pretrained=False, num_classes=10, **kwargs).eval()
    else:
        ref = torchvision.models.get_model(ref_name, weights=None, num_classes=10).eval()
    perturb(ref)
    ours = composer.build(name, num_classes=10, dynamic_img_size=bool(kwargs)).eval()
    report = (from_timm if source == "timm" else from_torchvision)(ours, ref.state_dict())
    assert report.ok
    return ours, ref


@pytest.mark.parametrize("name", ROWS)
def test_reference_logits_at_other_sizes(name):
    ours, ref = _pair(name, **ROWS[name])
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            a, b = ours(x), ref(x)
        assert a.shape == b.shape == (1, 10)
        assert (a - b).abs().max().item() < 1e-4, size


def test_caformer_and_convformer_run_at_other_sizes_as_timm():
    for name, ref_name in (("caformer_s18", "caformer_s18"), ("convformer_s18", "convformer_s18")):
        torch.manual_seed(0)
        ref = timm.create_model(ref_name, pretrained=False, num_classes=10).eval()
        ours = composer.build(name, num_classes=10).eval()
        assert from_timm(ours, ref.state_dict()).ok
        x = torch.randn(1, 3, 192, 256)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max().item() < 1e-4


def test_refusal_names_the_model_the_size_and_the_admitted_sizes():
    model = composer.build("vit_ti").eval()
    with pytest.raises(composer.InputSizeError) as exc:
        model(torch.randn(1, 3, 256, 256))
    text = str(exc.value)
    assert "vit_ti" in text and "256x256" in text and "built for 224x224" in text
    assert "dynamic_img_size" in text  # the way to allow it
    assert "fixed at 224" in text


def test_window_attention_at_multiples_of_its_window_without_padding():
    """Without dynamic_img_size, Swin runs where every stage's grid is a multiple of the window
    (448: 112, 56, 28, 14), with a shift mask made for that grid; 256 (a 64 grid) is refused."""
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10,
                            strict_img_size=False).eval()
    ours = composer.build("swin_t", num_classes=10).eval()
    assert from_timm(ours, ref.state_dict()).ok
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4
    with pytest.raises(composer.InputSizeError, match="dynamic_img_size=True to pad") as exc:
        ours(torch.randn(1, 3, 256, 256))
    # 448 = 224 * 2 admits and 256 does not: the grids must be multiples of 7 at every stride
    assert "multiples of 224 from 224" in str(exc.value)


def test_refusal_happens_before_the_forward_and_wrong_channels_too():
    model = composer.build("swin_t").eval()
    calls = []
    model.stem.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(composer.InputSizeError, match="swin_t"):
        model(torch.randn(1, 3, 256, 256))
    with pytest.raises(composer.InputSizeError, match="3 input channels, got 1"):
        model(torch.randn(1, 1, 224, 224))
    assert calls == []  # nothing ran: refused at the entry, not inside torch


def test_admitted_sizes_are_derived_from_the_plan():
    vit = composer.load("vit_ti")
    assert rule_text(vit) == "H and W: fixed at 224"
    # a patch size of 16 that must divide the input (timm's PatchEmbed asserts the same)
    assert rule_text(vit, dynamic=True) == "H and W: multiples of 16 from 16"
    assert admits(vit, (224, 224)) is None
    assert "pos_embed" in admits(vit, (240, 224))


def test_a_rule_from_the_strides(tmp_path):
    """Two stride-2 convolutions without padding and a 2x2 patch merge need even sizes here and
    there: the probe finds exactly the sizes the shape rules give (counted by hand)."""
    path = write(tmp_path, """
model m(img_size = 32) {
    input image(3, img_size)
    stem { conv(8, 2, stride = 2, padding = 0); patch_merging(16) }
    head { global_pool("avg"); classifier(4) }
}
""")
    plan = composer.load(path)
    # conv k2 s2 p0: floor(n / 2); patch_merging needs that even: n in {4, 5, 8, 9, 12, 13, ...}
    ok = [n for n in range(1, 20) if admits(plan, (n, 32)) is None]
    assert ok == [4, 5, 8, 9, 12, 13, 16, 17]
    model = composer.build(path).eval()
    y = model(torch.randn(2, 3, 13, 8))  # patch merging follows the grid it gets: 6x4 -> 3x2
    assert y.shape == (2, 4)


def test_tokens_fold_back_on_the_grid_they_get(tmp_path):
    """A map -> tokens -> map round trip at a non-square size equals the identity (the grid comes
    from the input at run time, not from the build size)."""
    path = write(tmp_path, """
model m(img_size = 16) {
    input image(4, img_size)
    stem { layernorm; conv(4, 1) }
}
""")
    model = composer.build(path).eval()
    x = torch.randn(1, 4, 12, 20)
    ln = model.stem.layernorm
    with torch.no_grad():
        expected = model.stem.conv(torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (4,), ln.weight, ln.bias)
                                   .permute(0, 3, 1, 2))
        assert torch.allclose(model.forward_features(x), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["convnext_atto", "pvt_v2_b0", "resnet50"])
def test_features_at_dense_prediction_sizes(name):
    """features_only at 512x384 and 800x608: each feature's shape is the one inferred at that size."""
    from composer.sizes import replan

    model = composer.build(name, features_only=True).eval()
    plan = composer.load(name)
    for size in ((512, 384), (800, 608)):
        with torch.no_grad():
            feats = model(torch.randn(1, 3, *size))
        expected = [st.y for st in replan(plan, size).stages]
        assert [tuple(f.shape[1:]) for f in feats] == [(y.channels, *y.spatial) for y in expected]


def test_maxvit_runs_where_its_window_and_grid_divide_every_stage_as_timm():
    """MaxViT keeps its window and grid of 7 and their relative-bias maps (sized by the window) at
    every input size; timm's MaxxVit asserts that both divide each stage's grid, so 448x224 (grids
    112x56 ... 14x7) runs and 256 (a 64 grid) is refused by both."""
    torch.manual_seed(0)
    ref = timm.create_model("maxvit_tiny_tf_224", pretrained=False, num_classes=10).eval()
    perturb(ref)
    ours = composer.build("maxvit_t", num_classes=10).eval()
    assert from_timm(ours, ref.state_dict()).ok
    x = torch.randn(1, 3, 448, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-4
    x = torch.randn(1, 3, 256, 256)
    with pytest.raises(AssertionError), torch.no_grad():
        ref(x)
    with pytest.raises(composer.InputSizeError, match="does not divide"):
        ours(x)


def test_gcvit_is_fixed_size_as_timm():
    """GC-ViT's global queries are pooled by a number of levels fixed at the build (down to the
    window), then shared by every window as its queries: at another grid they no longer are one
    window's worth. timm's GlobalContextVit fails at 448, 448x224 and 280 (a reshape), and 256
    (windows of 7 on a 64 grid); ours refuses them at the entry and admits only the sizes that
    give the build's grids."""
    torch.manual_seed(0)
    ref = timm.create_model("gcvit_xxtiny", pretrained=False, num_classes=10).eval()
    ours = composer.build("gcvit_xxt", num_classes=10).eval()
    for size in ((448, 448), (448, 224), (280, 280), (256, 256)):
        x = torch.randn(1, 3, *size)
        with pytest.raises(RuntimeError), torch.no_grad():
            ref(x)
        with pytest.raises(composer.InputSizeError, match="gcvit_xxt"):
            ours(x)
    assert rule_text(composer.load("gcvit_xxt")) == "H and W: 221 to 224"


@pytest.mark.parametrize("name,lengths", [("ecg_caformer", (2500, 3001)), ("ecg_convnext", (2048, 7500)),
                                          ("ecg_1d", (1000, 2990))])
def test_one_dimensional_models_at_other_lengths(name, lengths):
    """12-lead ECG backbones built for 10 s at 500 Hz run at other recording lengths their strides
    admit; each feature has the length inferred at that size."""
    from composer.sizes import replan

    target = f"{REPO / 'examples' / name}.arch:{name}"
    model = composer.build(target, features_only=True).eval()
    plan = composer.load(target)
    for n in lengths:
        assert admits(plan, (n,)) is None
        with torch.no_grad():
            feats = model(torch.randn(1, 12, n))
        assert [tuple(f.shape[1:]) for f in feats] == [(st.y.channels, *st.y.spatial) for st in replan(plan, (n,)).stages]
    with pytest.raises(composer.InputSizeError, match=name):
        model(torch.randn(1, 12, 1))


def test_fastvit_at_other_sizes_and_mixer_refused_as_timm():
    """FastViT (built at 256) gives timm's logits at 224 and 192x320; MLP-Mixer's token MLP is
    sized by the token count, so timm asserts the size and ours refuses it at the entry."""
    ours, ref = _pair("fastvit_t8")
    for size in ((224, 224), (192, 320)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max().item() < 1e-4, size
    ours, ref = _pair("mixer_s16")
    x = torch.randn(1, 3, 256, 256)
    with pytest.raises(AssertionError):
        ref(x)
    with pytest.raises(composer.InputSizeError, match="token_mlp"):
        ours(x)


def test_sizes_without_a_pattern_are_stated_as_every_run():
    """An axis whose admitted sizes have no step or period is stated as all its runs, not the
    first few (halonet26t's read "only 241, ..., 248" while 249 to 256 and 497 to 512 run too)."""
    from composer.sizes import AxisRule

    rule = AxisRule(8, False, 3, 1, 16, irregular=(3, 4, 5, 6, 9, 10, 12, 13, 14, 15, 16))
    assert rule.text() == "only 3 to 6, 9, 10, 12 to 16 (up to 16)"
    periodic = AxisRule(8, False, 1, 1, 64, irregular=(1, 2, 5, 6, 7), period=16)
    assert periodic.text() == "1, 2, 5 to 7 plus multiples of 16"
