"""Initialisation conventions as op options: kaiming fan-out convs and zero-initialised last batch
norm (ResNet), against the formulas (std = sqrt(2 / fan_out)) written here."""

import math

import composer
from helpers import write


def test_resnet_convs_are_kaiming_fan_out_and_last_bn_zero():
    model = composer.build("resnet50", seed=0)
    conv2 = model.stages[1].blocks[0].conv2  # 128 -> 128, 3x3: fan_out = 128 * 9
    expected = math.sqrt(2.0 / (128 * 9))
    assert abs(conv2.weight.detach().std().item() / expected - 1) < 0.03
    bn_last = [m for name, m in model.named_modules() if name.endswith(".bn3")]
    assert len(bn_last) == 16 and all(float(bn.weight.detach().abs().sum()) == 0.0 for bn in bn_last)
    bn_first = [m for name, m in model.named_modules() if name.endswith(".bn1")]
    assert all(float(bn.weight.detach().min()) == 1.0 for bn in bn_first)


def test_default_conv_init_is_pytorchs(tmp_path):
    path = write(tmp_path, """
model m {
    input image(64, 16)
    stem { conv(256, 3) as a; conv(256, 3, init = "kaiming_out") as b }
}
""")
    model = composer.build(path, seed=0)
    convs = {name.split(".")[-1]: m for name, m in model.named_modules() if name.split(".")[-1] in ("a", "b")}
    fan_in, fan_out = 64 * 9, 256 * 9
    # PyTorch's default: kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in), std bound / sqrt(3)
    assert abs(convs["a"].weight.detach().std().item() / (1 / math.sqrt(fan_in) / math.sqrt(3)) - 1) < 0.03
    assert abs(convs["b"].weight.detach().std().item() / math.sqrt(2.0 / fan_out) - 1) < 0.03
    assert float(convs["b"].bias.detach().abs().sum()) == 0.0
