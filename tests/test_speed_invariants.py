"""The fast check path gives what the plain one gives.

`composer check` reuses work: the parser builds the AST during Lark's LALR loop over flattened
tables, fed by a one-loop copy of Lark's contextual lexer (composer/lalr.py: `FAST` switches
both off), equal composite instances are expanded once and copied
(composer/speed.py), equal blocks are lowered once per model and replayed under their own path
(composer/speed.py), an op step keeps its op's counts (composer/plan.py: `COUNTS_KEPT`), an op
written again is the one validated before (composer/resolve_ops.py: `OPS_KEPT`) and an attention
its geometry per input (composer/ops/attention/op.py: `GEOMETRY_KEPT`). Each shortcut can be
switched off; with and without it, every zoo blueprint must give the same AST, model and plan,
and the hand-made cases below pin what the shortcuts
must not merge (per-block values, drop-path rates, 1 and 1.0).
"""

from __future__ import annotations

import dataclasses
import gc
import re
import subprocess
import sys

import pytest

import composer
import composer.lalr as LALR
import composer.loader as Loader
import composer.lower as Lower
import composer.parse as P
import composer.ops.attention.op as Attention
import composer.plan as Plan
import composer.resolve as R
import composer.resolve_ops as RO
import composer.speed as S
from composer.diagnostics import ComposerError
from helpers import REPO

FILES = sorted((REPO / "blueprints").rglob("*.arch")) + sorted((REPO / "examples").rglob("*.arch"))


def _outcome(fn):
    try:
        return fn()
    except ComposerError as exc:
        return ("error", [(d.code, d.message, str(d.span), d.hint, list(d.notes)) for d in exc.diagnostics])


def _steps(steps) -> list:
    """Every field of every step (ops by repr, nested step lists recursively), with its class."""
    out = []
    for s in steps:
        fields = []
        for f in dataclasses.fields(s):
            v = getattr(s, f.name)
            if f.name in ("body", "shortcut", "reused"):
                v = _steps(v)
            elif f.name == "branches":
                v = [_steps(b) for b in v]
            elif f.name == "op":
                v = repr(v)
            fields.append((f.name, v))
        out.append((type(s).__name__, fields))
    return out


def _plan_facts(plan, model) -> tuple:
    sections = [(s.path, s.x, s.y, s.drop_path, s.call, _steps(s.steps)) for s in plan.sections]
    g = plan.graph
    costs = [s.cost() for s in plan.sections]  # kept counts of op steps (plan.COUNTS_KEPT) or fresh ones
    return (repr(model), plan.params, plan.macs, costs, sections, list(g.nodes(data=True)), list(g.edges), plan.saved)


def _resolved_and_plan(path, name):
    """The resolved model and its plan, as `composer.load` makes them (no overrides)."""
    model = R.resolve_model(R.load(path), name, {})
    return _plan_facts(Lower.plan(model), model)


def _zoo_facts() -> list:
    Loader._CACHE.clear()
    facts = []
    for f in FILES:
        unit = _outcome(lambda f=f: Loader.load(f))
        if isinstance(unit, tuple):
            facts.append((str(f), unit))
            continue
        facts.append((str(f), repr(unit.file)))
        for m in unit.file.models:
            facts.append((m.name, _outcome(lambda f=f, n=m.name: _resolved_and_plan(f, n))))
    return facts


def test_zoo_same_with_and_without_shortcuts(monkeypatch):
    fast = _zoo_facts()

    def no_key(args):
        raise S.Unfrozen

    monkeypatch.setattr(LALR, "FAST", False)  # Lark's own LALR loop
    monkeypatch.setattr(S, "freeze_args", no_key)  # every composite instance expanded afresh
    monkeypatch.setattr(S, "_signature", lambda items: None)  # every block lowered afresh
    monkeypatch.setattr(Plan, "COUNTS_KEPT", False)  # every op's parameters and MACs counted afresh
    monkeypatch.setattr(RO, "OPS_KEPT", False)  # every op validated afresh
    monkeypatch.setattr(Attention, "GEOMETRY_KEPT", False)  # every attention's geometry computed afresh
    plain = _zoo_facts()
    Loader._CACHE.clear()
    assert len(fast) == len(plain) > 100
    for a, b in zip(fast, plain):
        assert a == b, a[0]


