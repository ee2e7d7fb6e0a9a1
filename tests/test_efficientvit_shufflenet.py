"""EfficientViT-M (timm, cascaded group attention) and ShuffleNet V2 (torchvision): exact parameter
counts and logits after the weight port. Expected values come from timm/torchvision models built in
the test, or from hand calculations written here."""

import pytest
import torch

import composer
from composer.port import from_timm, from_torchvision
from helpers import n_params

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

EFFICIENTVIT = ["efficientvit_m0", "efficientvit_m1", "efficientvit_m2"]
SHUFFLENET = ["shufflenet_v2_x1_0", "shufflenet_v2_x0_5"]


def _randomize(ref, seed=0):
    """Non-trivial batch-norm statistics and attention biases, so that the port is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in ref.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(1 + torch.randn(m.num_features, generator=g) * 0.2)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return ref.eval()


@pytest.mark.parametrize("name", EFFICIENTVIT)
def test_efficientvit_param_count_equals_timm(name):
    with torch.device("meta"):
        expected = n_params(timm.create_model(name, pretrained=False))
    plan = composer.load(name)
    assert plan.reference == f"timm:{name}"
    assert plan.params == expected
    assert n_params(composer.build(name, device="meta")) == expected


def test_efficientvit_m0_param_count_is_the_published_one():
    assert composer.load("efficientvit_m0").params == 2_349_436


@pytest.mark.parametrize("name", SHUFFLENET)
def test_shufflenet_param_count_equals_torchvision(name):
    with torch.device("meta"):
        expected = n_params(getattr(torchvision.models, name)())
    plan = composer.load(name)
    assert plan.reference == f"torchvision:{name}"
    assert plan.params == expected
    assert n_params(composer.build(name, device="meta")) == expected


def test_shufflenet_x1_0_param_count_is_the_published_one():
    assert composer.load("shufflenet_v2_x1_0").params == 2_278_604


# 224: windows cover the grid or tile it (14 = 2 x 7); 160: a 10x10 grid zero-padded to 14x14.
@pytest.mark.parametrize("name,size", [("efficientvit_m0", 224), ("efficientvit_m1", 160)])
def test_efficientvit_logits_match_timm(name, size):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(name, pretrained=False, img_size=size))
    model = composer.build(name, img_size=size).eval()
    report = from_timm(model, ref.state_dict())
    assert report.ok and not report.skipped
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("name,size", [("shufflenet_v2_x1_0", 224), ("shufflenet_v2_x0_5", 96)])
def test_shufflenet_logits_match_torchvision(name, size):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = _randomize(getattr(torchvision.models, name)())
    model = composer.build(name, img_size=size).eval()
    report = from_torchvision(model, ref.state_dict())
    assert report.ok and report.source == f"torchvision:{name}"
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff < 1e-4


def test_from_torchvision_refuses_a_timm_mapping():
    from composer.port import read_mapping
    from helpers import REPO

    model = composer.build("efficientvit_m0", device="meta")
    with pytest.raises(composer.ComposerError):
        from_torchvision(model, {}, read_mapping(REPO / "blueprints" / "efficientvit_msra.port.yaml"))


def test_offset_bias_index_by_hand():
    from composer.layers.attention import offset_index as _offset_index

    # a 2x2 group, positions (0,0) (0,1) (1,0) (1,1): offset (|dy|, |dx|) -> |dy| * 2 + |dx|
    assert _offset_index((2, 2)).tolist() == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]]
    # 1-D, 3 positions: |d|
    assert _offset_index((3,)).tolist() == [[0, 1, 2], [1, 0, 1], [2, 1, 0]]


ONE_HEAD = """
model one_head {
    input image(4, 4)
    stem cascaded_attention(1, 2, q_kernel = 0, position = offset_bias)
}
"""


def test_single_head_is_plain_attention(tmp_path):
    """One head, no query conv, zero biases: softmax(q k^T / sqrt(d)) v with q, k, v from a 1x1
    conv + BN (identity statistics), computed by hand here."""
    torch.set_num_threads(1)
    path = tmp_path / "one.arch"
    path.write_text(ONE_HEAD)
    model = composer.build(str(path)).eval()
    params = dict(model.named_parameters())
    w = next(v for k, v in params.items() if k.endswith("qkvs.0.conv.weight")).detach().flatten(1)  # (2+2+4, 4)
    assert n_params(model) == 8 * 4 + 2 * 8 + 16  # the projection, its BN, the 4x4 bias table
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        t = x.flatten(2)[0].T  # (16 tokens, 4)
        y = t @ w.T / (1 + 1e-5) ** 0.5  # eval BN with mean 0, var 1
        q, k, v = y[:, :2], y[:, 2:4], y[:, 4:]
        expected = torch.softmax(q @ k.T / 2 ** 0.5, -1) @ v
        out = model.forward_features(x)
    assert torch.allclose(out[0].flatten(1).T, expected, atol=1e-5)


def test_cascaded_attention_is_dimension_agnostic(tmp_path):
    path = tmp_path / "sig.arch"
    path.write_text("""
