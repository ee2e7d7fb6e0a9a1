"""`composer convert`: .arch <-> YAML, the same blueprint both ways, comments carried."""

import shutil
import textwrap

import pytest
from hypothesis import given, settings

from composer import ast
from composer.cli import main
from composer.comments import yaml_comments
from composer.convert import arch_to_yaml, yaml_to_arch
from composer.diagnostics import ComposerError
from composer.format import format_text, print_expr, scan_comments, shape
from composer.parse import parse_text
from composer.resolve import load as load_unit
from composer.yaml_read import parse_yaml
from helpers import REPO
from test_format import exprs, outcome

BUILT = ["swin_t", "crossvit_tiny", "maxvit_t", "efficientvit_m0", "resnet50"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """`orig/`: the zoo; `yaml/`: every family as YAML (lib/ as .arch); `back/`: every file,
    library included, converted to YAML and back to .arch."""
    root = tmp_path_factory.mktemp("zoo")
    shutil.copytree(REPO / "blueprints", root / "orig", ignore=shutil.ignore_patterns("*.yaml"))
    (root / "yaml").mkdir()
    shutil.copytree(root / "orig" / "lib", root / "yaml" / "lib")
    (root / "back" / "lib").mkdir(parents=True)
    families = sorted((root / "orig").glob("*.arch"))
    texts = {}
    for path in families + sorted((root / "orig" / "lib").glob("*.arch")):
        rel = path.relative_to(root / "orig")
        arch = path.read_text()
        yml = arch_to_yaml(arch, str(rel))
        back = yaml_to_arch(yml, str(rel.with_suffix(".yaml")))
        if path in families:
            (root / "yaml" / rel.with_suffix(".yaml")).write_text(yml)
        (root / "back" / rel).write_text(back)
        texts[str(rel)] = (arch, yml, back)
    return root, texts


def test_zoo_round_trip_keeps_the_resolved_architecture(zoo):
    """Every model of .arch -> YAML -> .arch resolves the same (the YAML itself is checked against
    the .arch it came from by `convert`, and resolved in the state-dict test)."""
    root, _ = zoo
    count = 0
    for path in sorted((root / "orig").glob("*.arch")):
        for m in load_unit(root / "orig" / path.name).file.models:
            a = outcome(f"{root / 'orig' / path.name}:{m.name}")
            assert outcome(f"{root / 'back' / path.name}:{m.name}") == a, f"{path.stem} back:{m.name}"
            count += a[0] != "error"
    assert count >= 100


def test_round_trip_keeps_the_built_state_dict(zoo):
    from composer.api import load, zoo_index
    from composer.builder import build_module

    root, _ = zoo
    index = zoo_index()
    # the models named above (built on the meta device), and the first model of every family
    firsts = [load_unit(path).file.models[0].name for path in sorted((root / "orig").glob("*.arch"))
              if load_unit(path).file.models]
    for model in dict.fromkeys(BUILT + firsts):
        family = index[model].stem
        if model in BUILT:  # the others: the resolved architecture (every step, op and shape) is the
            shapes = []     # builder's whole input, so equal outcomes below build equal modules
            for target in (root / "orig" / f"{family}.arch", root / "yaml" / f"{family}.yaml",
                           root / "back" / f"{family}.arch"):
                module = build_module(load(f"{target}:{model}"), seed=None, device="meta")
                shapes.append({k: tuple(v.shape) for k, v in module.state_dict().items()})
            assert shapes[0] and shapes[1] == shapes[0] and shapes[2] == shapes[0], model
        assert outcome(f"{root / 'yaml' / (family + '.yaml')}:{model}") == outcome(f"{root / 'orig' / (family + '.arch')}:{model}")


def test_round_trip_keeps_every_comment(zoo):
    _, texts = zoo
    for rel, (arch, yml, back) in texts.items():
        want = sorted(c.text for c in scan_comments(arch))
        assert sorted(c.text for c in yaml_comments(yml)) == want, rel
        assert sorted(c.text for c in scan_comments(back)) == want, rel


def test_round_trip_keeps_docs(zoo):
    _, texts = zoo
    for rel, (arch, yml, back) in texts.items():
        a, y, b = parse_text(arch, "a"), parse_yaml(yml, "y"), parse_text(back, "b")
        assert a.doc == y.doc == b.doc, rel
        docs = {c.name: c.doc for c in a.composites}
        assert {c.name: c.doc for c in y.composites} == docs, rel
        assert {c.name: c.doc for c in b.composites} == docs, rel


def test_back_is_formatted_and_stable(zoo):
    """YAML -> .arch prints the canonical layout; converting again gives the same YAML."""
    _, texts = zoo
    for rel in ("swin.arch", "crossvit.arch", "ceit.arch", "conformer.arch", "lib/metaformer.arch"):
        arch, yml, back = texts[rel]
        assert format_text(back) == back, rel
        assert arch_to_yaml(back, rel) == arch_to_yaml(yaml_to_arch(arch_to_yaml(back, rel), rel), rel)


# ---- hand-written cases ------------------------------------------------------------------------------

ARCH = """\
# A small family.
# Second header line.
import "lib/metaformer"

# A block with every statement kind.
block b(dim, ratio = 4) {
    let hidden = dim * ratio  # the width inside
    # the pre-norm residual
    residual(shortcut = none, when = true) {
        norm
        linear(hidden) as fc1
    }
    save skip
    parallel concat(split = [1, 1]) {
        { from skip; linear(dim // 2) }
        linear(dim // 2)
    }
}

model m(num_classes = 10, dims = [8, 16]) {
    reference = "none:m"
    let d = dims[0]
    input image(3, 32)
    stem conv(d, 3, stride = 2)  # the stem
    stages for i in 0..2 {
        downsample i > 0 ? conv(dims[i], 2, stride = 2) : none
        repeat 2 as j { b(dims[i]); identity }
        block { b(dims[i]) }
    }
    head { global_pool("avg"); classifier(num_classes) }
}

model m2 : m { dims = [16, 32]; drop_path = linspace(0, 0.1) }
"""

YAML = """\
# A small family.
# Second header line.
imports: lib/metaformer
blocks:
  # A block with every statement kind.
  b:
    params: {dim: null, ratio: 4}
    body:
      - let: {hidden: dim * ratio}  # the width inside
      # the pre-norm residual
      - residual:
          shortcut: none
          when: true
          body: [norm, linear(hidden) as fc1]
      - {save: skip}
      - parallel:
          merge: concat
          split: [1, 1]
          branches:
            - [{from: skip}, linear(dim // 2)]
            - linear(dim // 2)
models:
  m:
    params: {num_classes: 10, dims: [8, 16]}
    reference: none:m
    let: {d: 'dims[0]'}
    input: 'image(3, 32)'
    stem: 'conv(d, 3, stride = 2)'  # the stem
    stages:
      - for: i
        range: 0..2
        body:
          - {downsample: 'i > 0 ? conv(dims[i], 2, stride = 2) : none'}
          - {repeat: 2, as: j, body: ['b(dims[i])', identity]}
          - {body: ['b(dims[i])']}
    head: ['global_pool("avg")', classifier(num_classes)]
  m2:
    base: m
    set: {dims: [16, 32]}
    drop_path: 'linspace(0, 0.1)'
"""


def test_golden_arch_to_yaml():
    assert arch_to_yaml(ARCH) == YAML


def test_golden_yaml_to_arch():
    assert yaml_to_arch(YAML) == ARCH
    assert shape(parse_yaml(YAML)) == shape(parse_text(ARCH))


def test_new_yaml_forms_read_as_arch():
    """save/from, residual `when`, inline repeat bodies: the same AST from both front ends."""
    a = parse_text(ARCH)
    y = parse_yaml(YAML)
    block = y.composites[0]
    assert [type(s).__name__ for s in block.body] == ["Let", "Residual", "Save", "Parallel"]
    assert isinstance(block.body[3].branches[0][0], ast.Load)
    stage = y.models[0].body[4]
    assert isinstance(stage.items[1].block, tuple) and stage.items[2].count is None
    assert shape(a.composites) == shape(y.composites)


def test_long_and_commented_expressions_become_blocks():
    arch = textwrap.dedent("""\
        model m {
            stem conv(
                8,
                3,  # a kernel of 3
                stride = 2,
            )
            head classifier(num_classes, bias = true, init = "trunc_normal", std = 0.02, extra_argument = 1234)
        }
        """)
    yml = arch_to_yaml(arch)
    assert "    stem: |-\n      conv(\n          8,\n          3,  # a kernel of 3\n" in yml
    assert "    head: |-\n      classifier(" in yml
    assert yaml_to_arch(yml) == format_text(arch)


def test_yaml_doc_key_becomes_comments():
    yml = "doc: The family.\nmixers:\n  m:\n    doc: \"Line one.\\nLine two.\"\n    body: [identity]\n"
    arch = yaml_to_arch(yml)
    assert arch == "# The family.\n\n# Line one.\n# Line two.\nmixer m {\n    identity\n}\n"
    f = parse_text(arch)
    assert f.doc == "The family.\n\nLine one.\nLine two.".split("\n\n")[0] and f.composites[0].doc == "Line one.\nLine two."


# ---- the command --------------------------------------------------------------------------------------

def test_convert_command(tmp_path, capsys):
    src = tmp_path / "m.arch"
    src.write_text(ARCH)
    assert main(["convert", str(src), "--to", "yaml"]) == 0
    assert capsys.readouterr().out == YAML
    out = tmp_path / "m.yaml"
    assert main(["convert", str(src), "--to", "yaml", "-o", str(out)]) == 0
    assert out.read_text() == YAML and capsys.readouterr().out == ""
    assert main(["convert", str(out), "--to", "arch"]) == 0
    assert capsys.readouterr().out == ARCH
    # already in the target syntax: a copy, byte for byte
    messy = tmp_path / "messy.arch"
    messy.write_text("model m{input image(3,32)}  # as written\n")
    assert main(["convert", str(messy), "--to", "arch", "-o", str(tmp_path / "copy.arch")]) == 0
    assert (tmp_path / "copy.arch").read_text() == messy.read_text()
    assert main(["convert", str(out), "--to", "yaml"]) == 0
    assert capsys.readouterr().out == YAML


@pytest.mark.parametrize("name, text, where, message", [
    ("bad.arch", "model m {\n    stem conv(8,\n}\n", ":3:1:", "error:"),
    ("bad.yaml", "models:\n  m:\n    stem: [a, b\n", "bad.yaml:", "invalid YAML"),
    ("bad.yaml", "models:\n  m:\n    stme: conv(8)\n", "bad.yaml:3:5:", "unknown key 'stme'"),
    ("bad.arch", "mixer m {\n    residual(2) { identity }\n}\n", "bad.arch:2:14:",
     "a positional argument of residual cannot be written in YAML"),
    ("bad.arch", "model m {\n    let a = 1\n    input image(3, 8)\n    let a = 2\n}\n", "bad.arch:4:5:",
     "a second model-level 'a' cannot be written in YAML"),
    ("bad.txt", "model m {}\n", "", "not a blueprint"),
    ("w.port.yaml", "x: 1\n", "", "weight map"),
])
def test_bad_input_exits_2_located(tmp_path, capsys, name, text, where, message):
    path = tmp_path / name
    path.write_text(text)
    to = "arch" if name.endswith(".yaml") else "yaml"
    out = tmp_path / "out"
    assert main(["convert", str(path), "--to", to, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and (str(path) + where if where.startswith(":") else where) in err
    assert not out.exists()


def test_missing_file(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.arch"), "--to", "yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_errors_are_composer_errors():
    with pytest.raises(ComposerError):
        arch_to_yaml("model m { stem conv(8, }")
    with pytest.raises(ComposerError):
        yaml_to_arch("models: [")


@settings(max_examples=60, deadline=None)
@given(exprs)
def test_expressions_survive_yaml(e):
    """Any expression, as a `let`, a setting and an argument, reads back from YAML the same."""
    text = print_expr(e)
    arch = f"model m : b {{\n    let v = {text}\n    x = {text}\n    stem conv(8, {text})\n}}\n"
    yml = arch_to_yaml(arch)
    assert shape(parse_yaml(yml).models) == shape(parse_text(arch).models)
    assert yaml_to_arch(yml) == format_text(arch)
