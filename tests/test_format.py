"""`composer fmt`: the canonical .arch layout, idempotent, meaning- and comment-preserving."""

import dataclasses
import re
import shutil
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer import ast
from composer.api import load
from composer.cli import main
from composer.diagnostics import ComposerError
from composer.format import format_text, print_expr, scan_comments, shape
from composer.parse import parse_expr, parse_text
from helpers import REPO

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The zoo copied twice: `orig/` as it is and `fmt/` formatted (lib/ included, so imports resolve)."""
    root = tmp_path_factory.mktemp("zoo")
    shutil.copytree(REPO / "blueprints", root / "orig", ignore=shutil.ignore_patterns("*.yaml"))
    shutil.copytree(root / "orig", root / "fmt")
    assert main(["fmt", str(root / "fmt")]) == 0
    return root


def files(zoo, lib=True):
    """The zoo's .arch files (relative paths), libraries included."""
    found = sorted(p.relative_to(zoo / "orig") for p in (zoo / "orig").glob("*.arch"))
    return found + (sorted(p.relative_to(zoo / "orig") for p in (zoo / "orig" / "lib").glob("*.arch")) if lib else [])


def description(plan):
    """The resolved architecture: every step of every section (kind, path, shapes, op and its fields)."""
    out = []
    for section in plan.sections:
        for step in section.steps:
            for s in step.walk():
                out.append((section.path, section.call, s.kind, s.path, str(s.x), str(s.y), _own_fields(s)))
    return out


def _own_fields(step) -> list:
    """A step's own fields (its class's: op, name, merge, split, drop_path, call, ...), the nested
    step lists left to `walk`; ops by repr, floats rounded."""
    out = []
    for f in dataclasses.fields(step):
        v = getattr(step, f.name)
        if f.name in ("path", "x", "y", "span", "body", "shortcut", "branches", "reused"):
            continue
        if f.name == "op":  # a tensor argument's source span (file, line) is where it was written, not what it is
            v = re.sub(r"span=Span\([^)]*\), ", "", repr(v))
        out.append((f.name, v if f.name == "op" else round(v, 9) if isinstance(v, float) else v))
    return out


def outcome(target):
    try:
        plan = load(target)
    except ComposerError as exc:
        return ("error", exc.code)
    return (plan.params, plan.macs, description(plan))


# ---- the zoo --------------------------------------------------------------------------------------

def test_zoo_fmt_is_idempotent(zoo):
    assert len(files(zoo)) >= 30
    for rel in files(zoo):
        once = (zoo / "fmt" / rel).read_text()
        assert format_text(once, str(rel)) == once, f"fmt is not idempotent on {rel}"


def test_zoo_fmt_keeps_every_comment(zoo):
    for rel in files(zoo):
        before = [c.text for c in scan_comments((zoo / "orig" / rel).read_text())]
        after = [c.text for c in scan_comments((zoo / "fmt" / rel).read_text())]
        assert after == before, rel


def test_zoo_fmt_keeps_the_ast(zoo):
    for rel in files(zoo):
        a = parse_text((zoo / "orig" / rel).read_text(), "a")
        b = parse_text((zoo / "fmt" / rel).read_text(), "b")
        assert shape(a) == shape(b), rel
        assert a.doc == b.doc and [c.doc for c in a.composites] == [c.doc for c in b.composites]


def test_zoo_fmt_keeps_the_resolved_architecture(zoo):
    from composer.resolve import load as load_unit

    count = 0
    for rel in files(zoo, lib=False):
        for m in load_unit(zoo / "orig" / rel).file.models:
            a = outcome(f"{zoo / 'orig' / rel}:{m.name}")
            b = outcome(f"{zoo / 'fmt' / rel}:{m.name}")
            assert a == b, f"{rel}:{m.name}"
            count += a[0] != "error"
    assert count >= 100  # the zoo resolves


def test_zoo_lines_fit(zoo):
    """Every formatted line fits in 100 columns unless it cannot break (a long string or comment)."""
    for rel in files(zoo):
        for line in (zoo / "fmt" / rel).read_text().splitlines():
            if len(line) > 100:
                assert '"' in line or "#" in line or "(" not in line, line


