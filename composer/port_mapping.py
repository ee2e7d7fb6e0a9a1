"""The mapping of a weight port (`<family>.port.yaml`, docs/porting.md) read and checked
(`read_mapping`): rename rules, splits, joins, ignores and explicit reorders, the sections of
`models` that fit the model first; where a blueprint's mapping lies (`mapping_path`). No torch:
the port itself is composer/port.py's."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .diagnostics import error

SOURCES = ("timm", "torchvision")
_TOP_KEYS = {"source", "rules", "split", "join", "ignore", "reshape", "models", "permute", "transpose", "view"}
_SECTION_KEYS = {"match", "rules", "split", "join", "ignore", "permute", "transpose", "view"}


@dataclass
class Rule:
    ours: re.Pattern
    ref: str


@dataclass
class Split:
    """A fused reference tensor (`from`, a regex searched in reference keys) cut along `dim` into
    parts in proportion `sizes`; part i is named by substituting the match with `into[i]`."""
    pattern: re.Pattern
    into: list[str]
    sizes: list[int]
    dim: int = 0


@dataclass
class Join:
    """The inverse of a Split: reference tensors whose keys match `parts` (regexes) and agree on the
    text around the match are concatenated along `dim`, in the order of `parts`; the joined tensor
    is named by substituting the first part's match with `into` (reference namespace)."""
    parts: list[re.Pattern]
    into: str
    dim: int = 0


@dataclass
class Reorder:
    """An explicit change of element order for the reference tensors whose key matches `pattern`:
    `permute` (dims: the new order of the axes), `transpose` (dims: the two axes swapped), or
    `view` (a row-major reshape into our shape, whatever it does to the axes). A reshape into
    our shape follows a permute or transpose."""
    pattern: re.Pattern
    kind: str
    dims: list[int]

    def describe(self) -> str:
        return f"{self.kind} {self.dims}" if self.kind != "view" else "view"


@dataclass
class Mapping:
    source: str = "timm"
    rules: list[Rule] = field(default_factory=list)
    splits: list[Split] = field(default_factory=list)
    ignore: list[re.Pattern] = field(default_factory=list)
    reshape: bool = True
    path: str = "<mapping>"
    joins: list[Join] = field(default_factory=list)
    reorders: list[Reorder] = field(default_factory=list)

    def reorder(self, ref_key: str) -> Reorder | None:
        return next((r for r in self.reorders if r.pattern.search(ref_key)), None)

    def our_to_ref(self, key: str) -> str:
        for r in self.rules:
            try:
                key = r.ours.sub(r.ref, key)
            except (re.error, IndexError) as exc:
                raise mapping_error(self.path, f"rule '{r.ours.pattern}' -> '{r.ref}': {exc}") from None
        return key


def mapping_error(path, message, hint=None):
    """A located error of the mapping file `path` (it has no line: the file is YAML data)."""
    return error("port-mapping", f"{path}: {message}", None, hint)


def _regex(path, text, what):
    if not isinstance(text, str):
        raise mapping_error(path, f"{what} must be a string (a regular expression), got {text!r}")
    try:
        return re.compile(text)
    except re.error as exc:
        raise mapping_error(path, f"{what} '{text}' is not a valid regular expression: {exc}") from None


def _rules(path, items, where):
    out = []
    for i, item in enumerate(items or []):
        if not isinstance(item, dict) or set(item) != {"ours", "ref"}:
            raise mapping_error(path, f"{where} rule {i + 1} must be {{ours: REGEX, ref: REPLACEMENT}}, got {item!r}")
        out.append(Rule(_regex(path, item["ours"], f"{where} rule {i + 1}"), str(item["ref"])))
    return out


def _splits(path, items, where):
    out = []
    for i, item in enumerate(items or []):
        keys = set(item) if isinstance(item, dict) else set()
        if not {"from", "into"} <= keys or keys - {"from", "into", "sizes", "dim"}:
            raise mapping_error(path, f"{where} split {i + 1} must be {{from: REGEX, into: [names], sizes: [..], dim: D}}, "
                       f"got {item!r}")
        into = item["into"]
        sizes = item.get("sizes") or [1] * len(into)
        if not isinstance(into, list) or len(into) < 2 or len(sizes) != len(into) \
                or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise mapping_error(path, f"{where} split {i + 1}: `into` needs two or more names and `sizes` one positive "
                       "integer per name")
        out.append(Split(_regex(path, item["from"], f"{where} split {i + 1}"), [str(n) for n in into],
                         list(sizes), int(item.get("dim", 0))))
    return out


