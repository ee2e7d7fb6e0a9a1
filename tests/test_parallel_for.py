"""`parallel MERGE for VAR in EXPR { body }` (branches from a loop) and `as NAME` on the elements of a
list written as a statement: parsing, names, resolution, errors, `fmt`, YAML and `convert`, and
DilateFormer's `msda` rewritten with the loop (same state_dict as the written-out branches)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import composer
from composer import ast
from composer.convert import convert_text
from composer.diagnostics import ComposerError
from composer.format import format_text
from composer.parse import parse_text
from composer.yaml_read import parse_yaml
from helpers import REPO, n_params, write


def keys_and_shapes(target: str) -> dict:
    return {k: tuple(v.shape) for k, v in composer.build(target, device="meta").state_dict().items()}


def fails(tmp_path, text: str, name: str = "m.arch") -> str:
    with pytest.raises(ComposerError) as info:
        composer.load(write(tmp_path, text, name))
    return info.value.render()


MODEL_TAIL = """
model m {
    input image(8, 8)
    stem {STEM}
    head { global_pool("avg"); classifier(3) }
}
"""


def model(stem: str, defs: str = "") -> str:
    return defs + MODEL_TAIL.replace("{STEM}", stem)


# ---- DilateFormer: the loop gives the same modules as the written-out branches ------------------

# The `msda` mixer as lib/attention_mixers.arch wrote it before `parallel ... for` (three branches).
OLD_MSDA = """
mixer msda(dim, heads, dilations = [1, 2, 3], kernel = 3) {
    let n = len(dilations)
    let h = heads / 3
    let c = dim / 3
    parallel concat {
        attention(
            n == 3 ? h : "msda takes exactly three dilations, one per head group",
            partition = dilated(kernel, dilations[0]),
            dim = c,
            proj = false,
        ) as dilate1
        attention(h, partition = dilated(kernel, dilations[1]), dim = c, proj = false) as dilate2
        attention(h, partition = dilated(kernel, dilations[2]), dim = c, proj = false) as dilate3
    }
    linear(dim) as proj
}
"""


@pytest.mark.parametrize("name", ["dilateformer_tiny", "dilateformer_small", "dilateformer_base"])
def test_dilateformer_state_dict_unchanged_by_the_loop(tmp_path, name):
    text = (REPO / "blueprints" / "dilateformer.arch").read_text()
    old = write(tmp_path, text + OLD_MSDA, "dilateformer_old.arch")  # the local msda wins over the import
    before = keys_and_shapes(f"{old}:{name}")
    after = keys_and_shapes(f"{REPO / 'blueprints' / 'dilateformer.arch'}:{name}")
    assert list(after) == list(before)
    assert after == before
    # three head groups: stage 0 has dim = embed_dim (72, base 96) -> q, k, v of dim / 3 channels each
    dim = 96 if name == "dilateformer_base" else 72
    assert after["stages.0.blocks.0.attn.dilate3.qkv.weight"] == (3 * dim // 3, dim)
    assert not any("dilate4" in k for k in after)


def test_msda_takes_any_number_of_dilations(tmp_path):
    text = model("msda(8, 4, dilations = [1, 2, 3, 4])", 'import "lib/attention_mixers"\n')
    keys = keys_and_shapes(write(tmp_path, text))
    # 4 groups of 2 channels and 1 head: qkv 8 -> 3 * 2 each; proj 8 -> 8
    assert [k for k in keys if k.endswith("qkv.weight")] == [f"stem.msda.dilate{g}.qkv.weight" for g in (1, 2, 3, 4)]
    assert keys["stem.msda.dilate4.qkv.weight"] == (6, 8)
    one = keys_and_shapes(write(tmp_path, model("msda(8, 2, dilations = [2])", 'import "lib/attention_mixers"\n'),
                                "one.arch"))
    assert "stem.msda.dilate.qkv.weight" in one  # a single group: a single name, not numbered


def test_msda_heads_not_divided_by_the_dilations(tmp_path):
    msg = fails(tmp_path, model("msda(12, 4)", 'import "lib/attention_mixers"\n'))
    assert "len(dilations) must divide" in msg and "attention_mixers.arch:" in msg
    assert "m.arch:5:" in msg  # and where it was used


# ---- the loop ---------------------------------------------------------------------------------------


def test_loop_over_a_list_names_and_params(tmp_path):
    text = model("ms(8)", """