# ---- golden cases -----------------------------------------------------------------------------------

MESSY = """\
# header line one
# header line two
import   "lib/metaformer"
mixer  m( dim,hidden=4*dim , act=gelu ){
  linear(hidden,bias=true)as fc1 ;act
    linear( dim )   # back to dim



}
# doc of the model
model  tiny (num_classes=1000,img_size=224,dims=[32,64,128,256],depths=[1,1,2,1],heads=[1,2,4,8],ratio=4):base_model{
  let x=-(1+2)*3**-1
  let y = ( a ? b : c ) ? d : e
  let z = not (p and q) or r
  stages for i in 0 .. 4 {
     downsample { conv(dims[i],2,stride=2) }
     repeat depths[i] as j [metaformer(dims[i], attention(heads[i], position = relative_bias, partition = window(7, shift = j % 2 * 3))), identity]
  }
  head {
    global_pool( "avg" )  # pool
    # the classifier
    classifier(num_classes,
               bias = true,   # keep the bias
    )
  }
}
model   small : tiny {dims=[48,96,192,384] ; heads=[2,4,8,16]}
model   base : tiny {dims=[64,128,256,512] ; heads=[2,4,8,16]}
# trailing comment at the end
"""

MESSY_FORMATTED = """\
# header line one
# header line two
import "lib/metaformer"

mixer m(dim, hidden = 4 * dim, act = gelu) {
    linear(hidden, bias = true) as fc1
    act
    linear(dim)  # back to dim
}

# doc of the model
model tiny(
    num_classes = 1000,
    img_size = 224,
    dims = [32, 64, 128, 256],
    depths = [1, 1, 2, 1],
    heads = [1, 2, 4, 8],
    ratio = 4,
) : base_model {
    let x = -(1 + 2) * 3 ** -1
    let y = (a ? b : c) ? d : e
    let z = not (p and q) or r
    stages for i in 0..4 {
        downsample conv(dims[i], 2, stride = 2)
        repeat depths[i] as j: [
            metaformer(
                dims[i],
                attention(
                    heads[i],
                    position = relative_bias,
                    partition = window(7, shift = j % 2 * 3),
                ),
            ),
            identity,
        ]
    }
    head {
        global_pool("avg")  # pool
        # the classifier
        classifier(
            num_classes,
            bias = true,  # keep the bias
        )
    }
}

model small : tiny { dims = [48, 96, 192, 384]; heads = [2, 4, 8, 16] }
model base : tiny { dims = [64, 128, 256, 512]; heads = [2, 4, 8, 16] }

# trailing comment at the end
"""


def test_golden_messy_file():
    assert format_text(MESSY) == MESSY_FORMATTED
    assert format_text(MESSY_FORMATTED) == MESSY_FORMATTED