model sig {
    input signal(8, 20)
    stem cascaded_attention(2, 4, q_kernel = [3, 5], partition = window(7, pad = true), position = offset_bias)
    head { global_pool("avg"); classifier(3) }
}
""")
    plan = composer.load(str(path))
    model = composer.build(str(path)).eval()
    assert n_params(model) == plan.params
    with torch.no_grad():
        assert model(torch.randn(2, 8, 20)).shape == (2, 3)


# ----------------------------------------------------------------- the op's rules against its module
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from composer.ops import OPS  # noqa: E402
from composer.shapes import Shape, ShapeError  # noqa: E402


@st.composite
def cascaded_configs(draw):
    heads = draw(st.integers(1, 3))
    c = heads * draw(st.integers(1, 4))
    grid = tuple(draw(st.integers(1, 9)) for _ in range(draw(st.integers(1, 2))))
    window = draw(st.none() | st.integers(1, 5).map(lambda w: OPS["window"](size=w, pad=True)))
    kernels = draw(st.sampled_from([0, 1, 3]) | st.lists(st.sampled_from([0, 3, 5]), min_size=heads,
                                                          max_size=heads))
    op = OPS["cascaded_attention"](heads=heads, key_dim=draw(st.integers(1, 4)), q_kernel=kernels,
                                   partition=window, position=draw(st.sampled_from([None, OPS["offset_bias"]()])))
    return op, Shape(c, grid, "map")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cascaded_configs())
def test_cascaded_attention_rules_match_module(config):
    """Shape, parameter and MAC rules (within 5% of the flop counter) agree with the built module."""
    torch.set_num_threads(1)
    op, x = config
    y = op.infer(x)
    torch.manual_seed(0)
    mod = op.build(x, y).eval()
    assert op.params(x, y) == n_params(mod)
    inp = torch.randn(2, x.channels, *x.spatial)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = mod(inp)
    assert out.shape == (2, y.channels, *y.spatial) and y == x
    counted = counter.get_total_flops() / 2 / 2  # flops -> MACs, per sample (batch 2)
    assert abs(op.macs(x, y) - counted) <= 0.05 * counted


@pytest.mark.parametrize("op, x, words", [
    (OPS["cascaded_attention"](heads=3, key_dim=4), Shape(8, (4, 4)), "do not divide"),
    (OPS["cascaded_attention"](heads=2, key_dim=4, q_kernel=[3]), Shape(8, (4, 4)), "one kernel per head"),
    (OPS["cascaded_attention"](heads=2, key_dim=4, q_kernel=4), Shape(8, (4, 4)), "odd"),
    (OPS["cascaded_attention"](heads=2, key_dim=4, partition=OPS["window"](size=2, shift=1)), Shape(8, (4, 4)),
     "shifted"),
    (OPS["cascaded_attention"](heads=2, key_dim=4, partition=OPS["window"](size=3)), Shape(8, (4, 4)),
     "does not divide"),
])
def test_cascaded_attention_shape_errors(op, x, words):
    with pytest.raises(ShapeError) as info:
        op.infer(x)
    assert words in (info.value.message + " " + (info.value.hint or ""))
