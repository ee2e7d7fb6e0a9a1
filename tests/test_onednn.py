"""The inference form's oneDNN layers (composer/layers/onednn.py): each equals the plain layer and
activation it replaces (torch's functional ops), on the fast path and on every fallback; the
packed weight follows edits of the weight; the optimised model keeps the plain optimised model's
state_dict keys and logits."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import composer
from composer.layers import onednn
from composer.layers.core import ChannelLinear

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="this PyTorch has no oneDNN kernels (plain ops are used)")
GEN = torch.Generator().manual_seed(0)
ACTS = [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish(), nn.ReLU6(), nn.Sigmoid(),
        nn.Tanh(), nn.LeakyReLU(0.1)]


def _close(a, b):
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("act", ACTS, ids=lambda a: repr(a))
def test_linear_and_activation(act):
    lin = nn.Linear(12, 20)
    packed = onednn.PackedLinear(lin, onednn.activation(act))
    with torch.no_grad():
        for shape in [(7, 12), (2, 5, 12), (1, 12)]:
            x = torch.randn(*shape, generator=GEN)
            assert _close(packed(x), act(F.linear(x, lin.weight, lin.bias)))


@pytest.mark.parametrize("act", [None, nn.ReLU(), nn.SiLU(), nn.GELU()], ids=repr)
@pytest.mark.parametrize("conv", [nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2, padding=0, bias=False),
                                  nn.Conv2d(6, 6, 5, padding=2, groups=6), nn.Conv2d(6, 9, (1, 3), padding=(0, 1),
                                                                                     dilation=2, groups=3),
                                  nn.Conv1d(6, 8, 3, padding=1)], ids=repr)
def test_conv_and_activation_in_both_memory_formats(conv, act):
    packed = onednn.PackedConv(conv, onednn.activation(act) if act else onednn.NONE)
    plain = act or nn.Identity()
    with torch.no_grad():
        shapes = [(2, 6, 11)] if conv.weight.dim() == 3 else [(2, 6, 9, 13), (1, 6, 16, 16)]
        for shape in shapes:
            x = torch.randn(*shape, generator=GEN)
            want = plain(conv(x))
            got = packed(x)
            assert _close(got, want) and got.is_contiguous()  # channels-first in, channels-first out
            if x.dim() == 4:
                cl = x.contiguous(memory_format=torch.channels_last)
                got = packed(cl)
                assert _close(got, want) and got.is_contiguous(memory_format=torch.channels_last)


def test_channel_first_linear_on_maps_and_sequences():
    lin = ChannelLinear(6, 10, channel_first=True)
    packed = onednn.PackedChannelLinear(lin, onednn.activation(nn.GELU()))
    with torch.no_grad():
        for shape in [(2, 6, 5, 7), (1, 6, 9), (1, 6, 2, 3, 4)]:
            x = torch.randn(*shape, generator=GEN)
            assert _close(packed(x), F.gelu(lin(x)))


def test_fallbacks_compute_the_same():
    """Autograd, float64 and a weight that needs a gradient run the plain ops (and give gradients)."""
    lin = nn.Linear(8, 4)
    packed = onednn.PackedLinear(lin, onednn.activation(nn.ReLU()))
    x = torch.randn(3, 8, generator=GEN, requires_grad=True)
    y = packed(x)
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert _close(y.detach(), F.relu(lin(x)).detach())
    with torch.no_grad():
        x64 = torch.randn(3, 8, dtype=torch.float64, generator=GEN)
        assert torch.equal(onednn.PackedLinear(copy.deepcopy(lin).double(), onednn.NONE)(x64),
                           F.linear(x64, lin.weight.double(), lin.bias.double()))


def test_the_packed_weight_follows_the_weight():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    packed = onednn.PackedConv(conv, onednn.NONE)
    x = torch.randn(1, 4, 8, 8, generator=GEN)
    with torch.no_grad():
        first = packed(x)
        conv.weight.mul_(2)  # an in-place edit (a load_state_dict does the same)
        assert _close(packed(x) - conv.bias.view(1, -1, 1, 1), 2 * (first - conv.bias.view(1, -1, 1, 1)))
        clone = pickle.loads(pickle.dumps(packed))  # the cache is not carried
        assert clone._packed is None and _close(clone(x), packed(x))


def test_optimised_model_keeps_its_keys_and_logits():
    """convnext_atto (depthwise and pointwise convs, GELU inside the MLP) and a small ViT (linears,
    GELU): the kernels' form against the plain optimised form, same keys, same logits."""
    for name, kw in [("convnext_atto", {"img_size": 64}), ("vit_ti", {"img_size": 32, "depth": 2})]:
        plain = composer.build(name, **kw).optimize(kernels=False)
        fast = composer.build(name, **kw)
        fast.load_state_dict(composer.build(name, **kw).state_dict())
        fast.optimize()
        plain.load_state_dict(fast.state_dict())
        assert list(plain.state_dict()) == list(fast.state_dict())
        assert any(isinstance(m, onednn.PackedLayer) and m.post == "gelu" for m in fast.modules())
        size = kw["img_size"]
        x = torch.randn(2, 3, size, size, generator=GEN)
        with torch.no_grad():
            assert _close(fast(x), plain(x))