GOLDEN = [
    # spacing, numbers keep their spelling, minimal parentheses
    ("model m{let a=1e-6;let b=1_000;let c=(x+y)+z;let d=x+(y+z);let e=(x-y)-(z-w)}",
     "model m {\n    let a = 1e-6\n    let b = 1_000\n    let c = x + y + z\n    let d = x + (y + z)\n"
     "    let e = x - y - (z - w)\n}\n"),
    ("model m { let a = 2**3**4; let b = (2**3)**4; let c = -x**2; let d = (-x)**2 }",
     "model m { let a = 2 ** 3 ** 4; let b = (2 ** 3) ** 4; let c = -x ** 2; let d = (-x) ** 2 }\n"),
    ("model m { let a = (x == y) == z; let b = not(a) ; let c = (f)(x)[0]; let d = [ i*2 for i in xs ] }",
     "model m { let a = (x == y) == z; let b = not a; let c = f(x)[0]; let d = [i * 2 for i in xs] }\n"),
    # a stage, a one-line residual, a parallel with a braced and a bare branch; `repeat` with `:`
    ("block b(d){residual{norm;mixer(d)}\nparallel concat(split=[1,2]){{conv(1);relu}\n{identity}}}\n"
     "model m{stage{repeat 2: (x)\nrepeat 3: -y\nblock {conv(8)}}}\n",
     "block b(d) {\n    residual { norm; mixer(d) }\n    parallel concat(split = [1, 2]) {\n"
     "        { conv(1); relu }\n        identity\n    }\n}\n\n"
     "model m {\n    stage {\n        repeat 2 x\n        repeat 3: -y\n        block { conv(8) }\n    }\n}\n"),
    # a long conditional breaks before `?` and `:`; a comment after `{`; a comment before `}`
    ("model m {  # the model\n    downsample_rule = i > 0 ? patch_merging(dims[i], norm = layernorm, extra = 1234567) : "
     "conv(dims[i], 4, stride = 4)\n    # the end\n}\n",
     "model m {  # the model\n    downsample_rule = i > 0\n        ? patch_merging(dims[i], norm = layernorm, extra = 1234567)\n"
     "        : conv(dims[i], 4, stride = 4)\n    # the end\n}\n"),
    # comments inside brackets: above an argument, after one, after `(`, before `)`
    ("model m(\n  a = 1,  # first\n  # about b\n  b = 2\n) {\n  x = f(  # open\n    1,\n    2\n    # closing\n  )\n}\n",
     "model m(\n    a = 1,  # first\n    # about b\n    b = 2,\n) {\n    x = f(  # open\n        1,\n        2,\n"
     "        # closing\n    )\n}\n"),
    # blank lines: runs become one, none after `{` or before `}`, one between definitions
    ("mixer a {\n\n  x\n\n\n  y\n\n}\nmixer b { z }\n\n\n\nmixer c { w }\n",
     "mixer a {\n    x\n\n    y\n}\n\nmixer b { z }\n\nmixer c { w }\n"),
    # empty blocks and parameter lists
    ("model m () : base {   }\nmixer n() {\n}\n", "model m : base {}\nmixer n {}\n"),
    # an own-line comment between a statement's lines moves above the statement
    ("model m {\n    let a = b +\n        # two\n        c\n}\n", "model m {\n    # two\n    let a = b + c\n}\n"),
]


@pytest.mark.parametrize("text, expected", GOLDEN)
def test_golden(text, expected):
    assert format_text(text) == expected
    assert format_text(expected) == expected
    assert shape(parse_text(text)) == shape(parse_text(expected))


def test_long_one_line_block_breaks():
    text = "model crossvit_small : crossvit_tiny { dims = [192, 384]; heads = [6, 6]; reference = \"timm:crossvit_small_240\" }\n"
    assert format_text(text) == textwrap.dedent("""\
        model crossvit_small : crossvit_tiny {
            dims = [192, 384]
            heads = [6, 6]
            reference = "timm:crossvit_small_240"
        }
        """)


def test_trailing_comment_after_call_does_not_break_it():
    text = "model m {\n    stem conv(3, 4)   # a comment that would not fit on the line together with its statement, but does not count\n}\n"
    assert format_text(text) == text.replace("   #", "  #")


# ---- expressions (hypothesis) ---------------------------------------------------------------------------

SPAN = parse_expr("x").span
NAMES = st.sampled_from(["a", "b", "x", "dims", "conv", "layernorm", "i"])


def _lit(v):
    return ast.Literal(v, SPAN)


leaves = st.one_of(
    st.integers(0, 10 ** 12).map(_lit),
    st.floats(0, 1e300, allow_nan=False, allow_infinity=False).map(_lit),
    st.text(st.characters(blacklist_characters='"\n\r', blacklist_categories=("Cs",)), max_size=8).map(_lit),
    st.sampled_from([True, False, None]).map(_lit),
    NAMES.map(lambda n: ast.Name(n, SPAN)),
)


