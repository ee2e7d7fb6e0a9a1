"""The parse stage: .arch text -> `composer.ast`, through the public API (`parse_text`, `parse_expr`).

Each statement kind is checked for its node type and fields, a few nodes for their source spans
(line and column counted by hand in the text of the test; a span's end column is one past its last
character), expressions for precedence and associativity, and syntax errors for being a
`ComposerError` at the right place. The error *messages* are pinned by the goldens of
tests/test_diagnostics.py: here only the error's code and position are checked."""

from __future__ import annotations

import pytest

from composer import ast
from composer.diagnostics import ComposerError
from composer.parse import parse_expr, parse_text


def where(node) -> tuple[int, int, int, int]:
    """(line, column, end line, end column) of a node's span."""
    s = node.span
    return s.line, s.column, s.end_line, s.end_column


def tree(e):
    """An expression as nested tuples: literals and names as their values, ('neg', x) for unary minus."""
    if isinstance(e, ast.Literal):
        return e.value
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.BinOp):
        return (e.op, tree(e.left), tree(e.right))
    if isinstance(e, ast.UnaryOp):
        return ("neg" if e.op == "-" else e.op, tree(e.operand))
    if isinstance(e, ast.Conditional):
        return ("?", tree(e.test), tree(e.then), tree(e.orelse))
    if isinstance(e, ast.Index):
        return ("[]", tree(e.target), tree(e.index))
    if isinstance(e, ast.Call):
        return ("call", tree(e.func), *map(tree, e.args))
    if isinstance(e, ast.ListExpr):
        return ["list", *map(tree, e.items)]
    raise AssertionError(f"no tree form for {e!r}")


def model_body(body: str):
    """The statements of `model m { <body> }`."""
    (model,) = parse_text("model m {\n" + body + "\n}\n").models
    return model.body


def block_body(body: str):
    """The statements of `block b { <body> }`."""
    (block,) = parse_text("block b {\n" + body + "\n}\n").composites
    return block.body


def syntax_error(text: str) -> ComposerError:
    with pytest.raises(ComposerError) as info:
        parse_text(text, "t.arch")
    return info.value


# ---- files and definitions ----------------------------------------------------------------------------


FILE = """\
# A file of each kind of definition.
import "lib/mobile"

# The mixer's doc.
mixer tokens(dim, ratio = 4) {
    linear(dim * ratio)
}

block unit(c) { conv(c, 3) }

model tiny(width = 32, depth): base {
    input image(3, 224)
}
"""


def test_file_collects_imports_composites_and_models_in_order():
    f = parse_text(FILE, "f.arch")
    assert isinstance(f, ast.File)
    assert f.path == "f.arch"
    assert [type(i) for i in f.imports] == [ast.Import]
    assert f.imports[0].path == "lib/mobile"  # the quotes are not part of the path
    assert [(c.kind, c.name) for c in f.composites] == [("mixer", "tokens"), ("block", "unit")]
    assert [m.name for m in f.models] == ["tiny"]
    assert f.doc == "A file of each kind of definition."
    assert f.composites[0].doc == "The mixer's doc."
    assert f.composites[1].doc == ""


def test_composite_parameters_and_defaults():
    mixer = parse_text(FILE).composites[0]
    assert isinstance(mixer, ast.CompositeDef)
    assert [type(p) for p in mixer.params] == [ast.Param, ast.Param]
    assert [p.name for p in mixer.params] == ["dim", "ratio"]
    assert mixer.params[0].default is None
    assert mixer.params[1].default == ast.Literal(4, mixer.params[1].default.span)
    (stmt,) = mixer.body
    assert isinstance(stmt, ast.Apply) and stmt.alias is None
    assert tree(stmt.expr) == ("call", "linear", ("*", "dim", "ratio"))


def test_model_header_params_and_base():
    model = parse_text(FILE).models[0]
    assert isinstance(model, ast.ModelDef)
    assert (model.name, model.base) == ("tiny", "base")
    assert [(p.name, None if p.default is None else p.default.value) for p in model.params] == [
        ("width", 32), ("depth", None)]
    (inp,) = model.body
    assert isinstance(inp, ast.Input)
    assert tree(inp.expr) == ("call", "image", 3, 224)