@pytest.mark.parametrize("text", [
    "model a {\n  input image(3, 8)\n  stem { conv(8, 3) \n}\n",  # end of file inside a block
    "model a { input image(3, 8) stem conv(8 3) }",  # a missing comma
    "model a { input image(3, 8); stem conv(8, 3); head { linear(out = 3, 4) } }",
    "block b(x, x) { relu() }",
    "block b(x, x) { relu() }\nmodel a {",  # the syntax error wins over the earlier duplicate
    "block b(x, x) { relu() }\nblock c(y, y) { relu() }",  # the first duplicate is reported
    "model a { input image(3, 8) $ }",
])
def test_syntax_errors_same_with_lark_loop(monkeypatch, text):
    fast = _outcome(lambda: repr(P.parse_text(text, "t.arch")))
    monkeypatch.setattr(LALR, "FAST", False)
    assert fast == _outcome(lambda: repr(P.parse_text(text, "t.arch")))
    assert fast[0] == "error"


def test_spans_cover_brackets_of_operands():
    # (a + b) * c: the product starts at the '(' (column 1) and ends after c (column 12);
    # the sum inside keeps its own span, columns 2 to 7
    e = P.parse_expr("(a + b) * c")
    assert (e.span.column, e.span.end_column) == (1, 12)
    assert (e.left.span.column, e.left.span.end_column) == (2, 7)
    # a unary plus is dropped from the tree, but the product it starts begins at the '+': column 1
    e = P.parse_expr("+a * b")
    assert (e.span.column, e.span.end_column) == (1, 7)
    assert (e.left.id, e.left.span.column, e.left.span.end_column) == ("a", 2, 3)


BLOCKS = """
block alt(dim, k = alternate(1, 3)) {
    residual { conv(dim, k, padding = k // 2); relu() }
}
block plain(dim) {
    residual { conv(dim, 3, padding = 1) }
}
block one(n) { conv(n, 1) }
model m(num_classes = 10) {
    input image(3, 16)
    drop_path = linspace(0, 0.3)
    stem conv(8, 3, padding = 1)
    stage { repeat 4 BLOCK(8) }
    head { global_pool(); classifier(num_classes) }
}
"""


def _load(tmp_path, text, name="m"):
    path = tmp_path / "t.arch"
    path.write_text(text)
    Loader._CACHE.pop(str(path.resolve()), None)
    return composer.load(f"{path}:{name}")


CONTEXT = """
block reads(n) { residual { from ctx; conv(n, 1) } }
model m {
    input image(3, 16)
    stem { conv(8, 3, padding = 1); save ctx }
    stage { repeat 2 reads(8) }
    stage {
        downsample { conv(24, 1); save ctx; conv(8, 1) }
        repeat 2 reads(8)
    }
    head { global_pool(); classifier(10) }
}
"""


def test_a_block_reading_a_named_tensor_is_replayed_only_where_it_has_the_same_shape(tmp_path):
    """The four blocks are equal and get the same input, but `ctx` has 8 channels before the second
    stage and 24 in it: its blocks are lowered at 24 (replayed from each other), not replayed from
    the first stage's. Parameters by hand: each block's conv(8, 1) on ctx, 8 * c + 8."""
    plan = _load(tmp_path, CONTEXT)
    convs = [s.steps[0].body[1] for st in plan.stages for s in st.blocks]
    assert [c.x.channels for c in convs] == [8, 8, 24, 24]
    assert [c.path for c in convs] == [f"stages.{i}.blocks.{k}.conv" for i in (0, 1) for k in (0, 1)]
    stem, down, head = 3 * 8 * 9 + 8, (8 * 24 + 24) + (24 * 8 + 8), 8 * 10 + 10
    assert plan.params == stem + 2 * (8 * 8 + 8) + down + 2 * (8 * 24 + 8) + head
    assert plan.saved["ctx"].channels == 24


@pytest.mark.parametrize("block", ["alt", "plain"])
def test_reused_blocks_keep_their_drop_path(tmp_path, block):
    plan = _load(tmp_path, BLOCKS.replace("BLOCK", block))
    expected = [0.0, 0.1, 0.2, 0.3]  # linspace(0, 0.3) over 4 blocks
    blocks = plan.stages[0].blocks
    assert [s.drop_path for s in blocks] == pytest.approx(expected)
    assert [s.steps[0].drop_path for s in blocks] == pytest.approx(expected)
    model = R.resolve_model(R.load(tmp_path / "t.arch"), "m", {})
    assert [b.items[0].drop_path for b in model.stages[0].blocks] == pytest.approx(expected)
    assert [s.steps[0].body[0].path for s in blocks] == [f"stages.0.blocks.{k}.conv" for k in range(4)]
    nodes = list(plan.graph.nodes)
    assert [n for n in nodes if n.endswith(".conv")] == ["stem.conv"] + [f"stages.0.blocks.{k}.conv" for k in range(4)]
    # every block but the first starts from the residual merge of the block before it
    starts = [a for a, b in plan.graph.edges if b.startswith("stages.0.blocks.") and b.endswith(".conv")]
    assert starts[0] == "stem.conv" and all(a.startswith(f"stages.0.blocks.{k}.add@") for k, a in enumerate(starts[1:]))