mixer ms(dim, ds = [1, 2, 3]) {
    parallel concat(split = [2, 3, 3]) for r in ds {
        conv(4, 3, dilation = r) as dil
        relu
    }
    conv(dim, 1)
}
""")
    keys = keys_and_shapes(write(tmp_path, text))
    # input channels per branch: the split parts 2, 3, 3; each branch 4 out channels, 3x3
    assert keys["stem.ms.dil1.weight"] == (4, 2, 3, 3)
    assert keys["stem.ms.dil2.weight"] == (4, 3, 3, 3)
    assert keys["stem.ms.dil3.weight"] == (4, 3, 3, 3)
    assert keys["stem.ms.conv.weight"] == (8, 12, 1, 1)  # concat: 3 * 4 channels
    plan = composer.load(write(tmp_path, text))
    assert plan.params == 4 * 2 * 9 + 4 + 2 * (4 * 3 * 9 + 4) + 8 * 12 + 8 + 3 * 8 + 3


def test_range_and_names_shared_with_the_enclosing_body(tmp_path):
    text = model("{ conv(8, 1); parallel add for i in 0..2 { conv(8, 1); relu }; conv(8, 1) }")
    keys = keys_and_shapes(write(tmp_path, text))
    # four `conv` in one body: conv1 before the loop, conv2 and conv3 in it, conv4 after
    assert [k for k in keys if k.endswith(".weight")] == [f"stem.conv{i}.weight" for i in (1, 2, 3, 4)] \
        + ["head.classifier.weight"]


def test_range_bound_from_a_parameter_and_the_loop_variable_in_the_body(tmp_path):
    text = model("ms(8, 3)", """
mixer ms(dim, n) {
    parallel concat for i in 1..n + 1 { conv(2 * i, 1) as grow }
}
""")
    keys = keys_and_shapes(write(tmp_path, text))
    assert [keys[f"stem.ms.grow{i}.weight"] for i in (1, 2, 3)] == [(2, 8, 1, 1), (4, 8, 1, 1), (6, 8, 1, 1)]
    assert keys["head.classifier.weight"] == (3, 12)


def test_nested_loops(tmp_path):
    text = model("""{
        parallel add for i in 0..2 {
            parallel concat for k in [1, 3] { conv(4, k) as c }
        }
    }""")
    keys = keys_and_shapes(write(tmp_path, text))
    # 2 x 2 convs in the one naming scope of the stem: c1..c4, kernels 1, 3, 1, 3
    assert [keys[f"stem.c{j}.weight"] for j in (1, 2, 3, 4)] == [(4, 8, 1, 1), (4, 8, 3, 3)] * 2
    assert not any(k.startswith("stem.c5") for k in keys)


def test_one_dimensional_loop_matches_torch(tmp_path):
    text = """