def test_model_without_params_or_base():
    model = parse_text("model plain {\n    input image(3, 32)\n}\n").models[0]
    assert (model.name, model.params, model.base) == ("plain", (), None)


def test_definition_spans_and_file_name():
    f = parse_text(FILE, "f.arch")
    mixer, block = f.composites
    model = f.models[0]
    assert where(f.imports[0]) == (2, 1, 2, 20)  # `import "lib/mobile"`: 19 characters
    assert where(mixer) == (5, 1, 7, 2)
    assert where(block) == (9, 1, 9, 29)  # `block unit(c) { conv(c, 3) }`: 28 characters
    assert where(model) == (11, 1, 13, 2)
    assert where(model.params[1]) == (11, 24, 11, 29)  # `depth`
    assert where(model.body[0]) == (12, 5, 12, 24)  # `input image(3, 224)`
    assert {mixer.span.file, model.span.file, model.file, block.file} == {"f.arch"}


# ---- model statements -----------------------------------------------------------------------------------

MODEL = """\
model tiny(depth) {
    input image(3, 64)
    let c = 16
    drop_path = 0.1
    stem conv(c, 4, stride = 4) as patch
    stages for i in 0..4 {
        let w = c * 2 ** i
        downsample i > 0 ? conv(w, 2) : none
        repeat depth as j: unit(w)
        block [norm, mlp(w)]
    }
    stage {
        repeat 2: [norm, relu]
        after norm
        reuse stages.0.blocks.1
    }
    head { pool; linear(10) }
}
"""


def _model():
    return parse_text(MODEL, "tiny.arch").models[0]


def test_model_statement_kinds_in_order():
    assert [type(s) for s in _model().body] == [
        ast.Input, ast.Let, ast.Assign, ast.Section, ast.Stage, ast.Stage, ast.Section]


def test_let_and_assign():
    let, assign = _model().body[1:3]
    assert (let.name, tree(let.value)) == ("c", 16)
    assert (assign.name, tree(assign.value)) == ("drop_path", 0.1)
    assert where(let) == (3, 5, 3, 15)  # `let c = 16`
    assert where(assign) == (4, 5, 4, 20)  # `drop_path = 0.1`


def test_stem_is_a_section_of_one_named_apply():
    stem = _model().body[3]
    assert stem.kind == "stem"
    (apply,) = stem.body
    assert isinstance(apply, ast.Apply)
    assert apply.alias == "patch"
    call = apply.expr
    assert isinstance(call, ast.Call)
    assert [tree(a) for a in call.args] == ["c", 4]
    assert [(k, tree(v)) for k, v, _ in call.kwargs] == [("stride", 4)]
    assert call.kwargs[0][2].column == 21  # a keyword's span is its name: `stride` in column 21
    assert where(apply) == (5, 10, 5, 41)  # `conv(c, 4, stride = 4) as patch`
    assert where(call) == (5, 10, 5, 32)


def test_stages_for_loop():
    stage = _model().body[4]
    assert stage.loop_var == "i"
    assert (tree(stage.start), tree(stage.stop)) == (0, 4)
    assert [type(s) for s in stage.items] == [ast.Let, ast.Section, ast.Repeat, ast.Repeat]
    let, down = stage.items[:2]
    assert isinstance(let, ast.Let)
    assert tree(let.value) == ("*", "c", ("**", 2, "i"))
    assert isinstance(down, ast.Section) and down.kind == "downsample"
    (apply,) = down.body
    assert tree(apply.expr) == ("?", (">", "i", 0), ("call", "conv", "w", 2), None)
    assert where(stage) == (6, 5, 11, 6)


def test_repeat_with_a_variable_and_single_block():
    _, _, rep, single = _model().body[4].items
    assert isinstance(rep, ast.Repeat)
    assert (tree(rep.count), rep.var, tree(rep.block)) == ("depth", "j", ("call", "unit", "w"))
    assert isinstance(single, ast.Repeat)
    assert (single.count, single.var) == (None, None)  # `block X` is a repeat without a count
    assert tree(single.block) == ["list", "norm", ("call", "mlp", "w")]