def test_per_block_default_is_not_reused(tmp_path):
    plan = _load(tmp_path, BLOCKS.replace("BLOCK", "alt"))
    kernels = [s.steps[0].body[0].op.kernel for s in plan.stages[0].blocks]
    assert kernels == [1, 3, 1, 3]  # alternate(1, 3) over the blocks of the stage
    assert [s.steps[0].body[0].y.spatial for s in plan.stages[0].blocks] == [(16, 16)] * 4


def test_int_and_float_arguments_are_different_instances(tmp_path):
    text = BLOCKS.replace("stage { repeat 4 BLOCK(8) }", "stage { repeat 2 one(8) }\n    stage { repeat 1 one(8.0) }")
    with pytest.raises(ComposerError) as info:
        _load(tmp_path, text)
    diag = info.value.diagnostics[0]
    assert diag.code == "type" and "'conv' argument 'out' must be an int, got float" in diag.message


def test_instances_shared_across_models_of_a_file(tmp_path):
    text = BLOCKS.replace("BLOCK", "plain") + "model n : m { num_classes = 5 }\n"
    a = _load(tmp_path, text, "m")
    b = composer.load(f"{tmp_path / 't.arch'}:n")
    assert a.params - b.params == 5 * 8 + 5  # only the classifier differs: 8 -> 10 vs 8 -> 5 logits
    # equal, yet separate objects: changing one model's items leaves the other's alone
    unit = R.load(tmp_path / "t.arch")  # the resolved models (lowering reads them; the plans do not keep them)
    ma, mb = R.resolve_model(unit, "m", {}), R.resolve_model(unit, "n", {})
    ia, ib = ma.stages[0].blocks[0].items, mb.stages[0].blocks[0].items
    assert repr(ia) == repr(ib) and ia[0] is not ib[0] and ia[0].body[0] is not ib[0].body[0]


_GC_CHECK = """
import gc
import composer
from composer.loader import _CACHE

assert gc.isenabled() and gc.get_freeze_count() == 0
composer.load("caformer_s18")
assert gc.isenabled() and gc.get_freeze_count() == 0 and gc.get_count()[0] < 100
_CACHE.clear()
gc.freeze()
frozen = gc.get_freeze_count()
composer.load("caformer_s18")
assert gc.isenabled() and 0 < gc.get_freeze_count() <= frozen
print("ok")
"""