def _extend(inner):
    ops = st.sampled_from(["or", "and", "==", "!=", "<", "<=", ">", ">=", "+", "-", "*", "/", "//", "%", "**"])
    kwargs = st.lists(st.tuples(NAMES, inner), max_size=3, unique_by=lambda kv: kv[0]).map(
        lambda kvs: tuple((k, v, SPAN) for k, v in kvs))
    return st.one_of(
        st.builds(lambda op, l, r: ast.BinOp(op, l, r, SPAN), ops, inner, inner),
        st.builds(lambda op, e: ast.UnaryOp(op, e, SPAN), st.sampled_from(["-", "not"]), inner),
        st.builds(lambda t, a, b: ast.Conditional(t, a, b, SPAN), inner, inner, inner),
        st.builds(lambda f, a, k: ast.Call(f, tuple(a), k, SPAN), inner, st.lists(inner, max_size=3), kwargs),
        st.builds(lambda t, i: ast.Index(t, i, SPAN), inner, inner),
        st.builds(lambda xs: ast.ListExpr(tuple(xs), SPAN), st.lists(inner, max_size=4)),
        st.builds(lambda e, v, xs: ast.ListComp(e, v, xs, SPAN), inner, NAMES, inner),
    )


exprs = st.recursive(leaves, _extend, max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs)
def test_printed_expressions_parse_back(e):
    text = print_expr(e)
    again = parse_expr(text)
    assert shape(again) == shape(e), text
    assert print_expr(again) == text
    assert all(len(line) <= 100 or '"' in line for line in text.splitlines()) or len(text.splitlines()) == 1


@settings(max_examples=100, deadline=None)
@given(exprs)
def test_printed_expressions_as_statements(e):
    """The same expressions inside a file, breaking at 100 columns at several depths."""
    text = f"model m {{\n    let v = {print_expr(e)}\n    stage {{ block conv(8, {print_expr(e)}) }}\n}}\n"
    out = format_text(text)
    assert format_text(out) == out
    assert shape(parse_text(out)) == shape(parse_text(text))


# ---- the command --------------------------------------------------------------------------------------

def test_check_reports_and_exits_1(tmp_path, capsys):
    bad, good = tmp_path / "bad.arch", tmp_path / "good.arch"
    bad.write_text("model m{input image(3,224)}\n")
    good.write_text("model m { input image(3, 224) }\n")
    (tmp_path / "skip.yaml").write_text("not: [a blueprint\n")
    (tmp_path / "w.port.yaml").write_text("x: 1\n")
    assert main(["fmt", "--check", str(good)]) == 0
    assert capsys.readouterr().out == ""
    assert main(["fmt", "--check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"--- {bad}" in out and "-model m{input image(3,224)}" in out and "+model m { input image(3, 224) }" in out
    assert "good.arch" not in out
    assert bad.read_text() == "model m{input image(3,224)}\n"  # --check writes nothing


def test_fmt_rewrites_changed_files(tmp_path, capsys):
    bad, good = tmp_path / "sub" / "bad.arch", tmp_path / "good.arch"
    bad.parent.mkdir()
    bad.write_text("model m{input image(3,224)}\n")
    good.write_text("model m { input image(3, 224) }\n")
    before = good.stat().st_mtime_ns
    assert main(["fmt", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"reformatted {bad}\n"
    assert bad.read_text() == "model m { input image(3, 224) }\n"
    assert good.stat().st_mtime_ns == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.arch", "good.arch", "sub"]  # no temp files left


def test_parse_error_exits_2_and_writes_nothing(tmp_path, capsys):
    ok, broken = tmp_path / "a.arch", tmp_path / "b.arch"
    ok.write_text("model m{input image(3,224)}\n")
    broken.write_text("model m {\n    let x = (1 +\n}\n")
    assert main(["fmt", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{broken}:3:1: error:" in err
    assert ok.read_text() == "model m{input image(3,224)}\n"
    assert main(["fmt", "--check", str(tmp_path / "missing.arch")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["fmt", str(tmp_path / "x.yaml")]) == 2


def test_fmt_is_torch_free():
    import subprocess
    import sys

    code = ("import sys; import composer.format, composer.convert; "
            "composer.format.format_text('model m { stem conv(8, 3) }'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