def test_plain_stage_repeat_list_after_and_reuse():
    stage = _model().body[5]
    assert (stage.loop_var, stage.start, stage.stop) == (None, None, None)
    rep, after, reuse = stage.items
    assert (tree(rep.count), rep.var, tree(rep.block)) == (2, None, ["list", "norm", "relu"])
    assert isinstance(after, ast.Section) and after.kind == "norm"  # `after` is the stage's closing norm
    assert [tree(s.expr) for s in after.body] == ["norm"]
    assert isinstance(reuse, ast.Reuse) and reuse.path == "stages.0.blocks.1"
    assert where(reuse) == (15, 9, 15, 32)


def test_head_block_of_statements_split_by_semicolons():
    head = _model().body[6]
    assert head.kind == "head"
    assert [(type(s), tree(s.expr), s.alias) for s in head.body] == [
        (ast.Apply, "pool", None), (ast.Apply, ("call", "linear", 10), None)]
    assert where(head) == (17, 5, 17, 30)


# ---- block bodies ---------------------------------------------------------------------------------------


def test_residual_plain_and_with_shortcut_and_when():
    plain, both = block_body(
        "    residual { norm; mlp(4) }\n"
        "    residual(shortcut = conv(8, 1), when = stride == 1) { conv(8, 3) }")
    assert isinstance(plain, ast.Residual)
    assert (plain.args, plain.kwargs) == ((), ())
    assert [tree(s.expr) for s in plain.body] == ["norm", ("call", "mlp", 4)]
    assert both.args == ()
    assert [(k, tree(v)) for k, v, _ in both.kwargs] == [
        ("shortcut", ("call", "conv", 8, 1)), ("when", ("==", "stride", 1))]
    assert [where(s) for s in both.body] == [(3, 59, 3, 69)]
    assert where(both) == (3, 5, 3, 71)


def test_parallel_branches_and_merge():
    (par,) = block_body("    parallel add {\n        { norm; relu }\n        conv(8, 3)\n        from skip\n    }")
    assert isinstance(par, ast.Parallel)
    assert (par.merge, par.args, par.kwargs) == ("add", (), ())
    assert [[type(s) for s in b] for b in par.branches] == [[ast.Apply, ast.Apply], [ast.Apply], [ast.Load]]
    assert par.branches[2][0].name == "skip"
    assert where(par) == (2, 5, 6, 6)


def test_parallel_with_a_split():
    (par,) = block_body("    parallel concat(split = [4, 4]) { conv(4, 3); identity }")
    assert par.merge == "concat"
    assert [(k, tree(v)) for k, v, _ in par.kwargs] == [("split", ["list", 4, 4])]
    assert [tree(b[0].expr) for b in par.branches] == [("call", "conv", 4, 3), "identity"]


def test_parallel_for_over_a_list():
    (loop,) = block_body("    parallel add for k in [3, 5, 7] { conv(8, k) as dw }")
    assert isinstance(loop, ast.ParallelFor)
    assert (loop.merge, loop.var, loop.args, loop.kwargs) == ("add", "k", (), ())
    assert tree(loop.items) == ["list", 3, 5, 7]
    assert loop.stop is None
    (stmt,) = loop.body
    assert (tree(stmt.expr), stmt.alias) == (("call", "conv", 8, "k"), "dw")


def test_parallel_for_over_a_range_with_a_split():
    (loop,) = block_body("    parallel concat(split = 2) for g in 0..n { let h = g + 1; conv(4, h) }")
    assert (loop.merge, loop.var) == ("concat", "g")
    assert [(k, tree(v)) for k, v, _ in loop.kwargs] == [("split", 2)]
    assert (tree(loop.items), tree(loop.stop)) == (0, "n")
    assert [type(s) for s in loop.body] == [ast.Let, ast.Apply]


def test_save_from_and_reuse_in_a_body():
    save, _, load, reuse = block_body("    save skip\n    conv(8, 3)\n    from skip\n    reuse stem.0")
    assert isinstance(save, ast.Save) and save.name == "skip"
    assert isinstance(load, ast.Load) and load.name == "skip"
    assert isinstance(reuse, ast.Reuse) and reuse.path == "stem.0"
    assert [where(s) for s in (save, load, reuse)] == [(2, 5, 2, 14), (4, 5, 4, 14), (5, 5, 5, 17)]