model m {
    input signal(4, 16)
    stem { parallel concat for d in [1, 2, 3] { conv(2, 3, dilation = d) as dil } }
    head { global_pool("avg"); classifier(3) }
}
"""
    net = composer.build(write(tmp_path, text)).eval()
    sd = net.state_dict()
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0))
    # each branch: a dilated conv with padding dilation * (3 - 1) // 2 keeps the length
    y = torch.cat([F.conv1d(x, sd[f"stem.dil{d}.weight"], sd[f"stem.dil{d}.bias"], padding=d, dilation=d)
                   for d in (1, 2, 3)], dim=1)
    want = F.linear(y.mean(-1), sd["head.classifier.weight"], sd["head.classifier.bias"])
    with torch.no_grad():
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
    assert n_params(net) == 3 * (2 * 4 * 3 + 2) + 3 * 6 + 3


def test_body_statements_let_residual_save_from(tmp_path):
    text = model("""{
        save x0
        parallel add for w in [4, 8] {
            let h = w * 2
            from x0
            residual { conv(8, 1) as inner }
            conv(h, 1) as up
            conv(8, 1) as down
        }
    }""")
    keys = keys_and_shapes(write(tmp_path, text))
    assert keys["stem.up1.weight"] == (8, 8, 1, 1) and keys["stem.up2.weight"] == (16, 8, 1, 1)
    assert keys["stem.down2.weight"] == (8, 16, 1, 1) and "stem.inner2.weight" in keys


# ---- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem, where, words", [
    ("{ parallel concat(split = [4, 4]) for r in [1, 2, 3] { conv(4, 3) } }", "6:36", "split has 2 parts but there are 3"),
    ("{ parallel concat for r in [] { conv(4, 3) } }", "6:37", "needs 1 to 256 values, got 0"),
    ("{ parallel concat for r in 3 { conv(4, 3) } }", "6:37", "must be a list or a range"),
    ("{ parallel concat for r in 0..2.5 { conv(4, 3) } }", "6:40", "range bounds must be ints"),
    ("{ parallel cat for r in [1] { conv(4, 3) } }", "6:12", "unknown merge 'cat'"),
    ("{ parallel add(axis = 1) for r in [1] { conv(4, 3) } }", "6:25", "parallel has no parameter 'axis'"),
    ("{ parallel add(2) for r in [1] { conv(4, 3) } }", "6:25", "keyword arguments only"),
    ("{ parallel add for r in [1, 2] { conv(4, q) } }", "6:51", "unknown name 'q'"),
])
def test_located_errors(tmp_path, stem, where, words):
    msg = fails(tmp_path, model(stem, "\n\n"))
    assert f"m.arch:{where}:" in msg and words in msg, msg


def test_check_command_exits_2_with_a_location(tmp_path):
    path = write(tmp_path, model("{ parallel concat(split = [4, 4]) for r in [1, 2, 3] { conv(4, 3) } }", "\n\n"))
    out = subprocess.run([sys.executable, "-m", "composer", "check", path], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert f"{path}:6:36: error: split has 2 parts but there are 3 values of the loop" in out.stderr


def test_syntax_error_in_the_loop_header(tmp_path):
    msg = fails(tmp_path, model("{ parallel add for in [1] { conv(4, 3) } }"))
    assert "m.arch:4:32:" in msg and "unexpected '['" in msg and "expected 'in'" in msg


# ---- `as` on list elements ----------------------------------------------------------------------------


def test_named_list_elements(tmp_path):
    text = """
