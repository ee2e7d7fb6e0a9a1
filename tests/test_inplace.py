"""Activations run in place only where that cannot change a result: right after an op that made
a fresh tensor, never first in a program, never after `save`."""

import torch
from torch import nn

import composer
from helpers import write


def test_conv_bn_relu_chain_is_in_place_and_saved_tensors_are_kept(tmp_path):
    path = write(tmp_path, """
model m {
    input image(3, 8)
    stem {
        conv(4, 3) as c1; batchnorm as b1; relu as r1
        conv(4, 3) as c2; save kept; relu as r2
        residual { relu as r3; conv(4, 1) as c3 }
    }
    head { parallel concat { identity; from kept } }
}
""")
    model = composer.build(path).eval()
    acts = {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    assert acts["r1"].inplace  # after batch norm: fresh
    assert not acts["r2"].inplace  # after `save kept`: that tensor is read again by the head
    assert not acts["r3"].inplace  # first in the residual body: its input is the shortcut
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x)
        mods = dict(model.named_modules())
        get = lambda name: next(m for n, m in mods.items() if n.endswith(name))  # noqa: E731
        h = torch.relu(get("b1")(get("c1")(x)))
        kept = get("c2")(h)
        a = torch.relu(kept)
        y = a + get("c3")(torch.relu(a))
    assert torch.allclose(out, torch.cat([y, kept], dim=1), atol=1e-6)


def test_training_backward_with_in_place_activations():
    model = composer.build("resnet18", num_classes=4, img_size=32).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
