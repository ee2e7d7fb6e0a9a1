"""Op, part and loss references validated against their pydantic classes (`to_op`, `model_loss`),
and the message of a failed validation: the argument's expected type in the words users write
(`an int`, `a tensor ...`, `relative_bias(...) or none`). Used by composer/resolve.py."""

from __future__ import annotations

import re
import typing

from pydantic import ValidationError

from .diagnostics import ComposerError, deprecated, error
from .expr import Ref, evaluate, type_name
from .ops import OPS, Op
from .ops.registry import plain_annotation, range_problem
from .shapes import ShapeError
from .speed import Unfrozen, freeze_args


def to_op(ref: Ref) -> Op:
    """Validate a reference to an op or part against its pydantic class; a deprecated spelling in
    it, or in an op it is given, warns at its call."""
    op = _op_of(ref)
    _warn_deprecated(ref, op)
    return op


VALIDATED: dict = {}  # (op class, frozen arguments) -> the op; cleared when full
VALIDATED_MAX = 8192
OPS_KEPT = True  # False: every op validated afresh (tests/test_speed_invariants.py: the same results)


def _op_of(ref: Ref) -> Op:
    """The op `ref` validates to. Ops are frozen: the same class and arguments (told apart as the
    language tells them: 1, 1.0 and true differ) give the instance validated before, as a check
    of the zoo writes the same ops thousands of times; arguments holding a named tensor are
    validated each time."""
    try:
        key = (ref.target, freeze_args(ref.args)) if OPS_KEPT else None
    except Unfrozen:
        key = None
    op = VALIDATED.get(key) if key is not None else None
    if op is None:
        op = _validated(ref)
        if key is not None:
            if len(VALIDATED) >= VALIDATED_MAX:
                VALIDATED.clear()
            VALIDATED[key] = op
    return op


def _warn_deprecated(ref: Ref, op: Op) -> None:
    old = op.deprecation()
    if old is not None:
        deprecated(old[0], ref.span, old[1])
    for k, v in ref.args:
        if isinstance(v, Ref):
            given = getattr(op, k, None)
            if isinstance(given, Op):
                _warn_deprecated(v, given)


def _validated(ref: Ref) -> Op:
    cls = ref.target
    args = {}
    for k, v in ref.args:
        if isinstance(v, Ref):
            if v.kind == "composite":
                raise error("type", f"'{ref.name}' argument '{k}' needs an op, but '{v.name}' is a {v.target.kind}",
                            ref.arg_span(k), "only library ops can be arguments of ops")
            v = _op_of(v)
        args[k] = v
    try:
        return cls.model_validate(args)
    except ValidationError as exc:
        raise _validation_error(ref, exc) from None


def model_loss(expr, scope) -> Op:
    """`loss = focal(alpha = 0.25)`: a registered loss, validated like an op."""
    value = evaluate(expr, scope)
    if not (isinstance(value, Ref) and value.kind == "loss"):
        losses = sorted(n for n, c in OPS.items() if c.kind == "loss")
        raise error("type", f"loss must be a loss, got {type_name(value)}", expr.span,
                    f"the losses are: {', '.join(losses)}")
    loss = to_op(value)
    try:
        loss.check()
    except ShapeError as exc:
        raise error("value", str(exc), expr.span) from None
    return loss


def _validation_error(ref: Ref, exc: ValidationError) -> ComposerError:
    first = exc.errors()[0]
    loc = str(first["loc"][0]) if first["loc"] else ""
    out_of_range = range_problem(ref.target, loc, exc.errors(), dict(ref.args).get(loc))
    if out_of_range is not None:  # a value of the right type out of its range: `conv(-1, 3)`
        return error(out_of_range[0], f"'{ref.name}' argument '{loc}' {out_of_range[1]}", ref.arg_span(loc),
                     out_of_range[2])
    span = ref.arg_span(loc) if loc else ref.span
    given = dict(ref.args).get(loc)
    kind = first["type"]
    if kind == "missing":
        required = [n for n, f in ref.target.model_fields.items() if f.is_required()]
        return error("missing-argument", f"'{ref.name}' needs argument '{loc}'", ref.span,
                     f"required arguments: {', '.join(required)}")
    field = ref.target.model_fields.get(loc)
    want = _type_words(plain_annotation(field.annotation)) if field is not None else "another value"
    return error("type", f"'{ref.name}' argument '{loc}' must be {want}, got {type_name(given)} {_short(given)}"
                 .rstrip(), span)


def _short(value) -> str:
    if isinstance(value, Ref):
        return ""
    text = repr(value)
    return f"({text})" if len(text) < 30 else ""


def _type_words(annotation) -> str:
    parts = _part_words(annotation)
    if parts:
        return parts
    text = str(annotation).replace("typing.", "").replace("composer.ops.registry.", "").replace("composer.shapes.", "").replace("<class '", "").replace("'>", "")
    text = text.replace("Optional[", "").replace("Literal[", "one of ")
    text = re.sub(r"list\[(\w+)\]", lambda m: f"a list of {m.group(1)}s", text).replace("]", "")
    words = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string", "Op": "an op",
             "TensorRef": "a tensor (a name bound by `name = ...` or `save name`)"}
    return words.get(text, text)


def _part_words(annotation) -> str | None:
    """For a field that takes ops or parts (`position`, `partition`, `kv`): the names users write,
    `relative_bias(...) or ... or none`; None for another annotation."""
    def flat(a):
        args = typing.get_args(a)
        return [t for x in args for t in flat(x)] if args else [a]

    kinds = flat(annotation)
    classes = [c for c in kinds if isinstance(c, type) and issubclass(c, Op)]
    if not classes or len(classes) + (type(None) in kinds) != len(kinds):
        return None
    names = []
    for cls in classes:  # a registered class by its name, a base class by the registered ones under it
        found = [c.name for c in OPS.values() if issubclass(c, cls)]
        names += [n for n in found if n not in names]
    if not names:
        return None
    words = [f"{n}(...)" for n in names] + (["none"] if type(None) in kinds else [])
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]

