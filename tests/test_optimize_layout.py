"""`model.optimize(layout=...)` (composer/optimize_layout.py, composer/layers/blocked.py): runs of
convs on oneDNN's blocked layout give the numbers the ordinary kernels give (the reference here is
each module's own forward on an ordinary map, or the model optimised channels-first), take the
ordinary path where the blocked one does not exist, and leave the model's parameters, state_dict,
copies and features as they were."""

import copy

import pytest
import torch
from torch import nn

import composer
from composer.layers.blocked import CONV, MODULE, RESIDUAL, SUM, BlockedRun
from helpers import perturb, rel_close, write



def test_each_carried_step_matches_the_plain_kernels():
    torch.manual_seed(0)
    conv_a = nn.Conv2d(4, 8, 3, padding=1)
    conv_b = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)  # depthwise, strided
    conv_c = nn.Conv2d(8, 8, 1)
    conv_d = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
    bn = nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    mods = dict(relu=nn.ReLU(), gelu=nn.GELU(), sig=nn.Sigmoid(), tanh=nn.Tanh(),
                maxp=nn.MaxPool2d(3, 2, 1, ceil_mode=True), avgp=nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                                            count_include_pad=False),
                gap=nn.AdaptiveAvgPool2d(1))
    steps = ((CONV, conv_a), (MODULE, mods["relu"]), (MODULE, bn),
             (RESIDUAL, ((CONV, conv_b), (MODULE, mods["gelu"]), (CONV, conv_c)), ((MODULE, mods["maxp"]),)),
             (SUM, [((CONV, conv_d), (MODULE, mods["sig"])), ((MODULE, mods["tanh"]),), ()]),
             (MODULE, mods["avgp"]), (MODULE, mods["gap"]))
    x = torch.randn(2, 4, 15, 13)
    with torch.no_grad():  # the same sums written out with the modules' own forwards
        h = bn(mods["relu"](conv_a(x)))
        h = mods["maxp"](h) + conv_c(mods["gelu"](conv_b(h)))
        h = mods["sig"](conv_d(h)) + mods["tanh"](h) + h
        want = mods["gap"](mods["avgp"](h))
        got = BlockedRun(steps)(x)
    assert got.shape == want.shape and not got.is_mkldnn
    assert rel_close(got, want)


def test_the_ordinary_path_where_the_blocked_one_does_not_apply():
    model = composer.build("resnet18", img_size=64).eval().optimize(layout="blocked")
    seen = []
    model.stages[3].register_forward_hook(lambda *_: seen.append("stage"))
    x = torch.randn(1, 3, 64, 64)
    y = model(x)  # autograd on: the stages run as usual (their hooks too), the output has a gradient
    assert y.requires_grad and seen == ["stage"]
    with torch.no_grad():
        assert rel_close(model(x), y.detach()) and seen == ["stage"]  # the blocked run: no stage called
        double = copy.deepcopy(model).double()  # float64: not the blocked path
        assert rel_close(double(x.double()).float(), y.detach())


def test_a_pool_the_blocked_kernel_counts_differently_is_not_carried(tmp_path):
    text = """
model pools {
    input image(3, 16)
    stem { conv(8, 3, padding = 1); relu }
    stage { block { conv(8, 3, padding = 1); relu; pool(3, stride = 2, padding = 1) as pool } }
    head { global_pool("avg"); classifier(4) }
}
"""
    model = composer.build(write(tmp_path, text)).eval().optimize()
    x = torch.randn(1, 3, 17, 17)  # 17: the ceil mode adds a window over the padding
    pool = model.stages[0].blocks[0].pool
    with torch.no_grad():
        pool.ceil_mode = True  # counting the padding: oneDNN's average differs there
        want = model(x)
        assert model.optimize(layout="blocked").layout == "channels_first" and rel_close(model(x), want)
        pool.count_include_pad = False  # the real pixels only: the same numbers, carried
        want = model.optimize(layout="channels_first")(x)
        assert model.optimize(layout="blocked").layout == "blocked" and rel_close(model(x), want)


def test_resnet_runs_joined_and_equal_to_channels_first():
    model = composer.build("resnet18", img_size=64).eval()
    perturb(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.optimize()(x)
        keys = set(model.state_dict())
        model.optimize(layout="blocked")
        assert model.layout == "blocked" and model.joined is not None
        assert all(stage.joined is not None for stage in model.stages)
        assert sum(step[0] == RESIDUAL for step in model.joined.steps) == 8  # resnet18: 8 blocks
        assert rel_close(model(x), want)
        assert set(model.state_dict()) == keys
        # features: every stage's output, ordinary maps equal to the channels-first model's
        feats = model.forward_intermediates(x, intermediates_only=True)
        model.optimize(layout="channels_first")
        assert model.joined is None and all(stage.joined is None for stage in model.stages)
        for f, g in zip(feats, model.forward_intermediates(x, intermediates_only=True)):
            assert not f.is_mkldnn and rel_close(f, g)


def test_copies_and_new_weights():
    model = composer.build("resnet18", img_size=64).eval()
    perturb(model)
    model.optimize(layout="blocked")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)  # packs the weights
        twin = copy.deepcopy(model)  # the packed weights are not copied: the copy packs its own
        assert rel_close(twin(x), y)
        # new weights through load_state_dict: the packed copies are made again
        other = composer.build("resnet18", img_size=64, seed=3).eval().optimize()
        want = other(x)
        model.load_state_dict(other.state_dict())
        assert rel_close(model(x), want) and not rel_close(want, y)


def test_no_run_where_a_step_is_not_carried():
    # ReLU6 has no blocked kernel: no stage of MobileNetV2 runs on the blocked layout
    model = composer.build("mobilenetv2_100", img_size=64).eval()
    perturb(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.optimize()(x)
        assert rel_close(model.optimize(layout="blocked")(x), want)
    assert model.joined is None and all(stage.joined is None for stage in model.stages)
    assert model.layout == "channels_first"  # what it is in, not what was asked


def test_fastest_and_the_old_spelling():
    model = composer.build("resnet18", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.optimize()(x)
        model.optimize(layout="fastest", example=x)
        assert model.layout in ("channels_first", "channels_last", "blocked")
        assert rel_close(model(x), want)
        with pytest.warns(DeprecationWarning, match='layout="channels_last"'):
            model.optimize(channels_last=True)
        assert model.layout == "channels_last" and model.stem.conv.weight.is_contiguous(
            memory_format=torch.channels_last)
        assert rel_close(model(x), want)
    with pytest.raises(composer.ComposerError, match="unknown layout 'nhwc'"):
        model.optimize(layout="nhwc")
    with pytest.raises(composer.ComposerError, match="two layouts"), pytest.warns(DeprecationWarning):
        model.optimize(layout="blocked", channels_last=True)


def test_pruned_features_of_a_blocked_model():
    model = composer.build("resnet18", img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model.optimize().forward_intermediates(x, indices=[1], intermediates_only=True)[0]
        model.optimize(layout="blocked").prune_intermediate_layers([1])
        got = model(x)  # the head pruned: the features of the last stage kept
    assert got.shape == want.shape and rel_close(got, want)


def test_a_refused_size_is_refused_before_the_run():
    model = composer.build("resnet18", img_size=64).eval().optimize(layout="blocked")
    with pytest.raises(composer.InputSizeError, match="takes 3 input channels, got 4"), torch.no_grad():
        model(torch.randn(1, 4, 64, 64))  # four channels: the stem's conv takes three
