"""RepVGG and FastViT: timm parity of the training form, and the fused (re-parameterized) form
against the training form and against timm's `reparameterize_model`."""

import copy

import pytest
import torch

import composer
from composer.cli import main
from composer.port import from_timm
from helpers import n_params, write

timm = pytest.importorskip("timm")
from timm.utils.model import reparameterize_model  # noqa: E402

PAIRS = {  # ours -> timm
    "repvgg_a0": "repvgg_a0", "repvgg_a1": "repvgg_a1", "repvgg_a2": "repvgg_a2", "repvgg_b0": "repvgg_b0",
    "repvgg_b1": "repvgg_b1", "fastvit_t8": "fastvit_t8", "fastvit_t12": "fastvit_t12",
    "fastvit_s12": "fastvit_s12", "fastvit_sa12": "fastvit_sa12", "fastvit_sa24": "fastvit_sa24",
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_param_count_equals_timm(name):
    with torch.device("meta"):
        expected = n_params(timm.create_model(PAIRS[name]))
    assert composer.load(name).params == expected
    assert composer.load(name).reference == f"timm:{PAIRS[name]}"


def _perturbed(ref_name, **kwargs):
    """A timm model whose BN statistics and layer scales are not the trivial init values, so that
    every branch matters (timm's layer scales start at 1e-5)."""
    torch.manual_seed(0)
    ref = timm.create_model(ref_name, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.05)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.bias.add_(torch.randn(m.num_features, generator=g) * 0.05)
        ref.get_classifier().weight.mul_(30)
    return ref


@pytest.mark.parametrize("name, size, kwargs", [
    ("repvgg_a0", 224, {}),
    ("fastvit_t8", 256, {"layer_scale_init_value": 0.3}),
    ("fastvit_sa12", 128, {"layer_scale_init_value": 0.3}),   # attention stage + RepCPE
])
def test_logits_match_timm_train_and_fused(name, size, kwargs):
    torch.set_num_threads(1)
    ref = _perturbed(PAIRS[name], **kwargs)
    model = composer.build(name, img_size=size).eval()
    report = from_timm(model, ref.state_dict())
    assert report.ok
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(x)
        train = model(x)
        assert expected.abs().max() > 0.1  # the comparison is not vacuous
        assert (train - expected).abs().max().item() < 1e-4

        ref_fused = reparameterize_model(copy.deepcopy(ref))
        expected_fused = ref_fused(x)
        n_train = n_params(model)
        assert model.fuse() is model
        fused = model(x)
    assert (fused - train).abs().max().item() < 1e-4
    assert (fused - expected_fused).abs().max().item() < 1e-4
    assert n_params(model) == n_params(ref_fused) < n_train
    assert not any(type(m).__name__ == "RepConv" for m in model.modules())


def test_fastvit_fuses_repmixer_into_one_conv():
    torch.set_num_threads(1)
    model = composer.build("fastvit_t8", img_size=64).fuse()
    mixer = model.stages[0].blocks[0].token_mixer
    # x + ls(mixer(x) - norm(x)) is one depthwise 3x3 conv with bias, named like timm's
    assert [n for n, _ in mixer.named_children()] == ["reparam_conv"]
    conv = mixer.reparam_conv
    assert conv.groups == 48 and conv.kernel_size == (3, 3) and conv.bias is not None


def test_build_fuse_prints_the_fused_count(capsys):
    with torch.device("meta"):
        ref = timm.create_model("repvgg_a0")
    # timm's fused RepVGG: one 3x3 conv with bias per block; count it by hand from the train form
    fused = sum(m.conv_kxk.conv.weight.numel() + m.conv_kxk.conv.out_channels
                for m in ref.modules() if type(m).__name__ == "RepVggBlock") + n_params(ref.head)
    assert fused == 8_309_384
    assert main(["build", "repvgg_a0"]) == 0
    assert "parameters: 9,108,968" in capsys.readouterr().out
    assert main(["build", "repvgg_a0", "--fuse"]) == 0
    out = capsys.readouterr().out
    assert f"parameters: {fused:,}" in out
    assert "forward: input (1, 3, 224, 224) -> output (1, 1000)" in out


BLUEPRINT = """
block two_scale(dim) {
    residual {
        parallel add {
            rep_conv(dim, 3, groups = 2, branches = 2, scale_branch = true) as wide
            { rep_dwconv(5, small_kernel = 3, identity = false); batchnorm }
            rep_dwconv(3, branches = 0) as norm
        }
        layer_scale(0.5)
    }
    relu
}

model toy {
    input image(4, 12)
    stem conv(8, 3, stride = 2)
    stage { repeat 2 two_scale(8) }
    head { global_pool("avg"); classifier(3) }
}
"""


def test_fusion_of_mixed_branches_and_groups(tmp_path):
    """Multi-branch rep convs with different groups and kernels in a residual parallel: fused to one
    conv per block, equal to the training form. The expected output is computed by hand, branch by
    branch, with torch's functional convs."""
    torch.set_num_threads(1)
    model = composer.build(write(tmp_path, BLUEPRINT)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    x = torch.randn(2, 4, 12, 12)
    block = model.stages[0].blocks[0]
    wide = block.wide
    assert len(wide.conv_kxk) == 2  # MobileOne-style: two kxk branches

    def bn(t, b):
        return torch.nn.functional.batch_norm(t, b.running_mean, b.running_var, b.weight, b.bias, False, 0, b.eps)

    def cb(t, stack, groups):
        conv = stack.conv
        return bn(torch.nn.functional.conv2d(t, conv.weight, None, 1, conv.padding, 1, groups), stack.bn)

    with torch.no_grad():
        h = model.stem(x)
        by_hand = (cb(h, wide.conv_kxk[0], 2) + cb(h, wide.conv_kxk[1], 2) + cb(h, wide.conv_1x1, 2)
                   + bn(h, wide.identity))
        dw = block.rep_dwconv
        by_hand = by_hand + bn(cb(h, dw.conv_kxk, 8) + cb(h, dw.conv_small, 8), block.batchnorm)
        by_hand = by_hand + bn(h, block.norm.identity)
        by_hand = torch.relu(h + 0.5 * by_hand)
        assert (block(h) - by_hand).abs().max().item() < 1e-5
        train = model(x)
        model.fuse()
        fused = model(x)
    assert (fused - train).abs().max().item() < 1e-5
    names = [n for n, _ in model.stages[0].blocks[0].named_children()]
    assert names == ["relu", "reparam_conv"] or names == ["reparam_conv", "relu"]
    conv = model.stages[0].blocks[0].reparam_conv
    assert conv.kernel_size == (5, 5) and conv.groups == 2


def test_branches_zero_needs_another_branch(tmp_path):
    text = """
model bad {
    input image(4, 8)
    stem rep_conv(8, 3, branches = 0)
    head { global_pool("avg"); classifier(3) }
}
"""
    with pytest.raises(composer.ComposerError, match="no branch"):
        composer.load(write(tmp_path, text))
