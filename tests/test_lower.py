"""The lowering stage: `composer.lower.plan(resolved model)` -> `composer.plan.Plan`.

Small blueprints, one construct at a time; every expected value (step classes, paths, shapes,
parameter and MAC counts) is counted by hand here, never computed by the code under test.
"""

from __future__ import annotations

import pytest

import composer
import composer.loader as Loader
import composer.lower as Lower
import composer.resolve as R
from composer.diagnostics import ComposerError
from composer.plan import (ConvertStep, LoadStep, OpStep, ParallelStep, Plan, ResidualStep, ReuseStep, SaveStep,
                           Section, SeqStep, StagePlan)
from composer.shapes import Shape
from helpers import write


def lowered(tmp_path, text: str, name: str = "m") -> Plan:
    """Parse and resolve `text` as the public front end does, then lower it."""
    path = write(tmp_path, text)
    return Lower.plan(R.resolve_model(Loader.load(path), name, {}))


def classes(steps) -> list[str]:
    return [type(s).__name__ for s in steps]


def walk_paths(steps) -> list[tuple[str, str]]:
    return [(type(t).__name__, t.path) for s in steps for t in s.walk()]


# --- single steps: ops, shapes, params, MACs -------------------------------------------------------


def test_conv_stride_padding_shapes(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(3, 16)
    stem conv(8, 5, stride = 2, padding = 1)
}
""")
    (step,) = plan.stem.steps
    assert type(step) is OpStep and step.path == "stem.conv" and step.name == "conv"
    assert step.x == Shape(3, (16, 16), "map")
    # (16 + 2*1 - 5) // 2 + 1 = 13 // 2 + 1 = 7
    assert step.y == Shape(8, (7, 7), "map")
    assert plan.stem.x == Shape(3, (16, 16), "map") and plan.stem.y == Shape(8, (7, 7), "map")


def test_params_and_macs_by_hand(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(3, 16)
    stem { conv(8, 3, stride = 2); batchnorm; relu }
    stage { block linear(16) }
    head { global_pool("avg"); classifier(10) }
}
""")
    conv, bn, relu = plan.stem.steps
    # conv 3x3, 3 -> 8, bias; default padding 1 at stride 2: 16 -> 8
    assert conv.y == Shape(8, (8, 8), "map")
    assert conv.params == 3 * 3 * 3 * 8 + 8 == 224
    assert conv.macs == (8 * 8) * (3 * 3 * 3 * 8) == 13824
    assert bn.params == 2 * 8 and bn.macs == 0
    assert relu.params == 0
    assert plan.stem.params == 224 + 16
    (lin,) = plan.stages[0].blocks[0].steps
    # a linear on a map: per position, 8 -> 16 (+ bias)
    assert lin.params == 8 * 16 + 16 and lin.macs == (8 * 8) * 8 * 16
    pool, cls = plan.head.steps
    assert pool.y == Shape(16, (), "vector")
    assert cls.params == 16 * 10 + 10 and cls.macs == 16 * 10
    assert plan.params == 224 + 16 + (8 * 16 + 16) + (16 * 10 + 10)
    assert plan.macs == 13824 + 64 * 8 * 16 + 16 * 10


def test_composite_instance_is_a_seq_step_with_its_body(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(4, 8)
    stem { conv(8, 3) as a; mix(8) }
}
mixer mix(dim) { linear(dim) as fc; gelu }
""")
    a, mix = plan.stem.steps
    assert type(a) is OpStep and a.path == "stem.a"
    assert type(mix) is SeqStep and mix.name == "mix" and mix.path == "stem.mix" and mix.call == "mix"
    assert classes(mix.body) == ["OpStep", "OpStep"]
    assert [s.path for s in mix.body] == ["stem.mix.fc", "stem.mix.gelu"]
    assert mix.children() == (mix.body,)
    # the composite's parameters are its body's: linear 8 -> 8 with bias
    assert mix.params == 8 * 8 + 8


def test_composite_as_block_is_the_section_itself(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(4, 8)
    stem conv(8, 3)
    stage { repeat 2 unit(8) }
}
block unit(dim) { conv(dim, 3) as conv; batchnorm as norm1; relu }
""")
    blocks = plan.stages[0].blocks
    assert [b.path for b in blocks] == ["stages.0.blocks.0", "stages.0.blocks.1"]
    assert all(b.call == "unit" for b in blocks)
    # the block's statements are the section's steps directly, no SeqStep around them
    assert [s.path for s in blocks[1].steps] == [
        "stages.0.blocks.1.conv", "stages.0.blocks.1.norm1", "stages.0.blocks.1.relu"]
    assert classes(blocks[1].steps) == ["OpStep"] * 3


