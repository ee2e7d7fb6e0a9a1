"""The JSON Schema of the YAML form (`composer schema`), for YAML editors: validation of the
document's shape and completion of its keys and of op names.

Generated, never written by hand: the shape is composer/yaml_schema.py's pydantic models
(`FileSchema.model_json_schema()`), post-processed for editors (JSON Schema draft 7, which
yaml-language-server reads; no pydantic titles; descriptions of the keys from docs/yaml.md). Every
expression string (a statement, a value, a section) refers to `definitions/expression`, whose
`defaultSnippets` offer each op of the registry with its required arguments and whose
descriptions give the op's documentation and parameters (type, default, range);
`definitions/op.<name>` holds each op's parameters as a JSON object schema.

The schema is never stricter than composer: a document it refuses, composer refuses too
(tests/test_schema.py). Expressions stay free strings (`dims[i] * 2` is a value, and so is
`i > 0 ? conv(8) : none`), so composer refuses more, never less. No torch.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

DRAFT = "http://json-schema.org/draft-07/schema#"
_NAME_PATTERN = "^[A-Za-z_][A-Za-z0-9_]*$"
# keys whose strings are expressions (besides a Value's and a statement's strings)
_EXPRESSION_KEYS = ("value", "stem", "head", "downsample", "after", "branches")

# The keys' descriptions (docs/yaml.md), by (definition, key); "" is the file's top level.
DESCRIPTIONS = {
    ("", "doc"): "The file's documentation (default: its leading # comment lines).",
    ("", "imports"): "A path or a list of paths of other blueprints (relative to this file, then to the standard "
                     "library), e.g. lib/metaformer. `.arch`: import \"lib/x\".",
    ("", "blocks"): "Composite blocks: name -> {params, doc, body}. `.arch`: block name(...) { ... }.",
    ("", "mixers"): "Composite mixers: name -> {params, doc, body}. `.arch`: mixer name(...) { ... }.",
    ("", "models"): "Models: name -> model. `.arch`: model name(...) { ... }.",
    ("_Composite", "params"): "Parameters: name -> default; null means required.",
    ("_Composite", "doc"): "The composite's documentation (default: the comment lines above its name).",
    ("_Composite", "body"): "The statements, in order.",
    ("_Model", "params"): "Parameters: name -> default; null means required (write `none` for a default of none).",
    ("_Model", "base"): "The model this one inherits from. `.arch`: model b : a.",
    ("_Model", "reference"): "The reference implementation (a plain string), e.g. timm:resnet50.",
    ("_Model", "paper"): "The paper (a plain string).",
    ("_Model", "drop_path"): "The stochastic depth rate: a number, or linspace(0, 0.2) across the blocks.",
    ("_Model", "let"): "Local values: name -> value, in order. `.arch`: let name = value.",
    ("_Model", "input"): "The input, an expression: image(3, img_size).",
    ("_Model", "stem"): "The stem: an expression or a list of statements.",
    ("_Model", "stages"): "The stages: a list of {for, range, body} (a loop) or {body} (one stage).",
    ("_Model", "head"): "The head: an expression or a list of statements.",
    ("_Model", "set"): "Overrides of the base's parameters, lets and settings: name -> value.",
    ("_Stage", "for"): "The loop variable of a looping stage (with `range`).",
    ("_Stage", "range"): "The loop's range: start..stop, or [start, stop].",
    ("_Stage", "body"): "The stage's items: let, downsample, after, repeat, block, body, reuse.",
    ("_Repeat", "repeat"): "How many blocks (an expression).",
    ("_Repeat", "as"): "The index variable of the repeat (0, 1, ...).",
    ("_Repeat", "block"): "The block, an expression (or a list naming its elements: \"expr as name\").",
    ("_Repeat", "body"): "The block's statements (instead of `block`).",
    ("_ParallelSpec", "merge"): "How the branches merge: add, concat, mul, ...",
    ("_ParallelSpec", "split"): "How the input is split among the branches (an expression).",
    ("_ParallelSpec", "branches"): "The branches: each an expression string or a list of statements.",
    ("_ParallelSpec", "for"): "The loop variable of branches made from a loop (with `in` or `range`, and `body`).",
    ("_ParallelSpec", "in"): "The list the loop runs over.",
    ("_ParallelSpec", "range"): "The loop's range: start..stop, or [start, stop].",
    ("_ParallelSpec", "body"): "The statements of one branch.",
    ("_ResidualSpec", "shortcut"): "The shortcut path (an expression).",
    ("_ResidualSpec", "when"): "Whether the residual adds the shortcut (an expression).",
    ("_ResidualSpec", "body"): "The residual branch's statements.",
    ("_Bind", "bind"): "The name (or names, for a splitting op) of the tensors this statement makes.",
    ("_Bind", "value"): "The expression applied to the running tensor.",
    ("_Bind", "body"): "Statements whose result is named (instead of `value`).",
}
# Definitions' descriptions (the statement and stage item forms).
DEFINITION_DESCRIPTIONS = {
    "statement": "A statement: an expression string (\"expr as name\" names its layer), or a mapping with one of "
                 "let, residual, parallel, save, from, reuse, bind.",
    "stage_item": "A stage item: a mapping with one of let, downsample, after, repeat, block, body, reuse.",
    "Value": "A value: a string is an expression; numbers, booleans, null and lists are literals.",
    "_Let": "Local values: name -> value, in order.",
    "_Residual": "A residual: a list of statements, or {shortcut, when, body}.",
    "_Parallel": "Branches merged: {merge, split, branches} or {merge, split, for, in|range, body}.",
    "_Save": "Names the running tensor (`save skip`).",
    "_From": "Continues from a named tensor (`from skip`).",
    "_Reuse": "Runs the module at a state_dict path again, sharing its weights (reuse stages.0.blocks.1).",
    "_Downsample": "The stage's downsampling: an expression or a list of statements.",
    "_After": "What follows the stage's blocks (a norm): an expression or a list of statements.",
    "_Block": "One block (an expression).",
    "_Body": "One block written as statements.",
}


def json_schema() -> dict:
    """The JSON Schema (draft 7) of a YAML blueprint, as a dict."""
    from .yaml_schema import FileSchema

    raw = FileSchema.model_json_schema(ref_template="#/definitions/{model}")
    definitions = raw.pop("$defs")
    root = _clean(raw, "")
    defs = {name: _clean(d, name) for name, d in sorted(definitions.items())}
    for name, text in DEFINITION_DESCRIPTIONS.items():
        defs[name]["description"] = text
    defs["expression"] = _expression()
    # expression strings: a value, a statement, a section, a parallel branch, a binding's value
    _point_strings(defs["Value"], "anyOf")
    _point_strings(defs["statement"], "anyOf")
    for d in defs.values():
        for key, prop in d.get("properties", {}).items():
            if key in _EXPRESSION_KEYS:
                _point_strings(prop.get("items", prop), "anyOf")
                if prop.get("type") == "string":
                    del prop["type"]
                    prop["$ref"] = "#/definitions/expression"
    defs.update(_op_definitions())
    # an empty document is an empty blueprint: null
    return {"$schema": DRAFT, "title": "composer YAML blueprint",
            "description": "A composer blueprint in YAML (docs/yaml.md). Strings are expressions of the .arch "
                           "language, except doc, imports, reference, paper and names.",
            "type": ["object", "null"], **{k: v for k, v in root.items() if k != "type"}, "definitions": defs}


def _clean(node: Any, where: str) -> Any:
    """Draft 7 for editors: no titles, anyOf for pydantic's disjoint oneOf, keys of name
    mappings as propertyNames, no `default: null` on a key that may not be null."""
    if isinstance(node, list):
        return [_clean(n, where) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key == "oneOf":
            key = "anyOf"
        if key == "patternProperties" and list(value) == [_NAME_PATTERN]:
            out["propertyNames"] = {"pattern": _NAME_PATTERN}
            out["additionalProperties"] = _clean(value[_NAME_PATTERN], where)
            continue
        if key == "properties":
            out[key] = {k: _describe(_clean(v, where), where, k) for k, v in value.items()}
            continue
        out[key] = _clean(value, where)
    if out.get("default", 0) is None and not _admits_null(out):
        del out["default"]
    return out


def _describe(prop: dict, where: str, key: str) -> dict:
    text = DESCRIPTIONS.get((where, key))
    if text:
        prop["description"] = text
    return prop


def _admits_null(node: dict) -> bool:
    kinds = node.get("type")
    if kinds == "null" or (isinstance(kinds, list) and "null" in kinds):
        return True
    if "$ref" in node and node["$ref"].endswith("/Value"):
        return True
    return any(_admits_null(n) for n in node.get("anyOf", []))


def _point_strings(node: dict, key: str) -> None:
    """Make the plain string members of `node[key]` references to the expression definition."""
    for i, member in enumerate(node.get(key, [])):
        if member == {"type": "string"}:
            node[key][i] = {"$ref": "#/definitions/expression"}


# ---- ops ---------------------------------------------------------------------------

def _expression() -> dict:
    from .ops import OPS

    snippets = []
    for name, cls in sorted(OPS.items()):
        required = [k for k, f in cls.model_fields.items() if f.is_required()]
        args = ", ".join(f"${{{i}:{k}}}" for i, k in enumerate(required, 1))
        snippets.append({"label": name, "description": _summary(cls),
                         "markdownDescription": op_markdown(name, cls),
                         "body": f"^{name}({args})" if required else f"^{name}"})
    return {"type": "string",
            "description": "An expression of the .arch language: an op call conv(64, 3, stride = 2), a "
                           "composite, a name, a number, a list, cond ? a : b ... (docs/language.md).",
            "defaultSnippets": snippets}


def _summary(cls) -> str:
    doc = inspect.cleandoc(cls.__doc__ or "")
    first = doc.split("\n\n")[0].replace("\n", " ")
    return f"{cls.kind} ({cls.category}): {first}"


def op_markdown(name: str, cls) -> str:
    """An op's documentation and parameters in Markdown (a snippet's description)."""
    from .ops.registry import bounds_of, show_value

    lines = [f"**{name}** ({cls.kind}, {cls.category}, input: {cls.layout})", "",
             inspect.cleandoc(cls.__doc__ or "(undocumented)")]
    if cls.model_fields:
        lines += ["", "| parameter | type | default | range |", "|---|---|---|---|"]
        for key, f in cls.model_fields.items():
            default = "required" if f.is_required() else f"`{show_value(f.default)}`"
            kind = type_words(f.annotation).replace("|", "\\|")
            lines.append(f"| `{key}` | {kind} | {default} | {bounds_of(f.annotation, f.metadata)} |")
    return "\n".join(lines)


def type_words(annotation) -> str:
    """A parameter's type as a reader writes it: `int | list[int] | none`."""
    from .ops.registry import plain_annotation

    ann = plain_annotation(annotation)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Union:
        return " | ".join(type_words(a) for a in args)
    if origin is list:
        return f"list[{type_words(args[0])}]"
    if origin is typing.Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if ann is type(None):
        return "none"
    return getattr(ann, "__name__", str(ann)).replace("TensorRef", "tensor")


