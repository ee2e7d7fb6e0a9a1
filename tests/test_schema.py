"""`composer schema`: the JSON Schema of the YAML form. Every YAML blueprint composer reads
validates against it, and no document it refuses is accepted by composer (hand-made bad
documents and hypothesis mutations of a valid one, each checked both ways)."""

from __future__ import annotations

import copy
import json
import re
import pytest
import yaml
from helpers import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from composer.convert import convert_file
from composer.diagnostics import ComposerError
from composer.ops import OPS
from composer.schema import json_schema
from composer.yaml_read import CoreLoader, parse_yaml

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = json_schema()
VALIDATOR = jsonschema.Draft7Validator(SCHEMA)
# Zoo files whose YAML forms use, together, every statement, stage item and model key (checked
# below), converted with `composer convert`; and the YAML files of the repository.
ZOO = ["cf_vit", "msg_transformer", "lib/factorized_mixers", "ceit", "gcvit", "lib/attention_mixers"]
TWINS = sorted((REPO / "tests" / "data" / "yaml").glob("*.yaml"))


def load(text: str):
    return yaml.load(text, Loader=CoreLoader)


def composer_accepts(text: str) -> bool:
    try:
        parse_yaml(text, "t.yaml")
    except ComposerError:
        return False
    return True


def docs_example() -> str:
    text = (REPO / "docs" / "yaml.md").read_text()
    return re.search(r"```yaml\n(.*?)```", text, re.S).group(1)


@pytest.fixture(scope="module")
def zoo_yaml() -> dict:
    return {name: convert_file(REPO / "blueprints" / f"{name}.arch", "yaml") for name in ZOO}


def test_the_schema_is_draft7_and_its_refs_resolve():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    refs = set(re.findall(r'"\$ref": "#/definitions/([^"]+)"', json.dumps(SCHEMA)))
    assert refs and refs <= set(SCHEMA["definitions"])
    assert "title" not in SCHEMA["definitions"]["_Model"]["properties"]["base"]  # no pydantic titles


def test_every_yaml_twin_and_zoo_conversion_validates(zoo_yaml):
    texts = {p.name: p.read_text() for p in TWINS} | {"docs/yaml.md": docs_example()} | zoo_yaml
    assert len(TWINS) >= 2
    for name, text in texts.items():
        assert composer_accepts(text), name
        errors = [e.message for e in VALIDATOR.iter_errors(load(text))]
        assert not errors, (name, errors[:3])


def test_the_zoo_sample_uses_every_form(zoo_yaml):
    """The converted zoo files exercise every key the YAML form has (so a form the schema got
    wrong would show above): statements, stage items, model keys, parallel and repeat forms."""
    used = set()

    def walk(node):
        if isinstance(node, dict):
            used.update(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for text in zoo_yaml.values():
        walk(load(text))
    keys = set()
    for d in SCHEMA["definitions"].values():
        if not d.get("description", "").startswith(("op ", "part ", "loss ")):
            keys |= set(d.get("properties", {}))
    # written by hand in the twins / never written by `convert` (doc keys, the [a, b] range, `in`)
    assert keys - used <= {"doc", "when", "shortcut", "body", "in", "imports", "value"} | {"blocks"} - used


def test_op_names_complete_with_docs_and_parameters():
    expression = SCHEMA["definitions"]["expression"]
    snippets = {s["label"]: s for s in expression["defaultSnippets"]}
    assert set(snippets) == set(OPS)
    conv = snippets["conv"]
    assert conv["body"] == "^conv(${1:out})"  # the required parameter (docs/ops.md: `out` required)
    assert "| `stride` | int \\| list[int] | `1` | >= 1 |" in conv["markdownDescription"]
    assert snippets["relu"]["body"] == "^relu"
    params = SCHEMA["definitions"]["op.conv"]
    assert params["required"] == ["out"] and params["properties"]["groups"]["minimum"] == 1
    # a statement string and a value string are expressions: they offer the ops
    assert {"$ref": "#/definitions/expression"} in SCHEMA["definitions"]["statement"]["anyOf"]
    assert {"$ref": "#/definitions/expression"} in SCHEMA["definitions"]["Value"]["anyOf"]


GOOD = "models:\n  m:\n    input: image(3, 32)\n    stem: conv(8, 3)\n    head: [global_pool, classifier(10)]\n"
# Each refused by the schema and by composer (yaml_read's own tests check composer's messages).
BAD = [
    "- a list\n- at the top\n",
    "just a string\n",
    "modles: {}\n",
    "models: []\n",
    "models:\n  m:\n    stemm: conv(8)\n",
    "models:\n  1bad: {}\n",
    "models:\n  m:\n    params: [1, 2]\n",
    "models:\n  m:\n    params: {bad name: 1}\n",
    "models:\n  m:\n    base: 3\n",
    "models:\n  m:\n    reference: 3\n",
    "models:\n  m:\n    stem: {residual: []}\n",
    "models:\n  m:\n    stem: [{residul: [relu]}]\n",
    "models:\n  m:\n    stem: [{save: x, from: y}]\n",
    "models:\n  m:\n    stem: [{save: 1x}]\n",
    "models:\n  m:\n    stem: [{parallel: {split: 2, branches: [relu]}}]\n",
    "models:\n  m:\n    stem: [{parallel: [relu]}]\n",
    "models:\n  m:\n    stem: [{reuse: 'stages..0'}]\n",
    "models:\n  m:\n    stem: [{bind: []}]\n",
    "models:\n  m:\n    stem: [3]\n",
    "models:\n  m:\n    stages: [{for: i, range: [0], body: []}]\n",
    "models:\n  m:\n    stages: [{range: 0..4}]\n",
    "models:\n  m:\n    stages: [{body: [relu]}]\n",
    "models:\n  m:\n    stages: [{body: [{repeat: 2, as: 1}]}]\n",
    "models:\n  m:\n    stages: [{body: [{downsample: 3}]}]\n",
    "models:\n  m:\n    stages: {body: []}\n",
    "blocks:\n  b: {params: {}}\n",
    "blocks:\n  b: {body: relu}\n",
    "blocks:\n  b: {body: [], doc: [x]}\n",
    "mixers:\n  b: {body: [], extra: 1}\n",
    "imports: [1]\n",
    "doc: [a]\n",
]


@pytest.mark.parametrize("text", BAD)
def test_bad_documents_are_refused_by_both(text):
    assert not VALIDATOR.is_valid(load(text)), text
    assert not composer_accepts(text), text


def test_the_good_document_is_accepted_by_both():
    assert VALIDATOR.is_valid(load(GOOD)) and composer_accepts(GOOD)
    assert VALIDATOR.is_valid(None) and composer_accepts("")  # an empty file is an empty blueprint


# ---- mutations of a valid document -------------------------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(-2, 2, allow_nan=False),
                    st.sampled_from(["relu", "conv(8, 3)", "1bad", "x y", "0..4", "i", ""]),
                    st.lists(st.sampled_from(["relu", "identity", 2]), max_size=2),
                    st.dictionaries(st.sampled_from(["let", "body", "for", "in", "residual", "save", "x"]),
                                    st.sampled_from(["relu", "i", 1]), max_size=2))