model m(n = 2) {
    input image(3, 16)
    stem [conv(8, 3) as proj, relu]
    stages for i in 0..2 {
        downsample i > 0 ? [conv(16, 2, stride = 2) as merge, batchnorm as bn] : none
        repeat n: [conv(i > 0 ? 16 : 8, 3) as mix, gelu as act]
    }
    head { global_pool("avg"); classifier(3) }
}
"""
    keys = keys_and_shapes(write(tmp_path, text))
    assert keys["stem.proj.weight"] == (8, 3, 3, 3)
    assert "stages.0.downsample.merge.weight" not in keys  # the conditional's `none`
    assert keys["stages.1.downsample.merge.weight"] == (16, 8, 2, 2)
    assert keys["stages.1.downsample.bn.running_var"] == (16,)
    assert keys["stages.0.blocks.1.mix.weight"] == (8, 8, 3, 3)
    assert keys["stages.1.blocks.0.mix.weight"] == (16, 16, 3, 3)


def test_named_list_elements_keep_plain_expressions_unchanged():
    # `as` is only a list element's: everywhere else the expression grammar is as before
    f = parse_text("mixer m { [conv(8, 3) as proj, relu]; conv(8, 3) as c; let x = [1, 2] }")
    first, second, third = f.composites[0].body
    assert isinstance(first.expr.items[0], ast.Named) and first.expr.items[0].alias == "proj"
    assert isinstance(first.expr.items[1], ast.Name)
    assert second.alias == "c" and isinstance(second.expr, ast.Call)
    assert third.value.items[0].value == 1


@pytest.mark.parametrize("text, where", [
    ("mixer m { conv(8, [relu as r]) }", "1:20"),
    ("mixer m { let x = [relu as r] }", "1:20"),
    ("mixer m { residual(shortcut = [conv(8, 1) as s]) { relu } }", "1:32"),
    ("mixer m { [relu, [gelu][0 + len([a as b])]] }", "1:34"),
])
def test_misplaced_names_are_located_errors(tmp_path, text, where):
    msg = fails(tmp_path, text + model("m"))
    assert f"m.arch:{where}:" in msg and "names are for layers" in msg, msg


def test_a_name_for_a_list_of_layers_is_an_error(tmp_path):
    msg = fails(tmp_path, model("{ let two = [relu, gelu]; [two as pair] }"))
    assert "m.arch:4:37:" in msg and "names one layer" in msg


def test_duplicate_names_in_a_list(tmp_path):
    msg = fails(tmp_path, model("[conv(8, 1) as a, conv(8, 1) as a]"))
    assert "the name 'a' is used twice" in msg


# ---- fmt ---------------------------------------------------------------------------------------------

MESSY = """# header
mixer ms(dim, ds = [1, 2, 3]) {
    # above
    parallel   concat( split = [4,4,4] )  for r in ds {   # after open
        conv(4, 3, dilation = r) as dilate   # trailing
        # dangling
    }
    parallel add for i in 0 ..  n-1 { conv(dim, 1); relu }
    parallel add for i in 0..2 {
        parallel mean for j in [1, 2] { conv(dim, 1) }
    }
    [conv(8, 3) as proj,   relu]
    dim > 0 ? [linear(3) as merge] : none
    [conv(8, 3) as proj,   # c1
      relu as act]
}
"""

CANONICAL = """# header
mixer ms(dim, ds = [1, 2, 3]) {
    # above
    parallel concat(split = [4, 4, 4]) for r in ds {  # after open
        conv(4, 3, dilation = r) as dilate  # trailing
        # dangling
    }
    parallel add for i in 0 .. n - 1 { conv(dim, 1); relu }
    parallel add for i in 0..2 {
        parallel mean for j in [1, 2] { conv(dim, 1) }
    }
    [conv(8, 3) as proj, relu]
    dim > 0 ? [linear(3) as merge] : none
    [
        conv(8, 3) as proj,  # c1
        relu as act,
    ]
}
"""


def test_fmt_canonical_and_idempotent():
    assert format_text(MESSY) == CANONICAL
    assert format_text(CANONICAL) == CANONICAL


def test_fmt_breaks_a_long_loop_header():
    text = ("mixer m(dim) {\n    parallel concat(split = [dim / 4, dim / 4, dim / 4, dim / 4]) for kernel_size in "
            "[3, 5, 7, 9] { conv(dim / 4, kernel_size, groups = dim / 4) as dw }\n}\n")
    out = format_text(text)
    assert all(len(line) <= 100 for line in out.splitlines())
    assert format_text(out) == out
    assert "for kernel_size in [3, 5, 7, 9] {" in out


def test_fmt_check_on_the_library():
    out = subprocess.run([sys.executable, "-m", "composer", "fmt", "--check", "blueprints/lib/attention_mixers.arch"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ---- YAML and convert ----------------------------------------------------------------------------------

ROUND_TRIP = """# A header comment.
import "lib/attention_mixers"

# a mixer doc
mixer ms(dim, ds = [1, 2]) {
    # above the loop
    parallel concat(split = [4, 4]) for r in ds {  # after open
        conv(4, 3, dilation = r) as dilate  # trailing
    }
    parallel add for i in 0..2 {
        parallel mean for j in [1, 2] { conv(dim, 1) }
    }
    [conv(dim, 3) as proj, relu]  # a named list
    dim > 0 ? [linear(dim) as merge] : none
}