def _joins(path, items, where):
    out = []
    for i, item in enumerate(items or []):
        keys = set(item) if isinstance(item, dict) else set()
        if not {"from", "into"} <= keys or keys - {"from", "into", "dim"} or not isinstance(item["from"], list) \
                or len(item["from"]) < 2 or not isinstance(item["into"], str):
            raise mapping_error(path, f"{where} join {i + 1} must be {{from: [two or more REGEXES], into: NAME, dim: D}}, "
                       f"got {item!r}")
        parts = [_regex(path, t, f"{where} join {i + 1}") for t in item["from"]]
        out.append(Join(parts, item["into"], int(item.get("dim", 0))))
    return out


def _reorders(path, sec, where):
    out = []
    for kind, size in (("permute", None), ("transpose", 2)):
        items = sec.get(kind) or {}
        if not isinstance(items, dict):
            raise mapping_error(path, f"{where} {kind} must be a mapping {{REGEX: [axes]}}, got {items!r}")
        for pattern, dims in items.items():
            ok = isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
            if kind == "permute":
                ok = ok and sorted(dims) == list(range(len(dims))) and len(dims) >= 2
            else:
                ok = ok and len(dims) == 2 and dims[0] != dims[1]
            if not ok:
                want = "a permutation of 0 .. n-1 (e.g. [0, 2, 3, 1])" if kind == "permute" else "two axes, e.g. [0, 1]"
                raise mapping_error(path, f"{where} {kind} '{pattern}': the axes must be {want}, got {dims!r}")
            out.append(Reorder(_regex(path, pattern, f"{where} {kind}"), kind, list(dims)))
    out += [Reorder(_regex(path, t, f"{where} view"), "view", []) for t in _names(sec.get("view"))]
    return out


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def read_mapping(source, model_names=()) -> Mapping:
    """A mapping from a `.port.yaml` path or an already loaded dict; sections of `models` whose
    `match` (fnmatch patterns) fits one of `model_names` put their rules, splits and ignores first."""
    path = str(source) if not isinstance(source, dict) else "<mapping>"
    if isinstance(source, dict):
        data = source
    else:
        try:
            data = yaml.safe_load(Path(source).read_text())
        except OSError as exc:
            raise error("io", f"cannot read the port mapping {source}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise mapping_error(path, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise mapping_error(path, "a port mapping is a YAML mapping with `source` and `rules`")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise mapping_error(path, f"unknown key(s) {', '.join(sorted(unknown))}", f"keys: {', '.join(sorted(_TOP_KEYS))}")
    src = data.get("source", "timm")
    if src not in SOURCES:
        raise mapping_error(path, f"unsupported source '{src}'", f"supported: {', '.join(SOURCES)}")
    rules, splits, ignore, joins, reorders = [], [], [], [], []
    for j, sec in enumerate(data.get("models") or []):
        if not isinstance(sec, dict) or "match" not in sec or set(sec) - _SECTION_KEYS:
            raise mapping_error(path, f"models section {j + 1} must be {{match: PATTERN(S), rules: [...], split: [...], "
                       f"join: [...], ignore: [...], permute: {{...}}, transpose: {{...}}, view: [...]}}, got {sec!r}")
        pats = _names(sec["match"])
        if any(fnmatch.fnmatchcase(n, p) for n in model_names if n for p in pats):
            where = f"models[{j + 1}]"
            rules += _rules(path, sec.get("rules"), where)
            splits += _splits(path, sec.get("split"), where)
            joins += _joins(path, sec.get("join"), where)
            ignore += [_regex(path, t, f"{where} ignore") for t in _names(sec.get("ignore"))]
            reorders += _reorders(path, sec, where)
    rules += _rules(path, data.get("rules"), "top-level")
    splits += _splits(path, data.get("split"), "top-level")
    joins += _joins(path, data.get("join"), "top-level")
    ignore += [_regex(path, t, "ignore") for t in _names(data.get("ignore"))]
    reorders += _reorders(path, data, "top-level")
    return Mapping(src, rules, splits, ignore, bool(data.get("reshape", True)), path, joins, reorders)


def mapping_path(model) -> Path:
    """The `.port.yaml` declared next to the model's blueprint file."""
    file = Path(model.plan.file)
    return file.with_name(file.name.rsplit(".", 1)[0] + ".port.yaml")