def test_gc_pause_leaves_the_collector_as_it_was():
    """After a pause the survivors are moved to the oldest generation (freeze, then unfreeze):
    nothing stays frozen, the collector is on again and the young generation is empty. A program
    that froze objects itself keeps them frozen: the pause then only re-enables (none is added; a
    frozen object that reference counting frees meanwhile leaves the count). Run in a fresh
    process: in the suite's the heap holds every model built so far, and a collection of it takes
    seconds."""
    out = subprocess.run([sys.executable, "-c", _GC_CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_an_op_validated_before_still_warns_at_each_call(tmp_path):
    """The same deprecated op written twice is validated once, and warns at both places."""
    import warnings

    from helpers import write

    text = GLMIX_TWICE
    path = write(tmp_path, text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        composer.load(path + ":m")
    where = sorted(int(str(w.message).split(": warning:")[0].rsplit(":", 2)[1]) for w in caught
                   if "paired = true" in str(w.message))
    assert where == [5, 10]


# a mixer written in a deprecated spelling (cluster's slot source packed in the channels)
PACKED_MIXER = """
mixer NAME(dim) {
    x = identity
    parallel concat { identity; from x }
    cluster(2, attention(2), paired = true) as mix
}"""

GLMIX_TWICE = PACKED_MIXER.replace("NAME", "one") + PACKED_MIXER.replace("NAME", "two") + """
model m {
    input image(3, 32)
    stem patch_embed(16, 4)
    stage { block { one(16) as a; two(16) as b } }
    head { global_pool("avg"); classifier(4) }
}
"""


def test_an_instance_that_warned_is_expanded_again(tmp_path):
    """A composite whose expansion warns (a deprecated spelling inside) is not kept for copying:
    each model that uses it warns again, so a check of either one alone is not kept as clean."""
    import warnings

    from composer.diagnostics import warnings_issued
    from helpers import write

    path = write(tmp_path, WARNS_IN_A_COMPOSITE)
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("m", "n"):
            before = warnings_issued()
            composer.load(f"{path}:{name}")
            counts.append(warnings_issued() - before)
    assert counts == [1, 1]


WARNS_IN_A_COMPOSITE = PACKED_MIXER.replace("NAME", "packed") + """
model m(classes = 4) {
    input image(3, 32)
    stem patch_embed(16, 4)
    stage { block { packed(16) as a } }
    head { global_pool("avg"); classifier(classes) }
}
model n : m { classes = 5 }
"""


def test_op_traits_are_class_attributes_and_never_parameters():
    """The traits every op class has (`grid_bound`, `tied`, ...) live on a plain base of `Op`,
    not as ClassVars pydantic would evaluate again for every op class. An op class still sets one
    in its body, with or without a ClassVar annotation, and it never becomes a parameter."""
    from typing import ClassVar

    from composer.ops import OPS
    from composer.ops.registry import Op, OpTraits

    class Bound(Op):
        grid_bound = True
        width: int = 1

    class Tied(Op):
        tied: ClassVar[bool] = True

    assert Bound.grid_bound and Bound().grid_bound and not Op.grid_bound and Tied.tied
    assert list(Bound.model_fields) == ["width"] and not Tied.model_fields
    traits = {k for k in vars(OpTraits) if not k.startswith("_")}
    assert {"name", "layout", "grid_bound", "tied", "tensor_args", "per_fold"} <= traits
    assert not any(traits & set(cls.model_fields) for cls in OPS.values())
    assert not Op.__dict__.get("__annotations__")  # nothing for pydantic to evaluate per op class


def test_op_modules_keep_annotations_evaluated():
    """Pydantic evaluates an op class's field annotations when it builds the class: a string
    annotation (`from __future__ import annotations`) costs a compile() each time, about 3% of the
    check's start-up over the op library."""
    ops = REPO / "composer" / "ops"
    late = [p.relative_to(ops) for p in sorted(ops.rglob("*.py"))
            if re.search(r"^from __future__ import annotations", p.read_text(), re.M)]
    assert not late, f"op modules with string annotations: {late}"


# ---- sizes probed: sections taken again from an earlier size (speed.kept_section) -------------

FULL = """
block reads_full(n) { residual { from full; conv(n, 2, stride = 2) } }
model m {
    input image(3, 16)
    stem { save full; conv(8, 3, stride = 2, padding = 1) }
    stage { block reads_full(8) }
    head { global_pool(); classifier(10) }
}
"""


def test_a_section_is_taken_again_only_where_the_tensors_it_reads_are_alike(tmp_path):
    """Sizes 9 and 10 give the block the same input (the stem's 3x3 conv at stride 2: 5 from both),
    but the tensor `full` it reads is the input itself: its 2x2 conv at stride 2 gives n // 2, which
    the shortcut's ceil(n / 2) matches for even n only (by hand). Probing 9 first, 10 must not take
    the block's error from 9; probing 10 first, 9 must not take its section."""
    import composer.sizes as Z

    plan = _load(tmp_path, FULL)
    for order in ((9, 10), (10, 9)):
        with Z.probing():
            answers = {n: Z.admits(plan, (n, 16)) for n in order}
        assert answers[10] is None and answers[9] is not None and "residual" in answers[9]
    with Z.probing():
        assert Z.axis_rule(plan, 0).text() == "multiples of 2 from 2"


@pytest.mark.parametrize("name", ["resnet18", "cmt_ti", "coat_lite_mini"])
def test_probed_sizes_same_with_and_without_kept_sections(monkeypatch, name):
    """A convnet whose stride-2 stem maps two sizes to one grid (sections taken again), a model
    whose blocks share a tied parameter and one with `reuse` (their sections lowered afresh):
    the admitted sizes, plain and dynamic, are those found with every section lowered."""
    import composer.sizes as Z

    plan = composer.load(name)
    monkeypatch.setattr(S, "SECTIONS_KEPT", False)
    expected = Z.rule_texts(plan)
    monkeypatch.setattr(S, "SECTIONS_KEPT", True)
    with Z.probing():
        assert Z.rule_texts(plan) == expected
        assert S.sections_taken() or name != "resnet18"
