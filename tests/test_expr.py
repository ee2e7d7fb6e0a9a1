"""The expression evaluator: values, errors, and agreement with Python arithmetic."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from composer.diagnostics import ComposerError
from composer.expr import Cycle, Namespace, Schedule, Scope, evaluate
from composer.ops import OPS
from composer.parse import parse_expr


def ev(text, **values):
    return evaluate(parse_expr(text), Scope(Namespace(ops=dict(OPS)), values))


@pytest.mark.parametrize("text, expected", [
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("96 / 3", 32),            # exact integer division stays an int
    ("7 / 2", 3.5),
    ("7 // 2", 3),
    ("-7 % 3", 2),
    ("2 ** 10", 1024),
    ("[1, 2, 3][1]", 2),
    ("[1, 2, 3][-1]", 3),
    ("3 > 2 ? \"a\" : \"b\"", "a"),
    ("1 == 1 and not (2 < 1)", True),
    ("none", None),
    ("max(3, 9, 4)", 9),
    ("min([5, 2])", 2),
    ("round(0.9 * 3)", 3),
    ("len([1, 2] + [3])", 3),
    ("sum([2, 2, 6, 2])", 12),
    ("make_divisible(32 * 0.75)", 24),
    ("[0] * 3", [0, 0, 0]),
])
def test_values(text, expected):
    assert ev(text) == expected


def test_variables_and_refs():
    assert ev("dims[i] * 2", dims=[96, 192], i=1) == 384
    ref = ev("conv(64, kernel = 3)")
    assert ref.name == "conv" and dict(ref.args) == {"out": 64, "kernel": 3}


def test_per_block_values():
    assert ev("alternate(0, 3)").values == (0, 3)
    assert isinstance(ev("cycle([1, 2])"), Cycle)
    sched = ev("linspace(0, 0.2)")
    assert isinstance(sched, Schedule)
    assert [round(sched.at(k, 5), 3) for k in range(5)] == [0.0, 0.05, 0.1, 0.15, 0.2]


@pytest.mark.parametrize("text, code", [
    ("1 / 0", "value"),
    ("[1][3]", "index"),
    ("undefined_thing", "unknown-name"),
    ("conv(8, kernal = 3)", "unknown-parameter"),
    ("conv(8, 3, 1, 1, 1, 1, true, \"default\", 9)", "arguments"),  # one more than conv's parameters
    ("3(4)", "type"),
    ("\"a\" - 1", "type"),
    ("2 ** 1000", "value"),
])
def test_errors_are_located(text, code):
    with pytest.raises(ComposerError) as info:
        ev(text)
    assert info.value.code == code
    assert info.value.diagnostics[0].span is not None


def test_did_you_mean():
    with pytest.raises(ComposerError) as info:
        ev("layernrom")
    assert "did you mean 'layernorm'" in info.value.render()


# Property: for integer arithmetic trees the evaluator agrees with Python (an independent oracle).
_leaf = st.integers(-50, 50).map(str)


def _tree(children):
    return st.tuples(children, st.sampled_from(["+", "-", "*", "//", "%"]), children).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})")


@settings(max_examples=200, deadline=None)
@given(st.recursive(_leaf, _tree, max_leaves=12))
def test_arithmetic_matches_python(text):
    try:
        expected = eval(text)  # the oracle: Python itself, on generated integer arithmetic only
    except ZeroDivisionError:
        with pytest.raises(ComposerError):
            ev(text)
        return
    assert ev(text) == expected