# --- layouts -------------------------------------------------------------------------------------


def test_tokens_op_after_a_map_gets_a_convert_step_before_it(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(3, 8)
    stem { conv(4, 3); pos_embed; conv(4, 1) as back }
}
""")
    steps = plan.stem.steps
    assert classes(steps) == ["OpStep", "ConvertStep", "OpStep", "ConvertStep", "OpStep"]
    to_tokens, pos, to_map = steps[1], steps[2], steps[3]
    assert to_tokens.name == "to_tokens" and to_tokens.path == "stem.pos_embed"
    assert to_tokens.x == Shape(4, (8, 8), "map") and to_tokens.y == Shape(4, (8, 8), "tokens")
    assert pos.x.layout == "tokens"
    assert pos.params == 8 * 8 * 4  # one row per token
    assert to_map.name == "to_map" and to_map.path == "stem.back"
    assert to_map.y == Shape(4, (8, 8), "map")
    assert plan.stem.y == Shape(4, (8, 8), "map")


def test_residual_whose_body_needs_tokens_converts_before_it(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(3, 8)
    stem conv(4, 3)
    stage { block { residual { pos_embed } } }
}
""")
    convert, res = plan.stages[0].blocks[0].steps
    # the conversion comes first, at the block's path, so the shortcut carries tokens too
    assert type(convert) is ConvertStep and convert.name == "to_tokens" and convert.path == "stages.0.blocks.0"
    assert type(res) is ResidualStep and res.x == Shape(4, (8, 8), "tokens") == res.y
    assert res.shortcut == []


# --- residual, parallel, named tensors, reuse ---------------------------------------------------


def test_residual_without_and_with_shortcut(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(8, 8)
    stage {
        block { residual { conv(8, 3); relu } }
        block { residual(shortcut = [conv(16, 1, stride = 2), batchnorm]) { conv(16, 3, stride = 2); batchnorm } }
    }
}
""")
    (plain,) = plan.stages[0].blocks[0].steps
    assert type(plain) is ResidualStep and plain.path == "stages.0.blocks.0"
    assert plain.shortcut == [] and classes(plain.body) == ["OpStep", "OpStep"]
    assert [s.path for s in plain.body] == ["stages.0.blocks.0.conv", "stages.0.blocks.0.relu"]
    assert plain.x == plain.y == Shape(8, (8, 8), "map")

    (proj,) = plan.stages[0].blocks[1].steps
    assert type(proj) is ResidualStep
    # shortcut and body share one naming scope: written first, the shortcut's ops are numbered 1
    assert [s.name for s in proj.shortcut] == ["conv1", "batchnorm1"]
    assert [s.name for s in proj.body] == ["conv2", "batchnorm2"]
    assert proj.shortcut[0].op.kernel == 1 and proj.body[0].op.kernel == 3
    assert proj.x == Shape(8, (8, 8), "map") and proj.y == Shape(16, (4, 4), "map")
    assert proj.children() == (proj.shortcut, proj.body)
    # 1x1 8->16 + bn(16) + 3x3 8->16 + bn(16)
    assert proj.params == (8 * 16 + 16) + 32 + (9 * 8 * 16 + 16) + 32


def test_parallel_concat_with_split(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(16, 4)
    stem parallel concat(split = [4, 12]) { conv(2, 1); { conv(6, 3); relu } }
}
""")
    (par,) = plan.stem.steps
    assert type(par) is ParallelStep and par.merge == "concat" and par.split == [4, 12]
    first, second = par.branches
    assert [s.path for s in first] == ["stem.conv1"]
    assert [s.path for s in second] == ["stem.conv2", "stem.relu"]
    assert first[0].x == Shape(4, (4, 4), "map") and second[0].x == Shape(12, (4, 4), "map")
    assert par.y == Shape(2 + 6, (4, 4), "map")
    assert par.params == (4 * 2 + 2) + (9 * 12 * 6 + 6)


