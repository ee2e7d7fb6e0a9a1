"""Unbounded work and hostile sizes (issue 15, items 2 to 4 and 7): every such input ends in a
located error with exit status 2, within the work budget of a check (composer/budget.py), never
a hang, an exhausted memory or an internal error. The goldens of the messages are in
tests/data/diagnostics (too-large_*, too-deep_*, ...)."""

from __future__ import annotations

import re
import time

import pytest

from composer import api, budget, cli
from composer.diagnostics import ComposerError

MODEL = "model m {{\n    {lets}\n    input image(3, 8)\n    stem {{ {stem} }}\n}}\n"


def _check(tmp_path, text: str, capsys, name: str = "x.arch") -> tuple[int, str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    capsys.readouterr()
    status = cli.main(["check", str(path)])
    return status, capsys.readouterr().err


def _located(status: int, err: str, code_words: str) -> None:
    assert status == 2, err
    assert "internal error" not in err and "Traceback" not in err, err
    assert re.search(r"x\.arch:\d+:\d+: error: ", err), err
    assert code_words in err, err


def _doubling(op: str, start: str, n: int = 30) -> str:
    lines = [f"let v0 = {start}"] + [f"let v{i} = v{i - 1} {op} v{i - 1}" for i in range(1, n)]
    return "\n    ".join(lines)


CASES = {  # name: (lets, stem, words of the message)
    "exponent tower": ("let a = (9 ** 64) ** 64 ** 2", "conv(8, 3)", "too large"),
    "right tower": ("let a = 2 ** 2 ** 2 ** 2 ** 2", "conv(8, 3)", "too large"),
    "squaring chain": (_doubling("*", "10 ** 60", 8), "conv(8, 3)", "too large: this number"),
    "nested ranges": ("let a = [[x + y for y in range(999999)] for x in range(999999)]", "conv(8, 3)",
                      "work budget"),
    "string doubling": (_doubling("+", '"ab"'), "conv(8, 3)", "work budget"),
    "list doubling": (_doubling("+", "[0]"), "conv(8, 3)", "work budget"),
    "list repetition": ("let a = [0] * 10 ** 9", "conv(8, 3)", "work budget"),
    # a grid no model can hold: refused where it is made (a fuzzed padding of 2 ** 62 hung the check)
    "huge grid": ("let p = 2 ** 62", "conv(8, 3, padding = p)", "beyond what any model runs"),
    # 65,536 x 3 layers from a list a fuzzed blueprint multiplied (found by benchmarks/fuzz.py)
    "list of layers": ("let n = 2 ** 2 ** 2 ** 2", "[conv(8, 3), batchnorm, relu] * n", "applying this list of layers"),
    "float overflow": ("let a = 1e300 ** 2", "conv(8, 3)", "too large"),
    "float literal": ("let a = 1e309", "conv(8, 3)", "too large"),
    "int of infinity": ("let a = int(1e308 * 10)", "conv(8, 3)", "too large"),
    "huge product": ("let a = 10 ** 200 * 10 ** 200", "conv(8, 3)", "too large"),
    "long range": ("let a = range(10 ** 8)", "conv(8, 3)", "a range of 100,000,000 numbers"),
    "parallel for cubed": ("", "parallel add for i in 0..256 { parallel add for j in 0..256 { parallel add for k in "
                           "0..256 { conv(8, 3, padding = 1) } } }", "work budget"),
    "deep unary": ("let a = " + "-" * 600 + "1", "conv(8, 3)", "too deeply nested"),
    "long sum": ("let a = " + "1 + " * 600 + "1", "conv(8, 3)", "too deeply nested"),
    "deep lists": ("let a = " + "[" * 500 + "1" + "]" * 500, "conv(8, 3)", "too deeply nested"),
    "deep residuals": ("", "residual { " * 500 + "identity" + " }" * 500, "too deeply nested"),
    "summary overflow": ("let c = (10 ** 50) ** 4", "conv(c, 3, padding = 1); conv(c, 3, padding = 1)",
                         "too large: a tensor of about 6.4e+201 values is beyond what any model runs"),
    "second let": ("let a = 8\n    let a = 16", "conv(a, 3)", "'a' is already defined here"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_expression_is_a_located_error(case, tmp_path, capsys):
    lets, stem, words = CASES[case]
    status, err = _check(tmp_path, MODEL.format(lets=lets, stem=stem), capsys)
    _located(status, err, words)


def test_long_integer_literal_is_located(tmp_path, capsys):
    status, err = _check(tmp_path, MODEL.format(lets="let a = " + "7" * 5000, stem="conv(8, 3)"), capsys)
    _located(status, err, "an integer of 5,000 digits")


@pytest.mark.parametrize("depth, words", [(30, "too large"), (None, "expands into itself")])
def test_recursive_block_with_two_branches(depth, words, tmp_path, capsys):
    """Two uses of itself per level, 30 levels: the budget stops it long before 2**30 expansions;
    without an end, the depth limit. One note per use, not one per level."""
    body = "n > 0 ? [b(n - 1, 0), b(n - 1, 1)] : none" if depth else "residual { b(n + 1) }; residual { b(n + 2) }"
    text = (f"block b(n, k = 0) {{\n    conv(8, 3, padding = 1)\n    {body}\n}}\n"
            + MODEL.format(lets="", stem=f"conv(8, 3, padding = 1); b({depth or 0})"))
    status, err = _check(tmp_path, text, capsys)
    _located(status, err, words)
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == len(set(notes)) <= 3, err


def test_budget_error_comes_from_the_budget(tmp_path):
    """The check of a model stops when its units are spent, whatever the clock says: with a small
    budget a zoo-sized model fails, with the default it passes."""
    path = tmp_path / "x.arch"
    path.write_text(MODEL.format(lets="let a = [x * 2 for x in range(5000)]", stem="conv(8, 3)"), encoding="utf-8")
    assert api.load(f"{path}:m").params == 8 * 3 * 9 + 8
    with budget.opened(1000), pytest.raises(ComposerError) as info:
        budget.charge(2000, None, "this")
    assert info.value.code == "too-large"


def test_range_from_a_million_works(tmp_path):
    """It used to be silently empty from 1,000,000."""
    path = tmp_path / "x.arch"
    path.write_text(MODEL.format(lets="let a = len(range(1000000, 1000003))", stem="conv(a * 8, 3)"),
                    encoding="utf-8")
    assert api.load(f"{path}:m").params == 24 * 3 * 9 + 24


def test_many_definitions_check_in_linear_time(monkeypatch):
    """The duplicate-definition check is one pass: 20,000 definitions (a quadratic check compares
    200 million pairs) are loaded in well under a second, and a duplicate is still found."""
    import composer.loader as loader
    from composer import ast
    from composer.source import Span

    span = Span("<many>", 1, 1, 1, 2)
    comps = [ast.CompositeDef("block", f"b{i}", (), (), span) for i in range(20000)]
    file = ast.File(path="<many>", imports=[], composites=comps, models=[])
    monkeypatch.setattr(loader, "read_blueprint", lambda path: file)
    monkeypatch.setattr(loader, "_CACHE", {})
    start = time.process_time()
    unit = loader._load("many.arch", ())
    assert time.process_time() - start < 1.0
    assert len(unit.names.composites) >= 20000
    comps.append(ast.CompositeDef("block", "b7", (), (), Span("<many>", 9, 1, 9, 2)))
    monkeypatch.setattr(loader, "_CACHE", {})
    with pytest.raises(ComposerError, match="'b7' is defined twice"):
        loader._load("many.arch", ())


def test_megabyte_line_is_quoted_in_part(tmp_path, capsys):
    text = MODEL.format(lets="let a = 1" + " " * 1_000_000 + "$", stem="conv(8, 3)")
    status, err = _check(tmp_path, text, capsys)
    _located(status, err, "unexpected character '$'")
    assert max(len(line) for line in err.splitlines()) < 200, [len(line) for line in err.splitlines()]
    quoted = next(line for line in err.splitlines() if " | " in line)
    caret = err.splitlines()[err.splitlines().index(quoted) + 1]
    assert quoted.rstrip().endswith("$") and caret.index("^") == len(quoted.rstrip()) - 1


def test_nested_parallel_is_a_branch(tmp_path):
    """docs/language.md: a branch is one statement; a parallel, parallel for or residual included."""
    path = tmp_path / "x.arch"
    path.write_text(MODEL.format(lets="", stem="conv(8, 3, padding = 1); parallel add { parallel concat { conv(4, 1); "
                                 "conv(4, 1) }; residual { conv(8, 1) }; parallel add for i in 0..2 { conv(8, 1) }; "
                                 "identity }"), encoding="utf-8")
    plan = api.load(f"{path}:m")
    assert plan.params == (8 * 27 + 8) + 2 * (8 * 4 + 4) + (64 + 8) + 2 * (64 + 8)


def test_debug_after_the_subcommand(tmp_path, capsys):
    path = tmp_path / "x.arch"
    path.write_text(MODEL.format(lets="", stem="conv(8, 3)"), encoding="utf-8")
    assert cli.main(["check", str(path), "--debug"]) == 0
    assert cli.make_parser().parse_args(["check", str(path), "--debug"]).debug
    assert not cli.make_parser().parse_args(["check", str(path)]).debug


def test_a_file_of_too_many_tokens_is_refused_where_it_passes_the_limit(tmp_path, capsys):
    """15,000 one-line blocks (about 90,000 tokens; the zoo's longest file has about 2,200): the
    parse stops at the 50,000th token with a located error instead of taking seconds."""
    blocks = "".join(f"block b{i} {{ relu }}\n" for i in range(15000))
    status, err = _check(tmp_path, MODEL.format(lets="", stem="conv(8, 3)") + blocks, capsys)
    _located(status, err, "limited to 50,000 tokens")
    line = int(err.split(":")[1])
    assert 8000 < line < 9000  # about 6 tokens a block, after the model's own
