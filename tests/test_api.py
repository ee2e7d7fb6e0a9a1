"""The built model's timm-style API: classifier, features, overrides, init, state_dict keys."""

import torch

import composer
from helpers import n_params, write


def test_classifier_api():
    model = composer.build("convnext_atto", img_size=64).eval()
    assert model.num_classes == 1000
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 320, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 320)
    model.reset_classifier(10)
    assert model.num_classes == 10 and model(x).shape == (2, 10)
    model.reset_classifier(0)
    assert model(x).shape == (2, 320)  # no classifier: pooled, normed features
    assert isinstance(model.get_classifier(), torch.nn.Identity)


def test_num_classes_changes_only_the_head():
    a, b = composer.build("vit_ti", device="meta"), composer.build("vit_ti", num_classes=10, device="meta")
    assert n_params(a) - n_params(b) == 192 * (1000 - 10) + (1000 - 10)  # the head's weight and bias


def test_features_only_matches_stages():
    model = composer.build("swin_t", features_only=True, img_size=224).eval()
    info = model.feature_info
    assert [f["num_chs"] for f in info] == [96, 192, 384, 768]  # Swin's widths
    assert [f["reduction"] for f in info] == [4, 8, 16, 32]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    assert not hasattr(model, "head")


def test_out_indices():
    model = composer.build("convnext_atto", features_only=True, out_indices=(1, 3), img_size=64)
    assert [f["reduction"] for f in model.feature_info] == [8, 32]


def test_in_chans_and_img_size():
    model = composer.build("pvt_v2_b0", in_chans=1, img_size=128, num_classes=3).eval()
    assert model.stem.patch_embed.proj.weight.shape == (32, 1, 7, 7)
    with torch.no_grad():
        assert model(torch.randn(1, 1, 128, 128)).shape == (1, 3)


def test_seeded_init_is_deterministic():
    a, b = composer.build("convnext_atto", seed=1), composer.build("convnext_atto", seed=1)
    c = composer.build("convnext_atto", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["stages.0.blocks.0.conv_dw.weight"], sc["stages.0.blocks.0.conv_dw.weight"])


def test_init_conventions():
    model = composer.build("vit_ti", seed=0)
    w = model.stages[0].blocks[0].token_mixer.qkv.weight
    # timm: trunc_normal_(std=0.02) with the cut at +-2 absolute, i.e. a normal of std 0.02 in practice
    assert abs(w.std().item() - 0.02) < 0.001 and abs(w.mean().item()) < 0.001
    assert torch.count_nonzero(model.stages[0].blocks[0].token_mixer.qkv.bias) == 0
    gamma = composer.build("convnext_atto").stages[0].blocks[0].gamma.scale
    assert torch.all(gamma == 1e-6)  # ConvNeXt's layer-scale init


def test_state_dict_keys_follow_the_blueprint():
    keys = set(composer.build("swin_t", device="meta").state_dict())
    for key in [
        "stem.patch_embed.proj.weight",
        "stages.1.downsample.patch_merging.reduction.weight",
        "stages.2.blocks.3.token_mixer.qkv.weight",
        "stages.2.blocks.3.token_mixer.relative_position_bias_table",
        "stages.2.blocks.3.mlp.fc1.weight",
        "stages.2.blocks.3.norm2.weight",
        "head.classifier.weight",
    ]:
        assert key in keys, key
    # stable: the same keys in the same order on a second build
    assert list(composer.build("swin_t", device="meta").state_dict()) == list(
        composer.build("swin_t", device="meta").state_dict())


def test_named_tensors_and_outputs(tmp_path):
    path = write(tmp_path, """
model two(img_size = 32) {
    input image(3, img_size)
    stem { conv(8, 3, stride = 2); save a; from input; conv(8, 5, stride = 2, padding = 2); save b }
    stage {
        block { parallel add { from a; from b }; save fused }
        block { conv(16, 3, stride = 2); save c }
    }
    head { global_pool("avg"); classifier(10) }
    outputs = ["fused", "c"]
}
""")
    model = composer.build(path).eval()
    # hand count: two stem convs, the stage conv and the classifier
    assert n_params(model) == (3 * 8 * 9 + 8) + (3 * 8 * 25 + 8) + (8 * 16 * 9 + 16) + (16 * 10 + 10)
    x = torch.randn(2, 3, 32, 32)
    stem = model.stem
    expected = stem.conv1(x) + stem.conv2(x)  # the fused tensor, computed by hand
    feats = composer.build(path, features_only=True)
    feats.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head")})
    fused, c = feats(x)
    assert torch.allclose(fused, expected, atol=1e-6)
    assert c.shape == (2, 16, 8, 8)
    assert [f["module"] for f in feats.feature_info] == ["fused", "c"]


def test_drop_path_is_applied_in_training():
    model = composer.build("convnext_atto", img_size=64, seed=0)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_eval_forward_is_deterministic():
    model = composer.build("poolformer_s12", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_torch_export_round_trip():
    model = composer.build("convnext_atto", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        model = composer.build("convnext_atto", img_size=64, seed=0)
        model.set_grad_checkpointing(ckpt)
        model(x).sum().backward()
        grads.append(model.stem.patch_embed.proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_zoo_home_agrees_with_the_full_index():
    """A zoo name is found by a textual search confirmed by parsing one file (`composer info swin_t`
    parses swin.arch alone); every zoo model must land in the file the parsed index names."""
    from composer.api import zoo_home, zoo_index

    index = zoo_index()
    assert len(index) > 150
    assert {name: zoo_home(name) for name in index} == index
    assert zoo_home("no_such_model") is None and zoo_home("lib/metaformer") is None