def test_parallel_add_feeds_every_branch_the_whole_input(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(8, 4)
    stem parallel add { identity; conv(8, 1) }
}
""")
    (par,) = plan.stem.steps
    assert par.merge == "add" and par.split is None
    assert [b[0].x for b in par.branches] == [Shape(8, (4, 4), "map")] * 2
    assert par.y == Shape(8, (4, 4), "map")


def test_save_and_from(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(4, 8)
    stem { conv(8, 3) as a; save s; conv(16, 3, stride = 2) as b }
    stage { block { from s; conv(8, 1) } }
}
""")
    a, save, b = plan.stem.steps
    assert type(save) is SaveStep and save.tensor == "s" and save.path == "stem"
    assert save.x == save.y == Shape(8, (8, 8), "map")
    load, conv = plan.stages[0].blocks[0].steps
    assert type(load) is LoadStep and load.tensor == "s"
    # `from s` leaves (16, 4x4) behind and continues from the saved (8, 8x8)
    assert load.x == Shape(16, (4, 4), "map") and load.y == Shape(8, (8, 8), "map")
    assert conv.x == Shape(8, (8, 8), "map")
    assert plan.saved == {"input": Shape(4, (8, 8), "map"), "s": Shape(8, (8, 8), "map")}


def test_reuse_counts_macs_again_but_params_once(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(8, 4)
    stage {
        block conv(8, 1)
        reuse stages.0.blocks.0
    }
}
""")
    own, again = plan.stages[0].blocks
    (reuse,) = again.steps
    assert type(reuse) is ReuseStep and reuse.target == "stages.0.blocks.0" and reuse.path == "stages.0.blocks.1"
    assert classes(reuse.reused) == ["OpStep"] and reuse.reused[0].path == "stages.0.blocks.0.conv"
    assert again.call == "reuse stages.0.blocks.0"
    assert own.params == 8 * 8 + 8 and again.params == 0
    assert own.macs == again.macs == 16 * 8 * 8
    assert plan.params == 72 and plan.macs == 2 * 16 * 64


def test_paths_of_nested_steps_are_state_dict_paths(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(8, 8)
    stem conv(8, 3)
    stages for i in 0..2 { repeat 2 unit(8) }
}
block unit(dim) { residual { layernorm as norm; mix(dim) } }
mixer mix(dim) { linear(dim) as fc; gelu }
""")
    sec = plan.stages[1].blocks[1]
    assert sec.path == "stages.1.blocks.1"
    assert walk_paths(sec.steps) == [
        ("ResidualStep", "stages.1.blocks.1"),
        ("OpStep", "stages.1.blocks.1.norm"),
        ("SeqStep", "stages.1.blocks.1.mix"),
        ("OpStep", "stages.1.blocks.1.mix.fc"),
        ("OpStep", "stages.1.blocks.1.mix.gelu"),
    ]


# --- the plan's own fields, sections and stages ---------------------------------------------------

VARIANTS = """
model base(num_classes = 10, dims = [8, 16]) {
    input image(3, 16)
    stem conv(dims[0], 3, stride = 2)
    stages for i in 0..2 {
        downsample i > 0 ? conv(dims[i], 2, stride = 2) : none
        repeat 2 unit(dims[i])
    }
    head { global_pool("avg"); classifier(num_classes) }
    drop_path = linspace(0, 0.3)
    reference = "timm:resnet18"
}
block unit(dim) { residual { conv(dim, 3); relu } }
model mid : base { num_classes = 4 }
model wide : mid {
    dims = [16, 32]
}
"""


