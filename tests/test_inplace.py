"""In-place work only where that cannot change a result: an activation right after an op that made
a fresh tensor autograd did not save (never first in a program, never after `save`), a residual
added into its body's fresh output. Outputs and training gradients equal the out-of-place form's."""

import copy

import pytest
import torch
from helpers import FAMILY_SAMPLE, write
from torch import nn

import composer
from composer.builder import Sequence
from composer.program import Call, Parallel, Residual

SAMPLE = dict(FAMILY_SAMPLE.values())


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
        get = lambda name: next(m for n, m in mods.items() if n.endswith(name))
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


# ---- in-place residual adds and activations after a residual: the same function and gradients



def _out_of_place(model):
    """A copy computing the plain form: every activation out of place, every residual `short + body`
    (a 4-field residual instruction is never added in place)."""
    def strip(prog):
        out = []
        for ins in prog:
            if isinstance(ins, Residual):
                ins = Residual(strip(ins.body), strip(ins.shortcut), ins.drop_path)
            elif isinstance(ins, Parallel):
                ins = ins._replace(branches=[strip(b) for b in ins.branches])
            out.append(ins)
        return out

    plain = copy.deepcopy(model)
    for m in plain.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
        if isinstance(m, Sequence):
            m.program = strip(m.program)
    return plain


def _flags(model):
    """(in-place residuals, in-place activations) of a built model."""
    def walk(prog):
        n = 0
        for ins in prog:
            if isinstance(ins, Residual):
                n += bool(ins.add_into) + walk(ins.body) + walk(ins.shortcut)
            elif isinstance(ins, Parallel):
                n += sum(walk(b) for b in ins.branches)
        return n

    res = sum(walk(m.program) for m in model.modules() if isinstance(m, Sequence))
    return res, sum(1 for m in model.modules() if getattr(m, "inplace", False) is True)


def _grads(model, x, seed=0):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout / drop-path masks in both forms
    out = model(x)
    loss = (out.float() ** 2).sum()
    loss.backward()
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


def _assert_same_grads(model, x, atol=1e-6):
    """The model (in-place form) and its out-of-place copy: same output, input gradient and every
    parameter gradient (relative to each tensor's scale)."""
    plain = _out_of_place(model)
    got, want = _grads(model, x), _grads(plain, x)
    scale = lambda t: max(1.0, t.abs().max().item())
    assert (got[0] - want[0]).abs().max().item() <= atol * scale(want[0])
    assert (got[1] - want[1]).abs().max().item() <= atol * scale(want[1])
    for g, w in zip(got[2], want[2]):
        assert (g is None) == (w is None)
        if g is not None:
            assert (g - w).abs().max().item() <= atol * scale(w)


def test_resnet_block_adds_into_its_body_and_runs_every_relu_in_place():
    model = composer.build("resnet50", num_classes=4, img_size=64)
    block = model.stages[1].blocks[0]
    r, act3 = block.program
    assert isinstance(r, Residual) and r.add_into is True  # the body ends with bn3: `body += short`
    assert act3 == Call("act3") and block.act3.inplace  # right after the residual's sum
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))  # 1 + 3 x 16 as timm's


def test_in_place_decisions_follow_the_rules(tmp_path):
    path = write(tmp_path, """
model m {
    input image(4, 8)
    stem {
        residual { conv(4, 3) as c1; relu as a1 }
        relu as after_r1
        residual { conv(4, 3) as c2; save kept }
        relu as after_r2
        residual { conv(4, 1) as c3; batchnorm as b3 }
        save after_r3
        relu as a4
        residual { conv(4, 1) as c5; layer_scale(1e-2) as ls5 }
        residual { residual { conv(4, 1) as c6 } }
    }
    head { parallel concat { identity; from kept; from after_r3 } }
}
""")
    model = composer.build(path).train()
    prog = model.stem.program
    flags = [ins.add_into for ins in prog if isinstance(ins, Residual)]
    # r1's body ends with an activation (autograd keeps its output), r2's with a save; r3 with a
    # batch norm, r5 with a layer scale (x * scale keeps its inputs), r6 with a residual: in place
    assert flags == [False, False, True, True, True]
    acts = {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
    assert acts["a1"].inplace  # after a conv, in r1's body (so r1 adds out of place: relu keeps its output)
    assert acts["after_r1"].inplace and acts["after_r2"].inplace  # right after a residual's sum
    assert not acts["a4"].inplace  # after `save`: the saved tensor is read by the head
    x = torch.randn(2, 4, 8, 8)
    _assert_same_grads(model, x)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), _out_of_place(model).eval()(x))


def test_residual_adds_out_of_place_when_dtypes_differ():
    """Under autocast the body's conv gives bfloat16 while an identity shortcut is float32: the sum
    must promote as `short + body` does, not round into the body's dtype."""
    model = composer.build("resnet18", num_classes=4, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    plain = _out_of_place(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100"])
def test_zoo_gradients_equal_the_out_of_place_form(name):
    model = composer.build(name, num_classes=4, img_size=64).train()
    res, acts = _flags(model)
    assert res > 0 and acts > 0
    _assert_same_grads(model, torch.randn(2, 3, 64, 64))


def test_features_are_not_overwritten_by_later_blocks():
    model = composer.build("resnet18", img_size=64, features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for got, want in zip(model(x), _out_of_place(model)(x)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("name", sorted(name for name, _ in FAMILY_SAMPLE.values()))
def test_every_family_trains_with_in_place_ops(name):
    """Training mode, forward and backward, one small model of each family (one block per stage:
    in-place decisions are made per program, the same in every block of a kind): no "modified by
    an inplace operation" error, and the gradients of the out-of-place form."""
    model = composer.build(name, num_classes=3, **SAMPLE[name]).train()
    plan = model.plan
    # relative 5e-6: an in-place add changes the order in which autograd sums a tensor's gradients,
    # which moves the last bits (1.7e-6 relative in MobileViTv2's stem conv, deterministic); a wrong
    # in-place op is off by far more
    _assert_same_grads(model, torch.randn(2, plan.input.channels, *plan.input.spatial), atol=5e-6)


def test_gradient_checkpointing_recomputes_the_in_place_blocks():
    model = composer.build("resnet18", num_classes=4, img_size=32).train()
    x = torch.randn(2, 3, 32, 32)
    want = _grads(copy.deepcopy(model), x)
    model.set_grad_checkpointing(True)
    got = _grads(model, x)
    assert torch.allclose(got[1], want[1], atol=1e-6)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got[2], want[2]))


def test_channel_shuffle_interleaves_the_groups():
    """The shuffle as torchvision's `channel_shuffle` (4-D) and by index (channel k of group g goes
    to position k * groups + g), on 1-D and 3-D maps too."""
    from torchvision.models.shufflenetv2 import channel_shuffle

    from composer.layers.resample import ChannelShuffle

    x = torch.randn(2, 12, 5, 3)
    assert torch.equal(ChannelShuffle(3)(x), channel_shuffle(x, 3))
    for shape in [(2, 12, 7), (1, 12, 2, 3, 4)]:
        x = torch.randn(shape)
        order = [g * 4 + k for k in range(4) for g in range(3)]  # output position k * 3 + g reads group g, k
        assert torch.equal(ChannelShuffle(3)(x), x[:, order])
