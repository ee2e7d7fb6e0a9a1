"""The timm bridge (composer/timm.py, composer/timm_api.py), driven through timm's own API:
`create_model` and its keywords, `create_optimizer_v2(layer_decay=...)`, `resolve_data_config`,
`ModelEmaV3`, features_only; the expected values come from timm's own models of the same
architectures where there is one."""

from __future__ import annotations

import importlib
import re
import warnings

import pytest
import torch

timm = pytest.importorskip("timm")

import composer  # noqa: E402
import composer.timm as ctimm  # noqa: E402
from composer import ComposerError  # noqa: E402
from helpers import REPO, write  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402


def reference(name: str, **kw):
    """timm's own model, allocated on the meta device (only its structure is read)."""
    with torch.device("meta"):
        return timm.create_model(name, **kw)


def test_every_zoo_model_is_registered():
    # the zoo's names read from the blueprint files themselves (every `model NAME` statement)
    names = {m for p in (REPO / "blueprints").glob("*.arch") for m in re.findall(r"^model (\w+)", p.read_text(), re.M)}
    registered = set(timm.list_models("composer_*"))
    assert {n for n in names if "composer_" + n not in registered} == set()
    assert len(registered) >= len(names) > 150


def test_registering_plans_nothing(monkeypatch):
    """Importing composer.timm registers entry points only: no model is resolved or planned."""
    def refuse(*a, **k):
        raise AssertionError("a model was planned at import")

    monkeypatch.setattr(composer.api, "load", refuse)
    monkeypatch.setattr(composer.api, "plan", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns that each name is registered again
        importlib.reload(ctimm)
    assert timm.is_model("composer_swin_t")


def test_create_model_keywords():
    m = timm.create_model("composer_convnext_atto", pretrained=False, num_classes=10, drop_rate=0.1,
                          drop_path_rate=0.1, global_pool="max", in_chans=1, img_size=64).eval()
    x = torch.randn(2, 1, 64, 64)
    assert m(x).shape == (2, 10) and m.num_classes == 10
    drops = [d.p for d in m.head.modules() if isinstance(d, torch.nn.Dropout)]
    assert drops == [0.1]
    # drop_path_rate: timm's schedule, torch.linspace(0, rate, blocks)
    assert m.plan.drop_path == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    # global_pool="max": pre-logits are the head's norm of the max over positions
    with torch.no_grad():
        f = m.forward_features(x)
        assert torch.allclose(m.forward_head(f, pre_logits=True), m.head.norm(f.amax((2, 3))), atol=1e-6)
    # in training, stochastic depth changes the output from call to call; without it, nothing does
    plain = timm.create_model("composer_convnext_atto", num_classes=10, img_size=64).train()
    with torch.no_grad():
        assert torch.equal(plain(x[:, :1].expand(-1, 3, -1, -1)), plain(x[:, :1].expand(-1, 3, -1, -1)))
        m.train()
        m.head.head_drop.p = 0.0
        # every block of both samples is kept in a call with probability prod(1 - p_i)^2, about 0.3 for
        # linspace(0, 0.1) over 12 blocks: eight calls that all agree, about 1 in 20,000
        first = m(x)
        assert any(not torch.equal(first, m(x)) for _ in range(7))


def test_refusals_are_clear():
    with pytest.raises(ComposerError, match="without pretrained weights"):
        timm.create_model("composer_convnext_atto", pretrained=True)
    with pytest.raises(ComposerError, match="global_pool='token' does not fit"):
        timm.create_model("composer_convnext_atto", global_pool="token", device="meta")
    with pytest.raises(ComposerError, match="global_pool must be one of"):
        timm.create_model("composer_convnext_atto", global_pool="catavgmax", device="meta")
    with pytest.raises(ComposerError, match="drop_path_rate must be"):
        timm.create_model("composer_convnext_atto", drop_path_rate=1.0, device="meta")
    with pytest.raises(ComposerError, match="feature index 4 is out of range"):  # 4 stages: 0 to 3
        timm.create_model("composer_convnext_atto", features_only=True, out_indices=(0, 4), device="meta")
    with pytest.raises(ComposerError, match="no parameter 'depth'"):  # other keywords: the blueprint's
        timm.create_model("composer_convnext_atto", depth=3, device="meta")


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_checkpoint_path(tmp_path, suffix):
    from safetensors.torch import save_file

    src = timm.create_model("composer_resnet18", num_classes=4, img_size=64)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)  # differs from the seeded initialisation a new model gets
    path = tmp_path / f"w.{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, path) if suffix == "safetensors" else torch.save(state, path)
    m = timm.create_model("composer_resnet18", num_classes=4, img_size=64, checkpoint_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))