def test_plan_fields_of_a_variant_chain(tmp_path):
    plan = lowered(tmp_path, VARIANTS, "wide")
    assert plan.name == "wide"
    assert plan.chain == ["wide", "mid", "base"]
    # every variant's assignments along the chain, nearest the base first, each at its own line
    assert [(name, span.line) for name, span in plan.overrides] == [("num_classes", 14), ("dims", 16)]
    assert plan.arguments == {"num_classes": 4, "dims": [16, 32]}
    assert plan.reference == "timm:resnet18"
    assert plan.input_kind == "image" and plan.input == Shape(3, (16, 16), "map")
    assert plan.outputs is None
    # linspace(0, 0.3) over the 4 blocks of the model: 0, 0.1, 0.2, 0.3
    assert plan.drop_path == pytest.approx([0.0, 0.1, 0.2, 0.3])
    rates = [b.drop_path for st in plan.stages for b in st.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # each block's rate reaches the residual of that block
    assert plan.stages[1].blocks[1].steps[0].drop_path == pytest.approx(0.3)
    assert plan.head.y == Shape(4, (), "vector")


def test_composer_load_gives_the_same_plan_and_applies_build_keys(tmp_path):
    path = write(tmp_path, VARIANTS)
    plan = composer.load(f"{path}:base", num_classes=7)
    assert plan.name == "base" and plan.chain == ["base"] and plan.overrides == []
    assert plan.arguments["num_classes"] == 7 and plan.head.y.channels == 7
    # base: stem 16 -> 8 (8 channels), stage 1 downsample 8 -> 4 (16 channels)
    assert [(st.x, st.y) for st in plan.stages] == [
        (Shape(8, (8, 8), "map"), Shape(8, (8, 8), "map")),
        (Shape(8, (8, 8), "map"), Shape(16, (4, 4), "map")),
    ]
    bigger = composer.load(f"{path}:base", in_chans=1)
    assert bigger.input == Shape(1, (16, 16), "map")
    assert bigger.stem.params == 8 * 1 * 9 + 8


def test_sections_with_downsample_first_and_last(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input image(4, 16)
    stem conv(8, 3)
    stage { downsample conv(16, 2, stride = 2); block conv(16, 1) }
    stage { block conv(16, 1); downsample conv(32, 2, stride = 2) }
    stage { block conv(32, 1); after layernorm }
}
""")
    first, last, normed = plan.stages
    assert all(type(st) is StagePlan for st in plan.stages)
    assert [st.index for st in plan.stages] == [0, 1, 2]
    assert first.downsample_last is False and last.downsample_last is True
    assert type(first.downsample) is Section and first.downsample.path == "stages.0.downsample"
    assert normed.downsample is None and normed.norm.path == "stages.2.norm"
    assert [s.path for s in plan.sections] == [
        "stem",
        "stages.0.downsample", "stages.0.blocks.0",
        "stages.1.blocks.0", "stages.1.downsample",
        "stages.2.blocks.0", "stages.2.norm",
        "head",
    ]
    # downsample first: it reads the stage's input; last: it reads the block's output
    assert first.downsample.x == Shape(8, (16, 16), "map") and first.downsample.y == Shape(16, (8, 8), "map")
    assert last.blocks[0].x == Shape(16, (8, 8), "map") and last.downsample.x == Shape(16, (8, 8), "map")
    assert last.y == Shape(32, (4, 4), "map")
    # no head written: an empty head section passes the last stage's output through
    assert plan.head.steps == [] and plan.head.x == plan.head.y == Shape(32, (4, 4), "map")


def test_outputs_and_signal_input(tmp_path):
    plan = lowered(tmp_path, """
model m {
    input signal(2, 32)
    stem { conv(4, 3, stride = 2); save early }
    stage { block { conv(8, 3, stride = 2); save late } }
    outputs = ["early", "late"]
}
""")
    assert plan.input_kind == "signal" and plan.input == Shape(2, (32,), "map")
    assert plan.outputs == ["early", "late"]
    assert plan.saved["early"] == Shape(4, (16,), "map") and plan.saved["late"] == Shape(8, (8,), "map")


# --- located errors ---------------------------------------------------------------------------


def test_residual_that_changes_channels_is_a_located_shape_error(tmp_path):
    text = """model m {
    input image(8, 8)
    stem conv(8, 3)
    stage {
        block { residual { conv(16, 3) } }
    }
}
"""
    with pytest.raises(ComposerError) as exc:
        lowered(tmp_path, text)
    d = exc.value.diagnostics[0]
    assert exc.value.code == "shape"
    assert d.span.line == 5
    assert "(16, 8x8)" in d.message and "(8, 8x8)" in d.message


def test_split_that_does_not_add_up_is_a_located_shape_error(tmp_path):
    text = """model m {
    input image(8, 8)
    stem parallel concat(split = [4, 2]) { conv(2, 1); conv(2, 1) }
}
"""
    with pytest.raises(ComposerError) as exc:
        composer.load(write(tmp_path, text))
    assert exc.value.code == "shape"
    assert exc.value.diagnostics[0].span.line == 3
    assert "adds up to 6" in exc.value.diagnostics[0].message


def test_from_an_unsaved_tensor_is_reported(tmp_path):
    text = """model m {
    input image(8, 8)
    stem { conv(8, 3); from nowhere }
}
"""
    with pytest.raises(ComposerError) as exc:
        lowered(tmp_path, text)
    assert exc.value.code == "unknown-tensor"
    assert exc.value.diagnostics[0].span.line == 3
