"""`model.optimize()` (composer/optimize.py), `composer.build(..., optimize=True)` and `composer build
--optimize`: each fold checked against its equation written here, and the optimised form of every
parity row equal to the built model in eval mode (random batch-norm statistics and affine, random
layer scales), at a small size, batch 2."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import composer
from composer.cli import main
from composer.layers import packed
from helpers import perturb, small_kwargs, write

# the smallest variant of every row of shared/MODELS.md 1-19 (tests/test_parity_rows.py, and
# benchmarks/vs_timm_optimize.py's PARITY_ROWS)
ROWS = ["vit_ti", "deit_ti_distilled", "mixer_s16", "resnet50", "mobilenetv2_100", "pvt_v2_b0", "swin_t",
        "mobilevit_xxs", "crossvit_tiny", "convnext_atto", "inception_next_t", "gcvit_xxt", "efficientvit_m0",
        "poolformer_s12", "maxvit_t", "fastvit_t8", "repvgg_a0", "twins_pcpvt_small", "shufflenet_v2_x1_0"]

FOLDS = """
block mlp(c) { linear(2 * c) as fc1; gelu; linear(c) as fc2 }
model m {
    input image(3, 8)
    stem { conv(8, 3, bias = false) as c1; batchnorm as bn1; relu }
    stage { block { batchnorm as bn2; conv(6, 2, stride = 2) as down; linear(6) as fc; layer_scale as ls; dropout(0.1) } }
    stage { block { residual { mlp(6); layer_scale as gamma } } }
    head { global_pool("avg"); classifier(5) }
}
"""


def _folds(tmp_path):
    model = composer.build(write(tmp_path, FOLDS)).eval()
    perturb(model)
    return model


def _bn(bn):
    """(scale, shift) of an eval-mode batch norm: bn(x) = x * scale + shift per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def test_each_fold_matches_its_equation(tmp_path):
    model = _folds(tmp_path)
    stem, block, res = model.stem, model.stages[0].blocks[0], model.stages[1].blocks[0]
    # the expected weights, from the eval-mode modules and the equations
    s1, t1 = _bn(stem.bn1)
    want_c1 = (stem.c1.weight * s1[:, None, None, None], t1)  # conv (no bias) then BN
    s2, t2 = _bn(block.bn2)  # BN then an unpadded 2x2 conv: scale the inputs, shift through the taps
    want_down = (block.down.weight * s2[None, :, None, None],
                 block.down.bias + (block.down.weight * t2[None, :, None, None]).sum((1, 2, 3)))
    ls = block.ls.scale  # a channel-first linear then a layer scale: rows scaled
    want_fc = (block.fc.weight * ls[:, None], block.fc.bias * ls)
    g = res.gamma.scale  # a layer scale after a composite that ends in a linear: into that linear
    want_fc2 = (res.mlp.fc2.weight * g[:, None], res.mlp.fc2.bias * g)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        model.optimize()
        after = model(x)
    for conv, (w, b) in ((stem.c1, want_c1), (block.down, want_down), (block.fc, want_fc), (res.mlp.fc2, want_fc2)):
        assert torch.allclose(conv.weight, w, atol=1e-6) and torch.allclose(conv.bias, b, atol=1e-6)
    for name in ("bn1",):
        assert not hasattr(stem, name)
    for name in ("bn2", "ls", "dropout"):
        assert not hasattr(block, name)
    assert not hasattr(res, "gamma")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in model.modules())
    # the folded stem by hand: one conv with bias, then ReLU
    y = F.relu(F.conv2d(x, want_c1[0], want_c1[1], padding=1))
    assert torch.allclose(model.stem(x), y, atol=1e-5)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-5)


def test_train_refused_and_state_dict_keys(tmp_path):
    model = _folds(tmp_path)
    plain = model.state_dict()
    model.optimize()
    assert model.inference_only and not model.training
    with pytest.raises(composer.ComposerError, match="optimized for inference"):
        model.train()
    model.eval()  # train(False) stays allowed
    keys = set(model.state_dict())
    assert "stem.bn1.running_mean" in plain and "stem.bn1.running_mean" not in keys
    assert "stem.c1.bias" in keys and "stem.c1.bias" not in plain
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        model.load_state_dict(plain)  # an unoptimised state dict: load before optimizing
    with pytest.raises(composer.ComposerError, match="reset first"):
        model.reset_classifier(3)


def test_reused_module_is_not_folded(tmp_path):
    """A conv applied again elsewhere (`reuse`) keeps its weights: folding the batch norm after one
    of its uses would change the other."""
    path = write(tmp_path, """
model m {
    input image(3, 8)
    stem { conv(4, 3) as c0; conv(4, 3) as c; batchnorm as bn }
    stage { block { relu; reuse stem.c; batchnorm } }
}
""")
    model = composer.build(path).eval()
    perturb(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        w = model.stem.c.weight.clone()
        model.optimize()
        assert torch.equal(model.stem.c.weight, w) and hasattr(model.stem, "bn")
        assert torch.allclose(model(x), before, atol=1e-6)


SMALL = {"swin_t": {"img_size": 64, "win": 2}, "crossvit_tiny": {"img_size": 120}}  # 64 is refused


def _small(name) -> dict:
    return SMALL.get(name) or small_kwargs(name)


@pytest.mark.parametrize("name", ROWS)
def test_optimized_row_equals_built(name, monkeypatch):
    # every linear on oneDNN's packed path (composer/layers/packed.py), however small at this size
    monkeypatch.setattr(packed, "MIN_MACS", 0)
    monkeypatch.setattr(packed, "MIN_MACS_FUSED", 0)
    kwargs = _small(name)
    model = composer.build(name, **kwargs).eval()
    perturb(model)  # random norm affine, batch-norm statistics, layer scales and biases
    size = composer.load(name, **kwargs).input.spatial
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
        got = model.optimize()(x)
        last = model.optimize(layout="channels_last")(x)  # conv weights channels-last: maps flow that way
        blocked = model.optimize(layout="blocked")(x)  # runs of convs on oneDNN's blocked layout
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.stages.modules()), \
        "a batch norm of the stages was not folded"
    assert any(getattr(m, "packed", None) is not None for m in model.modules()) or \
        not any(isinstance(m, nn.Linear) for m in model.stages.modules())
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert (last - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert (blocked - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_build_option_and_cli(tmp_path, capsys):
    path = write(tmp_path, FOLDS)
    model = composer.build(path, optimize=True)
    assert model.inference_only and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    out = tmp_path / "w.safetensors"
    assert main(["build", path, "--optimize", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "optimized:" in text and "forward: input (1, 3, 8, 8) -> output (1, 5)" in text
    from safetensors.torch import load_file

    assert set(load_file(str(out))) == set(copy.deepcopy(model).state_dict())