def test_pretrained_cfg_and_data_config():
    m = timm.create_model("composer_convnext_atto", img_size=64, num_classes=7, device="meta")
    assert m.default_cfg is m.pretrained_cfg
    cfg = resolve_data_config({}, model=m)
    assert cfg["input_size"] == (3, 64, 64)
    assert cfg["mean"] == IMAGENET_DEFAULT_MEAN and cfg["std"] == IMAGENET_DEFAULT_STD
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    pc = m.pretrained_cfg
    assert pc["num_classes"] == 7 and pc["architecture"] == "composer_convnext_atto"
    # first_conv and classifier name real modules (timm adapts in_chans and heads through them)
    modules = dict(m.named_modules())
    assert isinstance(modules[pc["first_conv"]], torch.nn.Conv2d) and modules[pc["first_conv"]].in_channels == 3
    assert modules[pc["classifier"]] is m.get_classifier()
    overlay = timm.create_model("composer_convnext_atto", device="meta", pretrained_cfg_overlay={"crop_pct": 0.95})
    assert resolve_data_config({}, model=overlay)["crop_pct"] == 0.95


def test_model_ema_v3():
    m = timm.create_model("composer_convnext_atto", num_classes=3, img_size=32)
    ema = ModelEmaV3(m, decay=0.5)
    before = ema.module.head.classifier.weight.clone()
    with torch.no_grad():
        m.head.classifier.weight.add_(2.0)
    ema.update(m)
    assert torch.allclose(ema.module.head.classifier.weight, before + 1.0)
    assert ema.module(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("ours, theirs, blocks", [
    ("composer_convnext_atto", "convnext_atto", 12),
    ("composer_resnet18", "resnet18", 8),
    ("composer_vit_ti", "vit_tiny_patch16_224", 12),
])
def test_layer_decay_sees_every_block(ours, theirs, blocks):
    """One group per layer: the stem, each block, the head, as timm's layer decay groups timm's own
    model of the same architecture."""
    m = timm.create_model(ours, device="meta")

    def layers(model):
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
        return opt, sorted({g["lr_scale"] for g in opt.param_groups})

    opt, scales = layers(m)
    assert len(scales) == len(layers(reference(theirs))[1]) == blocks + 2
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    first = next(n for n in named if n.startswith("stages."))
    assert scale[id(named["stem." + next(n for n in named if n.startswith("stem.")).split(".", 1)[1]])] == scales[0]
    assert scale[id(named[first])] == scales[1]
    assert scale[id(m.get_classifier().weight)] == scales[-1] == 1.0


def test_no_weight_decay_as_timm():
    m = timm.create_model("composer_vit_ti", img_size=32, device="meta")
    ref = reference("vit_tiny_patch16_224")
    nwd = m.no_weight_decay()
    named = dict(m.named_parameters())
    assert nwd <= set(named)
    # timm's: pos_embed and cls_token (of those it names, the ones the model has)
    assert len(nwd) == len(ref.no_weight_decay() & {n for n, _ in ref.named_parameters()}) == 2
    opt = create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert not any(id(named[n]) in decayed for n in nwd)
    swin = composer.build("swin_t", device="meta")
    tables = {n for n in swin.no_weight_decay() if "relative_position_bias_table" in n}
    assert len(tables) == len([n for n, _ in reference("swin_tiny_patch4_window7_224").named_parameters()
                               if "relative_position_bias_table" in n]) == 12


def test_features_only_through_timm():
    f = timm.create_model("composer_resnet18", features_only=True, out_indices=(1, 2, 3), img_size=64).eval()
    ref = reference("resnet18", features_only=True, out_indices=(2, 3, 4))  # timm counts the stem as 0
    assert f.feature_info.channels() == ref.feature_info.channels() == [128, 256, 512]
    assert f.feature_info.reduction() == ref.feature_info.reduction() == [8, 16, 32]
    plan = composer.load("resnet18", img_size=64)
    assert f.feature_info.channels() == [st.y.channels for st in plan.stages[1:]]
    assert f.feature_info.channels(0) == 64 and f.feature_info.reduction([0, 3]) == [4, 32]
    assert [d["module"] for d in f.feature_info.get_dicts()] == ["stages.1", "stages.2", "stages.3"]
    assert [fi["num_chs"] for fi in f.feature_info] == [128, 256, 512]  # still a list of dicts
    with torch.no_grad():
        maps = f(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in maps] == [(c, 64 // r, 64 // r) for c, r in
                                                  zip(f.feature_info.channels(), f.feature_info.reduction())]


def test_forward_intermediates_as_timm():
    m = composer.build("convnext_atto", img_size=64).eval()
    ref = timm.create_model("convnext_atto").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        _, theirs = ref.forward_intermediates(x)
        assert torch.equal(final, m.forward_features(x))
        assert [t.shape for t in inter] == [t.shape for t in theirs]
        last2 = m.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in last2] == [t.shape for t in theirs[2:]]
        early = m.forward_intermediates(x, indices=[1, -3], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], inter[1]) and torch.equal(early[1], inter[1])
        nlc = m.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)[0]
        assert torch.equal(nlc, inter[-1].flatten(2).transpose(1, 2))
        assert m.prune_intermediate_layers(indices=(1,)) == [1]
        assert len(m.stages) == 2 and torch.equal(m(x), inter[1])


