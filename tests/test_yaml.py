"""The YAML front end: the same AST and plans as .arch, safe loading, located errors."""

import dataclasses
import os

import pytest

import composer
from composer.cli import main
from composer.diagnostics import ComposerError
from composer.loader import read_blueprint as parse_file
from composer.parse import parse_text
from composer.source import Span
from composer.yaml_read import parse_yaml
from helpers import REPO, write

DATA = REPO / "tests" / "data" / "yaml"


def strip(x):
    """An AST with spans and file names removed, for comparing the two front ends."""
    if isinstance(x, Span):
        return None
    if isinstance(x, (tuple, list)):
        return tuple(strip(y) for y in x)
    if dataclasses.is_dataclass(x):
        return (type(x).__name__,) + tuple(
            (f.name, strip(getattr(x, f.name))) for f in dataclasses.fields(x) if f.name not in ("file", "path"))
    return x


def steps(section):
    """(path, kind, output shape) of every step of a plan section, nested steps included."""
    out = []

    def walk(items):
        for s in items:
            out.append((s.path, s.kind, str(s.y)))
            for sub in s.children():  # a residual's shortcut and body, a parallel's branches, a composite's body
                walk(sub)

    if section is not None:
        walk(section.steps)
    return out


def structure(plan):
    return {
        "stem": steps(plan.stem),
        "stages": [(steps(st.downsample), [steps(b) for b in st.blocks], steps(st.norm), str(st.y))
                   for st in plan.stages],
        "head": steps(plan.head),
    }


def render(text: str, name: str = "bad.yaml") -> ComposerError:
    with pytest.raises(ComposerError) as info:
        parse_yaml(text, name)
    return info.value


# ---- the same model from both front ends ------------------------------------------


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_same_ast_as_arch(family):
    assert strip(parse_file(DATA / f"{family}.yaml")) == strip(parse_file(REPO / "blueprints" / f"{family}.arch"))


@pytest.mark.parametrize("model", ["swin_t", "swin_s"])
def test_swin_yaml_plan_matches_arch(model):
    from_yaml = composer.load(f"{DATA / 'swin.yaml'}:{model}")
    from_arch = composer.load(model)
    if model == "swin_t":
        assert from_yaml.params == 28288354
    assert from_yaml.params == from_arch.params
    assert structure(from_yaml) == structure(from_arch)


@pytest.mark.parametrize("model", ["convnext_atto", "convnext_t", "convnext_s"])
def test_convnext_yaml_plan_matches_arch(model):
    from_yaml, from_arch = composer.load(f"{DATA / 'convnext.yaml'}:{model}"), composer.load(model)
    assert from_yaml.params == from_arch.params
    assert structure(from_yaml) == structure(from_arch)


def test_relative_load_path():
    assert composer.load("tests/data/yaml/swin.yaml:swin_t").params == 28288354


ARCH = """
mixer split_mix(dim, tag = none) {
    let half = dim // 2
    parallel concat(split = [half, half]) {
        conv(half, 3) as left
        { conv(half, 5); gelu }
    }
    linear(dim) as proj
}
block unit(dim, k = 3) {
    residual(shortcut = none) { layernorm as norm; split_mix(dim) }
    residual { conv(dim, k, groups = dim) }
}
model tiny(num_classes = 10, img_size = 32, dims = [16, 32], flag = true, rate = 0.5, tag = none) {
    input image(3, img_size)
    stem conv(dims[0], 3, stride = 2)
    stage { block unit(dims[0]) }
    stages for i in 1..2 {
        let d = dims[i]
        downsample { conv(d, 2, stride = 2); layernorm }
        repeat 2 as j unit(d, k = j % 2 == 0 ? 3 : 5)
        after layernorm
    }
    head { global_pool("avg"); classifier(num_classes) }
    drop_path = 0.1
}
model tiny2 : tiny { dims = [8, 16] }
"""

YAML = """
mixers:
  split_mix:
    params: {dim: null, tag: none}
    body:
      - let: {half: dim // 2}
      - parallel:
          merge: concat
          split: [half, half]
          branches: ["conv(half, 3) as left", ["conv(half, 5)", gelu]]
      - linear(dim) as proj
blocks:
  unit:
    params: {dim: null, k: 3}
    body:
      - residual: {shortcut: null, body: [layernorm as norm, split_mix(dim)]}
      - residual: ["conv(dim, k, groups = dim)"]
models:
  tiny:
    params: {num_classes: 10, img_size: 32, dims: [16, 32], flag: true, rate: 0.5, tag: none}
    input: image(3, img_size)
    stem: conv(dims[0], 3, stride = 2)
    stages:
      - body: [{block: "unit(dims[0])"}]
      - for: i
        range: 1..2
        body:
          - let: {d: "dims[i]"}
          - downsample: ["conv(d, 2, stride = 2)", layernorm]
          - {repeat: 2, as: j, block: "unit(d, k = j % 2 == 0 ? 3 : 5)"}
          - after: layernorm
    head: ['global_pool("avg")', classifier(num_classes)]
    drop_path: 0.1
  tiny2:
    base: tiny
    set: {dims: [8, 16]}
"""


