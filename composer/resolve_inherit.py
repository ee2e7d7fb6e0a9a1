"""Inheritance: a model's chain of bases (`model_chain`) flattened into one model (`flatten`), base
first, each variant overriding parameters, lets, settings and sections by name; the model-level
settings (`SETTINGS`), which may also be given from outside (`user_setting`). Used by
composer/resolve.py."""

from __future__ import annotations

import typing

from . import ast
from .diagnostics import did_you_mean, error
from .loader import Unit, base_hint
from .preprocess import SETTINGS as PREPROCESS
from .resolve_values import twice

SETTINGS = ("drop_path", "reference", "paper", "outputs", "feature_points", "loss", *PREPROCESS)


def user_setting(key: str, value) -> ast.Assign:
    """A setting given from outside (`--set drop_path=linspace(0, 0.1)`: an expression; `build(...,
    drop_path=0.1)`: a Python value) as the statement `key = value` of the model."""
    if not isinstance(value, typing.get_args(ast.Expr)):
        value = ast.Literal(value, None)
    return ast.Assign(key, value, value.span)


def model_chain(unit: Unit, name: str) -> list:
    """Model `name` of `unit` and its bases, base first; an unknown or cyclic base is an error."""
    own = {m.name: m for m in unit.file.models}
    if name not in own:
        raise error("unknown-model", f"no model '{name}' in {unit.file.path}", None,
                    did_you_mean(name, own) or f"models in this file: {', '.join(own) or '(none)'}")
    defs = unit.models or own  # a base may be defined in an imported file (the zoo's included)
    chain, cur = [], own[name]
    while True:
        if cur in chain:
            cycle = " : ".join(m.name for m in chain[chain.index(cur):] + [cur])
            raise error("cyclic-inheritance", f"model '{cur.name}' inherits from itself ({cycle})", cur.span)
        chain.append(cur)
        if cur.base is None:
            break
        seen = unit.homes.get(id(cur), defs)  # the models the file defining `cur` sees
        if cur.base not in seen:
            raise error("unknown-model", f"unknown base model '{cur.base}'", cur.span, base_hint(cur.base, seen))
        cur = seen[cur.base]
    return list(reversed(chain))


def flatten(chain: list) -> tuple:
    """The statements of `chain` (base first) merged: (params, lets, settings, sections, stages,
    overrides)."""
    flat = _Inherited()
    for depth, m in enumerate(chain):
        flat.model, flat.depth = m, depth
        for p in m.params:
            flat.params[p.name] = p
        stage_items = [s for s in m.body if isinstance(s, ast.Stage)]
        if stage_items:
            flat.stages = stage_items
        for stmt in m.body:
            flat.visit(stmt)
    return (flat.params, flat.lets, flat.settings, {k: v[1] for k, v in flat.sections.items()}, flat.stages,
            flat.overrides)


class _Inherited(ast.NodeVisitor):
    """The statements of a chain of models, base first, merged by name (`flatten`):
    a variant's `name = value` overrides a parameter or a let of its base."""

    def __init__(self):
        self.params: dict[str, ast.Param] = {}
        self.lets: dict[str, ast.Expr] = {}
        self.let_depth: dict[str, int] = {}  # name -> the depth in the chain of the model that defines it
        self.settings: dict[str, ast.Assign] = {}
        self.sections: dict[str, tuple] = {}  # key -> (depth, statement)
        self.stages: list = []
        self.overrides: list = []
        self.model, self.depth = None, 0

    def visit_Let(self, stmt: ast.Let) -> None:
        if stmt.name in self.lets:
            if self.let_depth[stmt.name] == self.depth:
                raise twice(stmt)
            raise error("redefinition", f"'{stmt.name}' is already defined by the base model", stmt.span,
                        f"write `{stmt.name} = ...` to override it")
        self.lets[stmt.name] = stmt.value
        self.let_depth[stmt.name] = self.depth

    def visit_Assign(self, stmt: ast.Assign) -> None:
        depth, params, lets = self.depth, self.params, self.lets
        if stmt.name in SETTINGS:
            self.settings[stmt.name] = stmt
        elif depth and stmt.name in params:
            params[stmt.name] = ast.Param(stmt.name, stmt.value, stmt.span)
        elif depth and stmt.name in lets:
            lets[stmt.name] = stmt.value
        else:
            known = list(SETTINGS) + (list(params) + list(lets) if depth else [])
            hint = did_you_mean(stmt.name, known) or (
                f"write `let {stmt.name} = ...` to define a value" if not depth
                else f"a variant can set: {', '.join(known)}")
            raise error("unknown-setting", f"'{stmt.name}' is not a setting, parameter or let of '{self.model.name}'",
                        stmt.span, hint)
        if depth:
            self.overrides.append((stmt.name, stmt.span))

    def visit_Section(self, stmt: ast.Section) -> None:
        self._section(stmt.kind, stmt)

    def visit_Input(self, stmt: ast.Input) -> None:
        self._section("input", stmt)

    def _section(self, key: str, stmt) -> None:
        if key in self.sections and self.sections[key][0] == self.depth:
            raise error("redefinition", f"'{key}' is given twice", stmt.span)
        self.sections[key] = (self.depth, stmt)

    def visit_Stage(self, stmt: ast.Stage) -> None:
        pass  # a variant's stages replace its base's as a whole (`flatten`)