_KEYS = st.sampled_from(["let", "body", "block", "repeat", "as", "for", "range", "in", "merge", "branches",
                         "split", "residual", "parallel", "save", "from", "reuse", "bind", "value", "stem", "head",
                         "stages", "params", "base", "set", "input", "downsample", "after", "stemm", "1x"])


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


@st.composite
def mutants(draw, base):
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))[1:]))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        how = draw(st.sampled_from(["replace", "delete", "add_key", "rename", "wrap"]))
        last = path[-1]
        if how == "replace":
            parent[last] = draw(_VALUES)
        elif how == "delete":
            del parent[last]
        elif how == "wrap":
            parent[last] = [parent[last]]
        elif isinstance(parent, dict):
            key = draw(_KEYS)
            if how == "add_key":
                parent[key] = draw(_VALUES)
            elif key not in parent:
                parent[key] = parent.pop(last)
    return doc


_BASE = load("""
models:
  m:
    params: {dims: [8, 16], depth: 1}
    input: image(3, 32)
    stem: ["conv(dims[0], 3) as proj", {let: {w: 2}}, {residual: [relu]}]
    stages:
      - for: i
        range: 0..2
        body:
          - downsample: "i > 0 ? conv(dims[i], 2, stride = 2) : none"
          - repeat: depth
            as: j
            body: [{parallel: {merge: add, branches: [identity, ["conv(dims[i], 3)"]]}}, {save: s}, {from: s}]
      - body: [{block: relu}, {after: layernorm}]
    head: [global_pool, classifier(10)]
  n:
    base: m
    set: {depth: 2}
blocks:
  b:
    params: {dim: null}
    body: [{bind: q, value: linear(dim)}, {parallel: {merge: concat, for: r, in: "[1, 2]", body: [relu]}}]
""")


def test_the_mutation_base_is_valid():
    assert VALIDATOR.is_valid(_BASE) and composer_accepts(yaml.safe_dump(_BASE, sort_keys=False))


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mutants(_BASE))
def test_what_the_schema_refuses_composer_refuses(doc):
    text = yaml.safe_dump(doc, sort_keys=False)
    if load(text) != doc:  # a value YAML 1.1 and 1.2 read differently: not this test's subject
        return
    if not VALIDATOR.is_valid(doc):
        assert not composer_accepts(text), text


def test_cli_schema_writes_the_same_schema(tmp_path, capsys):
    from composer.cli import main

    out = tmp_path / "arch.schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == SCHEMA
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1]) == SCHEMA  # after the "wrote" line