def test_every_construct_maps_to_the_arch_ast(tmp_path):
    assert strip(parse_yaml(YAML, "t.yaml")) == strip(parse_text(ARCH, "t.arch"))
    for model in ("tiny", "tiny2"):
        a = composer.load(f"{write(tmp_path, ARCH, 't.arch')}:{model}")
        y = composer.load(f"{write(tmp_path, YAML, 't.yaml')}:{model}")
        assert a.params == y.params and structure(a) == structure(y)


def test_spans_point_into_the_yaml():
    file = parse_file(DATA / "swin.yaml")
    swin_t = file.models[0]
    stage = next(s for s in swin_t.body if type(s).__name__ == "Stage")
    assert (stage.start.span.line, stage.start.span.column) == (12, 16)  # `range: 0..4`
    repeat = next(s for s in stage.items if type(s).__name__ == "Repeat")
    assert (repeat.count.span.line, repeat.count.span.column) == (21, 21)  # `repeat: depths[i]`
    # inside a folded (>-) scalar: `partition = ...` starts line 19 after 16 spaces
    mixer = next(s for s in stage.items if getattr(s, "name", None) == "mixer")
    partition = mixer.value.kwargs[1]
    assert partition[0] == "partition" and (partition[2].line, partition[2].column) == (19, 17)
    assert all(s.span.file == str(DATA / "swin.yaml") for s in swin_t.body)


# ---- safety and errors -----------------------------------------------------------------


def test_python_tag_rejected_and_never_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)
    path = write(tmp_path, "imports: []\nmodels: !!python/object/apply:os.system ['echo pwned']\n", "evil.yaml")
    with pytest.raises(ComposerError) as info:
        composer.load(path)
    text = info.value.render()
    assert info.value.code == "yaml-tag"
    assert "evil.yaml:2:9" in text and "tag" in text
    assert calls == []


def test_custom_tag_rejected():
    err = render("imports: [!include other.yaml]\n")
    assert err.code == "yaml-tag" and "bad.yaml:1:11" in err.render()


def test_unknown_key_did_you_mean():
    err = render("models:\n  m:\n    input: image(3, 32)\n    stemm: conv(8)\n")
    text = err.render()
    assert err.code == "yaml-schema"
    assert "bad.yaml:4:5: error: unknown key 'stemm'" in text and "did you mean 'stem'?" in text


def test_unknown_statement_did_you_mean():
    text = render("blocks:\n  b:\n    body:\n      - residul: [conv(8)]\n").render()
    assert "bad.yaml:4:9" in text and "unknown statement 'residul'" in text and "'residual'" in text


def test_wrong_type_is_located():
    text = render("blocks:\n  b:\n    body: {conv: 8}\n").render()
    assert "bad.yaml:3:11: error: expected a list, got a mapping" in text


def test_missing_and_duplicate_keys():
    assert "missing key 'body'" in render("blocks:\n  b:\n    params: {dim: null}\n").render()
    assert "bad.yaml:3:3: error: duplicate key 'm'" in render("models:\n  m: {}\n  m: {}\n").render()


def test_yaml_syntax_error_is_located():
    err = render("models:\n  m:\n    input: [image(3, 32)\n")
    assert err.code == "yaml-syntax"
    assert "bad.yaml:3:" in err.render()
    err = render("models:\n\tm: 1\n")
    assert err.code == "yaml-syntax" and "bad.yaml:2:1" in err.render()


def test_unquoted_comma_in_flow_list_hints_quoting():
    err = render("models:\n  m:\n    head: [conv(8, 3), gelu]\n")
    assert "bad.yaml:3:" in err.render() and "quote this expression" in err.render()


def test_recursive_alias_is_an_error():
    assert render("models: &a [*a]\n").code == "yaml-size"


def test_expression_syntax_error_points_into_the_yaml():
    # line 4 is `    stem: "conv(16,, 3)"`: the quote is column 11, `conv` column 12, the 2nd comma column 20
    err = render('models:\n  m:\n    input: image(3, 32)\n    stem: "conv(16,, 3)"\n')
    assert err.code == "syntax"
    span = err.diagnostics[0].span
    assert (span.file, span.line, span.column) == ("bad.yaml", 4, 20)
    assert '   4 |     stem: "conv(16,, 3)"' in err.render()


def test_expression_name_error_points_into_the_yaml(tmp_path):
    path = write(tmp_path, "models:\n  m:\n    input: image(3, 32)\n    head:\n"
                           "      - global_pool(\"avg\")\n      - classifer(10)\n", "m.yaml")
    with pytest.raises(ComposerError) as info:
        composer.load(path)
    span = info.value.diagnostics[0].span
    assert (span.file, span.line, span.column, span.end_column) == (path, 6, 9, 18)
    assert "did you mean 'classifier'" in info.value.render()


def test_cli_check_yaml(capsys):
    assert main(["check", "tests/data/yaml/swin.yaml"]) == 0
    assert "swin_t" in capsys.readouterr().out