model m(n = 2) {
    input image(8, 16)
    stem ms(8)
    stage {
        repeat 2: [conv(8, 3) as a, relu as act]
        downsample [conv(8, 2, stride = 2) as reduce, batchnorm as bn]
    }
    stages for i in 0..2 {
        downsample i > 0 ? [conv(8, 1) as proj] : none
        block { parallel add for k in 0..n { conv(8, 1) as branch } }
        block cpe_block(8, msda(8, 2, dilations = [1, 2]))
    }
    head { global_pool("avg"); classifier(3) }
}
"""


def test_convert_round_trip_keeps_the_model(tmp_path):
    yml = convert_text(ROUND_TRIP, "rt.arch", "arch", "yaml")
    assert "for: r" in yml and "in: ds" in yml and "range: 0..2" in yml and "range: 0..n" in yml
    assert "# above the loop" in yml and "# a named list" in yml
    back = convert_text(yml, "rt.yaml", "yaml", "arch")
    assert format_text(back) == back
    for comment in ("# A header comment.", "# a mixer doc", "# above the loop", "# after open", "# trailing",
                    "# a named list"):
        assert comment in back
    results = []
    for name, text in (("rt.arch", ROUND_TRIP), ("rt.yaml", yml), ("back.arch", back)):
        target = write(tmp_path, text, name) + ":m"
        results.append((composer.load(target).params, keys_and_shapes(target)))
    assert results[1] == results[0] and results[2] == results[0]
    assert "stem.ms.dilate2.weight" in results[0][1] and "stages.0.blocks.0.a.weight" in results[0][1]
    assert "stages.2.blocks.0.branch2.weight" in results[0][1]


YAML_FORMS = """
mixers:
  ms:
    params: {dim: null}
    body:
      - parallel:
          merge: concat
          split: [4, 4]
          for: r
          in: [1, 2]
          body: ["conv(4, 3, dilation = r) as dil"]
      - parallel: {merge: add, for: i, range: [0, 2], body: ["conv(dim, 1)"]}
models:
  m:
    input: image(8, 8)
    stem: ms(8)
    stages:
      - body:
          - {repeat: 2, block: ["conv(8, 1) as pw", relu as act]}
          - {block: "[conv(8, 1) as last]"}
    head: ['global_pool("avg")', classifier(3)]
"""


def test_yaml_forms(tmp_path):
    f = parse_yaml(YAML_FORMS, "forms.yaml")
    loop, ranged = f.composites[0].body
    assert isinstance(loop, ast.ParallelFor) and loop.var == "r" and loop.stop is None
    assert isinstance(ranged, ast.ParallelFor) and ranged.items.value == 0 and ranged.stop.value == 2
    keys = keys_and_shapes(write(tmp_path, YAML_FORMS, "forms.yaml"))
    assert keys["stem.ms.dil2.weight"] == (4, 4, 3, 3) and keys["stem.ms.conv2.weight"] == (8, 8, 1, 1)
    assert "stages.0.blocks.1.pw.weight" in keys and "stages.0.blocks.2.last.weight" in keys


@pytest.mark.parametrize("spec, words", [
    ("{merge: add, for: i, body: [relu]}", "`in` (a list) or `range`"),
    ("{merge: add, for: i, in: [1], range: 0..2, body: [relu]}", "`in` (a list) or `range`"),
    ("{merge: add, for: i, in: [1], branches: [relu]}", "not `branches`"),
    ("{merge: add, in: [1], body: [relu]}", "or `for` with `in`"),
])
def test_yaml_loop_schema_errors(spec, words):
    text = f"mixers:\n  ms:\n    body:\n      - parallel: {spec}\n"
    with pytest.raises(ComposerError) as info:
        parse_yaml(text, "bad.yaml")
    msg = info.value.render()
    assert "bad.yaml:4:" in msg and words in msg, msg


def test_yaml_misplaced_name_points_into_the_yaml():
    text = "mixers:\n  ms:\n    body:\n      - let: {x: '[relu as r]'}\n"
    with pytest.raises(ComposerError) as info:
        parse_yaml(text, "bad.yaml")
    assert "bad.yaml:4:20:" in info.value.render() and "names are for layers" in info.value.render()


def test_an_empty_parallel_branch_is_a_located_error(tmp_path):
    # `{}` would be an identity branch that fmt and convert could not write back: it is refused
    arch = tmp_path / "e.arch"
    arch.write_text('model m {\n    input image(3, 8)\n    stem { conv(4, 1); parallel add { {}; relu } }\n'
                    '    head { global_pool("avg") }\n}\n')
    yml = tmp_path / "e.yaml"
    yml.write_text("models:\n  m:\n    input: image(3, 8)\n    stem:\n      - conv(4, 1)\n"
                   "      - parallel: {merge: add, branches: [[], relu]}\n    head: ['global_pool(\"avg\")']\n")
    for path, line, col in ((arch, 3, 39), (yml, 6, 43)):
        with pytest.raises(composer.ComposerError) as info:
            composer.load(f"{path}:m")
        diag = info.value.diagnostics[0]
        assert "empty parallel branch" in diag.message and (diag.span.line, diag.span.column) == (line, col)
        assert "identity" in diag.hint