def test_a_list_statement_may_name_its_layers():
    (apply,) = block_body("    [conv(8, 3) as proj, relu]")
    named, relu = apply.expr.items
    assert isinstance(named, ast.Named)
    assert (named.alias, tree(named.expr), tree(relu)) == ("proj", ("call", "conv", 8, 3), "relu")
    assert where(named) == (2, 6, 2, 24)


def test_a_name_in_a_list_that_is_not_a_statement_is_refused():
    with pytest.raises(ComposerError) as info:
        parse_text("block b {\n    let xs = [conv(8, 3) as proj]\n}\n")
    assert info.value.code == "misplaced-name"
    assert where(info.value.diagnostics[0]) == (2, 15, 2, 33)


def test_a_newline_after_an_operator_or_inside_brackets_continues_the_statement():
    let, apply = block_body("    let x = 1 +\n        2\n    conv(8,\n         3)")
    assert tree(let.value) == ("+", 1, 2)
    assert where(let) == (2, 5, 3, 10)
    assert tree(apply.expr) == ("call", "conv", 8, 3)


# ---- expressions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3", ("+", 1, ("*", 2, 3))),
    ("1 * 2 + 3", ("+", ("*", 1, 2), 3)),
    ("(1 + 2) * 3", ("*", ("+", 1, 2), 3)),
    ("1 - 2 - 3", ("-", ("-", 1, 2), 3)),  # left-associative
    ("8 / 2 // 2 % 3", ("%", ("//", ("/", 8, 2), 2), 3)),
    ("2 ** 3 ** 2", ("**", 2, ("**", 3, 2))),  # right-associative
    ("-2 ** 2", ("neg", ("**", 2, 2))),  # ** binds tighter than unary minus
    ("2 ** -1", ("**", 2, ("neg", 1))),
    ("-a * b", ("*", ("neg", "a"), "b")),
    ("- -a", ("neg", ("neg", "a"))),
    ("+a", "a"),  # unary plus leaves no node
    ("-x[0]", ("neg", ("[]", "x", 0))),
    ("x[0][1]", ("[]", ("[]", "x", 0), 1)),
    ("f(1)(2)", ("call", ("call", "f", 1), 2)),
    ("a + b < c * d", ("<", ("+", "a", "b"), ("*", "c", "d"))),
    ("a == b and c != d or e", ("or", ("and", ("==", "a", "b"), ("!=", "c", "d")), "e")),
    ("a or b and c", ("or", "a", ("and", "b", "c"))),
    ("not a == b", ("not", ("==", "a", "b"))),
    ("not a and b", ("and", ("not", "a"), "b")),
    ("a or b ? c : d", ("?", ("or", "a", "b"), "c", "d")),
    ("a ? b : c ? d : e", ("?", "a", "b", ("?", "c", "d", "e"))),
    ("a ? b ? c : d : e", ("?", "a", ("?", "b", "c", "d"), "e")),
    ("a >= 1 ? [a, 2] : none", ("?", (">=", "a", 1), ["list", "a", 2], None)),
])
def test_precedence(text, expected):
    assert tree(parse_expr(text)) == expected


@pytest.mark.parametrize("text, value, kind", [
    ("42", 42, int),
    ("1_000", 1000, int),
    ("2.5", 2.5, float),
    ("1e-3", 0.001, float),
    ('"gelu"', "gelu", str),
    ("none", None, type(None)),
    ("true", True, bool),
    ("false", False, bool),
])
def test_literals(text, value, kind):
    lit = parse_expr(text)
    assert isinstance(lit, ast.Literal)
    assert lit.value == value and type(lit.value) is kind


def test_call_arguments_list_comprehension_and_index():
    call = parse_expr("f(1, x, k = [c * 2 for c in ws][0])")
    assert isinstance(call.func, ast.Name) and call.func.id == "f"
    assert [tree(a) for a in call.args] == [1, "x"]
    (kname, kvalue, kspan), = call.kwargs
    assert kname == "k" and (kspan.line, kspan.column) == (1, 9)
    assert isinstance(kvalue, ast.Index) and tree(kvalue.index) == 0
    comp = kvalue.target
    assert isinstance(comp, ast.ListComp)
    assert (tree(comp.expr), comp.var, tree(comp.items)) == (("*", "c", 2), "c", "ws")


