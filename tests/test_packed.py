"""Linears on oneDNN's packed weights with their activation in the same kernel
(composer/layers/packed.py, made by `model.optimize()`): each activation oneDNN takes equals
`F.linear` then torch's own function for it (written here), the ordinary path is taken where
oneDNN's does not exist or loses, and the model keeps its parameters, state_dict, copies and the
logits of the built model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import composer
from composer.layers import packed
from composer.layers.core import ChannelLinear
from composer.layers.packed import PackedLinear
from helpers import perturb, rel_close, write

# each activation module with the functional form a reader can check against torch's docs
ACTIVATIONS = [
    (nn.GELU(), F.gelu),
    (nn.GELU(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    (nn.ReLU(), F.relu),
    (nn.ReLU6(), lambda t: t.clamp(0, 6)),
    (nn.SiLU(), lambda t: t * torch.sigmoid(t)),
    (nn.Sigmoid(), torch.sigmoid),
    (nn.Tanh(), torch.tanh),
    (nn.Hardswish(), lambda t: t * (t + 3).clamp(0, 6) / 6),
    (nn.Hardsigmoid(), lambda t: (t + 3).clamp(0, 6) / 6),
    (nn.LeakyReLU(0.2), lambda t: torch.where(t > 0, t, 0.2 * t)),
    (nn.Hardtanh(-1.0, 2.0), lambda t: t.clamp(-1, 2)),
]



def _packed(cin=64, cout=256, act=None, channel_first=False):
    torch.manual_seed(0)
    lin = ChannelLinear(cin, cout, channel_first=channel_first)
    with torch.no_grad():
        lin.weight.normal_(0, 0.2), lin.bias.normal_(0, 1)
    m = PackedLinear.of(lin)
    if act is not None:
        m.take(act)
    return lin, m


@pytest.mark.parametrize("act,fn", ACTIVATIONS, ids=lambda a: type(a).__name__ if isinstance(a, nn.Module) else "")
def test_each_activation_in_the_kernel_equals_torch(act, fn):
    lin, m = _packed(act=act)
    x = torch.randn(2, 300, 64) * 2  # 2 x 300 x 64 x 256 = 9.8M multiply-adds: oneDNN's path
    with torch.no_grad():
        got = m(x)
        want = fn(F.linear(x, lin.weight, lin.bias))
    assert m.packed is not None, "oneDNN's path was not taken"
    assert got.shape == want.shape and rel_close(got, want)


def test_the_ordinary_path_where_onednn_does_not_apply_or_loses():
    lin, m = _packed(act=nn.GELU())
    big = torch.randn(2, 300, 64)
    want = F.gelu(F.linear(big, lin.weight, lin.bias))
    y = m(big)  # autograd on: the ordinary path, with a gradient
    assert m.packed is None and y.requires_grad
    y.sum().backward()
    assert lin.weight.grad is not None  # the same parameter object
    with torch.no_grad():
        small = torch.randn(1, 4, 64)  # 4 x 64 x 256 multiply-adds: oneDNN's fixed cost would lose
        assert rel_close(m(small), F.gelu(F.linear(small, lin.weight, lin.bias)))
        assert m.packed is None
        double = copy.deepcopy(m).double()  # float64: not oneDNN's path
        assert rel_close(double(big.double()).float(), want.detach())
        assert double.packed is None


def test_channel_first_maps():
    lin, m = _packed(cin=32, cout=64, act=nn.ReLU(), channel_first=True)
    with torch.no_grad():
        for x in (torch.randn(1, 32, 40, 40),  # one map: F.linear on the moved axes in ChannelLinear too
                  torch.randn(2, 32, 40, 40).to(memory_format=torch.channels_last),
                  torch.randn(2, 32, 40, 40)):  # a batch of contiguous maps: ChannelLinear's 1x1 conv
            want = F.relu(F.conv2d(x, lin.weight[:, :, None, None], lin.bias))
            m.__dict__["packed"] = None
            got = m(x)
            assert got.shape == want.shape and rel_close(got, want)
            assert (m.packed is None) == (x.shape[0] > 1 and x.is_contiguous())


def test_weight_changes_repack_and_copies():
    lin, m = _packed()
    x = torch.randn(2, 300, 64)
    with torch.no_grad():
        m(x)
        first = m.packed
        m.load_state_dict({"weight": lin.weight * 2, "bias": lin.bias})  # keys as nn.Linear's
        assert rel_close(m(x), F.linear(x, lin.weight, lin.bias)) and m.packed is not first
        m.weight.data.mul_(3)  # torch does not record a `.data` edit: the packed copy is stale
        m.repack()  # what optimize() does again for every packed linear
        assert rel_close(m(x), F.linear(x, lin.weight, lin.bias))
        twin = copy.deepcopy(m)
        assert twin.packed is None and rel_close(twin(x), m(x))
        assert twin.weight is not m.weight


MLP = """
block mlp(c) { linear(4 * c) as fc1; gelu; linear(c) as fc2; hardswish }
block tail(c) { linear(c) as proj }
model m {
    input image(3, 32)
    stem { patch_embed(64, 4) }
    stage { block { residual { layernorm; mlp(64) } }
            block { residual { layernorm; tail(64); relu; layer_scale as ls } } }
    head { global_pool("avg"); classifier(5) }
}
"""


def test_optimize_takes_activations_into_linears(tmp_path, monkeypatch):
    monkeypatch.setattr(packed, "MIN_MACS", 0)  # oneDNN's path for every product of this small model
    monkeypatch.setattr(packed, "MIN_MACS_FUSED", 0)
    model = composer.build(write(tmp_path, MLP)).eval()
    perturb(model)
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        got = model.optimize()(x)
        again = model.optimize()(x)  # a second optimize changes nothing: no scale folds into act(linear)
    mlp, second = model.stages[0].blocks[0].mlp, model.stages[0].blocks[1]
    assert type(mlp.fc1) is PackedLinear and type(mlp.fc1.act) is nn.GELU
    assert type(mlp.fc2.act) is nn.Hardswish  # the last op of a composite
    assert type(second.tail.proj.act) is nn.ReLU  # an activation after the composite that ends in a linear
    assert hasattr(second, "ls")  # the layer scale follows the ReLU: it does not fold into the linear
    assert all(m.packed is not None for m in model.modules() if type(m) is PackedLinear)
    assert type(model.head.classifier) is not PackedLinear  # the classifier stays as it is
    assert set(model.state_dict()) == keys  # no batch norm or scale folded here: the same keys
    assert rel_close(got, want, 1e-4) and rel_close(again, want, 1e-4)


def test_exported_models_take_the_ordinary_path(tmp_path, monkeypatch):
    monkeypatch.setattr(packed, "MIN_MACS", 0)
    monkeypatch.setattr(packed, "MIN_MACS_FUSED", 0)
    model = composer.build(write(tmp_path, MLP)).eval().optimize()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        graph = torch.export.export(model, (x,))  # what the ONNX exporter and torch.compile trace
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in op for op in ops) and any("gelu" in op for op in ops)
    with torch.no_grad():
        assert rel_close(graph.module()(x), want)
