"""The shape of a YAML blueprint (docs/yaml.md) as strict pydantic models: which keys each
mapping may hold and what their values are. composer/yaml_read.py validates a document with
`FileSchema` before it builds the AST, and turns pydantic's errors into located diagnostics."""

from __future__ import annotations

from typing import Annotated, List, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      StringConstraints, Tag, model_validator)
from pydantic_core import PydanticCustomError
from typing_extensions import TypeAliasType

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# A value: a string is an expression; numbers, booleans, null and lists of values are literals.
Value = TypeAliasType("Value", Union[StrictStr, StrictBool, StrictInt, StrictFloat, None, List["Value"]])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data):
        # Checked here rather than by extra="forbid" alone so that the error carries the allowed keys.
        if isinstance(data, dict):
            allowed = [f.alias or n for n, f in cls.model_fields.items()]
            for key in data:
                if key not in allowed:
                    raise PydanticCustomError("unknown_key", "unknown key", {"key": key, "allowed": allowed})
        return data


def _tagged(choices: dict, noun: str, what: str, pick):
    """A union chosen by `pick(value)`; an unknown choice is an error naming the allowed keys."""
    # Tags are bracketed so that they never match a YAML key when a `loc` is followed back.
    members = tuple(Annotated[t, Tag(f"<{tag}>")] for tag, t in choices.items())
    # A named alias: a Discriminator holds a dict, so it cannot sit unwrapped inside another Union.
    return TypeAliasType(noun.replace(" ", "_"), Annotated[Union[members], Discriminator(
        pick, custom_error_type="unknown_form", custom_error_message=what,
        custom_error_context={"noun": noun, "allowed": [k for k in choices if k != "expr"]})])


STMT_KEYS = ("let", "residual", "parallel", "save", "from", "reuse", "bind")
# `repeat` first: it also has a `block` or `body` key; a lone `body` is an inline `block { ... }`
STAGE_KEYS = ("repeat", "let", "downsample", "after", "block", "body", "reuse")


def _by_key(*keys):
    def pick(v):
        if isinstance(v, str):
            return "<expr>"
        if isinstance(v, dict):
            return next((f"<{k}>" for k in keys if k in v), None)
        return None
    return pick


class _Let(_Strict):
    let: dict[Name, Value]


class _ResidualSpec(_Strict):
    shortcut: Value = None
    when: Value = None
    body: List["Stmt"]


class _Residual(_Strict):
    residual: Union[List["Stmt"], _ResidualSpec]


Range = Union[StrictStr, Annotated[List[Value], Field(min_length=2, max_length=2)]]  # `a..b` or [a, b]


class _ParallelSpec(_Strict):
    merge: Name
    split: Value = None
    branches: List[Union[StrictStr, List["Stmt"]]] = None
    # branches from a loop: `for` with `in` (a list) or `range`, and the `body` of one branch
    for_: Name = Field(None, alias="for")
    in_: Value = Field(None, alias="in")
    range: Range = None
    body: List["Stmt"] = None

    @model_validator(mode="after")
    def _one_form(self):
        given = self.model_fields_set
        if "for_" not in given:
            if "branches" not in given or given & {"in_", "range", "body"}:
                raise PydanticCustomError("parallel_form", "a parallel has `branches` (a list), or `for` with `in` "
                                          "(a list) or `range` and the `body` of one branch")
        elif "branches" in given or "body" not in given or ("in_" in given) == ("range" in given):
            raise PydanticCustomError("parallel_for", "a parallel with `for` has `in` (a list) or `range` (a..b), "
                                      "and `body` (the statements of one branch), not `branches`")
        return self


class _Parallel(_Strict):
    parallel: _ParallelSpec


class _Save(_Strict):
    save: Name


class _From(_Strict):
    from_: Name = Field(alias="from")


class _Bind(_Strict):
    bind: Union[Name, Annotated[List[Name], Field(min_length=1)]]
    value: StrictStr = None
    body: List["Stmt"] = None

    @model_validator(mode="after")
    def _one_value(self):
        if ("value" in self.model_fields_set) == ("body" in self.model_fields_set):
            raise PydanticCustomError("bind_value", "a binding has a `value` (an expression) or a `body` (statements)")
        return self


class _Reuse(_Strict):
    reuse: Annotated[StrictStr, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.([A-Za-z0-9_]+|\{[A-Za-z_][A-Za-z0-9_]*\}))*$")]


Stmt = _tagged({"expr": StrictStr, "let": _Let, "residual": _Residual, "parallel": _Parallel, "save": _Save,
                "from": _From, "reuse": _Reuse, "bind": _Bind}, "statement",
               "a statement is an expression string or a mapping with one of: let, residual, parallel, save, from, "
               "reuse, bind",
               _by_key(*STMT_KEYS))
Section = Union[StrictStr, List[Stmt]]


class _Downsample(_Strict):
    downsample: Section


class _After(_Strict):
    after: Section


class _Repeat(_Strict):
    repeat: Value
    as_: Name = Field(None, alias="as")
    block: Value = None
    body: List[Stmt] = None  # an inline body: `repeat n { ... }`

    @model_validator(mode="after")
    def _one_block(self):
        if ("block" in self.model_fields_set) == ("body" in self.model_fields_set):
            raise PydanticCustomError("repeat_block", "a repeat has a `block` (an expression) or a `body` (statements)")
        return self


class _Block(_Strict):
    block: Value


class _Body(_Strict):
    body: List[Stmt]  # `block { ... }`


StageItem = _tagged({"let": _Let, "downsample": _Downsample, "after": _After, "repeat": _Repeat, "block": _Block,
                     "body": _Body, "reuse": _Reuse}, "stage item",
                    "a stage item is a mapping with one of: let, downsample, after, repeat, block, body, reuse",
                    lambda v: next((f"<{k}>" for k in STAGE_KEYS if k in v), None) if isinstance(v, dict) else None)


class _Stage(_Strict):
    for_: Name = Field(None, alias="for")
    range: Range = None
    body: List[StageItem]

    @model_validator(mode="after")
    def _loop(self):
        if (self.for_ is None) != (self.range is None):
            raise PydanticCustomError("stage_loop", "a looping stage needs both `for` and `range`")
        return self


class _Model(_Strict):
    params: dict[Name, Value] = {}
    base: Name = None
    reference: StrictStr = None
    paper: StrictStr = None
    drop_path: Value = None
    let: dict[Name, Value] = {}
    input: Value = None
    stem: Section = None
    stages: List[_Stage] = []
    head: Section = None
    set: dict[Name, Value] = {}


class _Composite(_Strict):
    params: dict[Name, Value] = {}
    doc: StrictStr = ""
    body: List[Stmt]


class FileSchema(_Strict):
    doc: StrictStr = None
    imports: Union[StrictStr, List[StrictStr]] = []
    blocks: dict[Name, _Composite] = {}
    mixers: dict[Name, _Composite] = {}
    models: dict[Name, _Model] = {}


for _m in (_ResidualSpec, _Residual, _ParallelSpec, _Repeat, _Body):
    _m.model_rebuild()