def test_expression_spans():
    e = parse_expr("foo(a, b = 1) + 20", "e.expr")
    assert isinstance(e, ast.BinOp)
    assert where(e) == (1, 1, 1, 19)
    assert where(e.left) == (1, 1, 1, 14)  # `foo(a, b = 1)`
    assert where(e.left.func) == (1, 1, 1, 4)
    assert where(e.left.args[0]) == (1, 5, 1, 6)
    assert where(e.right) == (1, 17, 1, 19)
    assert e.span.file == "e.expr"
    # a bracketed operand widens its parent's span to the bracket, not its own
    p = parse_expr("(1 + 2) * 3")
    assert where(p) == (1, 1, 1, 12)
    assert where(p.left) == (1, 2, 1, 7)
    # a conditional spans its test to its last branch
    c = parse_expr("x > 1 ? x : 1")
    assert where(c) == (1, 1, 1, 14)
    assert where(c.test) == (1, 1, 1, 6)


# ---- syntax errors --------------------------------------------------------------------------------------


def test_unexpected_token_is_located():
    err = syntax_error("model m {\n    input image(3, 32)\n    let = 4\n}\n")
    assert err.code == "syntax"
    d = err.diagnostics[0]
    assert (d.span.file, d.span.line, d.span.column) == ("t.arch", 3, 9)  # the `=` where a name should be


def test_unexpected_character_is_located():
    err = syntax_error("block b {\n    conv(8, 3) @ relu\n}\n")
    assert err.code == "syntax"
    assert where(err.diagnostics[0]) == (2, 16, 2, 17)


def test_end_of_file_is_located_after_the_last_line():
    err = syntax_error("model m {\n    input image(3, 32)\n")
    assert err.code == "syntax"
    assert where(err.diagnostics[0]) == (2, 23, 2, 24)  # the last line has 22 characters


def test_comparisons_do_not_chain():
    with pytest.raises(ComposerError) as info:
        parse_expr("1 < 2 < 3")
    assert info.value.code == "syntax"
    assert (info.value.diagnostics[0].span.line, info.value.diagnostics[0].span.column) == (1, 7)


def test_argument_errors_are_located_at_the_offending_argument():
    err = syntax_error("block b {\n    conv(out = 8, 3)\n}\n")
    assert err.code == "syntax"  # positional after keyword
    assert where(err.diagnostics[0]) == (2, 19, 2, 20)
    err = syntax_error("block b {\n    conv(8, k = 3, k = 5)\n}\n")
    assert err.code == "duplicate-argument"
    assert where(err.diagnostics[0]) == (2, 20, 2, 21)  # the second `k`
    err = syntax_error("block b(c, c) {\n    conv(c, 3)\n}\n")
    assert err.code == "duplicate-parameter"
    assert where(err.diagnostics[0]) == (1, 12, 1, 13)


def test_a_syntax_error_later_in_the_file_wins_over_an_argument_error():
    err = syntax_error("block b {\n    conv(8, k = 3, k = 5)\n}\nmodel {\n}\n")
    assert err.code == "syntax"
    assert err.diagnostics[0].span.line == 4


# ---- every walker covers every node it may meet ---------------------------------------------

def _covers(walker, union) -> list[str]:
    import typing

    return [c.__name__ for c in typing.get_args(union) if not hasattr(walker, "visit_" + c.__name__)]


def test_expression_walkers_cover_every_expression_node():
    """A new expression node must get a visit method in each expression walker: this fails in the
    suite, not at the first blueprint that uses it."""
    from composer import ast as A
    from composer import format as F

    for walker in (F.Printer, F._Precedence, A._LayerNames, A._HasLayerNames):
        assert _covers(walker, A.Expr) == [], walker.__name__


def test_statement_walkers_cover_every_body_statement():
    from composer import ast as A
    from composer import convert as C
    from composer import format as F
    from composer import resolve as R

    for walker in (F.Printer, C._ToYaml, R._Resolver):
        assert _covers(walker, A.Body) == [], walker.__name__
