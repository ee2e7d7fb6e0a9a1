"""Weight sharing: `reuse PATH` (one module applied again) and `learned_bias(tie = ...)` (one
position table for several attentions). Expected counts are written out by hand; forward passes
are compared with the same modules wired by hand."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import composer
from composer.layers.attention.positions import LearnedTable

SHARED = """
model m(num_classes = 10) {
    input image(3, 16)
    stem { conv(8, 3) as c0; relu; conv(8, 3) as c }
    stage { repeat 2 { conv(8, 3); relu } }
    stage {
        reuse stages.0
        block { relu; reuse stem.c }
    }
    head { global_pool("avg"); classifier(num_classes) as fc }
}
"""


def _write(tmp_path, text, name="m.arch"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _model(tmp_path, text=SHARED, **kw):
    torch.manual_seed(0)
    return composer.build(_write(tmp_path, text) + ":m", **kw)


def test_reuse_counts_weights_once_and_macs_twice(tmp_path):
    model = _model(tmp_path)
    conv = 8 * 8 * 9 + 8
    expected = (3 * 8 * 9 + 8) + conv + 2 * conv + (8 * 10 + 10)  # stem, stage 0, head; stage 1 owns none
    assert sum(p.numel() for p in model.parameters()) == expected == 2_066
    assert sum(v.numel() for v in model.state_dict().values()) == expected
    assert not [k for k in model.state_dict() if k.startswith("stages.1")]
    plan = model.plan
    assert plan.params == expected and plan.stages[1].blocks[0].params == 0
    per_conv = 16 * 16 * 8 * 8 * 9  # MACs of one 8 -> 8 3x3 conv at 16 x 16
    assert sum(b.macs for b in plan.stages[1].blocks) == 3 * per_conv  # stage 0 twice, stem.c once


def test_reuse_forward_is_the_same_modules_wired_by_hand(tmp_path):
    model = _model(tmp_path).eval()
    x = torch.randn(2, 3, 16, 16)
    stem, s0 = model.stem, model.stages[0]

    def stage0(t):
        for b in s0.blocks:
            t = F.relu(b.conv(t))
        return t

    t = stem.c(F.relu(stem.c0(x)))
    t = stage0(stage0(t))
    t = stem.c(F.relu(t))
    expected = model.head.fc(t.mean((2, 3)))
    with torch.no_grad():
        assert torch.allclose(model(x), expected.detach(), atol=1e-6)
    # gradients of a shared weight sum over its uses (autograd through both applications)
    model.zero_grad()
    model(x).sum().backward()
    ours = s0.blocks[0].conv.weight.grad.clone()
    w = s0.blocks[0].conv.weight
    by_hand = torch.autograd.grad(expected.sum(), w)[0]
    assert torch.allclose(ours, by_hand, atol=1e-5)


def test_reuse_survives_copy_reset_and_state_dict(tmp_path):
    model = _model(tmp_path).eval()
    twin = copy.deepcopy(model)
    assert twin.stages[1].blocks[1]._shared["stem.c"] is twin.stem.c  # not the original's module
    fresh = composer.build(_write(tmp_path, SHARED) + ":m", seed=7).eval()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    model.reset_classifier(4)
    with torch.no_grad():
        assert model(x).shape == (1, 4)


def test_reuse_of_head_modules_with_features_only(tmp_path):
    text = SHARED.replace("block { relu; reuse stem.c }", "block { relu; reuse head.proj }").replace(
        'head { global_pool("avg")', 'head { conv(8, 1) as proj; global_pool("avg")')
    model = _model(tmp_path, text, features_only=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 16, 16))
    assert [f.shape[1] for f in feats] == [8, 8]
    assert model.stages[1].blocks[1]._shared["head.proj"] is model.head.proj


def test_reuse_in_yaml_fmt_and_convert(tmp_path):
    from composer.convert import arch_to_yaml, yaml_to_arch
    from composer.format import format_text

    text = SHARED.lstrip()
    yaml_text = arch_to_yaml(text, "m.arch")
    assert "{reuse: stages.0}" in yaml_text and "{reuse: stem.c}" in yaml_text
    assert composer.load(_write(tmp_path, yaml_text, "m.yaml") + ":m").params == 2_066
    back = yaml_to_arch(yaml_text, "m.yaml")
    assert "reuse stages.0" in back and "reuse stem.c" in back
    assert composer.load(_write(tmp_path, back, "back.arch") + ":m").params == 2_066
    assert format_text(text, "m.arch") == text  # already canonical: `reuse PATH` printed as written


def test_reuse_blocks_are_not_in_the_drop_path_schedule(tmp_path):
    text = SHARED.replace("head {", "drop_path = linspace(0.0, 0.2)\n    head {")
    plan = composer.load(_write(tmp_path, text) + ":m")
    # 3 scheduled blocks (stage 0: 2, stage 1: the inline block); the reuse block has none
    assert [b.drop_path for s in plan.stages for b in s.blocks] == [0.0, 0.1, 0.0, 0.2]


@pytest.mark.parametrize("line, message, caret", [
    ("reuse stages.7", "no module 'stages.7' in this model: it has 2 stages", "stages.7"),
    ("reuse stem.nothing", "stem has no layer 'nothing'", "stem.nothing"),
    ("reuse stages.1", "would apply stages.1 inside itself", "stages.1"),
    ("block { conv(4, 1); reuse stem.c }", "stem.c was built for input (8, 16x16) but gets (4, 16x16)",
     "stem.c"),
])
def test_reuse_errors_are_located(tmp_path, line, message, caret):
    text = SHARED.replace("reuse stages.0", line)
    path = _write(tmp_path, text)
    with pytest.raises(composer.ComposerError) as info:
        composer.load(path + ":m")
    diag = info.value.diagnostics[0]
    assert message in diag.message
    row = text.splitlines()[diag.span.line - 1]
    assert row[diag.span.column - 1:].startswith("reuse " + caret)
    proc = subprocess.run([sys.executable, "-m", "composer", "check", path], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and f"{path}:{diag.span.line}:" in proc.stderr


TIED = """
block blk(dim, tie) {
    residual { layernorm as norm; attention(2, position = learned_bias(std = 1.0, tie = tie)) as attn }
}
model m(num_classes = 10) {
    input image(3, 16)
    stem { patch_embed(8, 4) }
    stage { repeat 3 blk(8, 0) }
    stage { repeat 2 blk(8, 1) }
    head { global_pool("avg"); classifier(num_classes) }
}
"""


def test_tied_learned_bias_is_one_table_per_key(tmp_path):
    untied = composer.load(_write(tmp_path, TIED.replace(", tie = tie", ""), "u.arch") + ":m").params
    model = _model(tmp_path, TIED)
    table = 2 * 16 * 16  # heads x queries x keys on the 4 x 4 grid
    # 5 blocks have a table untied; tied, stage 0 keeps 1 of 3 and stage 1 keeps 1 of 2
    assert model.plan.params == untied - 3 * table == sum(p.numel() for p in model.parameters())
    keys = sorted(k for k in model.state_dict() if k.endswith("relative_pos"))
    assert keys == ["stages.0.blocks.0.attn.relative_pos", "stages.1.blocks.0.attn.relative_pos"]
    owner0 = model.stages[0].blocks[0].attn.relative_pos

    def table(attn):
        return next(p for p in attn.pieces if isinstance(p, LearnedTable)).table(attn)

    assert all(table(b.attn) is owner0 for b in model.stages[0].blocks)
    assert table(model.stages[1].blocks[1].attn) is not owner0
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert owner0.grad is not None and owner0.grad.abs().sum() > 0


def test_reuse_exports(tmp_path):
    model = _model(tmp_path).eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    assert len(exported.state_dict) == len(model.state_dict())  # shared weights lifted once
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x))


def test_a_reused_activation_never_overwrites_its_input(tmp_path):
    # `act` runs in place where it is defined (right after a conv); reused after `save`, an in-place
    # ReLU would overwrite the saved tensor that the head reads again
    text = """
model m {
    input image(3, 8)
    stem { conv(4, 1) as c; relu as act; save kept; conv(4, 1) as d; save pre; reuse stem.act }
    stage { block { parallel concat { identity; from pre } } }
    head { global_pool("avg") }
}
"""
    model = _model(tmp_path, text).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        pre = model.stem.d(F.relu(model.stem.c(x)))
        expected = torch.cat([F.relu(pre), pre], 1).mean((2, 3))
        assert torch.allclose(model(x), expected, atol=1e-6)