def _op_definitions() -> dict:
    """`op.<name>`: each op's parameters as an object schema (types, ranges, defaults, docs)."""
    from .ops import OPS
    from .ops.registry import bounds_of

    out = {}
    for name, cls in sorted(OPS.items()):
        raw = cls.model_json_schema()
        props = {k: _drop_refs(_clean(v, "op")) for k, v in raw.get("properties", {}).items()}
        for key, f in cls.model_fields.items():
            if key in props:
                words = bounds_of(f.annotation, f.metadata)
                props[key]["description"] = f"{type_words(f.annotation)}" + (f"; {words}" if words else "")
        out[f"op.{name}"] = {"type": "object", "description": _summary(cls), "properties": props,
                             "required": [k for k, f in cls.model_fields.items() if f.is_required()],
                             "additionalProperties": False}
    return out


def _drop_refs(node: Any) -> Any:
    """An op's nested classes (a named tensor, an attention part) as a description: their own
    schemas are the parts' definitions (`op.window`, ...)."""
    if isinstance(node, list):
        return [_drop_refs(n) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        return {"description": "a named tensor" if ref in ("TensorRef", "Shape") else f"a call: {ref.lower()}(...)"}
    return {k: _drop_refs(v) for k, v in node.items()}


def render(indent: int = 2) -> str:
    import json

    return json.dumps(json_schema(), indent=indent, ensure_ascii=False) + "\n"