def test_forward_intermediates_vit_blocks_and_norm():
    m = composer.build("vit_ti", img_size=32).eval()
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, indices=[0, 11], norm=True)
        _, theirs = ref.forward_intermediates(x, indices=[0, 11], norm=True)
        assert [t.shape for t in inter] == [t.shape for t in theirs] == [(1, 192, 2, 2)] * 2
        assert torch.equal(final, m.forward_features(x))
        # norm: the head's layernorm on the last block's tokens, class token left out
        assert torch.allclose(inter[1].flatten(2).transpose(1, 2), m.head.norm(final)[:, 1:], atol=1e-6)
        assert len(m.forward_intermediates(x, intermediates_only=True)) == 12
        every = m.forward_intermediates(x, intermediates_only=True)
        early = m.forward_intermediates(x, indices=[2, 5], stop_early=True)  # blocks 6 to 11 not run
        theirs = ref.forward_intermediates(x, indices=[2, 5], stop_early=True)
        assert torch.equal(early[1][0], every[2]) and torch.equal(early[1][1], every[5])
        env = {"input": x}
        y = m.stem(x, env)
        for block in m.stages[0].blocks[:6]:
            y = block(y, env)
        assert torch.equal(early[0], y) and early[0].shape == theirs[0].shape  # the tokens after block 5


def test_register_a_blueprint_of_ones_own(tmp_path):
    path = write(tmp_path, """
import "lib/convnets"

model tiny_a(num_classes = 10, img_size = 32) {
    input image(3, img_size)
    stem conv(8, 3, stride = 2)
    stages for i in 0..2 { downsample i > 0 ? conv(16, 2, stride = 2) : none; repeat 1 convnext(8 * (i + 1)) }
    head { global_pool("avg"); classifier(num_classes) }
}
model tiny_b : tiny_a { img_size = 16 }
""", "mine.arch")
    assert ctimm.register(f"{path}:tiny_b", "my_tiny") == "my_tiny"
    m = timm.create_model("my_tiny", num_classes=3, drop_rate=0.2)
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert m.pretrained_cfg["input_size"] == (3, 16, 16)
    with pytest.raises(ComposerError, match="defines 2 models"):
        ctimm.register(path)
    with pytest.raises(ComposerError, match="no model 'tiny_c'"):
        ctimm.register(f"{path}:tiny_c")


def test_fine_tuning_from_no_classes():
    """timm's fine-tuning pattern: built with num_classes=0 (the classifier an identity), then
    reset_classifier(n): the new classifier runs, and pretrained_cfg says n."""
    model = timm.create_model("composer_resnet18", num_classes=0, img_size=32).eval()
    assert model.pretrained_cfg["num_classes"] == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model(x)
        model.reset_classifier(7)
        logits = model(x)
    assert features.shape == (2, 512) and logits.shape == (2, 7)
    assert torch.allclose(logits, model.head.fc(features), atol=1e-6)
    assert model.pretrained_cfg["num_classes"] == 7 == model.num_classes


def test_pruned_model_gives_the_points_it_kept():
    """After prune_intermediate_layers([0, 1]) the model has the first two stages' points only:
    forward_intermediates() gives those, equal to the unpruned model's, and a dropped one is refused."""
    full = composer.build("resnet18", img_size=64).eval()
    pruned = composer.build("resnet18", img_size=64).eval()
    pruned.load_state_dict(full.state_dict())
    kept = pruned.prune_intermediate_layers([0, 1])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = pruned.forward_intermediates(x, intermediates_only=True)
        want = full.forward_intermediates(x, indices=kept, intermediates_only=True)
    assert len(got) == len(want) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ComposerError):
        pruned.forward_intermediates(x, indices=[3])
